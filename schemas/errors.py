"""The project's error hierarchy: one base, small families, builtins mixed in where they fit.

    ActcacheError
    ├── ConfigError (ValueError)                  bad option: dtype, device, arch, spec field
    ├── ModelError
    │   ├── UnknownModelError (LookupError)       not a registry key nor a model directory
    │   ├── ModelNotAvailableError (FileNotFoundError)
    │   │                                         not in the local Hugging Face cache while offline
    │   ├── CheckpointError                       a directory that cannot be loaded as a checkpoint
    │   │   └── UnsafeCheckpointError             only pickle weights / remote code, not allowed
    │   └── QuantizationUnsupportedError (RuntimeError)
    │                                             bitsandbytes missing or not usable on the device
    └── CacheError                                the activation store (see ``cache``)

Every message names the offending value and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ActcacheError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "ModelError",
    "ModelNotAvailableError",
    "QuantizationUnsupportedError",
    "UnknownModelError",
    "UnsafeCheckpointError",
]


class ActcacheError(Exception):
    """Base of every error actcache raises on purpose."""


class ConfigError(ActcacheError, ValueError):
    """An option or spec field has a value actcache cannot use."""


class ModelError(ActcacheError):
    """A model could not be resolved or loaded."""


class UnknownModelError(ModelError, LookupError):
    """The name is neither a registry key nor an existing model directory."""

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotAvailableError(ModelError, FileNotFoundError):
    """The model is not in the local Hugging Face cache and downloads are off."""


class CheckpointError(ModelError):
    """A model directory exists but is not a loadable checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """Loading would run code from the checkpoint (pickle weights, remote code)."""


class QuantizationUnsupportedError(ModelError, RuntimeError):
    """bitsandbytes quantization was asked for where it cannot run."""


class CacheError(ActcacheError):
    """Base of the activation store's errors."""
