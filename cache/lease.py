"""A store's writer lease: every writer shares it; removing the store (rm, gc, extract --force) needs it alone.

The lease is an advisory flock on a sibling file, `<key>.zarr.writers`: writers hold it
shared from opening the store until they close it, and a removal takes it exclusively
without waiting, so it either refuses (naming the writers) or holds it for the whole
deletion and no writer can start meanwhile. The kernel drops a dead holder's lock, even
after SIGKILL, so a crashed writer never blocks a removal. On an object store, which has
no flock, the lease is an object of that name created by a conditional put and held by one
run alone (`cache.objectlease`).

>>> with writer_lease(store):            # doctest: +SKIP
...     ...                              # write shards; `actcache rm` refuses meanwhile
>>> with exclusive_lease(store):         # doctest: +SKIP
...     shutil.rmtree(store)             # StoreInUseError above if a writer is live
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from cache.claims import alive, parse_holder
from cache.files import lock_fd, try_flock
from cache.objectlease import ObjectLease, object_lease
from cache.paths import is_local
from schemas import StoreInUseError
from schemas.store import CLAIM_SUFFIX, SHARDS_DIR, WRITERS_SUFFIX

__all__ = ["exclusive_lease", "writer_lease", "writers_path"]


# Leases this process holds, by lease file: a refusal caused by our own writer says so.
_held: Counter[str] = Counter()
_held_lock = threading.Lock()


def writers_path(store: Path) -> Path:
    """The lease file of `store`: a sibling named `<name>.writers` (it outlives nothing: rm removes it)."""
    return store.with_name(store.name + WRITERS_SUFFIX)


@contextlib.contextmanager
def writer_lease(store: Path) -> Iterator[ObjectLease | None]:
    """Hold a shared lease on `store` for the block: rm, gc and extract --force refuse to remove it meanwhile.

    Any number of writers share it. It waits while a removal holds the lease, so afterwards
    the store may be gone: check for it (or create it) inside the block. The store need not
    exist yet; its parent directory must. On an object store one run holds it alone (its
    `ObjectLease` is yielded; `StoreInUseError` names another run holding it).
    """
    if not is_local(store):
        with object_lease(store, writers_path(store), doing="write") as held:
            yield held
        return
    lease = writers_path(store)
    fd = lock_fd(lease, shared=True)  # waits while a removal holds it alone
    assert fd is not None
    with _held_lock:
        _held[str(lease)] += 1
    try:
        yield None
    finally:
        with _held_lock:
            _held[str(lease)] -= 1
        os.close(fd)


@contextlib.contextmanager
def exclusive_lease(store: Path) -> Iterator[None]:
    """Hold `store`'s lease alone for the block (to remove it); `StoreInUseError` naming the writers if it is held.

    Never waits: a live writer is refused at once. Delete the store and `writers_path(store)`
    inside the block; a writer waiting for the lease then finds the store gone.
    """
    if not is_local(store):
        with object_lease(store, writers_path(store), doing="remove"):
            yield
        return
    fd = try_flock(writers_path(store))
    if fd is None:
        raise StoreInUseError(
            f"store {str(store)!r} is in use: {_holders(store)} holds its writer lease, so it is not removed. "
            "Fix: let that process finish (or stop it), then run this again."
        )
    try:
        yield
    finally:
        os.close(fd)


def _holders(store: Path) -> str:
    """Who holds `store`'s lease, as far as can be told: this process, the writers of its claimed shards, or
    "another process" (a writer between shards claims none)."""
    names = []
    with _held_lock:
        if _held[str(writers_path(store))] > 0:
            names.append(f"this process (pid {os.getpid()}: close its StoreWriter first)")
    shards: dict[str, list[str]] = {}
    for claim in sorted((store / SHARDS_DIR).glob(f"*{CLAIM_SUFFIX}")):
        try:
            text = claim.read_text(errors="replace").strip()
        except OSError:  # released (unlinked) since the listing, or unreadable: it names no one
            continue
        holder = parse_holder(text)
        if holder is None or not alive(holder):
            continue  # being written this instant, or left by a writer that died (SIGKILL skips its cleanup)
        writer = str(holder)
        shards.setdefault(writer, []).append(claim.name.removesuffix(CLAIM_SUFFIX).lstrip("0") or "0")
    for writer, indices in shards.items():
        names.append(f"{writer} (writing shard{'s' if len(indices) > 1 else ''} {', '.join(indices)})")
    return "; ".join(names) or "another process"
