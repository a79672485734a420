"""Mutual k-nearest neighbours: how alike two representations of the same examples rank their neighbours, blockwise.

Each example's k nearest other examples by cosine similarity are found a query block against
a candidate block at a time (never an n x n matrix), keeping only a running top k per query.
The mutual k-NN alignment of two representations X and Y is the mean over examples of the
share of the example's k neighbours that X and Y have in common (Huh et al., 2024, "The
Platonic Representation Hypothesis"): 1 when both rank the same neighbours first.

The search (`knn_indices`, once per representation) and the comparison (`knn_overlap`, per
pair, per example) are apart, so L layers cost L searches and a bootstrap resamples the
per-example overlaps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from metrics.retrieval import RETRIEVAL_BLOCK_ROWS, _unit
from metrics.rows import Rows, align_of, blocks

__all__ = ["knn_indices", "knn_overlap", "mutual_knn"]

_OVERLAP_ROWS = 1 << 16  # rows compared at once: 2k int64 each
_CLASS_COLUMNS = 256  # a wide block's columns are first narrowed to those of k of this many classes


def knn_indices(
    rows: Rows,
    k: int = 10,
    *,
    block_rows: int = RETRIEVAL_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(n, k) int64: each row's k nearest other rows by cosine similarity, nearest first; ties to the lower index.

    A zero row has similarity 0 to every row. `progress(rows)` hears of every query block.

    >>> knn_indices(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), k=1)
    array([[1],
           [0],
           [1]])
    """
    n = int(rows.shape[0])
    if not 0 < k < n:
        raise ValueError(f"k={k} nearest neighbours among n={n} rows: k must be between 1 and n - 1 = {n - 1}")
    spans = list(blocks(n, block_rows, align_of(rows)))
    out = np.empty((n, k), dtype=np.int64)
    for q0, q1 in spans:
        queries = _unit(rows, q0, q1)
        best = np.full((q1 - q0, k), -np.inf, dtype=np.float32)  # sorted by (-similarity, index)
        best_at = np.full((q1 - q0, k), n, dtype=np.int64)
        for c0, c1 in spans:
            candidates = queries if c0 == q0 else _unit(rows, c0, c1)
            scores = queries @ candidates.T
            if c0 == q0:
                np.fill_diagonal(scores, -np.inf)  # a row is not its own neighbour
            at = _top_k(scores, k)
            values = np.concatenate([best, np.take_along_axis(scores, at, axis=1)], axis=1)
            indices = np.concatenate([best_at, c0 + at], axis=1)
            keep = np.lexsort((indices, -values), axis=1)[:, :k]
            best = np.take_along_axis(values, keep, axis=1)
            best_at = np.take_along_axis(indices, keep, axis=1)
        out[q0:q1] = best_at
        if progress is not None:
            progress(q1 - q0)
    return out


def knn_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) float64: per example, the share of its k neighbours that the two (n, k) neighbour lists have in common."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"neighbour lists of shapes {a.shape} and {b.shape}: both must be (n, k), alike")
    n, k = a.shape
    out = np.empty(n)
    for start in range(0, n, _OVERLAP_ROWS):
        # A row's neighbours are distinct, so a value repeats in the two lists together only if both hold it.
        both = np.sort(np.concatenate([a[start : start + _OVERLAP_ROWS], b[start : start + _OVERLAP_ROWS]], axis=1))
        out[start : start + len(both)] = np.count_nonzero(both[:, 1:] == both[:, :-1], axis=1) / k
    return out


def mutual_knn(
    x: Rows,
    y: Rows,
    k: int = 10,
    *,
    block_rows: int = RETRIEVAL_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> float:
    """The mutual k-NN alignment of two representations of the same examples: the mean overlap, in [0, 1]."""
    if int(x.shape[0]) != int(y.shape[0]):
        raise ValueError(f"{x.shape[0]} rows against {y.shape[0]}: both must hold the same examples")
    a = knn_indices(x, k, block_rows=block_rows, progress=progress)
    b = knn_indices(y, k, block_rows=block_rows, progress=progress)
    return float(knn_overlap(a, b).mean())


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest scores (all, where a row has fewer), ties to the lower column."""
    b, m = scores.shape
    if m <= k:
        return np.broadcast_to(np.arange(m), scores.shape)
    chunks = m // _CLASS_COLUMNS
    peaks = None
    if chunks >= 4 and _CLASS_COLUMNS > k:
        # The k largest lie in the k column classes (mod _CLASS_COLUMNS) of largest maxima: partitioning
        # those few columns costs a fraction of partitioning the whole row.
        peaks = scores[:, :_CLASS_COLUMNS].copy()
        for u in range(1, chunks):
            np.maximum(peaks, scores[:, u * _CLASS_COLUMNS : (u + 1) * _CLASS_COLUMNS], out=peaks)
        classes = np.argpartition(peaks, _CLASS_COLUMNS - k, axis=1)[:, _CLASS_COLUMNS - k :]
        rest = np.broadcast_to(np.arange(chunks * _CLASS_COLUMNS, m), (b, m - chunks * _CLASS_COLUMNS))
        columns = np.concatenate([(classes[:, :, None] + _CLASS_COLUMNS * np.arange(chunks)).reshape(b, -1), rest], 1)
        values = np.take_along_axis(scores, columns, axis=1)
    else:
        columns, values = np.broadcast_to(np.arange(m), scores.shape), scores
    pick = np.argpartition(values, values.shape[1] - k, axis=1)[:, -k:]
    at = np.take_along_axis(columns, pick, axis=1)
    kth = np.take_along_axis(values, pick, axis=1).min(axis=1)
    # argpartition keeps any of the columns tied with the k-th value, and a class left out may hold one
    # (its maximum equal to it): such rows are settled over the whole row, the lowest-numbered tied first.
    tied = np.count_nonzero(values >= kth[:, None], axis=1) > k
    if peaks is not None:
        chosen = np.take_along_axis(peaks, classes, axis=1)
        tied |= np.count_nonzero(peaks >= kth[:, None], axis=1) > np.count_nonzero(chosen >= kth[:, None], axis=1)
    for row in np.flatnonzero(tied):
        line = scores[row]
        above = np.flatnonzero(line > kth[row])
        at[row] = np.concatenate([above, np.flatnonzero(line == kth[row])[: k - len(above)]])
    return at
