"""A new store's skeleton (group, empty arrays, metadata table, manifest), made whole aside and renamed into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cache.files import json_ready, write_json
from cache.zattrs import consolidate, create_arrays
from schemas.manifest import Manifest
from schemas.store import INCOMPLETE_SUFFIX, MANIFEST_ATTR, MANIFEST_FILE, SHARDS_DIR

__all__ = ["create_store"]


def create_store(path: Path, manifest: Manifest, examples: Mapping[str, Sequence[Any]] | None) -> None:
    """Create the store `manifest` describes at `path`: built in a sibling `*.incomplete` directory and
    renamed into place, so a store directory is never half made. Call it holding the store's lock."""
    import zarr

    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{INCOMPLETE_SUFFIX}")
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        create_arrays(group, manifest, examples)
        # A second copy of what never changes after creation: verify rebuilds a lost manifest from it.
        group.attrs[MANIFEST_ATTR] = json_ready(manifest.to_dict())
        consolidate(tmp)
        (tmp / SHARDS_DIR).mkdir()
        write_json(tmp / MANIFEST_FILE, manifest.to_dict())
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
