"""The data contracts shared by the pipeline (writer) and the cache (reader): the ground floor."""

from schemas.errors import (
    ActcacheError,
    CacheError,
    CheckpointError,
    ConfigError,
    ModelError,
    ModelNotAvailableError,
    QuantizationUnsupportedError,
    UnknownModelError,
    UnsafeCheckpointError,
)
from schemas.model import ARCHS, ModelOutputs, ModelSpec, parse_arch, parse_dtype_name

__all__ = [
    "ARCHS",
    "ActcacheError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "ModelError",
    "ModelNotAvailableError",
    "ModelOutputs",
    "ModelSpec",
    "QuantizationUnsupportedError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "parse_arch",
    "parse_dtype_name",
]
