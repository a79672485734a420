"""File primitives of the store: atomic writes, JSON files, advisory locks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cache.faults import crash_point
from cache.paths import is_local
from schemas import StoreCorruptError

__all__ = [
    "PARTIAL_SUFFIX",
    "atomic_write_bytes",
    "file_stats",
    "flocked",
    "json_ready",
    "lock_fd",
    "lock_path",
    "read_json",
    "remove_tree",
    "try_flock",
    "write_json",
]

PARTIAL_SUFFIX = ".partial"  # the same suffix zarr's LocalStore gives its temp files


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True, crash_at: str = "mid-commit") -> None:
    """Write `data` to `path` whole or not at all: a sibling temp file, fsync (if `durable`), rename.

    `crash_at` names the crash point between the temp file and the rename (see `cache.faults`).
    On an object store it is one PUT, which replaces an object whole or not at all.
    """
    if not is_local(path):
        crash_point(crash_at)
        path.write_bytes(data)
        return
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        crash_point(crash_at)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_stats(path: Path) -> Iterator[os.stat_result]:
    """The lstat of every regular file under the folder `path`, one scandir pass (links are not followed).

    A store of a million examples is ~60k chunk files in ~20k folders: os.walk's joins and link
    checks took 1 s of every cache hit's and `ls`'s time there. A folder or file removed meanwhile
    (or unreadable) is skipped, as os.walk skips it.
    """
    folders = [str(path)]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    pass


def remove_tree(path: Path) -> None:
    """Delete the directory `path` and all it holds; on an object store, every object under that prefix."""
    if is_local(path):
        shutil.rmtree(path)
    else:
        path.fs.rm(path.path, recursive=True)  # type: ignore[attr-defined]  # a UPath


def json_ready(value: Any) -> Any:
    """`value` with numpy scalars and arrays turned into JSON numbers and lists."""
    return json.loads(json.dumps(value, default=_plain))


def write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=1, sort_keys=True, default=_plain)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (counters from the writer) as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON file holding an object; a mangled one is `StoreCorruptError` naming `what` it was."""
    fix = "Fix: run `actcache verify` on the store (it resets what it cannot trust), or remove it and extract again."
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(f"{what} {str(path)!r} is not valid JSON ({exc}). {fix}") from None
    if not isinstance(value, dict):
        raise StoreCorruptError(f"{what} {str(path)!r} holds a JSON {type(value).__name__}, not an object. {fix}")
    return value


def lock_fd(path: Path, *, shared: bool = False, wait: bool = True) -> int | None:
    """Open `path` and take an advisory lock (shared or exclusive); the fd, or None if held and not `wait`.

    The kernel drops the lock when its holder dies, even by SIGKILL, so a dead writer's
    lock never needs breaking. A lock file unlinked after we opened it (a store removed
    meanwhile) is stale: retry on the file that is there now.
    """
    kind = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # unlinked after we opened it
            same = False
        except BaseException:  # Ctrl-C while waiting: never leak the fd
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def try_flock(path: Path) -> int | None:
    """An exclusive lock on `path` without waiting (see `lock_fd`); the fd, or None if held."""
    return lock_fd(path, wait=False)


def lock_path(path: Path) -> Path:
    """The lock file that guards `path` (a store, an alias file): a sibling named `<name>.lock`."""
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, waiting for it if need be (see `lock_fd`).

    On an object store, which has no locks, nothing is held: there one run at a time holds
    the store's lease object (`cache.objectlease`), and within a run only its client creates,
    finalizes and names the store.
    """
    if not is_local(path):
        yield
        return
    fd = lock_fd(path)
    assert fd is not None  # a waiting lock is always won
    try:
        yield
    finally:
        os.close(fd)
