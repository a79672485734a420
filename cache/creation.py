"""A new store's skeleton (group, empty arrays, metadata table, manifest), never seen half made.

On a disk it is built in a sibling `*.incomplete` directory and renamed into place. An
object store has no rename: there it is written in place with `manifest.json` last, and a
store without one is a creation that stopped midway, cleared and made again by the next
writer (which holds the store's lease object, so no one else is making it).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from cache.files import json_ready, remove_tree, write_json
from cache.paths import is_local
from cache.zattrs import ExampleColumns, consolidate, create_arrays
from schemas.manifest import Manifest
from schemas.store import INCOMPLETE_SUFFIX, MANIFEST_ATTR, MANIFEST_FILE, SHARDS_DIR

__all__ = ["create_store", "created"]


def created(path: Path) -> bool:
    """Whether a store was made at `path`: the directory on a disk, its manifest on an object store."""
    return path.exists() if is_local(path) else (path / MANIFEST_FILE).exists()


def create_store(path: Path, manifest: Manifest, examples: ExampleColumns | None) -> None:
    """Create the store `manifest` describes at `path`. Call it holding the store's lock (and its lease)."""
    if not is_local(path):
        if path.exists():  # objects of a creation that stopped before its manifest
            remove_tree(path)
        _build(path, manifest, examples)
        write_json(path / MANIFEST_FILE, manifest.to_dict())  # last: the store exists from here on
        return
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{INCOMPLETE_SUFFIX}")
    try:
        _build(tmp, manifest, examples)
        (tmp / SHARDS_DIR).mkdir()
        write_json(tmp / MANIFEST_FILE, manifest.to_dict())
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(path: Path, manifest: Manifest, examples: ExampleColumns | None) -> None:
    """The group, its arrays and example table, the creation copy of the manifest; consolidated."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    create_arrays(group, manifest, examples)
    # A second copy of what never changes after creation: verify rebuilds a lost manifest from it.
    group.attrs[MANIFEST_ATTR] = json_ready(manifest.to_dict())
    consolidate(path)
