"""Exact linear CKA (Kornblith et al. 2019) between layers, streamed over the rows in one pass.

For centred X (n x p) and Y (n x q), linear CKA is ||X'Y||_F^2 / (||X'X||_F ||Y'Y||_F): it
needs only the feature-space cross-products X'Y, X'X, Y'Y, which sum over row blocks. So
every layer pair is exact over all examples (not a minibatch estimate) with memory that
depends on the widths, never on n. Products accumulate in float64. Centring happens at the
end (X'Y - n m_x m_y'); each row is first shifted by the first block's mean, which leaves
the result unchanged and keeps the subtraction from cancelling hidden states' large means.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from metrics.rows import DEFAULT_BLOCK_ROWS, Rows, align_of, blocks, read

__all__ = ["DEFAULT_CKA_MEMORY", "cka_matrix", "linear_cka"]

DEFAULT_CKA_MEMORY = 1 << 30  # bytes of cross-products held at once; more layers take more passes


def linear_cka(x: Rows, y: Rows, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> float:
    """Linear CKA of two (n, p) and (n, q) matrices of the same n rows (examples)."""
    return float(cka_matrix([x], [y], block_rows=block_rows)[0, 0])


def cka_matrix(
    xs: Sequence[Rows],
    ys: Sequence[Rows] | None = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    memory: int = DEFAULT_CKA_MEMORY,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Linear CKA of every x against every y (`ys` None: `xs` against themselves), shape (len(xs), len(ys)).

    All matrices have the same rows. The cross-products of as many layers as fit `memory`
    are accumulated in one pass over the rows; more layers take more passes (each pass
    reads its layers once). `progress(rows)` hears of every block.
    """
    same = ys is None
    mats: list[Rows] = list(xs) if same else [*xs, *ys]  # type: ignore[misc]
    n = _rows_of(mats)
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got {n}")
    widths = [int(m.shape[1]) for m in mats]
    nx = len(xs)
    wanted = (
        {(i, j) for i in range(nx) for j in range(nx)}
        if same
        else {(i, nx + j) for i in range(nx) for j in range(len(mats) - nx)}
    )
    hsic: dict[tuple[int, int], float] = {}
    for group in _passes(widths, wanted, memory):
        hsic |= _pass([mats[i] for i in group], group, n, block_rows, progress)
    ny = nx if same else len(mats) - nx
    out = np.empty((nx, ny))
    for i, j in itertools.product(range(nx), range(ny)):
        a, b = i, j if same else nx + j
        denominator = np.sqrt(hsic[a, a] * hsic[b, b])
        out[i, j] = hsic[min(a, b), max(a, b)] / denominator if denominator > 0 else np.nan
    return out


def _rows_of(mats: Sequence[Rows]) -> int:
    counts = {int(m.shape[0]) for m in mats}
    if len(counts) != 1:
        raise ValueError(f"CKA compares the same examples; these matrices have {sorted(counts)} rows")
    return counts.pop()


def _passes(widths: list[int], wanted: set[tuple[int, int]], memory: int) -> list[list[int]]:
    """Groups of matrices, each small enough that its (sum of widths)^2 float64 products fit `memory`,
    together covering every wanted pair (and each matrix with itself)."""
    budget = max(int(np.sqrt(memory / 8)), max(widths) * 2)
    half = budget // 2
    groups: list[list[int]] = []
    for i, width in enumerate(widths):
        if groups and sum(widths[k] for k in groups[-1]) + width <= half:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) == 1:
        return groups
    where = {m: g for g, members in enumerate(groups) for m in members}
    pairs = {(min(where[i], where[j]), max(where[i], where[j])) for i, j in wanted}
    alone = {g for g in range(len(groups)) if not any(g in pair for pair in pairs)}
    return [sorted({*groups[a], *groups[b]}) for a, b in sorted(pairs | {(g, g) for g in alone})]


def _pass(
    mats: list[Rows], ids: list[int], n: int, block_rows: int, progress: Callable[[int], None] | None
) -> dict[tuple[int, int], float]:
    """HSIC (unnormalized: squared Frobenius norm of the centred cross-product) of every pair in `mats`."""
    from scipy.linalg.blas import dsyrk

    edges = np.cumsum([0, *(int(m.shape[1]) for m in mats)])
    gram = np.zeros((edges[-1], edges[-1]), order="F")  # dsyrk updates it in place
    sums = np.zeros(edges[-1])
    shift: np.ndarray | None = None
    for start, stop in blocks(n, block_rows, align_of(mats[0])):
        block = np.concatenate([read(m, start, stop) for m in mats], axis=1)
        if shift is None:
            shift = block.mean(axis=0)
        block -= shift
        # Z'Z is symmetric: a rank-k update of its upper triangle is half a matrix product's work.
        gram = dsyrk(1.0, block.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
        sums += block.sum(axis=0)
        if progress is not None:
            progress(stop - start)
    gram = np.triu(gram) + np.triu(gram, 1).T - np.outer(sums, sums) / n
    out = {}
    for (a, i), (b, j) in itertools.combinations_with_replacement(enumerate(ids), 2):
        cross = gram[edges[a] : edges[a + 1], edges[b] : edges[b + 1]]
        out[i, j] = float(np.einsum("ij,ij->", cross, cross))
    return out
