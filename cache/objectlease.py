"""A store's writer lease on an object store: one lease object per run, created by a conditional put.

Object stores have neither flock nor rename, so the lease that `cache.lease` takes with flock
on a disk is here an object beside the store, `<key>.zarr.writers`, created with
`If-None-Match: *` (fsspec's exclusive "xb" mode): of two runs that try at once, the store
admits one and refuses the other (412), whatever their machines. It names its run; the
run's own processes (the client and its Dask workers) write under it, and a removal must
create it too, so `actcache rm` refuses while a run writes.

A run that dies leaves its lease behind (nothing drops it as the kernel drops a flock).
One held by a process of this host that no longer runs is taken over at once (the client
killed and the same command rerun); one of another host is refused naming it, with the
object to delete once that run is known to be dead.

Where a filesystem cannot create conditionally, the lease is still written and read back,
and one already there is refused naming its holder: two runs starting in the same instant
could then both pass. `exclusive_create` says which kind a store has.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.claims import Holder, alive, parse_holder, utcnow
from schemas import StoreInUseError

__all__ = ["ObjectLease", "exclusive_create", "holder_of_lease", "object_lease", "require_run"]

# Filesystems whose exclusive create is a real conditional put (checked against moto's S3 for s3).
_CONDITIONAL = {"s3", "s3a", "memory"}


@dataclass(frozen=True)
class ObjectLease:
    """A lease this run holds: the run's id (its workers check it) and the lease object."""

    run: str
    path: Path


def exclusive_create(path: Path) -> bool:
    """Whether `path`'s filesystem creates objects conditionally (an atomic lease), not write-then-check."""
    protocols = _fs(path).protocol
    return bool(({protocols} if isinstance(protocols, str) else set(protocols)) & _CONDITIONAL)


@contextlib.contextmanager
def object_lease(store: Path, lease: Path, *, doing: str) -> Iterator[ObjectLease]:
    """Hold `store`'s lease object `lease` for the block, alone; `StoreInUseError` naming the holder if held.

    `doing` says what the refused caller wanted ("write", "remove"). Deleted on exit.
    """
    run = uuid.uuid4().hex
    body = json.dumps({"run": run, "holder": str(Holder(os.getpid(), socket.gethostname(), utcnow()))})
    if not _create(lease, body) and not (_stale(lease) and _create(lease, body)):
        holder = holder_of_lease(lease) or "another run (it released the lease just now: try again)"
        raise StoreInUseError(
            f"cannot {doing} store {str(store)!r}: {holder} holds its writer lease ({str(lease)!r}). Fix: let that "
            "run finish; if it is dead (its machine lost), delete that lease object and run this again."
        )
    try:
        yield ObjectLease(run, lease)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _run_of(lease) == run:
                lease.unlink()


def require_run(store: Path, lease: Path, run: str) -> None:
    """`StoreInUseError` unless run `run` still holds `store`'s lease: a worker of a run whose lease was
    taken over (its client killed and the command rerun) must not write beside the new run."""
    if _run_of(lease) != run:
        holder = holder_of_lease(lease) or "no run"
        raise StoreInUseError(
            f"store {str(store)!r} is no longer leased to this run (now: {holder}): its client stopped or "
            "another run took the store over, so this worker writes nothing. Fix: rerun the extract."
        )


def holder_of_lease(lease: Path) -> str | None:
    """Who holds the lease object, as it says ("pid N on HOST since TIME"); None when there is none."""
    data = _read(lease)
    return None if data is None else str(data.get("holder") or "another run")


def _create(lease: Path, body: str) -> bool:
    """Create the lease object if absent; whether we did."""
    fs, key = _fs(lease), _key(lease)
    if exclusive_create(lease):
        try:
            with fs.open(key, "xb") as fh:
                fh.write(body.encode())
        except FileExistsError:
            return False
        return True
    if fs.exists(key):
        return False
    fs.pipe_file(key, body.encode())
    return _run_of(lease) == json.loads(body)["run"]


def _stale(lease: Path) -> bool:
    """Whether the lease was left by a process of this host that no longer runs; if so it is deleted."""
    data = _read(lease)
    holder = parse_holder(str(data.get("holder", ""))) if data else None
    if holder is None or alive(holder):
        return False
    with contextlib.suppress(FileNotFoundError):
        lease.unlink()
    return True


def _run_of(lease: Path) -> str | None:
    data = _read(lease)
    return None if data is None else data.get("run")


def _read(lease: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lease.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # not ours, or torn by a filesystem without atomic puts: a holder we cannot name
        return {}
    return data if isinstance(data, dict) else {}


def _fs(path: Path) -> Any:
    return path.fs  # type: ignore[attr-defined]  # a UPath


def _key(path: Path) -> str:
    return str(path.path)  # type: ignore[attr-defined]
