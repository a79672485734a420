"""`BufferPool`: a shard's host buffers, sized for the largest pending shard and reused from shard to shard."""

from __future__ import annotations

import numpy as np

from schemas.arrays import ArraySpec
from schemas.geometry import ShardRange
from schemas.store import OFFSETS

__all__ = ["BufferPool"]


class BufferPool:
    """Two sets at most: one being written while the next shard fills another, so memory stays flat
    and no shard pays the page faults of fresh memory (~90 MB a shard for MiniLM's 7 layers).

    Every element a shard's views cover is overwritten by its batches (each token and each
    example is placed once), so reused memory holds nothing stale.
    """

    def __init__(self, arrays: tuple[ArraySpec, ...], shards: list[ShardRange]) -> None:
        self.arrays = [spec for spec in arrays if spec.name != OFFSETS]
        self.capacity = {
            axis: max((_logical(axis, shard) for shard in shards), default=0) for axis in ("token", "example")
        }
        self.free: list[dict[str, np.ndarray]] = []

    def take(self, shard: ShardRange) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A set of buffers, and its views sized for `shard`."""
        for axis, size in self.capacity.items():
            if _logical(axis, shard) > size:  # not planned for (pending when the run began): grow
                self.capacity[axis] = _logical(axis, shard)
                self.free.clear()
        if self.free:
            buffers = self.free.pop()
        else:
            buffers = {
                spec.name: np.empty(
                    (*spec.leading, self.capacity[_axis(spec)], *spec.trailing), dtype=spec.physical_dtype
                )
                for spec in self.arrays
            }
        views = {
            spec.name: buffers[spec.name][
                (*(slice(None) for _ in spec.leading), slice(0, _logical(_axis(spec), shard)))
            ]
            for spec in self.arrays
        }
        return buffers, views

    def give_back(self, buffers: dict[str, np.ndarray]) -> None:
        self.free.append(buffers)


def _axis(spec: ArraySpec) -> str:
    return "token" if spec.axis == "token" else "example"


def _logical(axis: str, shard: ShardRange) -> int:
    return shard.n_tokens if axis == "token" else shard.n_examples
