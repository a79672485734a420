"""Debiased linear CKA and resample weights (`metrics.cka`) against independent references: the Gram-matrix
form of the unbiased HSIC estimator, repeated rows, ckatorch's unbiased CKA."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from metrics.cka import cka_matrix, linear_cka
from tests.test_metrics import textbook_cka

pytestmark = pytest.mark.unit  # numpy arrays only: no model, no store


# -- independent references ---------------------------------------------------------------


def unbiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. 2012: K = XX', L = YY' with zeroed diagonals,
    [tr(KL) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    gram_k, gram_l = x @ x.T, y @ y.T
    np.fill_diagonal(gram_k, 0.0)
    np.fill_diagonal(gram_l, 0.0)
    one = np.ones(n)
    sums = (one @ gram_k @ one) * (one @ gram_l @ one) / ((n - 1) * (n - 2))
    middle = one @ gram_k @ gram_l @ one
    return float((np.trace(gram_k @ gram_l) + sums - 2 / (n - 2) * middle) / (n * (n - 3)))


def unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    return unbiased_hsic(x, y) / np.sqrt(unbiased_hsic(x, x) * unbiased_hsic(y, y))


def hidden_like(rng: np.random.Generator, n: int, width: int, mean: float = 0.0) -> np.ndarray:
    """Correlated features around per-dimension means ~`mean` times their spread, as hidden states have."""
    return rng.uniform(0.5, 1.5, width) * mean + rng.standard_normal((n, width)) @ rng.standard_normal((width, width))


def related(rng: np.random.Generator, x: np.ndarray, width: int, noise: float) -> np.ndarray:
    """A matrix that shares some structure with `x` (so CKA is strictly between 0 and 1)."""
    return x @ rng.standard_normal((x.shape[1], width)) + noise * rng.standard_normal((len(x), width))


# -- the estimator ----------------------------------------------------------------------------


def test_unbiased_hsic_ignores_a_shift_of_every_row() -> None:
    """The first-block shift is exact for the debiased form too: U-centring removes c.x_i + c.x_j + c.c."""
    rng = np.random.default_rng(10)
    x = hidden_like(rng, 40, 5)
    y = related(rng, x, 3, 2.0)
    base = unbiased_hsic(x, y)
    assert unbiased_hsic(x + rng.uniform(-3, 3, 5), y) == pytest.approx(base, rel=1e-9)
    assert unbiased_hsic(x + 1.5, y - rng.uniform(-3, 3, 3)) == pytest.approx(base, rel=1e-9)
    assert abs(base) > 1.0, "a non-trivial HSIC"


@pytest.mark.parametrize("block_rows", [7, 13, 60, 1000])
def test_debiased_cka_equals_the_gram_formula_over_blocks(block_rows: int) -> None:
    rng = np.random.default_rng(11)
    x = hidden_like(rng, 60, 6)
    y = related(rng, x, 4, 3.0)
    expected = unbiased_cka(x, y)
    assert linear_cka(x, y, debiased=True, block_rows=block_rows) == pytest.approx(expected, abs=1e-9)
    assert 0.05 < expected < 0.95
    assert abs(linear_cka(x, y, block_rows=block_rows) - expected) > 0.01, "debiased differs from plain"


def test_debiased_cka_matrix_equals_the_gram_formula_over_layers_and_passes() -> None:
    rng = np.random.default_rng(12)
    n = 97
    xs = [hidden_like(rng, n, w).astype(np.float32) for w in (4, 7, 5)]
    ys = [related(rng, xs[0], 3, 2.0), related(rng, xs[2], 6, 5.0)]
    heard: list[int] = []
    across = cka_matrix(xs, ys, debiased=True, block_rows=13, memory=8 * 12**2, progress=heard.append)
    np.testing.assert_allclose(across, [[unbiased_cka(x, y) for y in ys] for x in xs], rtol=0, atol=1e-9)
    assert sum(heard) >= 2 * n, "several passes were summed"
    within = cka_matrix(xs, debiased=True, block_rows=13, memory=8 * 12**2)
    np.testing.assert_allclose(within, [[unbiased_cka(a, b) for b in xs] for a in xs], rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.diag(within), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(within, within.T)


def test_debiased_cka_is_exact_when_means_dwarf_the_spread() -> None:
    """Means 100 times the spread: the reference, which would lose digits to them, sees the centred data
    (the estimator ignores a shift, as the test above checks)."""
    rng = np.random.default_rng(13)
    x = hidden_like(rng, 80, 6)
    y = related(rng, x, 4, 4.0)
    spread = max(x.std(), y.std())
    big_x, big_y = 100 * spread * rng.uniform(0.5, 1.5, 6), -100 * spread * rng.uniform(0.5, 1.5, 4)
    expected = unbiased_cka(x - x.mean(axis=0), y - y.mean(axis=0))
    for block_rows in (9, 80):
        got = linear_cka(x + big_x, y + big_y, debiased=True, block_rows=block_rows)
        assert got == pytest.approx(expected, abs=1e-9)
    weights = rng.integers(0, 3, 80)
    expected = unbiased_cka(*(np.repeat(m - m.mean(axis=0), weights, axis=0) for m in (x, y)))
    assert linear_cka(x + big_x, y + big_y, debiased=True, weights=weights, block_rows=9) == pytest.approx(expected)


@pytest.mark.parametrize("n", [64, 256])
def test_debiased_cka_is_near_zero_on_independent_data_where_plain_is_not(n: int) -> None:
    debiased, plain = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((n, 64)), rng.standard_normal((n, 64))
        debiased.append(linear_cka(x, y, debiased=True, block_rows=50))
        plain.append(linear_cka(x, y, block_rows=50))
    assert abs(np.mean(debiased)) < 0.02
    assert min(debiased) < 0, "the estimate is not clipped at 0"
    assert np.mean(plain) > 0.15


def test_debiased_cka_is_one_on_itself_and_invariant_to_rotation_and_scale() -> None:
    rng = np.random.default_rng(14)
    x = hidden_like(rng, 80, 6, 50.0)
    y = related(rng, x, 5, 4.0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert linear_cka(x, x, debiased=True, block_rows=11) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y, debiased=True, block_rows=11)
    assert linear_cka(x @ q, y, debiased=True, block_rows=11) == pytest.approx(base, abs=1e-9)
    assert linear_cka(3.7 * x, 0.02 * y, debiased=True, block_rows=11) == pytest.approx(base, abs=1e-9)
    assert 0.05 < base < 0.99


def test_debiased_linear_cka_equals_ckatorch_unbiased() -> None:
    from ckatorch.core import cka_base

    rng = np.random.default_rng(15)
    x = hidden_like(rng, 70, 9)
    y = related(rng, x, 4, 3.0) + 40.0
    peer = float(cka_base(torch.from_numpy(x), torch.from_numpy(y), kernel="linear", unbiased=True))
    assert linear_cka(x, y, debiased=True, block_rows=13) == pytest.approx(peer, abs=1e-9)
    assert peer == pytest.approx(unbiased_cka(x, y), abs=1e-9), "ckatorch's U-centring is the same estimator"
    assert 0.05 < peer < 0.99


# -- weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_weights_count_rows_as_if_repeated(debiased: bool) -> None:
    rng = np.random.default_rng(16)
    n = 70
    xs = [hidden_like(rng, n, w, 30.0) for w in (5, 3)]
    ys = [related(rng, xs[0], 4, 2.0), hidden_like(rng, n, 2)]
    weights = rng.integers(0, 6, n)
    weights[:9] = 0  # the whole first block left out: the shift comes from rows that count
    weights[-3:] = [0, 9, 0]
    got = cka_matrix(xs, ys, debiased=debiased, weights=weights, block_rows=9, memory=8 * 8**2)
    repeated = [np.repeat(m, weights, axis=0) for m in (*xs, *ys)]
    expected = cka_matrix(repeated[:2], repeated[2:], debiased=debiased, block_rows=9)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    reference = unbiased_cka if debiased else textbook_cka
    centred = [m - m.mean(axis=0) for m in repeated]  # the references lose digits to large means
    expected = np.array([[reference(x, y) for y in centred[2:]] for x in centred[:2]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert not np.allclose(got, cka_matrix(xs, ys, debiased=debiased, block_rows=9), atol=1e-3), "weights matter"


@pytest.mark.parametrize("debiased", [False, True])
def test_all_ones_weights_equal_no_weights(debiased: bool) -> None:
    rng = np.random.default_rng(17)
    xs = [hidden_like(rng, 50, w, 20.0) for w in (4, 6, 3)]
    got = cka_matrix(xs, debiased=debiased, weights=np.ones(50, dtype=int), block_rows=8)
    np.testing.assert_allclose(got, cka_matrix(xs, debiased=debiased, block_rows=8), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.ones(9, dtype=int), r"shape \(10,\); got shape \(9,\)"),
        (np.array([1, 1, -1, 1, 1, 1, 1, 1, 1, 1]), r"weights\[2\] is -1"),
        (np.array([1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1]), r"weights\[3\] is 0.5"),
    ],
    ids=["shape", "negative", "fraction"],
)
def test_weights_that_are_not_multiplicities_are_refused(weights: np.ndarray, message: str) -> None:
    x = np.random.default_rng(18).standard_normal((10, 3))
    with pytest.raises(ValueError, match=message):
        linear_cka(x, x, weights=weights)


# -- undefined cases --------------------------------------------------------------------------


def test_debiased_cka_needs_four_examples() -> None:
    x = np.random.default_rng(19).standard_normal((10, 3))
    with pytest.raises(ValueError, match=r"needs at least 4 examples, got 3$"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match=r"needs at least 4 examples, got 3 \(the weights' sum\)"):
        linear_cka(x, x, debiased=True, weights=np.array([0, 1, 0, 0, 2, 0, 0, 0, 0, 0]))
    assert linear_cka(x[:4], x[:4] ** 2, debiased=True) == pytest.approx(unbiased_cka(x[:4], x[:4] ** 2), abs=1e-9)
    assert np.isfinite(linear_cka(x[:3], x[:3] ** 2)), "plain CKA needs only 2"


@pytest.mark.parametrize("debiased", [False, True])
def test_a_constant_layer_is_nan_quietly(debiased: bool) -> None:
    """0.1 in float64: the mean of 7 of them is not 0.1, so the shifted layer is a tiny constant, not 0."""
    rng = np.random.default_rng(20)
    n = 40
    constant = np.full((n, 3), 0.1)
    xs = [hidden_like(rng, n, 4, 10.0), constant, related(rng, constant, 2, 0.0) + 7.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cka_matrix(xs, debiased=debiased, block_rows=7)
    undefined = np.zeros((3, 3), dtype=bool)
    undefined[1:, :] = undefined[:, 1:] = True
    np.testing.assert_array_equal(np.isnan(got), undefined)
    assert got[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("debiased", [False, True])
def test_a_layer_constant_over_the_weighted_rows_is_nan(debiased: bool) -> None:
    """Rows of weight 0 are absent: a layer that varies only there is constant."""
    rng = np.random.default_rng(21)
    n = 40
    x, varied = hidden_like(rng, n, 4, 10.0), np.full((n, 3), 0.1)
    weights = rng.integers(1, 3, n)
    weights[[0, 5, 33]] = 0
    varied[[0, 5, 33]] = rng.standard_normal((3, 3)) * 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cka_matrix([x, varied], debiased=debiased, weights=weights, block_rows=7)
    np.testing.assert_array_equal(np.isnan(got), [[False, True], [True, True]])
