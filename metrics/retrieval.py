"""Cross-lingual retrieval P@1 per language pair (the XTREME/Tatoeba measure), blockwise.

Items of different languages that share an alignment key are translations of each other.
For queries in language A, P@1(A -> B) is the share whose nearest neighbour among all items
of language B is a translation; queries without a translation in B are not counted.
"Nearest" is by cosine, or by the ratio margin of Artetxe and Schwenk (2019), which divides
the cosine by the two items' mean cosine to their k nearest items of the other's language:

    margin(x, y) = cos(x, y) / (mean_{z in kNN_B(x)} cos(x, z) / 2 + mean_{z in kNN_A(y)} cos(y, z) / 2)

so a hub (a vector close to everything) stops being everyone's nearest neighbour.
Similarities are computed a query block against a candidate block at a time (never an
n x n matrix): memory is a few blocks plus O(n x languages) whatever n is. The margin takes
two passes over the blocks: one for the k-NN means of every item towards every other
language, one for the best candidate of each query in each target language.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from metrics.rows import Rows, align_of, blocks, read

__all__ = [
    "RETRIEVAL_BLOCK_ROWS",
    "Alignment",
    "Outcomes",
    "retrieval_margin_p1",
    "retrieval_outcomes",
    "retrieval_p1",
]

RETRIEVAL_BLOCK_ROWS = 4096  # a 4096 x 4096 float32 similarity block: 64 MB


@dataclass(frozen=True)
class Alignment:
    """Each item's language code and alignment group (-1: no key, never a translation), as integers."""

    languages: tuple[str, ...]
    language: np.ndarray  # (n,) index into `languages`
    group: np.ndarray  # (n,) items with one group are translations of each other

    @classmethod
    def of(cls, languages: Sequence[str], keys: Sequence[Hashable | None]) -> Alignment:
        """From per-item language codes and alignment keys (None: no translation)."""
        if len(languages) != len(keys):
            raise ValueError(f"{len(languages)} languages for {len(keys)} keys")
        names, language = np.unique(np.asarray(languages, dtype=object).astype(str), return_inverse=True)
        ids: dict[Hashable, int] = {}
        group = np.array([-1 if k is None else ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
        return cls(tuple(str(n) for n in names), language.astype(np.int64), group)


@dataclass(frozen=True)
class Outcomes:
    """Per query and target language: whether it counts (has a translation there), whether its best candidate is one."""

    languages: tuple[str, ...]
    source: np.ndarray  # (n,) language index per item
    counted: np.ndarray  # (n, n_languages) bool: never for the item's own language
    hit: np.ndarray  # (n, n_languages) bool: only where counted

    def p1(self, weights: np.ndarray | None = None) -> dict[tuple[str, str], float]:
        """P@1 per ordered pair; `weights` (n,) non-negative multiplicities per item (a bootstrap resample):
        weighted share. Pairs without a counted query (of positive weight) are left out.
        """
        n, n_lang = self.counted.shape
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not np.all(w >= 0):  # also rejects NaN
            bad = np.count_nonzero(~(w >= 0))
            raise ValueError(f"weights must be {n} non-negative numbers, one per item; got {w.size}, {bad} not >= 0")
        inverse, sources, outcomes = self._distinct
        per_row = np.bincount(inverse, weights=w, minlength=len(sources))  # whole numbers stay exact
        totals = np.zeros((n_lang, 2 * n_lang))
        np.add.at(totals, sources, per_row[:, None] * outcomes)
        counted, hits = totals[:, :n_lang], totals[:, n_lang:]
        names = self.languages
        return {
            (names[a], names[b]): float(hits[a, b] / counted[a, b])
            for a in range(n_lang)
            for b in range(n_lang)
            if a != b and counted[a, b] > 0
        }

    @cached_property
    def _distinct(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inverse (n,), source (r,), [counted, hit] (r, 2 n_languages) as 0/1): the distinct rows of outcomes
        and each item's, so a bootstrap's weighted sums run over these few rows, not over n x n_languages."""
        both = np.concatenate([self.counted, self.hit], axis=1)
        n = len(both)
        raw = np.concatenate(
            [self.source.astype(">i8").view(np.uint8).reshape(n, 8), np.packbits(both, axis=1)], axis=1
        )
        keys = np.ascontiguousarray(raw).view(np.dtype((np.void, raw.shape[1]))).reshape(n)  # a row as one value
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        return inverse.reshape(n), self.source[first], both[first].astype(np.float64)


def retrieval_p1(
    vectors: Rows,
    alignment: Alignment,
    *,
    center: bool = False,
    block_rows: int = RETRIEVAL_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[str, str], float]:
    """P@1 for every ordered pair (source, target) of distinct languages with at least one translation.

    `center` subtracts each language's mean vector first (known to lift retrieval: it removes
    the language identity the vectors carry). `progress(rows)` hears of every query block.

    >>> retrieval_p1(vectors, Alignment.of(languages, keys))   # doctest: +SKIP
    {('de', 'en'): 0.93, ('en', 'de'): 0.91}
    """
    outcomes = retrieval_outcomes(vectors, alignment, center=center, block_rows=block_rows, progress=progress)
    return outcomes["cosine"].p1()


def retrieval_margin_p1(
    vectors: Rows,
    alignment: Alignment,
    *,
    k: int = 4,
    center: bool = False,
    block_rows: int = RETRIEVAL_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[str, str], float]:
    """P@1 as `retrieval_p1`, the nearest candidate by the ratio margin over `k` nearest neighbours."""
    outcomes = retrieval_outcomes(
        vectors, alignment, center=center, margin_k=k, block_rows=block_rows, progress=progress
    )
    return outcomes["margin"].p1()


def retrieval_outcomes(
    vectors: Rows,
    alignment: Alignment,
    *,
    center: bool = False,
    margin_k: int | None = None,
    block_rows: int = RETRIEVAL_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Outcomes]:
    """Each query's outcome per target language: {"cosine": ...}, and "margin" when `margin_k` is given.

    Both criteria read the same similarity blocks. `margin_k` is the neighbours averaged in
    the margin's denominator (all items of a language that has fewer). `progress(rows)` hears
    of every query block of each pass (two passes with the margin).
    """
    n = int(vectors.shape[0])
    if len(alignment.language) != n:
        raise ValueError(f"{n} vectors for {len(alignment.language)} aligned items")
    if margin_k is not None and margin_k < 1:
        raise ValueError(f"margin_k={margin_k!r}: the margin averages at least 1 neighbour")
    n_lang = len(alignment.languages)
    means = _language_means(vectors, alignment, block_rows) if center else None
    spans = list(blocks(n, block_rows, align_of(vectors)))
    # (n_languages, n): row B holds every item's mean cosine to its k nearest items of B (+inf for its own).
    knn = None if margin_k is None else _knn_means(vectors, alignment, means, spans, margin_k, progress)
    kinds = ["cosine"] if knn is None else ["cosine", "margin"]
    counted = np.zeros((n, n_lang), dtype=bool)
    hit = {kind: np.zeros((n, n_lang), dtype=bool) for kind in kinds}
    present = _present(alignment)
    for q0, q1 in spans:
        queries = _Block.read(vectors, q0, q1, alignment, means)
        best = {kind: np.full((q1 - q0, n_lang), -np.inf, dtype=np.float32) for kind in kinds}
        best_at = {kind: np.full((q1 - q0, n_lang), -1, dtype=np.int64) for kind in kinds}
        for c0, c1 in spans:
            candidates = queries if c0 == q0 else _Block.read(vectors, c0, c1, alignment, means)
            scores = queries.unit @ candidates.unit.T
            for target, lo, hi in candidates.runs:
                rows = candidates.rows[lo:hi]
                _keep_best(scores[:, lo:hi], rows, best["cosine"][:, target], best_at["cosine"][:, target])
                if knn is not None:
                    # For query x_i (language A_i) and candidate y_j: knn[B, x_i] + knn[A_i, y_j], the row of
                    # knn[:, rows] of each query's language. Not halved: that doubles every score exactly,
                    # so the argmax is the same.
                    denominator = knn[:, rows][queries.language]
                    denominator += knn[target, queries.rows, None]
                    margin = np.divide(scores[:, lo:hi], denominator, out=denominator)
                    _keep_best(margin, rows, best["margin"][:, target], best_at["margin"][:, target])
        for kind in kinds:
            in_row_order = np.empty_like(best_at[kind])
            in_row_order[queries.rows - q0] = best_at[kind]
            counted[q0:q1], hit[kind][q0:q1] = _count(alignment, present, q0, q1, in_row_order)
        if progress is not None:
            progress(q1 - q0)
    return {kind: Outcomes(alignment.languages, alignment.language, counted, hit[kind]) for kind in kinds}


@dataclass(frozen=True)
class _Block:
    """Rows [start, stop) as float32 unit vectors grouped by language, and each language's run."""

    unit: np.ndarray  # (b, d) grouped by language, stably (within one, in row order)
    rows: np.ndarray  # (b,) the row index of each of `unit`'s rows
    language: np.ndarray  # (b,) language index of each of `unit`'s rows
    runs: list[tuple[int, int, int]]  # (language, lo, hi): that language's rows are unit[lo:hi]

    @classmethod
    def read(cls, vectors: Rows, start: int, stop: int, alignment: Alignment, means: np.ndarray | None) -> _Block:
        # Grouped by language, so each target language's scores are a slice of one product, not a gathered copy.
        language = alignment.language[start:stop]
        order = np.argsort(language, kind="stable")
        shift = None if means is None else means[language]
        grouped = language[order]
        names, firsts = np.unique(grouped, return_index=True)
        ends = [*firsts[1:].tolist(), len(order)]
        runs = list(zip(names.tolist(), firsts.tolist(), ends, strict=True))
        return cls(_unit(vectors, start, stop, shift)[order], start + order, grouped, runs)


def _knn_means(
    vectors: Rows,
    alignment: Alignment,
    means: np.ndarray | None,
    spans: list[tuple[int, int]],
    k: int,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    """(n_languages, n) float32: each item's mean cosine to its k nearest items of each other language.

    The item's own language holds +inf: its margin against its own language is then 0 (such
    pairs are never counted) rather than NaN.
    """
    n_lang = len(alignment.languages)
    sizes = np.bincount(alignment.language, minlength=n_lang)
    out = np.empty((n_lang, int(alignment.language.shape[0])), dtype=np.float32)
    for q0, q1 in spans:
        queries = _Block.read(vectors, q0, q1, alignment, means)
        top = np.full((n_lang, q1 - q0, k), -np.inf, dtype=np.float32)  # the k best so far, unordered
        for c0, c1 in spans:
            candidates = queries if c0 == q0 else _Block.read(vectors, c0, c1, alignment, means)
            scores = queries.unit @ candidates.unit.T
            for target, lo, hi in candidates.runs:
                top[target] = _top_values(np.concatenate([top[target], _top_values(scores[:, lo:hi], k)], axis=1), k)
        # A language of fewer than k items: its -inf places are left out of the mean.
        total = np.where(np.isfinite(top), top, 0).sum(axis=2, dtype=np.float64)
        out[:, queries.rows] = total / np.clip(sizes, 1, k)[:, None]
        out[queries.language, queries.rows] = np.inf
        if progress is not None:
            progress(q1 - q0)
    return out


def _top_values(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest values (all, where a row has fewer), in no order."""
    m = scores.shape[1]
    return scores if m <= k else np.partition(scores, m - k, axis=1)[:, m - k :]


def _keep_best(scores: np.ndarray, rows: np.ndarray, best: np.ndarray, best_at: np.ndarray) -> None:
    """Update each query's running best (`best`, `best_at`: views, written in place) from one slice of candidates."""
    arg = scores.argmax(axis=1)
    value = scores[np.arange(len(arg)), arg]
    undefined = np.flatnonzero(np.isnan(value))  # 0 / 0 (zero vectors): such a score never wins
    if undefined.size:
        fixed = np.where(np.isnan(scores[undefined]), -np.inf, scores[undefined])
        arg[undefined] = fixed.argmax(axis=1)
        value[undefined] = fixed[np.arange(len(undefined)), arg[undefined]]
    better = value > best  # strictly: ties keep the earlier item, as argmax does
    best[better] = value[better]
    best_at[better] = rows[arg[better]]


def _count(
    alignment: Alignment, present: np.ndarray, q0: int, q1: int, best_at: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The query block's outcomes (counted, hit): a query counts for target B when it has a translation
    in B (and B is not its own language); it hits when its best candidate in B is one."""
    source = alignment.language[q0:q1]
    group = alignment.group[q0:q1]
    counted = np.zeros((len(group), len(alignment.languages)), dtype=bool)
    counted[group >= 0] = present[group[group >= 0]]
    counted[np.arange(len(group)), source] = False
    hit = np.zeros_like(counted)
    rows, targets = np.nonzero(counted & (best_at >= 0))
    hit[rows, targets] = alignment.group[best_at[rows, targets]] == group[rows]
    return counted, hit


def _present(alignment: Alignment) -> np.ndarray:
    """(groups, languages): whether the group has an item in the language."""
    n_groups = int(alignment.group.max()) + 1 if alignment.group.size else 0
    present = np.zeros((max(n_groups, 1), len(alignment.languages)), dtype=bool)
    keyed = alignment.group >= 0
    present[alignment.group[keyed], alignment.language[keyed]] = True
    return present


def _language_means(vectors: Rows, alignment: Alignment, block_rows: int) -> np.ndarray:
    sums = np.zeros((len(alignment.languages), int(vectors.shape[1])))
    for start, stop in blocks(int(vectors.shape[0]), block_rows, align_of(vectors)):
        np.add.at(sums, alignment.language[start:stop], read(vectors, start, stop))
    counts = np.bincount(alignment.language, minlength=len(alignment.languages))
    return sums / np.maximum(counts, 1)[:, None]


def _unit(vectors: Rows, start: int, stop: int, shift: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop), less `shift` (per row) if given, scaled to unit length (a zero row stays 0), as float32."""
    block = read(vectors, start, stop)
    if shift is not None:
        block -= shift
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return (block / np.where(norms > 0, norms, 1.0)).astype(np.float32)
