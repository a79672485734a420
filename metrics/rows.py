"""Row sources: an (n, d) matrix read in row blocks, the out-of-core unit of every metric.

A metric sees a `Rows`: anything with `.shape == (n, d)` whose `[start:stop]` is that row
block as an array. A numpy array is one (the tests hand the metrics in-memory arrays); a
store layer is `StoreRows`, which reads only the chunks a block lies in. No metric holds
more than a few blocks, so memory does not grow with the number of examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["DEFAULT_BLOCK_ROWS", "Rows", "StoreRows", "blocks", "read"]

DEFAULT_BLOCK_ROWS = 8192  # x 768 float64 = 50 MB per block and per layer held at once


class Rows(Protocol):
    """An (n, d) matrix that yields row blocks: `rows[start:stop]` is array-like."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: slice) -> Any: ...


@dataclass(frozen=True)
class StoreRows:
    """The pooled vectors of one layer of a store (`Activations.pooled`), as row blocks read on demand."""

    acts: Any  # cache.Activations
    layer: int
    how: str = "mean"
    stack: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n_rows, hidden = self.acts.pooled(self.layer, self.how, self.stack).shape  # lazy: reads nothing
        return int(n_rows), int(hidden)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.shape[0])
        return self.acts.pooled_rows(self.layer, start, stop, self.how, self.stack)


def blocks(n: int, rows: int = DEFAULT_BLOCK_ROWS, align: int = 1) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges covering n rows, each a multiple of `align` long (a chunk: none read twice)."""
    step = max(align, rows // align * align)
    for start in range(0, n, step):
        yield start, min(start + step, n)


def read(rows: Rows, start: int, stop: int, dtype: Any = np.float64) -> np.ndarray:
    """Rows [start, stop) of `rows` as a C-contiguous `dtype` array."""
    return np.ascontiguousarray(np.asarray(rows[start:stop]), dtype=dtype)


def align_of(rows: Rows) -> int:
    """The row count a block should be a multiple of: the store's example chunk, else 1."""
    acts = getattr(rows, "acts", None)
    return int(acts.example_chunk) if acts is not None else 1
