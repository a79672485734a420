"""Where things live under a cache root; names from users never escape it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cache.keys import hash_value, is_key
from schemas import CacheDirError, ConfigError
from schemas.store import ALIASES_DIR, HASHES_DIR, ROOT_DIRS, STORE_SUFFIX, STORES_DIR

__all__ = [
    "alias_name",
    "alias_path",
    "as_path",
    "cache_root",
    "ensure_writable",
    "hash_memo_path",
    "is_local",
    "is_url",
    "require_local",
    "store_path",
    "work_dir",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def is_url(ref: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL (s3://bucket/prefix, gs://..., memory://...), False for a local path."""
    return "://" in os.fspath(ref) and not os.fspath(ref).startswith("file://")


def as_path(ref: str | os.PathLike[str]) -> Path:
    """A local path (user-expanded, absolute), or for a URL a `UPath` that reads through fsspec.

    The filesystem's credentials and endpoint come from its standard environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for S3).
    """
    if is_url(ref):
        from upath import UPath

        return UPath(os.fspath(ref))  # type: ignore[return-value]  # pathlib.Path's API, through fsspec
    return Path(os.fspath(ref).removeprefix("file://")).expanduser().absolute()


def is_local(path: Path) -> bool:
    """Whether `path` is on this machine's filesystem (not an object store behind fsspec)."""
    return not is_url(str(path))


def require_local(path: Path, doing: str) -> None:
    """`ConfigError` for a URL where only a local cache root will do (gc: ages of files, tokenized copies)."""
    if not is_local(path):
        raise ConfigError(
            f"cannot {doing} {str(path)!r}: that works on a local cache root only (extract, ls, show, verify "
            "and rm work on object stores). Fix: remove old stores there with `actcache rm KEY --cache-dir URL`."
        )


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else $ACTCACHE_DIR, else the platform's user cache dir (~/.cache/actcache); URLs too.

    `CacheDirError` for an empty `cache_dir` (it would mean the current directory) and for a
    local root, or one of its directories (stores/, aliases/, ...), that is a file.
    """
    if cache_dir is not None and not os.fspath(cache_dir).strip():
        raise CacheDirError(
            "--cache-dir is empty, which would put the cache in the current directory. Fix: pass a directory, "
            "or leave the option out for $ACTCACHE_DIR or ~/.cache/actcache."
        )
    if cache_dir is not None:
        root = as_path(cache_dir)
    elif os.environ.get("ACTCACHE_DIR", "").strip():
        root = as_path(os.environ["ACTCACHE_DIR"])
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("actcache"))
    if is_local(root):
        for path in (root, *(root / name for name in ROOT_DIRS)):
            if path.exists() and not path.is_dir():
                raise CacheDirError(
                    f"{str(path)!r} is a file, where actcache keeps a directory of its cache root {str(root)!r}. "
                    "Fix: pass another --cache-dir, or move that file away."
                )
    return root


def store_path(root: Path, key: str) -> Path:
    """The directory of store `key` under `root`."""

    if not is_key(key):
        raise ConfigError(f"{key!r} is not a cache key (32 lowercase hex characters)")
    return root / STORES_DIR / f"{key}{STORE_SUFFIX}"


def _slug(text: str) -> str:
    # '/', '..', absolute paths and anything odd become '-': an alias is one file name.
    slug = _UNSAFE.sub("-", str(text)).strip(".-")
    return slug or "unnamed"


def alias_name(model: str, data: str) -> str:
    """The human name of a (model, data) pair, safe as a single file name."""
    return f"{_slug(model)}__{_slug(data)}"


def alias_path(root: Path, alias: str) -> Path:
    return root / ALIASES_DIR / f"{_slug(alias)}.json"


def hash_memo_path(root: Path, directory: Path) -> Path:
    """Where the file digests of model `directory` are remembered under `root` (one file per directory)."""

    return root / HASHES_DIR / f"{hash_value(str(directory), length=32)}.json"


def work_dir(root: Path) -> Path:
    """Where the local side of a cache root lives: tokenized and Arrow copies of the data, weight digests.

    The root itself on a disk. For an object store root, a directory named after the URL in
    this machine's own cache ($ACTCACHE_DIR where that is local, else ~/.cache/actcache):
    those copies are inputs of a run, read back at memory speed, and only stores and aliases
    belong in the bucket.
    """
    if is_local(root):
        return root
    local = cache_root()
    if not is_local(local):
        import platformdirs

        local = Path(platformdirs.user_cache_dir("actcache"))
    return local / "remote" / hash_value(str(root), length=16)


def ensure_writable(root: Path) -> Path:
    """Create `root` if need be and prove a file (or an object) can be written there; `CacheDirError` says why not."""
    probe = root / f".write-test-{os.getpid()}"
    try:
        if is_local(root):  # an object store has no directories to make
            root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheDirError(
            f"cache dir {str(root)!r} is not writable ({exc.strerror or exc}). Fix: pass --cache-dir DIR "
            "(or set ACTCACHE_DIR) to a directory you can write."
        ) from None
    return root
