"""Shard claims: which live process writes a shard now (an flock the kernel drops when its holder dies).

A claim is the file `shards/<index>.claim`, flock-ed while a process writes that shard and
holding its name ("pid N on HOST since TIME"); a dead writer's claim is free at once, so the
next process that asks takes its shard over. Only local and shared POSIX disks have flock.

On an object store a claim is this process's alone (a set in memory): there one run writes
at a time (its lease object) and its scheduler hands each shard to one task.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from cache.files import try_flock
from cache.paths import is_local
from schemas import ShardClaimedError
from schemas.store import CLAIM_SUFFIX, SHARDS_DIR

__all__ = ["Holder", "alive", "claim_path", "held", "holder_of", "parse_holder", "utcnow"]

# What a claim file holds while its shard is written: who, where, since when.
_HOLDER = re.compile(r"pid (?P<pid>\d+) on (?P<host>\S+) since (?P<since>\S+)")


class Holder(NamedTuple):
    pid: int
    host: str
    since: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


def parse_holder(text: str) -> Holder | None:
    """The holder a claim file names; None for anything else (a file being written this instant)."""
    match = _HOLDER.fullmatch(text.strip())
    return None if match is None else Holder(int(match["pid"]), match["host"], match["since"])


def alive(holder: Holder) -> bool:
    """Whether `holder`'s process still runs; a process on another host is taken to."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def claim_path(store: Path, index: int) -> Path:
    return store / SHARDS_DIR / f"{index:06d}{CLAIM_SUFFIX}"


def _claimed(key: str, index: int, holder: str) -> ShardClaimedError:
    return ShardClaimedError(
        f"shard {index} of store {key} is being written by {holder}. It will be done "
        "when that process finishes; run again afterwards to pick up anything it left."
    )


_claims_here: set[str] = set()  # claims of shards of object stores that this process holds
_claims_lock = threading.Lock()


@contextlib.contextmanager
def _in_process(claim: Path, key: str, index: int) -> Iterator[None]:
    with _claims_lock:
        if str(claim) in _claims_here:
            raise _claimed(key, index, f"this process (pid {os.getpid()})")
        _claims_here.add(str(claim))
    try:
        yield
    finally:
        with _claims_lock:
            _claims_here.discard(str(claim))


def holder_of(claim: Path) -> str:
    """Who holds `claim`, as it wrote itself there."""
    try:
        return claim.read_text(errors="replace").strip() or "another process"
    except FileNotFoundError:  # released between a lock attempt and this read
        return "another process (released it just now)"


@contextlib.contextmanager
def held(store: Path, key: str, index: int) -> Iterator[None]:
    """Hold shard `index`'s claim for the block; `ShardClaimedError` naming the holder if a live process has it."""
    claim = claim_path(store, index)
    if not is_local(store):
        with _in_process(claim, key, index):
            yield
        return
    fd = try_flock(claim)
    if fd is None:
        raise _claimed(key, index, holder_of(claim))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(Holder(os.getpid(), socket.gethostname(), utcnow())).encode(), 0)
        yield
    finally:
        claim.unlink(missing_ok=True)
        os.close(fd)
