"""The catalog of a cache root: finding a store (key, alias or path), its manifest and committed shards; ls, rm.

Removal goes through the store's writer lease (`cache.lease`): rm and gc refuse a store a
live writer holds, and hold the lease alone while they delete (`cache.cleanup` cleans up by age).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.files import file_stats, flocked, lock_path, read_json, remove_tree, write_json
from cache.keys import is_key
from cache.lease import exclusive_lease, writers_path
from cache.paths import alias_path, as_path, cache_root, is_local, store_path
from cache.zattrs import store_version
from schemas import (
    ActcacheError,
    NotAStoreError,
    StoreNotFoundError,
    UnsafePathError,
)
from schemas.geometry import ShardRange
from schemas.manifest import Manifest
from schemas.store import (
    ALIASES_DIR,
    FORMAT_NAME,
    MANIFEST_FILE,
    MARKER_SUFFIX,
    ROOT_ATTR,
    SCHEMA_VERSION,
    SHARDS_DIR,
    STORE_SUFFIX,
    STORES_DIR,
    ZARR_JSON,
)

__all__ = [
    "StoreInfo",
    "add_alias",
    "committed",
    "delete_leased",
    "find_store",
    "list_stores",
    "marker_path",
    "read_manifest",
    "remove_store",
    "signed",
    "store_bytes",
]


def signed(path: Path) -> Path:
    """`path`, if it carries actcache's signature (see `store_version`); else `NotAStoreError`.

    Nothing else makes a directory a store: actcache reads, repairs and removes only what it wrote.
    """
    if store_version(path) is None:
        raise NotAStoreError(
            f"{str(path)!r} is not an actcache store: its {ZARR_JSON} does not carry the root attribute "
            f"{ROOT_ATTR!r} naming format {FORMAT_NAME!r}, so actcache neither reads nor removes it. "
            "Fix: pass a key, an alias or a store path listed by `actcache ls`."
        )
    return path


def read_manifest(path: Path) -> Manifest:
    """The manifest of the store at `path` (`NotAStoreError` if `path` is not one)."""
    manifest_file = signed(path) / MANIFEST_FILE
    if not manifest_file.is_file():
        raise StoreNotFoundError(
            f"store {str(path)!r} has lost its {MANIFEST_FILE}. Fix: run `actcache verify` on it, which "
            "rebuilds the manifest from the copy kept at creation."
        )
    return Manifest.from_dict(read_json(manifest_file, "manifest"))


def marker_path(store: Path, index: int) -> Path:
    """The commit marker of shard `index` (its checksums: see `cache.integrity`)."""
    return store / SHARDS_DIR / f"{index:06d}{MARKER_SUFFIX}"


def committed(store: Path, shards: Iterable[ShardRange]) -> list[ShardRange]:
    """The shards of `shards` whose commit marker is there (verify decides whether to trust it)."""
    return [shard for shard in shards if marker_path(store, shard.index).is_file()]


def add_alias(root: Path, alias: str, key: str) -> None:
    """Record that `alias` names store `key` (most recent last)."""
    path = alias_path(root, alias)
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(lock_path(path)):
        keys = _alias_keys(path)
        keys = [k for k in keys if k != key] + [key]
        write_json(path, {"alias": alias, "keys": keys})


def _alias_keys(path: Path) -> list[str]:
    if not path.is_file():
        return []
    data = read_json(path, "alias file")
    return [k for k in data.get("keys", []) if isinstance(k, str) and is_key(k)]


def find_store(ref: str | os.PathLike[str], root: Path | None = None, *, complete_only: bool = False) -> Path:
    """The store directory named by a path, a key, or an alias (its newest store).

    With `complete_only`, an alias resolves to its newest *complete* store when it has one.
    """
    root = root or cache_root()
    text = os.fspath(ref)
    candidate = as_path(text)
    if text and ((candidate / ZARR_JSON).is_file() or (candidate / MANIFEST_FILE).is_file()):
        return signed(candidate)
    if is_key(text):
        path = store_path(root, text)
        if path.is_dir():
            return signed(path)
    keys = [k for k in _alias_keys(alias_path(root, text)) if store_path(root, k).is_dir()]
    if keys:
        if complete_only:
            complete = [k for k in keys if _is_complete(store_path(root, k))]
            keys = complete or keys
        return signed(store_path(root, keys[-1]))
    raise StoreNotFoundError(
        f"no store {text!r} in {str(root)!r}: not a store path, key or alias there. "
        "Fix: `actcache ls` lists what is cached (pass --cache-dir or set ACTCACHE_DIR for "
        "another root), or run `actcache extract` to make it."
    )


def _is_complete(path: Path) -> bool:
    try:
        return read_manifest(path).complete
    except ActcacheError:
        return False


def store_bytes(path: Path) -> int:
    """Bytes on disk under `path` (allocated blocks, as du counts them; an object store's object sizes)."""
    if not is_local(path):
        fs = path.fs  # type: ignore[attr-defined]  # a UPath
        return int(fs.du(path.path, total=True))  # type: ignore[attr-defined]
    return 512 * sum(st.st_blocks for st in file_stats(path))


@dataclass(frozen=True)
class StoreInfo:
    """One row of `actcache ls`."""

    key: str
    path: Path
    aliases: tuple[str, ...]
    complete: bool
    shards_done: int
    shards_total: int
    n_examples: int
    n_tokens: int
    bytes: int
    created_at: str
    error: str | None = None
    schema_version: int | None = SCHEMA_VERSION  # another version: a store this actcache cannot read


def list_stores(root: Path | None = None) -> list[StoreInfo]:
    """Every store under `root`, oldest first; unreadable ones are listed with their error."""
    root = root or cache_root()
    infos = []
    for path in sorted((root / STORES_DIR).glob(f"*{STORE_SUFFIX}")):
        key = path.name.removesuffix(STORE_SUFFIX)
        try:
            m = read_manifest(path)
        except ActcacheError as exc:
            version = store_version(path)
            infos.append(StoreInfo(key, path, (), False, 0, 0, 0, 0, store_bytes(path), "", str(exc), version))
            continue
        done = len(committed(path, m.geometry.shards))
        infos.append(
            StoreInfo(
                key, path, m.aliases, m.complete, done, len(m.geometry.shards),
                m.geometry.n_examples, m.geometry.n_tokens, store_bytes(path), m.created_at,
            )
        )  # fmt: skip
    return sorted(infos, key=lambda i: (i.created_at, i.key))


def remove_store(ref: str | os.PathLike[str], root: Path | None = None) -> Path:
    """Delete a store (by key, alias or path) and drop it from its aliases; returns its path.

    `StoreInUseError`, naming the writer, while a live process holds the store's writer lease.
    """
    root = root or cache_root()
    text = os.fspath(ref)
    for named in (as_path(text), store_path(root, text) if is_key(text) else None):
        if named is not None and named.exists():
            _refuse_links(named)  # before anything is read through it
    path = find_store(ref, root)
    _refuse_links(path)
    with exclusive_lease(path):
        if not path.exists():  # another rm or gc got there between find_store and the lease
            raise StoreNotFoundError(f"store {str(path)!r} is gone: another process removed it just now.")
        delete_leased(path, root)
    return path


def delete_leased(path: Path, root: Path) -> None:
    """Delete the store at `path`, its lock files and its key from every alias; hold `exclusive_lease(path)`."""
    key = path.name.removesuffix(STORE_SUFFIX)
    remove_tree(path)
    lock_path(path).unlink(missing_ok=True)
    # Unlinked while we hold it: a writer waiting for the lease wins the old file, sees it is stale, and
    # takes the lease on a new one, where it finds no store.
    writers_path(path).unlink(missing_ok=True)
    for alias_file in (root / ALIASES_DIR).glob("*.json"):
        with flocked(lock_path(alias_file)):
            data: dict[str, Any] = read_json(alias_file, "alias file")
            if key in data.get("keys", []):
                data["keys"] = [k for k in data["keys"] if k != key]
                write_json(alias_file, data)


def _refuse_links(path: Path) -> None:
    """`UnsafePathError` when the store, or the stores/ directory holding it, is a symbolic link."""
    if not is_local(path):  # object stores have no links
        return
    for link in (path, path.parent):
        if link.is_symlink():
            raise UnsafePathError(
                f"{str(link)!r} is a symbolic link (to {os.readlink(link)!r}); actcache never deletes through a "
                "link, since what it points to may not be ours. Fix: remove the link itself (rm PATH), and the "
                "store it points to with `actcache rm` on its real path."
            )
