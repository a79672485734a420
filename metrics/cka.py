"""Exact linear CKA (Kornblith et al. 2019), plain or debiased, between layers, streamed over the rows in one pass.

For centred X (n x p) and Y (n x q), linear CKA is ||X'Y||_F^2 / (||X'X||_F ||Y'Y||_F): it
needs only the feature-space cross-products X'Y, X'X, Y'Y, which sum over row blocks. So
every layer pair is exact over all examples (not a minibatch estimate) with memory that
depends on the widths, never on n. Products accumulate in float64. Centring happens at the
end (X'Y - n m_x m_y'); each row is first shifted by the first block's mean (of the rows
that count, with weights), which leaves the result unchanged and keeps the subtraction
from cancelling hidden states' large means.

Debiased CKA (Nguyen, Raghu & Kornblith 2021) puts the unbiased HSIC estimator of Song et
al. 2012 in place of HSIC: with K = XX', L = YY' (not centred) and K~, L~ their
off-diagonal parts,

    HSIC_u = [tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).

For linear kernels every term is a feature-space sum too, given each row's squared norm
a_i = ||x_i||^2 (b_i = ||y_i||^2): tr(K~L~) = ||X'Y||_F^2 - sum a_i b_i,
1'K~1 = ||X'1||^2 - sum a_i, and 1'K~L~1 = s_x'(X'Y)s_y - (sum a_i y_i).s_y - (sum b_i x_i).s_x
+ sum a_i b_i with s the column sums. The squared norms join the block as one column per
matrix, so the same rank-k update yields them all. HSIC_u is a product of U-centred Gram
matrices (Szekely & Rizzo 2014), and U-centring removes the change a shift of every row
makes to K (c.x_i + c.x_j + c.c): the first-block shift stays exact.

Weights (a bootstrap resample's multiplicities) count row i weights[i] times, as
`np.repeat(x, weights, axis=0)` would, without repeating anything: each bit of the weights
is one rank-k update scaled by its power of two, the sums are weighted, n is their total.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from metrics.rows import DEFAULT_BLOCK_ROWS, Rows, align_of, blocks, read

__all__ = ["DEFAULT_CKA_MEMORY", "cka_matrix", "linear_cka"]

DEFAULT_CKA_MEMORY = 1 << 30  # bytes of cross-products held at once; more layers take more passes


def linear_cka(
    x: Rows,
    y: Rows,
    *,
    debiased: bool = False,
    weights: np.ndarray | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> float:
    """Linear CKA of two (n, p) and (n, q) matrices of the same n rows (examples); see `cka_matrix`.

    >>> linear_cka(x, y, debiased=True)                  # doctest: +SKIP
    0.0031
    """
    return float(cka_matrix([x], [y], debiased=debiased, weights=weights, block_rows=block_rows)[0, 0])


def cka_matrix(
    xs: Sequence[Rows],
    ys: Sequence[Rows] | None = None,
    *,
    debiased: bool = False,
    weights: np.ndarray | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    memory: int = DEFAULT_CKA_MEMORY,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Linear CKA of every x against every y (`ys` None: `xs` against themselves), shape (len(xs), len(ys)).

    All matrices have the same rows. The cross-products of as many layers as fit `memory`
    are accumulated in one pass over the rows; more layers take more passes (each pass
    reads its layers once). `progress(rows)` hears of every block.

    `debiased`: the unbiased HSIC estimator in place of the plain one (needs 4 examples). It
    is near 0 for unrelated layers, and may be slightly below 0: that is the estimate, not
    clipped. `weights`: (n,) non-negative integers, row i counted weights[i] times (0: left
    out); n is then their sum.

    A cell is NaN (no error, no warning) when the self-HSIC of its x or its y is not positive:
    plain, when the layer's features are constant over the examples (those of weight > 0);
    debiased, then too, and wherever the unbiased self-HSIC comes out at or below 0. That
    one is ||U(K)||_F^2 / (n(n-3)) with U the U-centring, never below 0 in exact arithmetic
    and 0 also for a layer that varies in a single example only; so it is rounding on such a
    degenerate layer, which may as well round just above 0 and give a finite, meaningless cell.
    """
    same = ys is None
    mats: list[Rows] = list(xs) if same else [*xs, *ys]  # type: ignore[misc]
    rows = _rows_of(mats)
    weights = None if weights is None else _parse_weights(weights, rows)
    n = rows if weights is None else int(weights.sum())
    least = 4 if debiased else 2
    if n < least:
        given = " (the weights' sum)" if weights is not None else ""
        kind = "debiased CKA (the unbiased HSIC estimator)" if debiased else "CKA"
        raise ValueError(f"{kind} needs at least {least} examples, got {n}{given}")
    # Debiased, each matrix brings a column of squared row norms into the pass.
    widths = [int(m.shape[1]) + debiased for m in mats]
    nx = len(xs)
    wanted = (
        {(i, j) for i in range(nx) for j in range(nx)}
        if same
        else {(i, nx + j) for i in range(nx) for j in range(len(mats) - nx)}
    )
    hsic: dict[tuple[int, int], float] = {}
    for group in _passes(widths, wanted, memory):
        hsic |= _pass([mats[i] for i in group], group, rows, n, weights, debiased, block_rows, progress)
    ny = nx if same else len(mats) - nx
    out = np.empty((nx, ny))
    for i, j in itertools.product(range(nx), range(ny)):
        a, b = i, j if same else nx + j
        # Each factor tested: two negative debiased self-HSICs would make a positive product.
        both = hsic[a, a] > 0 and hsic[b, b] > 0
        denominator = np.sqrt(hsic[a, a] * hsic[b, b]) if both else 0.0
        out[i, j] = hsic[min(a, b), max(a, b)] / denominator if denominator > 0 else np.nan
    return out


def _rows_of(mats: Sequence[Rows]) -> int:
    counts = {int(m.shape[0]) for m in mats}
    if len(counts) != 1:
        raise ValueError(f"CKA compares the same examples; these matrices have {sorted(counts)} rows")
    return counts.pop()


def _parse_weights(weights: np.ndarray, rows: int) -> np.ndarray:
    """The weights as int64 multiplicities, one per row."""
    given = np.asarray(weights)
    if given.shape != (rows,):
        raise ValueError(f"CKA weights need one multiplicity per example, shape ({rows},); got shape {given.shape}")
    if not (np.issubdtype(given.dtype, np.integer) or np.issubdtype(given.dtype, np.floating)):
        raise ValueError(f"CKA weights are multiplicities (non-negative integers); got dtype {given.dtype}")
    wrong = np.flatnonzero(~np.isfinite(given) | (given < 0) | (given != np.round(given)))
    if len(wrong):
        raise ValueError(
            f"CKA weights are multiplicities (non-negative integers); weights[{wrong[0]}] is {given[wrong[0]].item()!r}"
        )
    return given.astype(np.int64)


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
    mats: list[Rows],
    ids: list[int],
    rows: int,
    n: int,
    weights: np.ndarray | None,
    debiased: bool,
    block_rows: int,
    progress: Callable[[int], None] | None,
) -> dict[tuple[int, int], float]:
    """HSIC of every pair in `mats` (`ids` name them): plain, the squared Frobenius norm of the centred
    cross-product; debiased, the unbiased estimator HSIC_u. `n` counts the examples (the weights' sum)."""
    from scipy.linalg.blas import dsyrk

    edges = np.cumsum([0, *(int(m.shape[1]) for m in mats)])
    width = int(edges[-1])
    extra = len(mats) if debiased else 0  # column width + k: matrix k's squared row norms
    gram = np.zeros((width + extra, width + extra), order="F")  # dsyrk updates it in place
    sums = np.zeros(width + extra)
    shift: np.ndarray | None = None
    buffer = np.empty((0, width + extra))
    for start, stop in blocks(rows, block_rows, align_of(mats[0])):
        if len(buffer) < stop - start:  # one buffer for every block: no allocation (and page faults) per block
            buffer = np.empty((stop - start, width + extra))
        block = buffer[: stop - start]
        for k, m in enumerate(mats):  # each matrix read, widened and shifted (once known) in one pass
            offset = 0.0 if shift is None else shift[edges[k] : edges[k + 1]]
            np.subtract(read(m, start, stop), offset, out=block[:, edges[k] : edges[k + 1]])
        if shift is None:
            # Of the rows that count: a layer constant over those then shifts to (next to) zero, and its
            # centred product comes out 0, a NaN CKA, not the rounding noise a far shift leaves.
            # Blocks before the first row that counts add nothing.
            present = block if weights is None else block[weights[start:stop] > 0]
            if len(present):
                shift = present[:, :width].mean(axis=0)
                block[:, :width] -= shift
        if shift is not None:
            for k in range(extra):
                part = block[:, edges[k] : edges[k + 1]]
                block[:, width + k] = np.einsum("ij,ij->i", part, part)
            if weights is None:
                # Z'Z is symmetric: a rank-k update of its upper triangle is half a matrix product's work.
                gram = dsyrk(1.0, block.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
                sums += block.sum(axis=0)
            else:
                gram = _weighted_syrk(gram, block, weights[start:stop])
                sums += weights[start:stop] @ block
        if progress is not None:
            progress(stop - start)
    pairs = list(itertools.combinations_with_replacement(enumerate(ids), 2))
    if not debiased:
        gram = np.triu(gram) + np.triu(gram, 1).T - np.outer(sums, sums) / n
        return {(i, j): _frobenius2(gram[edges[a] : edges[a + 1], edges[b] : edges[b + 1]]) for (a, i), (b, j) in pairs}
    gram = np.triu(gram) + np.triu(gram, 1).T
    norms, norm_sums = gram[:width, width:], sums[width:]  # Z'A and A's column sums
    out = {}
    for (a, i), (b, j) in pairs:
        x, y = slice(edges[a], edges[a + 1]), slice(edges[b], edges[b + 1])
        cross, sx, sy, ab = gram[x, y], sums[x], sums[y], gram[width + a, width + b]
        trace = _frobenius2(cross) - ab
        ones_k, ones_l = sx @ sx - norm_sums[a], sy @ sy - norm_sums[b]
        middle = sx @ cross @ sy - norms[y, a] @ sy - norms[x, b] @ sx + ab
        out[i, j] = (trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 * middle / (n - 2)) / (n * (n - 3))
        if a == b and _frobenius2(cross - np.outer(sx, sx) / n) <= 0:
            # Constant features: HSIC_u is 0 only up to rounding here, which the plain test catches exactly.
            out[i, j] = 0.0
    return out


def _weighted_syrk(gram: np.ndarray, block: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """gram + block' diag(weights) block for integer weights: one rank-k update per bit of the weights,
    over the rows that have it, scaled by its power of two (exact, unlike scaling rows by sqrt(w))."""
    from scipy.linalg.blas import dsyrk

    bit = 0
    while (weights >> bit).any():
        chosen = block[(weights >> bit) & 1 == 1]
        if len(chosen):
            gram = dsyrk(float(1 << bit), chosen.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
        bit += 1
    return gram


def _frobenius2(matrix: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", matrix, matrix))
