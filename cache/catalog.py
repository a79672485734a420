"""The catalog of a cache root: aliases, finding a store by key, alias or path; ls, rm, gc."""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.files import flocked, lock_path, read_json, write_json
from cache.keys import is_key
from cache.paths import alias_path, as_path, cache_root, is_local, require_local, store_path
from cache.zattrs import store_version
from schemas import ActcacheError, ConfigError, NotAStoreError, StoreNotFoundError, UnsafePathError
from schemas.store import (
    ALIASES_DIR,
    DATASETS_DIR,
    FORMAT_NAME,
    MANIFEST_FILE,
    ROOT_ATTR,
    SCHEMA_VERSION,
    STORE_SUFFIX,
    STORES_DIR,
    TOKENIZED_DIR,
    ZARR_JSON,
    Manifest,
)

__all__ = [
    "StoreInfo",
    "add_alias",
    "find_store",
    "gc",
    "list_stores",
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
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


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
    from cache.integrity import committed

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
    """Delete a store (by key, alias or path) and drop it from its aliases; returns its path."""
    root = root or cache_root()
    require_local(root, "remove a store from")
    text = os.fspath(ref)
    for named in (as_path(text), store_path(root, text) if is_key(text) else None):
        if named is not None and named.exists():
            _refuse_links(named)  # before anything is read through it
    path = find_store(ref, root)
    require_local(path, "remove")
    _refuse_links(path)
    key = path.name.removesuffix(STORE_SUFFIX)
    shutil.rmtree(path)
    lock_path(path).unlink(missing_ok=True)
    for alias_file in (root / ALIASES_DIR).glob("*.json"):
        with flocked(lock_path(alias_file)):
            data: dict[str, Any] = read_json(alias_file, "alias file")
            if key in data.get("keys", []):
                data["keys"] = [k for k in data["keys"] if k != key]
                write_json(alias_file, data)
    return path


def _refuse_links(path: Path) -> None:
    """`UnsafePathError` when the store, or the stores/ directory holding it, is a symbolic link."""
    for link in (path, path.parent):
        if link.is_symlink():
            raise UnsafePathError(
                f"{str(link)!r} is a symbolic link (to {os.readlink(link)!r}); actcache never deletes through a "
                "link, since what it points to may not be ours. Fix: remove the link itself (rm PATH), and the "
                "store it points to with `actcache rm` on its real path."
            )


def gc(older_than_days: float, root: Path | None = None, *, formats: Sequence[int] = ()) -> list[Path]:
    """Remove incomplete stores (and crashed creations) untouched for `older_than_days`, every store
    written in one of the schema versions `formats` (this actcache reads none but its own), and the
    tokenized copies and datasets' Arrow copies of local files untouched as long (rebuilt when needed)."""
    root = root or cache_root()
    cutoff = dt.datetime.now().timestamp() - older_than_days * 86400
    require_local(root, "clean up")
    if SCHEMA_VERSION in formats:
        raise ConfigError(
            f"gc --format {SCHEMA_VERSION} would remove readable stores of this actcache's own format. "
            "Fix: remove one with `actcache rm KEY`; --format takes older formats only."
        )
    if not math.isfinite(older_than_days) or older_than_days < 0:
        raise ConfigError(f"gc needs an age of 0 days or more, got {older_than_days!r}")
    removed: list[Path] = []
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
        return removed
    for path in sorted((root / STORES_DIR).glob("*")):
        if path.is_symlink() or not path.is_dir():  # never through a link
            continue
        if path.name.endswith(STORE_SUFFIX) and store_version(path) in formats:
            remove_store(path, root)
            removed.append(path)
            continue
        if _newest_mtime(path) > cutoff:
            continue
        if path.name.endswith(".incomplete") or not _is_complete(path):
            if path.name.endswith(STORE_SUFFIX):
                remove_store(path, root)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest
