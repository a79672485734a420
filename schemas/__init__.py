"""The data contracts shared by the pipeline (writer) and the cache (reader): the ground floor."""

from schemas.errors import (
    ActcacheError,
    CacheError,
    CheckpointError,
    ConfigError,
    IncompleteStoreError,
    LayoutMismatchError,
    ModelError,
    ModelNotAvailableError,
    QuantizationUnsupportedError,
    SchemaVersionError,
    ShardClaimedError,
    StoreCorruptError,
    StoreNotFoundError,
    UnknownModelError,
    UnsafeCheckpointError,
)
from schemas.model import ARCHS, ModelOutputs, ModelSpec, parse_arch, parse_dtype_name
from schemas.request import ExtractionRequest, OutputSpec

__all__ = [
    "ARCHS",
    "ActcacheError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "ExtractionRequest",
    "IncompleteStoreError",
    "LayoutMismatchError",
    "ModelError",
    "ModelNotAvailableError",
    "ModelOutputs",
    "ModelSpec",
    "OutputSpec",
    "QuantizationUnsupportedError",
    "SchemaVersionError",
    "ShardClaimedError",
    "StoreCorruptError",
    "StoreNotFoundError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "parse_arch",
    "parse_dtype_name",
]
