"""The project's error hierarchy: one base, small families, builtins mixed in where they fit.

    ActcacheError
    ├── ConfigError (ValueError)                  bad option: dtype, device, arch, spec field
    ├── DatasetError
    │   ├── DatasetNotAvailableError (FileNotFoundError)
    │   │                                         not registered, not a file, not in the local cache while offline
    │   └── DatasetIOError (OSError)              disk full, file-size limit or permission denied reading a
    │                                             dataset or writing its Arrow copy (`errno` is the cause's)
    ├── Interrupted                               a run stopped by Ctrl-C or SIGTERM; committed shards kept
    ├── WorkerError                               a Dask worker could not run a shard (model load, death); names it
    ├── ModelError
    │   ├── UnknownModelError (LookupError)       not a registry key nor a model directory
    │   ├── ModelNotAvailableError (FileNotFoundError)
    │   │                                         not in the local Hugging Face cache while offline
    │   ├── CheckpointError                       a directory that cannot be loaded as a checkpoint
    │   │   └── UnsafeCheckpointError             only pickle weights / remote code, not allowed
    │   └── QuantizationUnsupportedError (RuntimeError)
    │                                             bitsandbytes missing or not usable on the device
    └── CacheError                                the activation store
        ├── StoreNotFoundError (FileNotFoundError) no store for a key, alias or path
        │   └── NotAStoreError                    a directory without actcache's signature (never removed)
        ├── IncompleteStoreError                  shards still missing (allow_partial reads the rest)
        ├── ShardClaimedError                     another live process is writing that shard
        ├── StoreInUseError                       a live writer holds the store's lease: rm, gc refuse to remove it
        ├── StoreCorruptError                     manifest, marker or chunk fails its checksum
        ├── SchemaVersionError                    written by a schema version we cannot read
        ├── LayoutMismatchError (ValueError)      data that does not fit the store's layout
        ├── UnsafePathError                       a path actcache will not follow or delete (a symbolic link)
        ├── CacheDirError (OSError)               the cache dir cannot be created or written
        └── StoreFullError (OSError)              the disk (or a file-size limit) ran out mid-write

Every message names the offending value and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ActcacheError",
    "CacheDirError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DatasetIOError",
    "DatasetNotAvailableError",
    "IncompleteStoreError",
    "Interrupted",
    "LayoutMismatchError",
    "ModelError",
    "ModelNotAvailableError",
    "NotAStoreError",
    "QuantizationUnsupportedError",
    "SchemaVersionError",
    "ShardClaimedError",
    "StoreCorruptError",
    "StoreFullError",
    "StoreInUseError",
    "StoreNotFoundError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "UnsafePathError",
    "WorkerError",
]


class ActcacheError(Exception):
    """Base of every error actcache raises on purpose."""


class ConfigError(ActcacheError, ValueError):
    """An option or spec field has a value actcache cannot use."""


class Interrupted(ActcacheError):
    """A run was stopped by a signal (Ctrl-C, SIGTERM); committed shards are kept, rerun to continue."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class WorkerError(ActcacheError):
    """A Dask worker could not run a shard (the model did not load, the worker died); committed shards are kept."""


class DatasetError(ActcacheError):
    """A dataset could not be found or read."""


class DatasetNotAvailableError(DatasetError, FileNotFoundError):
    """The dataset is neither registered, nor a local file, nor loadable from the Hub or its cache."""


class DatasetIOError(DatasetError, OSError):
    """The system refused a read or write of a dataset (no space, a file-size limit, no permission).

    `errno` is the refused call's (ENOSPC, EFBIG, EACCES, ...), so callers can test it as for any OSError.
    """


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


class StoreNotFoundError(CacheError, FileNotFoundError):
    """No store for that key, alias or path."""


class NotAStoreError(StoreNotFoundError):
    """A directory without actcache's signature: never read, repaired or removed as a store."""


class IncompleteStoreError(CacheError):
    """The store still has shards to write; `allow_partial=True` reads the done ones."""


class ShardClaimedError(CacheError):
    """Another live process is writing that shard."""


class StoreInUseError(CacheError):
    """A live process holds the store's writer lease: it is not removed from under that writer."""


class StoreCorruptError(CacheError):
    """A manifest, marker or chunk does not match what was committed."""


class SchemaVersionError(CacheError):
    """The store was written by a schema version this actcache cannot read."""


class LayoutMismatchError(CacheError, ValueError):
    """Data handed to the writer does not fit the store's layout."""


class UnsafePathError(CacheError):
    """A path actcache will not follow or delete: a symbolic link where a store should be."""


class CacheDirError(CacheError, OSError):
    """The cache root cannot be created or written."""


class StoreFullError(CacheError, OSError):
    """No space left (or a file-size limit hit) while writing; free space and rerun to resume."""
