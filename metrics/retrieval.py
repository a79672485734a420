"""Cross-lingual retrieval P@1 per language pair (the XTREME/Tatoeba measure), blockwise.

Items of different languages that share an alignment key are translations of each other.
For queries in language A, P@1(A -> B) is the share whose cosine nearest neighbour among
all items of language B is a translation; queries without a translation in B are not
counted. Similarities are computed a query block against a candidate block at a time
(never an n x n matrix): memory is a few blocks whatever n is, and the running best of each
query in each target language is all that is kept between blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from metrics.rows import Rows, align_of, blocks, read

__all__ = ["RETRIEVAL_BLOCK_ROWS", "Alignment", "retrieval_p1"]

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
    """
    n = int(vectors.shape[0])
    if len(alignment.language) != n:
        raise ValueError(f"{n} vectors for {len(alignment.language)} aligned items")
    n_lang = len(alignment.languages)
    means = _language_means(vectors, alignment, block_rows) if center else None
    hits = np.zeros((n_lang, n_lang), dtype=np.int64)
    counted = np.zeros((n_lang, n_lang), dtype=np.int64)
    present = _present(alignment)
    spans = list(blocks(n, block_rows, align_of(vectors)))
    for q0, q1 in spans:
        queries = _unit(vectors, q0, q1, alignment, means)
        best = np.full((q1 - q0, n_lang), -np.inf, dtype=np.float32)
        best_at = np.full((q1 - q0, n_lang), -1, dtype=np.int64)
        for c0, c1 in spans:
            candidates = queries if (c0, c1) == (q0, q1) else _unit(vectors, c0, c1, alignment, means)
            # Candidates grouped by language (stably: within one, in row order), so each target
            # language's scores are a slice of one product, not a gathered copy.
            order = np.argsort(alignment.language[c0:c1], kind="stable")
            grouped = alignment.language[c0:c1][order]
            scores = queries @ candidates[order].T
            targets, firsts = np.unique(grouped, return_index=True)
            for target, lo, hi in zip(targets, firsts, [*firsts[1:], len(order)], strict=True):
                arg = scores[:, lo:hi].argmax(axis=1)
                value = scores[np.arange(len(arg)), lo + arg]
                better = value > best[:, target]  # strictly: ties keep the earlier item, as argmax does
                best[better, target] = value[better]
                best_at[better, target] = c0 + order[lo + arg[better]]
        _count(alignment, present, q0, q1, best_at, hits, counted)
        if progress is not None:
            progress(q1 - q0)
    names = alignment.languages
    return {
        (names[a], names[b]): float(hits[a, b] / counted[a, b])
        for a in range(n_lang)
        for b in range(n_lang)
        if a != b and counted[a, b]
    }


def _count(
    alignment: Alignment,
    present: np.ndarray,
    q0: int,
    q1: int,
    best_at: np.ndarray,
    hits: np.ndarray,
    counted: np.ndarray,
) -> None:
    """Add the query block's answers: a query counts for target B when it has a translation in B."""
    source = alignment.language[q0:q1]
    group = alignment.group[q0:q1]
    has = np.zeros((len(group), len(alignment.languages)), dtype=bool)
    has[group >= 0] = present[group[group >= 0]]
    found = best_at >= 0
    right = np.zeros_like(has)
    rows, targets = np.nonzero(found)
    right[rows, targets] = (alignment.group[best_at[rows, targets]] == group[rows]) & (group[rows] >= 0)
    for target in range(len(alignment.languages)):
        mask = has[:, target] & (source != target)
        np.add.at(counted[:, target], source[mask], 1)
        np.add.at(hits[:, target], source[mask & right[:, target]], 1)


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


def _unit(vectors: Rows, start: int, stop: int, alignment: Alignment, means: np.ndarray | None) -> np.ndarray:
    """Rows [start, stop), centred per language if asked, scaled to unit length, as float32."""
    block = read(vectors, start, stop)
    if means is not None:
        block -= means[alignment.language[start:stop]]
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return (block / np.where(norms > 0, norms, 1.0)).astype(np.float32)
