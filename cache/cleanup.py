"""Clean-up (`actcache gc`): remove what is provably abandoned and untouched for days; report the rest.

A store goes only when its manifest (readable, of this schema version) says incomplete, a
shard is still missing, nothing touched it since the cutoff and no live writer holds its
lease (decided again under the lease). Anything gc cannot read it reports and leaves, with
the command that repairs it. Tokenized and Arrow copies of data are rebuilt when needed.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cache.catalog import committed, delete_leased, read_manifest
from cache.files import file_stats, lock_path, try_flock
from cache.lease import exclusive_lease
from cache.paths import cache_root, require_local
from cache.zattrs import store_version
from schemas import (
    ConfigError,
    NotAStoreError,
    SchemaVersionError,
    StoreCorruptError,
    StoreInUseError,
    StoreNotFoundError,
)
from schemas.store import (
    DATASETS_DIR,
    INCOMPLETE_SUFFIX,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    STORE_SUFFIX,
    STORES_DIR,
    TOKENIZED_DIR,
    ZARR_JSON,
)

__all__ = ["GcResult", "KeptStore", "gc"]


@dataclass(frozen=True)
class KeptStore:
    """A directory under stores/ that `gc` left although it is old enough: why, and what to do about it."""

    path: Path
    reason: str


@dataclass(frozen=True)
class GcResult:
    """What `gc` did: the paths it removed, and what it left because it could not prove it abandoned."""

    removed: tuple[Path, ...] = ()
    kept: tuple[KeptStore, ...] = ()


def gc(older_than_days: float, root: Path | None = None, *, formats: Sequence[int] = ()) -> GcResult:
    """Remove what is provably abandoned and untouched for `older_than_days`, and the stores of older `formats`.

    Removed: stores whose manifest (readable, of this schema version) says incomplete and that no
    live writer holds; crashed creations (`*.incomplete` directories) no creation holds; the
    tokenized copies and datasets' Arrow copies of local files (rebuilt when needed); and, at any
    age, every store of a schema version in `formats` (older ones, which this actcache cannot read).
    Kept and reported, with why: a store whose manifest is lost or corrupt (`actcache verify KEY`
    rebuilds it), of a newer or another format, held by a live writer, or not a store at all.

    >>> result = gc(7)                                  # doctest: +SKIP
    >>> [(k.path.name, k.reason) for k in result.kept]  # doctest: +SKIP
    """
    root = root or cache_root()
    cutoff = dt.datetime.now().timestamp() - older_than_days * 86400
    require_local(root, "clean up")
    if SCHEMA_VERSION in formats:
        raise ConfigError(
            f"gc --format {SCHEMA_VERSION} would remove readable stores of this actcache's own format. "
            "Fix: remove one with `actcache rm KEY`; --format takes older formats only."
        )
    newer = sorted(v for v in formats if v > SCHEMA_VERSION)
    if newer:
        raise ConfigError(
            f"gc --format {newer[0]} would remove the stores of a newer actcache (this one writes format "
            f"{SCHEMA_VERSION}). Fix: remove one with `actcache rm KEY`, or run gc from that actcache; "
            "--format takes older formats only."
        )
    if not math.isfinite(older_than_days) or older_than_days < 0:
        raise ConfigError(f"gc needs an age of 0 days or more, got {older_than_days!r}")
    removed: list[Path] = []
    kept: list[KeptStore] = []
    for name in (TOKENIZED_DIR, DATASETS_DIR):
        if (root / name).is_dir() and not (root / name).is_symlink():
            for entry in sorted((root / name).iterdir()):
                if entry.is_symlink() or _newest_mtime(entry) > cutoff:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    if (root / STORES_DIR).is_symlink():  # never through a link
        return GcResult(tuple(removed))
    for path in sorted((root / STORES_DIR).glob("*")):
        if path.is_symlink() or not path.is_dir():  # never through a link; lock files are not stores
            continue
        if path.name.endswith(STORE_SUFFIX) and store_version(path) in formats:  # asked for by name: any age
            reason = _remove_if(path, root, lambda: None)
        elif _newest_mtime(path) > cutoff:
            continue
        elif path.name.endswith(INCOMPLETE_SUFFIX):
            reason = _remove_creation(path, cutoff)
        elif path.name.endswith(STORE_SUFFIX):
            reason = _why_not_abandoned(path, cutoff)
            if reason is None:  # a candidate: decided again under the lease, which no live writer holds
                reason = _remove_if(path, root, functools.partial(_why_not_abandoned, path, cutoff))
        else:
            reason = f"not an actcache store (its name does not end in {STORE_SUFFIX!r}): left alone"
        if reason is None:
            removed.append(path)
        elif reason != _NO_NEWS:
            kept.append(KeptStore(path, reason))
    return GcResult(tuple(removed), tuple(kept))


# What gc's helpers say about a directory: None, removed; `_NO_NEWS`, left and not worth a report (a complete
# store, one touched since the cutoff); any other text, left, and that is why.
_NO_NEWS = ""
_NOT_OURS = f"not an actcache store: its {ZARR_JSON} does not carry actcache's signature; left alone"


def _remove_if(path: Path, root: Path, why_not: Callable[[], str | None]) -> str | None:
    """Remove the store at `path` under its exclusive lease, unless `why_not()`, asked under the lease, says
    why not (a writer may have finished or touched it since we looked); the verdict (see `_NO_NEWS`)."""
    try:
        with exclusive_lease(path):
            reason = why_not()
            if reason is None:
                delete_leased(path, root)
            return reason
    except StoreInUseError as exc:
        return str(exc)


def _why_not_abandoned(path: Path, cutoff: float) -> str | None:
    """None if the store at `path` is provably incomplete and untouched since `cutoff`; else why gc keeps it."""
    key = path.name.removesuffix(STORE_SUFFIX)
    version = store_version(path)
    if version is None:
        return _NOT_OURS
    if version > SCHEMA_VERSION:
        return f"written by a newer actcache (format {version}; this one writes format {SCHEMA_VERSION}); left alone"
    if version != SCHEMA_VERSION:
        return (
            f"of format {version}, which this actcache cannot read; "
            f"remove such stores with `actcache gc --format {version}`"
        )
    verify = f"run `actcache verify {key}`, which rebuilds it from the copy kept at creation"
    try:
        manifest = read_manifest(path)
    except NotAStoreError:  # its signature went since we looked
        return _NOT_OURS
    except StoreNotFoundError:
        return f"its {MANIFEST_FILE} is missing, so gc cannot tell whether it is complete; {verify}"
    except StoreCorruptError:
        return f"its {MANIFEST_FILE} is corrupt, so gc cannot tell whether it is complete; {verify}"
    except SchemaVersionError:
        return f"its {MANIFEST_FILE} names a schema version this actcache cannot read; {verify}"
    if manifest.complete or _newest_mtime(path) > cutoff:
        return _NO_NEWS
    if len(committed(path, manifest.geometry.shards)) == len(manifest.geometry.shards):
        # All its data is there (a crash before finalize, or a manifest verify rebuilt): not abandoned work.
        return (
            "every shard is committed, but the store was never marked complete; run its extract again to finish "
            f"it (no shard is recomputed), or remove it with `actcache rm {key}`"
        )
    return None


def _remove_creation(path: Path, cutoff: float) -> str | None:
    """Remove a creation's temp directory (`<key>.zarr.<hex>.incomplete`) unless a creation holds the store's lock."""
    store = path.with_name(path.name.removesuffix(INCOMPLETE_SUFFIX).rsplit(".", 1)[0])
    if not store.name.endswith(STORE_SUFFIX):
        return f"not a store creation of actcache (no {STORE_SUFFIX!r} in its name): left alone"
    fd = try_flock(lock_path(store))  # what StoreWriter holds while it creates the store
    if fd is None:
        return (
            f"a live process holds the lock of store {store.name.removesuffix(STORE_SUFFIX)} (creating, finalizing "
            "or verifying it): left alone"
        )
    try:
        if _newest_mtime(path) > cutoff:  # again under the lock
            return _NO_NEWS
        shutil.rmtree(path, ignore_errors=True)
        return None
    finally:
        os.close(fd)


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    return max(newest, max((st.st_mtime for st in file_stats(path)), default=newest))
