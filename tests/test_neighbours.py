"""Nearest-neighbour metrics (`metrics.neighbours`, the margin and outcomes of `metrics.retrieval`) against
brute-force numpy references on full similarity matrices, and hand-made cases with answers worked by hand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from metrics.neighbours import knn_indices, knn_overlap, mutual_knn
from metrics.retrieval import Alignment, Outcomes, retrieval_margin_p1, retrieval_outcomes, retrieval_p1
from tests.test_metrics import Key, brute_force_p1, cosines, language_pairs

pytestmark = pytest.mark.unit


# -- independent references ---------------------------------------------------------------


def brute_force_knn(x: np.ndarray, k: int) -> np.ndarray:
    """Sort each row of the cosine matrix, self left out, by decreasing similarity, stably (ties: lower index)."""
    sims = cosines(x)
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def brute_force_mknn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    a, b = brute_force_knn(x, k), brute_force_knn(y, k)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(len(x))]))


def brute_force_margin_p1(
    vectors: np.ndarray, languages: Sequence[str], keys: Sequence[Key], k: int, *, center: bool = False
) -> dict[tuple[str, str], float]:
    """Artetxe and Schwenk's ratio margin from the full cosine matrix: each query of A takes the item j of B
    maximising cos(i, j) / (mean of i's k best cosines to B / 2 + mean of j's k best cosines to A / 2)."""
    sims = cosines(vectors, center_by=languages if center else None)
    langs = np.asarray(languages)

    def knn_mean(i: int, lang: str) -> float:
        return float(np.mean(np.sort(sims[i, langs == lang])[::-1][:k]))

    out = {}
    for (a, b), queries, candidates in language_pairs(languages, keys):
        hits = 0
        for i in queries:
            scores = [sims[i, j] / (knn_mean(i, b) / 2 + knn_mean(j, a) / 2) for j in candidates]
            hits += keys[candidates[int(np.argmax(scores))]] == keys[i]
        out[a, b] = hits / len(queries)
    return out


# -- data -------------------------------------------------------------------------------


def margin_data(seed: int) -> tuple[np.ndarray, list[str], list[Key]]:
    """Shuffled rows of 4 languages of uneven sizes ("sw" has 3 items: fewer than k = 4), translations
    sharing a meaning vector, some meanings missing from some languages (queries without a translation
    there), a few rows with no key, a per-language offset (centring matters) and a hub in "fr". With k = 30,
    "fr" (29 items) has fewer than k too."""
    rng = np.random.default_rng(seed)
    dim = 10
    meanings = rng.standard_normal((40, dim))
    keys_of = {"de": range(0, 36), "en": range(4, 40), "fr": range(0, 26), "sw": (1, 7, 39)}
    rows: list[tuple[str, Key, np.ndarray]] = []
    for lang, keys in keys_of.items():
        shift = 0.7 * rng.standard_normal(dim)
        rows += [(lang, k, meanings[k] + shift + 0.9 * rng.standard_normal(dim)) for k in keys]
        rows += [(lang, None, shift + rng.standard_normal(dim)) for _ in range(2 if lang != "sw" else 0)]
    rows.append(("fr", None, meanings.mean(axis=0) * 4 + 0.1 * rng.standard_normal(dim)))
    order = rng.permutation(len(rows))
    return (
        np.stack([rows[i][2] for i in order]).astype(np.float32),
        [rows[i][0] for i in order],
        [rows[i][1] for i in order],
    )


def hidden(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.uniform(-1, 1, d)).astype(np.float32)


def at_angles(degrees: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    theta = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.asarray(radii)[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)


# -- k nearest neighbours -------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [7, 16, 1000])
def test_knn_indices_equal_brute_force_across_blocks(block_rows: int) -> None:
    """53 rows (no block size divides it), a zero row among them (similarity 0 to every row)."""
    rng = np.random.default_rng(20)
    x = hidden(rng, 53, 6)
    x[17] = 0.0
    heard: list[int] = []
    got = knn_indices(x, 5, block_rows=block_rows, progress=heard.append)
    assert got.dtype == np.int64 and got.shape == (53, 5)
    np.testing.assert_array_equal(got, brute_force_knn(x, 5))
    np.testing.assert_array_equal(got[17], [0, 1, 2, 3, 4], err_msg="the zero row: all tie at 0, lowest first")
    assert sum(heard) == 53 and len(heard) == -(-53 // block_rows)


@pytest.mark.parametrize("block_rows", [3, 5, 100])
def test_knn_ties_go_to_the_lower_index_in_every_block(block_rows: int) -> None:
    """Scaled axis vectors: similarities exactly 1 or 0, so most neighbours tie; the lower index goes first."""
    axes = [0, 1, 0, 2, 0, 1, 2, 0, 1, 0, 2, 2, 0]
    x = np.eye(3, dtype=np.float32)[axes] * np.arange(1, len(axes) + 1, dtype=np.float32)[:, None]
    got = knn_indices(x, 6, block_rows=block_rows)
    np.testing.assert_array_equal(got, brute_force_knn(x, 6))
    np.testing.assert_array_equal(got[0], [2, 4, 7, 9, 12, 1])  # the other 0-axis rows, then the first of the rest
    np.testing.assert_array_equal(got[11], [3, 6, 10, 0, 1, 2])


@pytest.mark.parametrize("block_rows", [1500, 1100, 300])
def test_knn_ties_in_wide_blocks_equal_brute_force(block_rows: int) -> None:
    """Rows of four +-1 entries among 12: every cosine a multiple of 1/4, exact in float32 and float64, so
    many neighbours tie; blocks of 1,024 columns and more take the narrowed search, 300 the plain one."""
    rng = np.random.default_rng(27)
    x = np.zeros((1500, 12), dtype=np.float32)
    for row in x:
        row[rng.choice(12, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    np.testing.assert_array_equal(knn_indices(x, 7, block_rows=block_rows), brute_force_knn(x, 7))


def test_knn_hand_made_case_and_mutual_knn_of_a_moved_point() -> None:
    """Points on a circle (radii differ: cosine ignores them) at 0, 10, 30, 55, 95 and 150 degrees; the nearest
    are the nearest in angle. In Y point 0 moves to 200 degrees: the lists of points 0, 1 and 5 change,
    sharing 0, 1 and 1 of their 2 neighbours with X's: mutual k-NN (0 + 1/2 + 1 + 1 + 1 + 1/2) / 6 = 2/3."""
    radii = [1.0, 2.0, 0.5, 3.0, 1.5, 0.7]
    x = at_angles([0, 10, 30, 55, 95, 150], radii)
    y = at_angles([200, 10, 30, 55, 95, 150], radii)
    knn_x, knn_y = knn_indices(x, 2, block_rows=4), knn_indices(y, 2, block_rows=4)
    np.testing.assert_array_equal(knn_x, [[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [4, 3]])
    np.testing.assert_array_equal(knn_y, [[5, 4], [2, 3], [1, 3], [2, 4], [3, 5], [0, 4]])
    np.testing.assert_array_equal(knn_overlap(knn_x, knn_y), [0, 0.5, 1, 1, 1, 0.5])
    assert mutual_knn(x, y, 2, block_rows=4) == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_mutual_knn_equals_brute_force(k: int) -> None:
    rng = np.random.default_rng(21)
    x = hidden(rng, 61, 7)
    y = (x @ rng.standard_normal((7, 5)) + 1.5 * rng.standard_normal((61, 5))).astype(np.float32)
    got = mutual_knn(x, y, k, block_rows=8)
    assert got == pytest.approx(brute_force_mknn(x, y, k), abs=1e-15)
    assert 0.05 < got < 0.95, "the two representations share some neighbours, not all"


def test_mutual_knn_is_one_under_rotation_and_scaling() -> None:
    rng = np.random.default_rng(22)
    x = hidden(rng, 70, 8)
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    y = 3.5 * rng.uniform(0.2, 5.0, (70, 1)) * (x @ rotation)  # cosines unchanged
    assert mutual_knn(x, y, 5, block_rows=9) == 1.0
    assert mutual_knn(x, hidden(rng, 70, 8), 5, block_rows=9) < 0.5, "unrelated rows share few neighbours"


@pytest.mark.parametrize("k", [5, 6, 0])
def test_knn_needs_k_between_1_and_n_minus_1(k: int) -> None:
    x = np.ones((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"k={k} .* n=5 rows"):
        knn_indices(x, k)
    with pytest.raises(ValueError, match=rf"k={k} .* n=5 rows"):
        mutual_knn(x, x, k)
    assert knn_indices(x, 4).shape == (5, 4)


def test_knn_overlap_and_mutual_knn_need_lists_of_the_same_examples() -> None:
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(4, 3\)"):
        knn_overlap(np.zeros((4, 2), dtype=np.int64), np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="6 rows against 5"):
        mutual_knn(np.ones((6, 2)), np.ones((5, 2)), 2)


# -- margin retrieval -----------------------------------------------------------------------


@pytest.mark.parametrize(("center", "k"), [(False, 4), (True, 4), (False, 1), (True, 7), (False, 30)])
def test_margin_p1_equals_brute_force(center: bool, k: int) -> None:
    vectors, languages, keys = margin_data(23)
    heard: list[int] = []
    got = retrieval_margin_p1(
        vectors, Alignment.of(languages, keys), k=k, center=center, block_rows=9, progress=heard.append
    )
    expected = brute_force_margin_p1(vectors, languages, keys, k, center=center)
    assert len(expected) == 12, "every ordered pair of the 4 languages"
    assert got == expected
    assert sum(heard) == 2 * len(vectors), "two passes over the query blocks"
    assert sum(0 < v < 1 for v in expected.values()) >= 8, "most pairs find some translations, not all"
    assert got != brute_force_p1(vectors, languages, keys, center=center), "the margin differs from cosine"
    assert got != brute_force_margin_p1(vectors, languages, keys, k, center=not center), "centring matters"


def test_margin_overcomes_a_hub_that_cosine_falls_for() -> None:
    """Queries x_i = e_i (i < 4) of "q"; their translations y_i = 0.4 e_i + sqrt(0.84) e_4 of "t", and a hub
    h = (e_0 + e_1 + e_2 + e_3) / 2 of "t" (no key), at cosine 0.5 > 0.4 to every query: cosine takes h for
    every query, P@1(q -> t) = 0. With k = 4: x_i's 4 best in "t" are 0.5, 0.4, 0, 0 (mean 0.225); y_i's in
    "q" 0.4, 0, 0, 0 (mean 0.1); h's 0.5 x 4 (mean 0.5). margin(x_i, y_i) = 0.4 / (0.1125 + 0.05) = 2.46 beats
    margin(x_i, h) = 0.5 / (0.1125 + 0.25) = 1.38: P@1 = 1. From "t", y_i's nearest is x_i either way."""
    eye = np.eye(5)
    vectors = np.stack([*eye[:4], *(0.4 * eye[:4] + np.sqrt(0.84) * eye[4]), eye[:4].sum(axis=0) / 2])
    languages = ["q"] * 4 + ["t"] * 5
    keys: list[Key] = [0, 1, 2, 3, 0, 1, 2, 3, None]
    order = np.random.default_rng(24).permutation(9)  # the hub is not simply last
    alignment = Alignment.of([languages[i] for i in order], [keys[i] for i in order])
    outcomes = retrieval_outcomes(vectors[order].astype(np.float32), alignment, margin_k=4, block_rows=4)
    assert outcomes["cosine"].p1() == {("q", "t"): 0.0, ("t", "q"): 1.0}
    assert outcomes["margin"].p1() == {("q", "t"): 1.0, ("t", "q"): 1.0}


@pytest.mark.parametrize("block_rows", [1, 4, 10])
def test_retrieval_ties_go_to_the_earlier_candidate(block_rows: int) -> None:
    """Queries e_0, e_1, e_2 of "a"; in "b" e_0 and e_1 come twice, first with no key (exact ties: one-hot
    vectors). The earlier row wins, within a block and across blocks: only e_2 finds its translation."""
    eye = np.eye(3, dtype=np.float32)
    vectors = eye[[0, 1, 2, 0, 0, 1, 1, 2]]
    alignment = Alignment.of(["a", "a", "a", "b", "b", "b", "b", "b"], [0, 1, 2, None, 0, None, 1, 2])
    for kind, outcomes in retrieval_outcomes(vectors, alignment, margin_k=1, block_rows=block_rows).items():
        assert outcomes.p1() == {("a", "b"): 1 / 3, ("b", "a"): 1.0}, kind


# -- outcomes -------------------------------------------------------------------------------


@pytest.fixture()
def outcomes() -> dict[str, Outcomes]:
    vectors, languages, keys = margin_data(25)
    return retrieval_outcomes(vectors, Alignment.of(languages, keys), margin_k=4, block_rows=11)


def test_retrieval_p1_is_the_cosine_outcomes_and_the_margin_pass_shares_them(outcomes: dict[str, Outcomes]) -> None:
    vectors, languages, keys = margin_data(25)
    alignment = Alignment.of(languages, keys)
    plain = retrieval_p1(vectors, alignment, block_rows=11)
    assert plain == outcomes["cosine"].p1() == brute_force_p1(vectors, languages, keys)
    only_cosine = retrieval_outcomes(vectors, alignment, block_rows=11)
    assert list(only_cosine) == ["cosine"] and list(outcomes) == ["cosine", "margin"]
    np.testing.assert_array_equal(only_cosine["cosine"].hit, outcomes["cosine"].hit)
    np.testing.assert_array_equal(outcomes["cosine"].counted, outcomes["margin"].counted)
    assert not np.array_equal(outcomes["cosine"].hit, outcomes["margin"].hit)


@pytest.mark.parametrize("kind", ["cosine", "margin"])
def test_outcomes_weighted_p1_is_the_p1_of_the_items_repeated(outcomes: dict[str, Outcomes], kind: str) -> None:
    got = outcomes[kind]
    n = len(got.source)
    assert got.p1(np.ones(n)) == got.p1()
    weights = np.bincount(np.random.default_rng(26).integers(0, n, n), minlength=n)  # a bootstrap resample
    source = np.repeat(got.source, weights)
    counted = np.repeat(got.counted, weights, axis=0)
    hit = np.repeat(got.hit, weights, axis=0)
    names = got.languages
    by_hand = {}
    for a, b in np.ndindex(len(names), len(names)):
        queries = (source == a) & counted[:, b]
        if queries.any():
            by_hand[names[a], names[b]] = int(hit[queries, b].sum()) / int(queries.sum())
    assert got.p1(weights) == by_hand
    assert by_hand != got.p1(), "the resample changes P@1"


def test_outcomes_leave_out_pairs_without_weight_and_reject_bad_weights(outcomes: dict[str, Outcomes]) -> None:
    got = outcomes["cosine"]
    weights = np.where(got.source == got.languages.index("sw"), 0, 1)
    assert set(got.p1(weights)) == {pair for pair in got.p1() if pair[0] != "sw"}
    for bad in (-weights, np.ones(3), np.full(len(weights), np.nan)):
        with pytest.raises(ValueError, match="non-negative numbers, one per item"):
            got.p1(bad)
