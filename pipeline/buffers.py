"""`BufferPool`: a shard's host buffers, sized for the largest pending shard and reused from shard to shard."""

from __future__ import annotations

import mmap
import threading

import numpy as np

from schemas.arrays import ArraySpec
from schemas.geometry import ShardRange
from schemas.store import OFFSETS

__all__ = ["BufferPool"]

_FAULT_STEP = 64 << 20  # bytes faulted in between checks for `close`: ~0.1-0.2 s of fresh memory on a VM


class BufferPool:
    """Two sets at most: one being written while the next shard fills another, so memory stays flat
    and no shard pays the page faults of fresh memory (~90 MB a shard for MiniLM's 7 layers).

    Every element a shard's views cover is overwritten by its batches (each token and each
    example is placed once), so reused memory holds nothing stale.

    Only the first two shards meet fresh memory, and the first write to each of its pages is what
    costs: the kernel maps and zeroes the page, and on a VM memory the guest has not used lately
    costs far more (README, "The store path at GPU speed"). `prefault` moves the second set's
    faults onto a thread of their own, beside the first shard's compute, off the second shard's
    critical path: a one-off saving per run.
    """

    def __init__(self, arrays: tuple[ArraySpec, ...], shards: list[ShardRange]) -> None:
        self.arrays = [spec for spec in arrays if spec.name != OFFSETS]
        self.capacity = {
            axis: max((_logical(axis, shard) for shard in shards), default=0) for axis in ("token", "example")
        }
        self.free: list[dict[str, np.ndarray]] = []
        # A set being faulted in: its thread, the event that cuts the faulting short, the buffers.
        self._spare: tuple[threading.Thread, threading.Event, dict[str, np.ndarray]] | None = None

    def take(self, shard: ShardRange) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A set of buffers, and its views sized for `shard`."""
        for axis, size in self.capacity.items():
            if _logical(axis, shard) > size:  # not planned for (pending when the run began): grow
                self.capacity[axis] = _logical(axis, shard)
                self.free.clear()
                self.close()
        if self.free:
            buffers = self.free.pop()
        elif self._spare is not None:
            thread, _, buffers = self._spare
            thread.join()
            self._spare = None
        else:
            buffers = self._new()
        views = {
            spec.name: buffers[spec.name][
                (*(slice(None) for _ in spec.leading), slice(0, _logical(_axis(spec), shard)))
            ]
            for spec in self.arrays
        }
        return buffers, views

    def give_back(self, buffers: dict[str, np.ndarray]) -> None:
        self.free.append(buffers)

    def prefault(self) -> None:
        """Allocate one more set, its pages faulted in on a thread of its own (the GIL released), for
        the next `take` that finds no set free; call it as a shard starts when another will follow."""
        if self._spare is None:
            buffers, cancel = self._new(), threading.Event()
            thread = threading.Thread(target=_fault_in, args=(buffers, cancel), name="actcache-prefault", daemon=True)
            thread.start()
            self._spare = (thread, cancel, buffers)

    def close(self) -> None:
        """Let a set being faulted in go, its faulting cut short, once its thread has ended: no thread
        of the pool outlives the run, and a run that stops or fails does not wait for the whole set."""
        if self._spare is not None:
            thread, cancel, _ = self._spare
            cancel.set()
            thread.join()
            self._spare = None

    def _new(self) -> dict[str, np.ndarray]:
        return {
            spec.name: np.empty((*spec.leading, self.capacity[_axis(spec)], *spec.trailing), dtype=spec.physical_dtype)
            for spec in self.arrays
        }


def _fault_in(buffers: dict[str, np.ndarray], cancel: threading.Event) -> None:
    """Write one byte per page of each (fresh, contiguous) buffer, so the kernel maps and zeroes them
    now; `_FAULT_STEP` bytes at a time, until `cancel` is set."""
    for array in buffers.values():
        flat = array.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _FAULT_STEP):
            if cancel.is_set():
                return
            flat[start : start + _FAULT_STEP : mmap.PAGESIZE] = 0


def _axis(spec: ArraySpec) -> str:
    return "token" if spec.axis == "token" else "example"


def _logical(axis: str, shard: ShardRange) -> int:
    return shard.n_tokens if axis == "token" else shard.n_examples
