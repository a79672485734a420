"""Shard commit markers and their checksums: what `verify` recomputes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

# One way only: the catalog (finding stores, which shards are committed) sits below verify, which finds
# the store it checks through it. `committed` and `marker_path` are re-exported here, where they were.
from cache.catalog import committed, find_store, marker_path, read_manifest
from cache.files import flocked, lock_path, read_json, write_json
from cache.lease import writer_lease
from cache.zattrs import set_complete, zarr_group
from schemas import CacheError, StoreCorruptError, StoreNotFoundError
from schemas.arrays import ArraySpec
from schemas.geometry import Geometry, ShardRange
from schemas.manifest import Manifest
from schemas.store import MANIFEST_ATTR, MANIFEST_FILE, SHARD_COMMITTED, chunk_key

__all__ = [
    "CHECKSUM",
    "VerifyReport",
    "array_checksums",
    "checksum_bytes",
    "checksum_file",
    "committed",
    "marker_path",
    "read_marker",
    "shard_checksums",
    "stored_checksums",
    "verify",
    "verify_store",
]


# A marker records each chunk file's own CRC32C (the 4 bytes zarr's crc32c codec ends it with):
# the writer reads back 4 bytes a file, not the file, and verify recomputes the CRC over the
# file's body (catching a flipped byte or a torn write) and compares it with the marker (catching
# a whole, valid chunk from another write). Markers name their algorithm; format-2 stores
# written before hashed the whole file with XXH3-128.
CHECKSUM = "crc32c"
_HASHES: dict[str, Callable[[Any], str]] = {  # a chunk file's bytes in, hex digest out
    "crc32c": lambda data: _crc32c_of_file(np.frombuffer(data, dtype=np.uint8)),
    "xxh3_128": lambda data: xxhash.xxh3_128_hexdigest(data),
}


def _crc32c_of_file(data: np.ndarray) -> str:
    """The CRC32C a chunk file ends with, when its body matches it; else what the body hashes to, marked bad."""
    import google_crc32c

    body, stored = (data[:-4], data[-4:].tobytes().hex()) if data.size >= 4 else (data, "")
    computed = int(google_crc32c.value(body)).to_bytes(4, "little").hex()
    return stored if stored == computed else f"bad body {computed}"


def checksum_bytes(data: bytes | memoryview, algorithm: str = CHECKSUM) -> str:
    """The checksum of a chunk file's bytes (as written or as read back)."""
    return _HASHES[algorithm](data)


def checksum_file(path: Path, algorithm: str = CHECKSUM) -> str | None:
    """The checksum of a chunk file's bytes; None when the file is absent."""
    try:
        with path.open("rb") as fh:  # a local file or, through fsspec, an object
            return checksum_bytes(fh.read(), algorithm)
    except FileNotFoundError:
        return None


def stored_checksums(store: Path, spec: ArraySpec, shard: ShardRange, geometry: Geometry) -> dict[str, str | None]:
    """The CRC32C each chunk file of `spec` that `shard` owns ends with, as just written (None: absent)."""
    checksums: dict[str, str | None] = {}
    for key in spec.shard_chunks(shard, geometry):
        try:
            with (store / spec.name / key).open("rb") as fh:  # a file or, through fsspec, an object
                fh.seek(-4, os.SEEK_END)
                checksums[key] = fh.read(4).hex()
        except FileNotFoundError:
            checksums[key] = None
    return checksums


def array_checksums(
    store: Path, spec: ArraySpec, shard: ShardRange, geometry: Geometry, algorithm: str = CHECKSUM
) -> dict[str, str | None]:
    """Checksums of the chunk files of array `spec` that `shard` owns, read back from disk."""
    return {key: checksum_file(store / spec.name / key, algorithm) for key in spec.shard_chunks(shard, geometry)}


def shard_checksums(
    store: Path, manifest: Manifest, shard: ShardRange, algorithm: str = CHECKSUM
) -> dict[str, dict[str, str | None]]:
    """Checksums of every chunk file `shard` owns, by array and chunk key."""
    return {spec.name: array_checksums(store, spec, shard, manifest.geometry, algorithm) for spec in manifest.arrays}


def read_marker(store: Path, shard: ShardRange) -> dict[str, Any] | None:
    """The shard's marker if it is there and names this shard's ranges; None if absent."""
    path = marker_path(store, shard.index)
    if not path.is_file():
        return None
    marker = read_json(path, f"marker of shard {shard.index}")
    if not isinstance(marker, dict) or marker.get("range") != shard.to_dict():
        raise StoreCorruptError(f"marker of shard {shard.index} does not describe that shard")
    return marker


@dataclass
class VerifyReport:
    """What `verify` found: done shards, missing ones, and corrupt ones with what is wrong."""

    key: str
    path: Path
    n_shards: int
    done: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    corrupt: dict[int, list[str]] = field(default_factory=dict)
    reset: list[int] = field(default_factory=list)
    manifest_error: str | None = None
    manifest_rebuilt: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt and self.manifest_error is None

    def summary(self) -> str:
        lines = [f"store {self.key}: {len(self.done)}/{self.n_shards} shards verified"]
        if self.manifest_error:
            lines.append(f"  manifest corrupt: {self.manifest_error}")
            if self.manifest_rebuilt:
                lines.append("  manifest rebuilt (incomplete) from the copy kept at creation")
        if self.missing:
            lines.append(f"  missing (never committed): shards {_ranges(self.missing)}")
        for index, problems in sorted(self.corrupt.items()):
            shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
            lines.append(f"  corrupt shard {index}: {shown}")
        if self.reset:
            lines.append(f"  reset to pending: shards {_ranges(self.reset)} (rerun the same extract to redo them)")
        return "\n".join(lines)


def verify_store(store: Path, manifest: Manifest) -> VerifyReport:
    """Recompute every committed shard's chunk checksums against its marker."""
    report = VerifyReport(manifest.key, store, len(manifest.geometry.shards))
    for shard in manifest.geometry.shards:
        try:
            marker = read_marker(store, shard)
        except StoreCorruptError as exc:
            report.corrupt[shard.index] = [str(exc)]
            continue
        if marker is None:
            report.missing.append(shard.index)
            continue
        algorithm = marker.get("checksum")
        if algorithm not in _HASHES:
            report.corrupt[shard.index] = [f"marker names unknown checksum {algorithm!r}"]
            continue
        problems = _compare(marker.get("checksums", {}), shard_checksums(store, manifest, shard, algorithm))
        if problems:
            report.corrupt[shard.index] = problems
        else:
            report.done.append(shard.index)
    return report


def _compare(recorded: dict[str, dict[str, str | None]], actual: dict[str, dict[str, str | None]]) -> list[str]:
    problems = []
    for array, chunks in actual.items():
        for key, digest in chunks.items():
            expected = recorded.get(array, {}).get(key, "unrecorded")
            if digest == expected:
                continue
            if digest is None:
                problems.append(f"{array}/{key} is missing")
            else:
                problems.append(f"{array}/{key} checksum mismatch")
    return problems


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, value in enumerate(sorted(indices)):
        if start is None:
            start = value
        nxt = sorted(indices)[i + 1] if i + 1 < len(indices) else None
        if nxt != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def verify(ref: str | os.PathLike[str], root: Path | None = None, *, reset: bool = False) -> VerifyReport:
    """Recompute the checksums of store `ref` (key, alias or path) and report by shard.

    With `reset`, corrupt shards lose their markers (they become pending, so the next run
    of the same extract redoes exactly them) and a complete store is marked incomplete; a
    corrupt or missing manifest is rebuilt, incomplete, from the copy kept at creation. On
    an object store the reset holds the store's lease object: refused while a run writes.
    """
    path = find_store(ref, root)
    manifest_error = None
    try:
        manifest = read_manifest(path)
    except (StoreCorruptError, StoreNotFoundError) as exc:
        manifest_error = str(exc)
        manifest = _creation_manifest(path)
    report = verify_store(path, manifest)
    report.manifest_error = manifest_error
    if reset and (report.corrupt or manifest_error):
        # The writer lease: on an object store, where nothing else serializes writers, a run writing the
        # store refuses this reset (and is refused by it) rather than commit beside it.
        with writer_lease(path), flocked(lock_path(path)):
            set_complete(path, False)  # first: a crash below must not leave zarr readers a complete store
            for index in sorted(report.corrupt):
                (path / SHARD_COMMITTED / chunk_key((index,))).unlink(missing_ok=True)  # zarr readers see it too
                marker_path(path, index).unlink(missing_ok=True)
                report.reset.append(index)
            if manifest.complete or manifest_error:
                write_json(path / MANIFEST_FILE, manifest.with_(complete=False, completed_at=None).to_dict())
                report.manifest_rebuilt = manifest_error is not None
    return report


def _creation_manifest(path: Path) -> Manifest:
    try:
        copy = zarr_group(path).attrs[MANIFEST_ATTR]
        return Manifest.from_dict(dict(copy))  # type: ignore[arg-type]
    # No group (zarr's errors are ValueErrors; a missing file an OSError), no copy (KeyError), a mangled
    # copy (TypeError, or the manifest's own errors): nothing left to rebuild from.
    except (KeyError, TypeError, ValueError, OSError, CacheError) as exc:
        raise StoreCorruptError(
            f"the manifest of {str(path)!r} is unreadable and its creation copy is gone too ({exc}). "
            "Fix: remove the store (actcache rm) and extract again."
        ) from None
