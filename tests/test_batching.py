"""A shard's batches: the cheapest cut of the lengths sorted longest first, at most `batch_size` each."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from pipeline.batching import batch_overhead, batches

pytestmark = pytest.mark.unit

SHARD = 1_000


def _cut(lengths: list[int], batch_size: int) -> list[list[int]]:
    return [b.tolist() for b in batches(np.array(lengths), batch_size)]


def _computed(lengths: np.ndarray, groups: list[np.ndarray]) -> int:
    return sum(len(g) * int(lengths[g].max()) for g in groups)


def test_a_long_pair_and_a_short_pair_go_apart() -> None:
    """At batch 4 (2 positions a batch): [10, 9] [2, 1] costs 20 + 2 + 4 + 2 = 28; all four 40 + 2 = 42,
    [10] [9] [2, 1] 29, [10, 9] [2] [1] 29, one each 30. Indices are the shard's (dataset order)."""
    assert batch_overhead(4) == 2
    assert _cut([10, 9, 2, 1], 4) == [[0, 1], [2, 3]]
    assert _cut([2, 10, 1, 9], 4) == [[1, 3], [0, 2]]


def test_two_examples_share_a_batch_while_the_gap_is_at_most_the_overhead() -> None:
    """Together 2a + C, apart a + b + 2C: at batch 8 (C = 4), 10 and 6 share (24 vs 24, ties go to
    fewer batches), 10 and 5 do not (24 vs 23)."""
    assert batch_overhead(8) == 4
    assert _cut([10, 6], 8) == [[0, 1]]
    assert _cut([10, 5], 8) == [[0], [1]]


def test_equal_lengths_fill_whole_batches_remainder_last() -> None:
    assert _cut([7] * 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _cut([7] * 8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_edges() -> None:
    assert _cut([], 4) == []
    assert _cut([3, 5, 4], 1) == [[1], [2], [0]]
    with pytest.raises(ValueError, match="at least 1"):
        batches(np.array([1]), 0)


def _every_cut(n: int, batch_size: int) -> list[list[int]]:
    """The batch boundaries of each way to cut `n` sorted examples into runs of at most `batch_size`."""
    cuts = ([0, *(i + 1 for i in range(n - 1) if mask >> i & 1), n] for mask in range(2 ** (n - 1)))
    return [ends for ends in cuts if max(np.diff(ends)) <= batch_size]


def test_no_contiguous_cut_costs_less() -> None:
    """Against every cut of the sorted lengths on small random shards."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, batch_size = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        lengths = rng.integers(0, 30, size=n)
        fixed, ordered = batch_overhead(batch_size), np.sort(lengths)[::-1]
        least = min(
            sum(int(ordered[a]) * (b - a) + fixed for a, b in pairwise(ends)) for ends in _every_cut(n, batch_size)
        )
        groups = batches(lengths, batch_size)
        assert _computed(lengths, groups) + fixed * len(groups) == least, (lengths.tolist(), batch_size)


def _long_tailed(n: int, seed: int = 0) -> np.ndarray:
    """Token counts like `bench.scale.write_rows`'s texts: 3-60 words, log-normal around 6; ~1.4 tokens
    a word plus 2 special tokens, capped at 64 (its tiny BERT's max length)."""
    rng = np.random.default_rng(seed)
    words = np.clip(np.rint(np.exp(rng.normal(np.log(6), 0.6, size=n))), 3, 60)
    return np.minimum(np.rint(1.4 * words + 2), 64).astype(np.int64)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32, 128])
def test_a_permutation_in_batches_of_at_most_batch_size_longest_first(batch_size: int) -> None:
    lengths = _long_tailed(SHARD, seed=batch_size)
    groups = batches(lengths, batch_size)
    assert all(1 <= len(g) <= batch_size for g in groups)
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(SHARD))
    ordered = np.concatenate([lengths[g] for g in groups])
    assert np.all(np.diff(ordered) <= 0), "longest first, within and across batches"


@pytest.mark.parametrize("batch_size", [32, 128])
def test_padding_at_most_5_percent_where_the_fixed_cut_padded_more(batch_size: int) -> None:
    """On 20 shards of long-tailed lengths; the fixed cut (every `batch_size` of the sorted
    lengths, the run's batching before) is computed beside it."""
    lengths = _long_tailed(20 * SHARD)
    shards = [lengths[s : s + SHARD] for s in range(0, len(lengths), SHARD)]
    cut = sum(_computed(shard, batches(shard, batch_size)) for shard in shards)
    fixed = 0
    for shard in shards:
        order = np.argsort(-shard, kind="stable")
        fixed += _computed(shard, [order[b : b + batch_size] for b in range(0, SHARD, batch_size)])
    tokens = int(lengths.sum())
    padding, before = 1 - tokens / cut, 1 - tokens / fixed
    assert padding <= 0.05, f"{padding:.1%} padding at batch {batch_size} (fixed cut {before:.1%})"
    assert padding < before
    if batch_size == 128:
        assert before > 0.10, f"the fixed cut padded {before:.1%}: the sample lost its long tail"
