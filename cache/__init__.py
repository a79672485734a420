"""The content-addressed Zarr activation store: keys, layout, shard commits, lazy reading.

>>> from cache import open_activations
>>> acts = open_activations(model="minilm-l6", data="sample")   # doctest: +SKIP
>>> acts.pooled(layer=-1).mean(axis=0).compute()
"""

from cache.catalog import StoreInfo, find_store, gc, list_stores, read_manifest, remove_store, store_bytes
from cache.integrity import VerifyReport, verify
from cache.keys import cache_key, canonical_json
from cache.paths import alias_name, cache_root, store_path
from cache.reader import Activations, Example, open_activations
from cache.writer import StoreWriter

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
