"""The metrics job beyond the peers: debiased CKA, mutual k-NN and margin retrieval in `metrics.csv`, and
bootstrap intervals, against references computed here in numpy on the arrays the stores hold."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metrics import MetricsConfig, run_metrics
from metrics.job import METRICS
from tests.metricsdata import Parallel, StoreSpec, layer_vectors, parallel, write_store
from tests.test_cka_debiased import unbiased_cka
from tests.test_metrics import (
    N_STATES,
    REPO,
    STORED_LAYERS,
    brute_force_p1,
    csv_values,
    read_table,
    store_a_data,
    textbook_cka,
)
from tests.test_neighbours import brute_force_margin_p1, brute_force_mknn

pytestmark = pytest.mark.integration

SEED = 3


# -- independent references -----------------------------------------------------------------


def gram_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The Gram-matrix form on centred rows (the estimator does not see a shift; centring keeps digits)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return unbiased_cka(x - x.mean(0), y - y.mean(0))


# -- stores -----------------------------------------------------------------------------------


def store_of(root: Path, data: Parallel, pooled: np.ndarray, content: str) -> Path:
    """A store of `pooled`; `content` stands for its dataset's hash: stores of other data must have other keys
    (the metrics cache is shared by the session and keyed by them)."""
    spec = StoreSpec(
        pooled={"mean": pooled}, examples=data.examples, layers=STORED_LAYERS, n_states=N_STATES, dataset_hash=content
    )
    return write_store(root, spec)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Parallel, np.ndarray]:
    data, pooled = store_a_data()
    return store_of(tmp_path_factory.mktemp("beyond") / "actcache", data, pooled, "beyond-a"), data, pooled


def sized_store(root: Path, pairs: int) -> tuple[Path, Parallel, np.ndarray]:
    """Three languages of `pairs` translated pairs each (premise and hypothesis): 6 x pairs examples."""
    data = parallel({"de": pairs, "en": pairs, "fr": pairs}, dim=6, seed=21)
    pooled = layer_vectors(data, len(STORED_LAYERS), seed=22, meaning_weight=(0.3, 1.2, 2.5))
    return store_of(root, data, pooled, f"beyond-{pairs}-pairs"), data, pooled


# -- the new metrics equal their references ---------------------------------------------------


def test_new_metrics_in_the_table_equal_numpy_references(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path
) -> None:
    path, data, pooled = store
    config = MetricsConfig(
        store=str(path),
        out=tmp_path / "out",
        metrics=("cka_debiased", "mknn", "retrieval_margin"),
        mknn_k=5,
        margin_k=3,
        quiet=True,
    )
    result = run_metrics(config)
    table = read_table(result.csv)
    assert set(table.metric) == {"cka_debiased", "mknn", "retrieval_margin_p1", "retrieval_p1"}
    assert (table.ci_low == "").all() and (table.ci_high == "").all(), "no intervals without --bootstrap"

    pairs = list(itertools.product(enumerate(STORED_LAYERS), repeat=2))
    debiased = csv_values(table, "cka_debiased")
    mknn = csv_values(table, "mknn")
    for (i, a), (j, b) in pairs:
        key = (str(a), str(b), "", "")
        assert debiased[key] == pytest.approx(gram_debiased_cka(pooled[i], pooled[j]), abs=1e-9)
        assert mknn[key] == pytest.approx(brute_force_mknn(pooled[i], pooled[j], 5), abs=1e-12)
    assert len(debiased) == len(mknn) == len(pairs)

    margin = csv_values(table, "retrieval_margin_p1")
    plain = csv_values(table, "retrieval_p1")
    for layer, vectors in zip(STORED_LAYERS, pooled, strict=True):
        for (src, tgt), value in brute_force_margin_p1(vectors, data.languages, data.keys, 3).items():
            assert margin[str(layer), "", src, tgt] == pytest.approx(value, abs=1e-12)
        for (src, tgt), value in brute_force_p1(vectors, data.languages, data.keys).items():
            assert plain[str(layer), "", src, tgt] == pytest.approx(value, abs=1e-12)
    assert len(margin) == len(plain) == 3 * 6
    stems = sorted(p.stem for p in result.plots)
    assert stems == ["cka_debiased_fake-a__data", "mknn_fake-a__data", "retrieval_margin_p1_fake-a__data",
                     "retrieval_p1_fake-a__data"]  # fmt: skip
    page = result.report.read_text(encoding="utf-8")
    assert "Debiased linear CKA: fake-a__data" in page and "Mutual k-NN: fake-a__data" in page
    assert "Margin retrieval P@1: fake-a__data" in page


# -- bootstrap intervals ------------------------------------------------------------------------


def resampled_cka(x: np.ndarray, y: np.ndarray, seed: int, draws: int) -> tuple[float, float]:
    """CKA's interval as the job documents it, by hand: plain CKA of `draws` random halves of the rows
    (numpy's default_rng(seed), n // 2 rows without replacement), their 2.5% .. 97.5% spread about their
    median placed about the estimate on all rows."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        rows = rng.choice(len(x), len(x) // 2, replace=False)
        values.append(textbook_cka(x[rows], y[rows]))
    low, middle, high = np.quantile(values, [0.025, 0.5, 0.975])
    estimate = textbook_cka(x, y)
    return float(estimate - (middle - low)), float(estimate + (high - middle))


def test_cka_interval_equals_half_samples_of_the_rows_by_hand(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path
) -> None:
    path, _, pooled = store
    config = MetricsConfig(store=str(path), out=tmp_path / "o", metrics=("cka",), bootstrap=40, seed=SEED, quiet=True)
    table = run_metrics(config).table.set_index(["layer", "layer_b"])
    for (i, a), (j, b) in itertools.product(enumerate(STORED_LAYERS), repeat=2):
        low, high = resampled_cka(pooled[i], pooled[j], SEED, 40)
        assert table.ci_low[a, b] == pytest.approx(low, abs=1e-9)
        assert table.ci_high[a, b] == pytest.approx(high, abs=1e-9)


ALL_NEW = ("retrieval", "cka", "probe", "cka_debiased", "mknn", "retrieval_margin")


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory) -> dict[int, pd.DataFrame]:
    """Every metric with 200 resamples on stores of 3 x 30 and 3 x 120 translated pairs."""
    tables = {}
    for pairs in (30, 120):
        root = tmp_path_factory.mktemp(f"boot{pairs}")
        path, _, _ = sized_store(root / "actcache", pairs)
        config = MetricsConfig(
            store=str(path), out=root / "out", metrics=ALL_NEW, bootstrap=200, seed=SEED, mknn_k=5, quiet=True
        )
        tables[pairs] = run_metrics(config).table
    return tables


def test_bootstrap_intervals_hold_the_estimate_and_shrink_as_n_grows(bootstrapped: dict[int, pd.DataFrame]) -> None:
    small, large = bootstrapped[30], bootstrapped[120]
    for table in (small, large):
        assert table.ci_low.notna().all() and table.ci_high.notna().all(), "every row has its interval"
        inside = (table.ci_low <= table.value + 1e-12) & (table.value <= table.ci_high + 1e-12)
        assert inside.all(), table[~inside]
    width = {n: (t.ci_high - t.ci_low).groupby(t.metric).mean() for n, t in bootstrapped.items()}
    metrics = {"retrieval_p1", "retrieval_margin_p1", "cka", "cka_debiased", "mknn", "probe_language"}
    assert metrics <= set(width[30].index)
    for metric in metrics:
        # 4x the examples: intervals about half as wide (1/sqrt(4)); well under 0.8 of the small store's.
        assert width[120][metric] < 0.8 * width[30][metric], (metric, width[30][metric], width[120][metric])


def test_bootstrap_is_seeded(store: tuple[Path, Parallel, np.ndarray], tmp_path: Path) -> None:
    path, _, _ = store

    def run(seed: int, out: str) -> pd.DataFrame:
        config = MetricsConfig(
            store=str(path),
            out=tmp_path / out,
            metrics=("mknn",),
            mknn_k=5,
            bootstrap=30,
            seed=seed,
            quiet=True,
            use_cache=False,  # computed each time: a cached reread would be equal whatever the seed did
        )
        return run_metrics(config).table

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first.ci_low, other.ci_low), "another seed draws other resamples"
    assert np.array_equal(first.value, other.value), "the estimate itself is not resampled"


# -- errors and undefined values ------------------------------------------------------------------


def test_undefined_debiased_cka_is_an_empty_cell_with_a_note(tmp_path: Path) -> None:
    data, pooled = store_a_data()
    pooled[0] = 1.0  # layer 0 constant over the examples
    path = store_of(tmp_path / "actcache", data, pooled, "beyond-constant-layer")
    config = MetricsConfig(store=str(path), out=tmp_path / "o", metrics=("cka_debiased",), bootstrap=10, quiet=True)
    result = run_metrics(config)
    values = result.table.set_index(["layer", "layer_b"]).value
    assert np.isnan(values[0, 0]) and np.isnan(values[0, 3]) and np.isnan(values[3, 0])
    assert values[1, 1] == pytest.approx(1.0)
    assert any(n.startswith("cka_debiased: 5 cell(s) undefined (empty), from layer(s) 0: ") for n in result.notes)
    page = result.report.read_text(encoding="utf-8")
    assert "cka_debiased: 5 cell(s) undefined (empty), from layer(s) 0: " in page
    from metrics.plots import _cka_pivot, _normalize

    matrix = _cka_pivot(_normalize(result.table), within=True)
    assert list(matrix.index) == list(matrix.columns) == list(STORED_LAYERS), "the constant layer keeps its blanks"
    rows = read_table(result.csv).set_index(["layer", "layer_b"])
    assert rows.value[0, 1] == "" and rows.ci_low[0, 1] == "", "undefined cells are empty in the CSV"


def test_debiased_cka_half_samples_centre_on_the_estimate_where_draws_with_replacement_do_not() -> None:
    """Independent layers, 64 features at n = 64: CKA's resamples (random halves) give debiased estimates
    around the data's (~0); draws with replacement pair copies of an example and centre near 0.5."""
    from metrics import linear_cka
    from metrics.job import _half_samples

    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    config = MetricsConfig(store="-", out="-", bootstrap=60, seed=SEED)
    estimate = linear_cka(x, y, debiased=True)
    halves = [linear_cka(x, y, debiased=True, weights=w) for w in _half_samples(64, config)]
    copies = [linear_cka(x, y, debiased=True, weights=np.bincount(rng.integers(0, 64, 64), minlength=64))
              for _ in range(60)]  # fmt: skip
    assert abs(np.median(halves) - estimate) < 0.05 < abs(np.median(copies) - estimate) - 0.2, (
        estimate, np.median(halves), np.median(copies))  # fmt: skip


def test_mknn_and_debiased_cka_against_another_store(store: tuple[Path, Parallel, np.ndarray], tmp_path: Path) -> None:
    path, data, pooled = store
    rng = np.random.default_rng(14)
    theirs = (pooled[:2] @ rng.standard_normal((6, 5)) + rng.standard_normal((2, len(pooled[0]), 5))).astype(np.float32)
    other = write_store(
        tmp_path / "actcache",
        StoreSpec(pooled={"mean": theirs}, examples=data.examples, layers=(1, 2), n_states=3, model="org/fake-b",
                  alias="fake-b__data", dataset_hash="beyond-a"),
    )  # fmt: skip
    config = MetricsConfig(store=str(path), against=str(other), metrics=("cka_debiased", "mknn"), mknn_k=4,
                           out=tmp_path / "o", quiet=True)  # fmt: skip
    table = read_table(run_metrics(config).csv)
    debiased, mknn = csv_values(table, "cka_debiased", "fake-b__data"), csv_values(table, "mknn", "fake-b__data")
    assert set(debiased) == set(mknn) == {(str(a), str(b), "", "") for a in STORED_LAYERS for b in (1, 2)}
    for (i, a), (j, b) in itertools.product(enumerate(STORED_LAYERS), enumerate((1, 2))):
        key = (str(a), str(b), "", "")
        assert debiased[key] == pytest.approx(gram_debiased_cka(pooled[i], theirs[j]), abs=1e-9)
        assert mknn[key] == pytest.approx(brute_force_mknn(pooled[i], theirs[j], 4), abs=1e-12)


# -- plots and help -----------------------------------------------------------------------------


def test_line_plots_draw_intervals_as_bands(bootstrapped: dict[int, pd.DataFrame]) -> None:
    from metrics.plots import _figures, _normalize

    with_bands = {stem: fig for stem, fig in _figures(_normalize(bootstrapped[30]))}
    without = {stem: fig for stem, fig in _figures(_normalize(bootstrapped[30].assign(ci_low=np.nan, ci_high=np.nan)))}
    for stem in ("retrieval_p1_fake-a__data", "retrieval_margin_p1_fake-a__data", "probes_fake-a__data"):
        bands = len(with_bands[stem].axes[0].collections)
        assert bands >= 1 and len(without[stem].axes[0].collections) == 0, stem


def test_help_says_what_each_metric_measures_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "metrics", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    text = " ".join(done.stdout.split())
    for name, what in METRICS.items():
        assert f"{name} {' '.join(what.split())}" in text, name
    assert "--bootstrap B" in done.stdout and "--mknn-k" in done.stdout and "--margin-k" in done.stdout


def test_every_new_parameter_is_in_the_cache_key(store: tuple[Path, Parallel, np.ndarray], tmp_path: Path) -> None:
    """A rerun with the same parameters reads the cache (intervals back as floats); a changed k, B or seed
    computes again."""
    path, _, _ = store
    base = {"store": str(path), "metrics": ("mknn", "retrieval_margin"), "mknn_k": 5, "margin_k": 3, "quiet": True}

    def run(out: str, **changes: object) -> tuple[list[str], pd.DataFrame]:
        result = run_metrics(MetricsConfig(**(base | changes), out=tmp_path / out))  # type: ignore[arg-type]
        return result.cached, result.table

    first = run("a", bootstrap=10, seed=7)
    again = run("b", bootstrap=10, seed=7)
    assert first[0] == [] and again[0] == ["retrieval_margin", "mknn"]
    pd.testing.assert_frame_equal(first[1], again[1])
    assert again[1].ci_low.dtype == np.float64 and again[1].ci_low.notna().all()
    assert run("c", bootstrap=10, seed=8)[0] == []
    assert run("d", bootstrap=11, seed=7)[0] == []
    assert run("e", bootstrap=10, seed=7, mknn_k=4)[0] == ["retrieval_margin"]
    assert run("f", bootstrap=10, seed=7, margin_k=2)[0] == ["mknn"]
    no_intervals = run("g")
    assert no_intervals[0] == [] and no_intervals[1].ci_low.isna().all()
    assert run("h")[0] == ["retrieval_margin", "mknn"]
