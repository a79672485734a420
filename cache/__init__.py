"""The content-addressed Zarr activation store: keys, layout, shard commits, lazy reading.

>>> from cache import open_activations
>>> acts = open_activations(model="minilm-l6", data="sample")   # doctest: +SKIP
>>> acts.pooled(layer=-1).mean(axis=0).compute()

Names are imported on first use, so `import cache` (and the CLI's `--help`) costs no numpy or zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cache.catalog import StoreInfo, find_store, list_stores, read_manifest, remove_store, store_bytes
    from cache.cleanup import gc
    from cache.integrity import VerifyReport, verify
    from cache.keys import cache_key, canonical_json
    from cache.paths import alias_name, cache_root, store_path
    from cache.reader import Activations, Example, open_activations
    from cache.writer import StoreWriter

_HOME = {
    "Activations": "cache.reader",
    "Example": "cache.reader",
    "StoreInfo": "cache.catalog",
    "StoreWriter": "cache.writer",
    "VerifyReport": "cache.integrity",
    "alias_name": "cache.paths",
    "cache_key": "cache.keys",
    "cache_root": "cache.paths",
    "canonical_json": "cache.keys",
    "find_store": "cache.catalog",
    "gc": "cache.cleanup",
    "list_stores": "cache.catalog",
    "open_activations": "cache.reader",
    "read_manifest": "cache.catalog",
    "remove_store": "cache.catalog",
    "store_bytes": "cache.catalog",
    "store_path": "cache.paths",
    "verify": "cache.integrity",
}
__all__ = [
    "Activations",
    "Example",
    "StoreInfo",
    "StoreWriter",
    "VerifyReport",
    "alias_name",
    "cache_key",
    "cache_root",
    "canonical_json",
    "find_store",
    "gc",
    "list_stores",
    "open_activations",
    "read_manifest",
    "remove_store",
    "store_bytes",
    "store_path",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
