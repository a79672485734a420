"""Metrics jobs (`metrics/`): CKA, retrieval P@1 and probes against independent references, the job
over synthetic stores, and `actcache metrics` end to end on the real MiniLM."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
import subprocess
import sys
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from cache import open_activations
from metrics import (
    Alignment,
    MetricsConfig,
    StoreRows,
    cka_matrix,
    linear_cka,
    probe_accuracy,
    retrieval_p1,
    run_metrics,
)
from schemas import ConfigError
from tests.metricsdata import EXAMPLE_CHUNK, Parallel, StoreSpec, layer_vectors, parallel, write_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["metric", "store", "store_b", "layer", "layer_b", "src_lang", "tgt_lang", "value", "ci_low", "ci_high"]
SEED = 0
FOLDS = 5
STORED_LAYERS = (0, 1, 3)  # of 4 hidden states: layer 2 is not stored
N_STATES = 4
# Small lbfgs fits on a busy 2-core machine: threaded BLAS spins (90 s instead of 7 s for the CLI job).
ONE_BLAS_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- independent references ---------------------------------------------------------------


def textbook_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XX', L = YY', HSIC = tr(KHLH)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    gram_x, gram_y = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(gram_x, gram_y) / np.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))


Key = Hashable | None


def language_pairs(
    languages: Sequence[str], keys: Sequence[Key]
) -> Iterator[tuple[tuple[str, str], list[int], list[int]]]:
    """Each ordered pair (a, b) with its queries (rows of a whose key has a row in b) and candidates
    (every row of b); pairs with no query are left out."""
    for a in sorted(set(languages)):
        for b in sorted(set(languages) - {a}):
            candidates = [j for j, lang in enumerate(languages) if lang == b]
            in_b = {keys[j] for j in candidates} - {None}
            queries = [i for i, lang in enumerate(languages) if lang == a and keys[i] in in_b]
            if queries:
                yield (a, b), queries, candidates


def cosines(vectors: np.ndarray, *, center_by: Sequence[str] | None = None) -> np.ndarray:
    """The full (n, n) cosine matrix in float64, after subtracting each language's mean if asked; a zero row: 0."""
    x = np.asarray(vectors, dtype=np.float64).copy()
    if center_by is not None:
        langs = np.asarray(center_by)
        for lang in set(center_by):
            x[langs == lang] -= x[langs == lang].mean(axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return unit @ unit.T


def brute_force_p1(
    vectors: np.ndarray, languages: Sequence[str], keys: Sequence[Key], *, center: bool = False
) -> dict[tuple[str, str], float]:
    """P@1 from the full cosine matrix and argmax: a query counts for B when its key has an item in B."""
    sims = cosines(vectors, center_by=languages if center else None)
    out = {}
    for pair, queries, candidates in language_pairs(languages, keys):
        hits = [keys[candidates[int(np.argmax(sims[i, candidates]))]] == keys[i] for i in queries]
        out[pair] = sum(hits) / len(queries)
    return out


def p1_bounds(
    vectors: np.ndarray, languages: Sequence[str], keys: Sequence[Key], tol: float = 1e-5
) -> dict[tuple[str, str], tuple[float, float]]:
    """P@1 as (low, high) when near-ties (within `tol`) may go either way: real stores hold identical
    vectors (MiniLM reads Thai as unknown tokens), whose order float rounding decides."""
    sims = cosines(vectors)
    out = {}
    for pair, queries, candidates in language_pairs(languages, keys):
        sure = maybe = 0
        for i in queries:
            right = np.array([keys[j] == keys[i] for j in candidates])
            scores = sims[i, candidates]
            best_right, best_wrong = scores[right].max(), scores[~right].max()
            sure += bool(best_right > best_wrong + tol)
            maybe += bool(best_right >= best_wrong - tol)
        out[pair] = (sure / len(queries), maybe / len(queries))
    return out


def semantic_search_p1(
    vectors: np.ndarray, languages: Sequence[str], keys: Sequence[Key]
) -> dict[tuple[str, str], float]:
    """P@1 from sentence-transformers' `util.semantic_search(queries, corpus, top_k=1)` per language pair."""
    from sentence_transformers import util

    out = {}
    for pair, queries, corpus in language_pairs(languages, keys):
        found = util.semantic_search(torch.from_numpy(vectors[queries]), torch.from_numpy(vectors[corpus]), top_k=1)
        hits = [keys[corpus[int(hit[0]["corpus_id"])]] == keys[i] for i, hit in zip(queries, found, strict=True)]
        out[pair] = sum(hits) / len(queries)
    return out


def position_keys(examples: pd.DataFrame) -> list[tuple[str, int]]:
    """XNLI rows align by their index within their language and field: (field, index)."""
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for lang, fld in zip(examples.language, examples.field, strict=True):
        index = seen.get((lang, fld), 0)
        seen[lang, fld] = index + 1
        keys.append((fld, index))
    return keys


def sklearn_folds(labels: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros((len(labels), 1)), labels))


def lbfgs_reference(x: np.ndarray, labels: np.ndarray, seed: int) -> list[float]:
    """Per-fold accuracy of standardize + lbfgs logistic regression, fitted directly with scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for train, test in sklearn_folds(labels, seed):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        scores.append(float(model.fit(x[train], labels[train]).score(x[test], labels[test])))
    return scores


def sgd_reference(x: np.ndarray, labels: np.ndarray, seed: int, block_rows: int, epochs: int = 5) -> list[float]:
    """Per-fold accuracy of the out-of-core probe, written from scikit-learn: each fold's scaler learns
    from the training rows of each block in turn, then `epochs` passes of SGD log-loss over the blocks."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    n = len(labels)
    spans = [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
    classes = np.unique(labels)
    scores = []
    for _, test in sklearn_folds(labels, seed):
        train_mask = np.ones(n, dtype=bool)
        train_mask[test] = False
        scaler = StandardScaler()
        for start, stop in spans:
            rows = np.flatnonzero(train_mask[start:stop]) + start
            if len(rows):
                scaler.partial_fit(x[rows])
        model = SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed)
        for _ in range(epochs):
            for start, stop in spans:
                rows = np.flatnonzero(train_mask[start:stop]) + start
                if len(rows):
                    model.partial_fit(scaler.transform(x[rows]), labels[rows], classes=classes)
        scores.append(float((model.predict(scaler.transform(x[test])) == labels[test]).mean()))
    return scores


# -- data -------------------------------------------------------------------------------


def hidden_like(rng: np.random.Generator, n: int, width: int, mean: float = 100.0) -> np.ndarray:
    """Rows with per-dimension means ~`mean` times their spread, as hidden states have."""
    mixing = rng.standard_normal((width, width))
    return rng.uniform(0.5, 1.5, width) * mean + rng.standard_normal((n, width)) @ mixing


def related(rng: np.random.Generator, x: np.ndarray, width: int, noise: float) -> np.ndarray:
    """A matrix that shares some structure with `x` (so CKA is strictly between 0 and 1)."""
    return x @ rng.standard_normal((x.shape[1], width)) + noise * rng.standard_normal((len(x), width))


def retrieval_data(seed: int) -> tuple[np.ndarray, list[str], list[Key]]:
    """Shuffled rows of 4 languages (one with fewer items), translations sharing a meaning vector,
    a few rows with no key; vectors carry a per-language offset, so centring matters."""
    rng = np.random.default_rng(seed)
    counts = {"de": 30, "en": 30, "fr": 18, "sw": 30}
    dim = 12
    meanings = rng.standard_normal((30, dim))
    rows: list[tuple[str, Key, np.ndarray]] = []
    for lang, count in counts.items():
        shift = rng.standard_normal(dim)
        rows += [(lang, k, meanings[k] + shift + 0.8 * rng.standard_normal(dim)) for k in range(count)]
        rows += [(lang, None, shift + rng.standard_normal(dim)) for _ in range(3)]
    order = rng.permutation(len(rows))
    return (
        np.stack([rows[i][2] for i in order]).astype(np.float32),
        [rows[i][0] for i in order],
        [rows[i][1] for i in order],
    )


def probe_data(seed: int, n: int = 80, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping classes (accuracy strictly between chance and 1), features on unequal scales."""
    rng = np.random.default_rng(seed)
    labels = np.array(["neg", "neu", "pos"])[np.arange(n) % 3]
    centres = rng.standard_normal((3, d))
    x = centres[np.arange(n) % 3] + 1.2 * rng.standard_normal((n, d))
    return (x * np.logspace(-2, 2, d) + 50.0).astype(np.float32), labels


# -- CKA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [0.0, 100.0])
def test_cka_matrix_equals_the_textbook_gram_formula_over_blocks_and_passes(mean: float) -> None:
    rng = np.random.default_rng(1)
    n = 150
    xs = [hidden_like(rng, n, w, mean) for w in (4, 7, 5)]
    ys = [related(rng, xs[0], 3, 2.0) + mean, related(rng, xs[2], 6, 5.0) - mean]
    heard: list[int] = []
    got = cka_matrix(xs, ys, block_rows=16, memory=8 * 12**2, progress=heard.append)
    assert got.shape == (3, 2), "rows are xs, columns ys"
    expected = np.array([[textbook_cka(x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert len(heard) > n / 16 and sum(heard) >= 2 * n, "several blocks and several passes were summed"
    assert 0.3 < got.max() < 0.99, "the data make a non-trivial comparison"


def test_cka_within_is_symmetric_with_a_unit_diagonal_and_matches_the_textbook() -> None:
    rng = np.random.default_rng(2)
    x = hidden_like(rng, 90, 5)
    xs = [x, related(rng, x, 8, 1.0), hidden_like(rng, 90, 3)]
    got = cka_matrix(xs, block_rows=7, memory=8 * 10**2)
    expected = np.array([[textbook_cka(a, b) for b in xs] for a in xs])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.diag(got), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)


def test_linear_cka_equals_ckatorch() -> None:
    from ckatorch.core import cka_base

    rng = np.random.default_rng(3)
    x = hidden_like(rng, 120, 9)
    y = related(rng, x, 4, 3.0) + 40.0
    peer = float(cka_base(torch.from_numpy(x), torch.from_numpy(y), kernel="linear", unbiased=False))
    assert linear_cka(x, y, block_rows=13) == pytest.approx(peer, abs=1e-9)
    assert 0.05 < peer < 0.99


def test_cka_is_exact_when_means_dwarf_the_spread() -> None:
    """Offsets a million times the spread: CKA ignores a shift, so the reference may take it off exactly
    (x + big - big is exact in float64); naive float64 sums of squares would lose the signal."""
    rng = np.random.default_rng(4)
    x, y = hidden_like(rng, 100, 6, 0.0), hidden_like(rng, 100, 4, 0.0)
    y = y + related(rng, x, 4, 0.0)
    big_x, big_y = rng.uniform(1e6, 2e6, 6), rng.uniform(1e6, 2e6, 4)
    shifted_x, shifted_y = x + big_x, y + big_y
    expected = textbook_cka(shifted_x - big_x, shifted_y - big_y)
    assert linear_cka(shifted_x, shifted_y, block_rows=9) == pytest.approx(expected, abs=1e-9)


def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale() -> None:
    rng = np.random.default_rng(5)
    x = hidden_like(rng, 80, 6)
    y = related(rng, x, 5, 4.0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert linear_cka(x, x, block_rows=11) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y, block_rows=11)
    assert linear_cka(x @ q, y, block_rows=11) == pytest.approx(base, abs=1e-9)
    assert linear_cka(3.7 * x, 0.02 * y, block_rows=11) == pytest.approx(base, abs=1e-9)
    assert 0.05 < base < 0.99


# -- retrieval --------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_retrieval_equals_brute_force_nearest_neighbours(center: bool) -> None:
    vectors, languages, keys = retrieval_data(6)
    heard: list[int] = []
    got = retrieval_p1(vectors, Alignment.of(languages, keys), center=center, block_rows=7, progress=heard.append)
    expected = brute_force_p1(vectors, languages, keys, center=center)
    assert len(expected) == 12, "every ordered pair of the 4 languages"
    assert got == expected
    assert sum(heard) == len(vectors) and len(heard) > 10, "many query blocks"
    assert len(set(expected.values())) > 3 and 0 < min(expected.values()) and max(expected.values()) < 1
    assert got != brute_force_p1(vectors, languages, keys, center=not center), "centring matters on this data"


def test_retrieval_equals_sentence_transformers_semantic_search() -> None:
    vectors, languages, keys = retrieval_data(7)
    got = retrieval_p1(vectors, Alignment.of(languages, keys), block_rows=16)
    assert got == semantic_search_p1(vectors, languages, keys)


def test_retrieval_hand_made_case() -> None:
    """Vectors are one-hot by meaning. In language c, meanings 0 and 1 are swapped, so exactly 2 of
    the 4 queries shared with c find their translation; meaning 4 exists in a and b only; a row
    of a with no key is never a query."""
    eye = np.eye(6, dtype=np.float32)
    rows: list[tuple[str, int | None, np.ndarray]] = [
        *[("a", k, eye[k]) for k in range(5)],
        ("a", None, eye[0] + eye[1]),
        *[("b", k, eye[k]) for k in range(5)],
        *[("c", k, eye[{0: 1, 1: 0}.get(k, k)]) for k in range(4)],
        ("c", None, 0.9 * eye[2] + 0.1 * eye[5]),
    ]
    order = np.random.default_rng(8).permutation(len(rows))
    languages = [rows[i][0] for i in order]
    keys = [rows[i][1] for i in order]
    vectors = np.stack([rows[i][2] for i in order])
    got = retrieval_p1(vectors, Alignment.of(languages, keys), block_rows=3)
    assert got == {
        ("a", "b"): 1.0,
        ("a", "c"): 0.5,
        ("b", "a"): 1.0,
        ("b", "c"): 0.5,
        ("c", "a"): 0.5,
        ("c", "b"): 0.5,
    }


# -- probes ---------------------------------------------------------------------------------


def test_probe_in_memory_equals_sklearn_on_the_same_folds() -> None:
    x, labels = probe_data(9)
    got = probe_accuracy(x, labels, folds=FOLDS, seed=SEED)
    expected = lbfgs_reference(x, labels, SEED)
    assert got.method == "lbfgs"
    assert got.folds == tuple(expected)
    assert got.accuracy == pytest.approx(np.mean(expected), abs=1e-12)
    assert got.chance == pytest.approx(27 / 80)
    assert 0.4 < got.accuracy < 1.0


def test_probe_in_memory_uses_the_seed_for_its_folds() -> None:
    x, labels = probe_data(9)
    other = 3
    assert probe_accuracy(x, labels, seed=other).folds == tuple(lbfgs_reference(x, labels, other))
    assert lbfgs_reference(x, labels, other) != lbfgs_reference(x, labels, SEED), "the seed matters here"


def test_probe_streamed_equals_sklearn_partial_fit_over_the_same_blocks() -> None:
    x, labels = probe_data(10)
    got = probe_accuracy(x, labels, folds=FOLDS, seed=SEED, memory=1, block_rows=16)
    expected = sgd_reference(x, labels, SEED, block_rows=16)
    assert got.method == "sgd"
    assert got.folds == tuple(expected)
    assert 0.4 < got.accuracy < 1.0


def test_probe_streamed_with_a_block_of_one_fold_only() -> None:
    """81 rows in blocks of 16: the last block is one row, so one fold has no training rows in it."""
    x, labels = probe_data(10, n=81)
    got = probe_accuracy(x, labels, folds=FOLDS, seed=SEED, memory=1, block_rows=16)
    assert got.folds == tuple(sgd_reference(x, labels, SEED, block_rows=16))


@pytest.mark.parametrize("memory", [1 << 30, 1])
def test_probe_separable_problem_is_perfect(memory: int) -> None:
    rng = np.random.default_rng(11)
    labels = np.array(["x", "y"])[np.arange(60) % 2]
    x = rng.standard_normal((60, 4)).astype(np.float32)
    x[:, 2] += np.where(labels == "x", -8.0, 8.0)
    got = probe_accuracy(x, labels, memory=memory, block_rows=16)
    assert got.accuracy == 1.0 and got.folds == (1.0,) * FOLDS


def test_probe_needs_enough_rows_per_class() -> None:
    labels = np.array(["a"] * 20 + ["b"] * 4)
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        probe_accuracy(np.zeros((24, 3), dtype=np.float32), labels)


# -- the job over synthetic stores ---------------------------------------------------------


def store_a_data() -> tuple[Parallel, np.ndarray]:
    data = parallel({"de": 14, "en": 14, "fr": 10}, dim=6, seed=12)  # 76 rows: chunks of 8, 4 shards
    return data, layer_vectors(data, len(STORED_LAYERS), seed=13, meaning_weight=(0.3, 1.2, 2.5))


def first_token(pooled: np.ndarray) -> np.ndarray:
    """The stored "first" pooling: not a rescaling or permutation of the mean (cosines would not see that)."""
    return (pooled**2 / 4.0 - pooled[:, :, ::-1]).astype(np.float32)


def store_a(root: Path, data: Parallel, pooled: np.ndarray) -> Path:
    return write_store(
        root,
        StoreSpec(
            pooled={"mean": pooled, "first": first_token(pooled)},
            examples=data.examples,
            layers=STORED_LAYERS,
            n_states=N_STATES,
        ),
    )


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Path, Parallel, np.ndarray]:
    data, pooled = store_a_data()
    return store_a(tmp_path / "actcache", data, pooled), data, pooled


def read_table(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv, keep_default_na=False)


def test_store_rows_read_exactly_the_written_rows(store: tuple[Path, Parallel, np.ndarray]) -> None:
    path, _, pooled = store
    with open_activations(str(path)) as acts:
        assert acts.example_chunk == EXAMPLE_CHUNK
        for position, layer in enumerate(STORED_LAYERS):
            rows = StoreRows(acts, layer)
            assert rows.shape == pooled[position].shape
            for a, b in [(0, 76), (3, 29), (15, 17), (23, 25), (40, 41), (70, 76), (9, 9)]:
                np.testing.assert_array_equal(rows[a:b], pooled[position, a:b])
        np.testing.assert_array_equal(StoreRows(acts, -1, "first")[5:50], first_token(pooled)[2, 5:50])


def test_metrics_on_store_rows_cross_chunks_and_shards(store: tuple[Path, Parallel, np.ndarray]) -> None:
    path, data, pooled = store
    with open_activations(str(path)) as acts:
        rows = [StoreRows(acts, layer) for layer in STORED_LAYERS]
        within = cka_matrix(rows, block_rows=5, memory=8 * 8**2)
        expected = np.array([[textbook_cka(a, b) for b in pooled] for a in pooled])
        np.testing.assert_allclose(within, expected, rtol=0, atol=1e-9)
        alignment = Alignment.of(data.languages, data.keys)
        assert retrieval_p1(rows[1], alignment, block_rows=10) == brute_force_p1(pooled[1], data.languages, data.keys)


def csv_values(table: pd.DataFrame, metric: str, store_b: str = "") -> dict[tuple[str, ...], float]:
    """The `metric` rows of `table` (against `store_b`) by (layer, layer_b, src_lang, tgt_lang), as text."""
    rows = table[(table.metric == metric) & (table.store_b == store_b)]
    index = zip(rows.layer.astype(str), rows.layer_b.astype(str), rows.src_lang, rows.tgt_lang, strict=True)
    return {tuple(key): float(v) for key, v in zip(index, rows.value, strict=True)}


def test_run_metrics_writes_the_tidy_table_equal_to_references(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path
) -> None:
    path, data, pooled = store
    result = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "out", quiet=True))
    assert result.csv == tmp_path / "out" / "metrics.csv"
    assert result.csv.read_text().splitlines()[0].split(",") == COLUMNS
    table = read_table(result.csv)
    assert set(table.store) == {"fake-a__data"} and set(table.store_b) == {""}

    retrieval = {
        (str(layer), "", src, tgt): value
        for layer, vectors in zip(STORED_LAYERS, pooled, strict=True)
        for (src, tgt), value in brute_force_p1(vectors, data.languages, data.keys).items()
    }
    assert csv_values(table, "retrieval_p1") == retrieval
    assert len(retrieval) == 3 * 6

    got_cka = csv_values(table, "cka")
    assert set(got_cka) == {(str(a), str(b), "", "") for a in STORED_LAYERS for b in STORED_LAYERS}
    for (i, a), (j, b) in itertools.product(enumerate(STORED_LAYERS), repeat=2):
        assert got_cka[str(a), str(b), "", ""] == pytest.approx(textbook_cka(pooled[i], pooled[j]), abs=1e-9)

    for column, labels in (("language", data.languages), ("label", [str(v) for v in data.labels])):
        got = csv_values(table, f"probe_{column}")
        expected = {
            (str(layer), "", "", ""): float(np.mean(lbfgs_reference(vectors, np.asarray(labels), SEED)))
            for layer, vectors in zip(STORED_LAYERS, pooled, strict=True)
        }
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (column, key)


def test_run_metrics_centre_and_first_pooling(store: tuple[Path, Parallel, np.ndarray], tmp_path: Path) -> None:
    path, data, pooled = store
    config = MetricsConfig(
        store=str(path), out=tmp_path / "o", metrics=("retrieval",), pooling="first", center=True, quiet=True
    )
    table = read_table(run_metrics(config).csv)
    first = first_token(pooled)
    expected = {
        (str(layer), "", src, tgt): value
        for layer, vectors in zip(STORED_LAYERS, first, strict=True)
        for (src, tgt), value in brute_force_p1(vectors, data.languages, data.keys, center=True).items()
    }
    assert set(table.metric) == {"retrieval_p1"}
    assert csv_values(table, "retrieval_p1") == expected


def test_run_metrics_aligns_rows_without_ids_by_index_within_language_and_field(tmp_path: Path) -> None:
    """As XNLI: no shared id, so the k-th premise of each language is a translation of every other's
    k-th premise. Rows are shuffled, so the index within the language alone would pair wrong rows."""
    data = parallel({"de": 12, "en": 12, "fr": 9}, dim=6, seed=15)
    keys = position_keys(pd.DataFrame({"language": data.languages, "field": data.fields}))
    rng = np.random.default_rng(16)
    meanings = {key: rng.standard_normal(6) for key in sorted(set(keys))}
    data = dataclasses.replace(data, meaning=np.stack([meanings[key] for key in keys]))
    pooled = layer_vectors(data, len(STORED_LAYERS), seed=17, meaning_weight=(0.5, 1.5, 3.0))
    examples: dict[str, list[Any]] = {"language": data.languages, "field": data.fields, "label": data.labels}
    path = write_store(
        tmp_path / "actcache", StoreSpec(pooled={"mean": pooled}, examples=examples, layers=STORED_LAYERS, n_states=4)
    )
    table = read_table(run_metrics(MetricsConfig(store=str(path), out=tmp_path / "o", quiet=True)).csv)
    expected = {
        (str(layer), "", src, tgt): value
        for layer, vectors in zip(STORED_LAYERS, pooled, strict=True)
        for (src, tgt), value in brute_force_p1(vectors, data.languages, keys).items()
    }
    assert csv_values(table, "retrieval_p1") == expected
    assert max(expected.values()) > 0.5, "translations are found: the alignment is the right one"


def test_run_metrics_streamed_probes_on_chosen_layers(store: tuple[Path, Parallel, np.ndarray], tmp_path: Path) -> None:
    """`probe_memory` too small for the features: SGD from row blocks (here one block of all 76 rows)."""
    path, data, pooled = store
    config = MetricsConfig(
        store=str(path), out=tmp_path / "o", metrics=("probe",), layers=(-1, 0), probe_memory=1, quiet=True
    )
    table = read_table(run_metrics(config).csv)
    for column, labels in (("language", data.languages), ("label", [str(v) for v in data.labels])):
        expected = {
            (str(layer), "", "", ""): float(np.mean(sgd_reference(pooled[i], np.asarray(labels), SEED, 8192)))
            for i, layer in ((2, 3), (0, 0))
        }
        got = csv_values(table, f"probe_{column}")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (column, key)


def test_run_metrics_rerun_reads_the_cache(store: tuple[Path, Parallel, np.ndarray], tmp_path: Path) -> None:
    path, _, _ = store
    first = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "one", quiet=True))
    again = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "two", quiet=True))
    assert first.cached == [] and again.cached == ["retrieval", "cka", "probe"]
    assert again.csv.read_bytes() == first.csv.read_bytes()
    other_seed = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "three", seed=1, quiet=True))
    assert other_seed.cached == ["retrieval", "cka"], "probes depend on the seed"


def test_run_metrics_rerun_keeps_undefined_cka_a_float_nan(tmp_path: Path) -> None:
    """A constant layer has no variance: its CKA is 0/0, NaN. The cached rerun's table holds the same
    floats as the first run's (not the text the CSV holds for NaN)."""
    data, pooled = store_a_data()
    pooled[0] = 1.0
    path = write_store(
        tmp_path / "actcache",
        StoreSpec(pooled={"mean": pooled}, examples=data.examples, layers=STORED_LAYERS, n_states=N_STATES),
    )
    runs = [
        run_metrics(MetricsConfig(store=str(path), out=tmp_path / out, metrics=("cka",), quiet=True))
        for out in ("one", "two")
    ]
    assert runs[1].cached == ["cka"]
    for result in runs:
        values = result.table.set_index(["layer", "layer_b"]).value.astype(float)
        assert np.isnan(values[0, 0]) and np.isnan(values[0, 3]) and values[1, 1] == pytest.approx(1.0)
        assert result.table.value.dtype == np.float64, "the table's values are numbers"


def test_run_metrics_skips_a_label_probe_with_a_class_rarer_than_the_folds(tmp_path: Path) -> None:
    """Metrics not asked for run where the metadata allows: a label with 3 rows cannot be split into 5
    stratified folds, so the default job probes the language only and says why it left the label out."""
    data, pooled = store_a_data()
    labels = [2 if i in (0, 1, 2) else int(v == 2) for i, v in enumerate(data.labels)]  # class 2: rows 0-2
    path = write_store(
        tmp_path / "actcache",
        StoreSpec(
            pooled={"mean": pooled},
            examples={**data.examples, "label": labels},
            layers=STORED_LAYERS,
            n_states=N_STATES,
        ),
    )
    result = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "o", quiet=True))
    assert set(result.table.metric) == {"retrieval_p1", "cka", "probe_language"}
    assert any("label" in note for note in result.notes), result.notes


def test_run_metrics_against_a_store_of_the_same_examples(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path
) -> None:
    path, data, pooled = store
    rng = np.random.default_rng(14)
    theirs = np.stack([related(rng, pooled[i].astype(np.float64), 5, 1.0) for i in range(2)]).astype(np.float32)
    other = write_store(
        tmp_path / "actcache",
        StoreSpec(
            pooled={"mean": theirs},
            examples=data.examples,
            layers=(1, 2),
            n_states=3,
            model="org/fake-b",
            alias="fake-b__data",
        ),
    )
    config = MetricsConfig(store=str(path), against=str(other), metrics=("cka",), out=tmp_path / "o", quiet=True)
    result = run_metrics(config)
    assert sorted(p.name for p in result.plots) == ["cka_fake-a__data.png", "cka_fake-a__data_vs_fake-b__data.png"]
    table = read_table(result.csv)
    across = csv_values(table, "cka", store_b="fake-b__data")
    assert set(table.store) == {"fake-a__data"} and len(csv_values(table, "cka")) == 3 * 3
    assert set(across) == {(str(a), str(b), "", "") for a in STORED_LAYERS for b in (1, 2)}
    for (i, a), (j, b) in itertools.product(enumerate(STORED_LAYERS), enumerate((1, 2))):
        assert across[str(a), str(b), "", ""] == pytest.approx(textbook_cka(pooled[i], theirs[j]), abs=1e-9)


def test_run_metrics_against_different_examples_names_both_stores(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path
) -> None:
    path, data, pooled = store
    other = write_store(
        tmp_path / "actcache",
        StoreSpec(
            pooled={"mean": pooled},
            examples=data.examples,
            layers=STORED_LAYERS,
            n_states=N_STATES,
            model="org/fake-b",
            dataset_hash="rows-v2",
            alias="fake-b__data",
        ),
    )
    with pytest.raises(ConfigError, match="different examples") as raised:
        run_metrics(MetricsConfig(store=str(path), against=str(other), out=tmp_path / "o", quiet=True))
    assert path.name.removesuffix(".zarr") in str(raised.value) and other.name.removesuffix(".zarr") in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"metrics": ("retrieval", "mauve")}, r"unknown metric 'mauve'; choose from retrieval, cka, probe"),
        ({"pooling": "max"}, r"unknown pooling 'max'; choose from mean, first, last"),
        ({"pooling": "last"}, r"no 'last' pooling .* it has \[.*mean.*\]"),
        ({"layers": (0, 2)}, r"layer 2 was not stored; .* holds layers \[0, 1, 3\]. Fix"),
        ({"layers": (9,)}, r"layer 9 is out of range .* 4 hidden states"),
        ({"align_column": "pair"}, r"no column 'pair' .* Fix: pass one of those to --align-column"),
        ({"metrics": ("retrieval",), "align_column": "row"}, r"cannot run retrieval: .*'row'.*Fix: name the"),
        ({"folds": 1}, r"--folds must be at least 2"),
        ({"bootstrap": 5}, r"--bootstrap 5: too few resamples .* Fix: 0 \(no intervals\) or at least 10"),
        ({"bootstrap": -1}, r"--bootstrap counts resamples: got -1. Fix: 0 \(no intervals\) or B >= 10"),
        ({"mknn_k": 0}, r"--mknn-k must be at least 1, got 0"),
        ({"margin_k": 0}, r"--margin-k must be at least 1, got 0"),
        ({"metrics": ("mknn",), "mknn_k": 76}, r"cannot run mknn: 76 neighbours need more than 76 examples; .* 76"),
    ],
)
def test_run_metrics_config_errors_name_the_fix(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path, options: dict[str, object], message: str
) -> None:
    path, _, _ = store
    with pytest.raises(ConfigError, match=message):
        run_metrics(MetricsConfig(store=str(path), out=tmp_path / "o", quiet=True, **options))  # type: ignore[arg-type]
    assert not (tmp_path / "o").exists(), "nothing is written for a request that cannot run"


def test_retrieval_without_a_language_column_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    data, pooled = store_a_data()
    path = write_store(
        tmp_path / "actcache",
        StoreSpec(
            pooled={"mean": pooled},
            examples={"id": data.ids, "label": data.labels},
            layers=STORED_LAYERS,
            n_states=N_STATES,
        ),
    )
    with pytest.raises(ConfigError, match=r"cannot run retrieval: .*no language column.*Fix: .*--metrics cka,probe"):
        run_metrics(MetricsConfig(store=str(path), metrics=("retrieval",), out=tmp_path / "o", quiet=True))
    result = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "o", quiet=True))
    assert set(result.table.metric) == {"cka", "probe_label"}
    assert any("retrieval skipped" in note for note in result.notes)


def test_run_metrics_writes_plots_embedded_in_the_report(
    store: tuple[Path, Parallel, np.ndarray], tmp_path: Path
) -> None:
    path, _, _ = store
    result = run_metrics(MetricsConfig(store=str(path), out=tmp_path / "out", quiet=True))
    names = sorted(p.name for p in result.plots)
    assert names == ["cka_fake-a__data.png", "probes_fake-a__data.png", "retrieval_p1_fake-a__data.png"]
    page = result.report.read_text(encoding="utf-8")
    assert result.report == tmp_path / "out" / "report.html"
    for png in result.plots:
        data = png.read_bytes()
        assert png.parent == tmp_path / "out" and data.startswith(b"\x89PNG\r\n\x1a\n")
        assert f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" in page
    assert page.count("data:image/png;base64,") == 3


# -- end to end: the real MiniLM, through the command line --------------------------------


def imported_modules(stderr: str) -> set[str]:
    """Module names `python -X importtime` reported."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"imported package"}


def test_cli_metrics_on_the_real_minilm(minilm_path: Path, tmp_path: Path) -> None:
    from pipeline.extract import ExtractConfig, extract

    assert minilm_path.is_dir()
    root = Path(os.environ["ACTCACHE_DIR"])
    with open(os.devnull, "w") as devnull:
        extract(ExtractConfig(model="minilm-l6", data="sample", quiet=True), out=devnull)
    out = tmp_path / "metrics-out"
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "pipeline",
            "metrics",
            "--model",
            "minilm-l6",
            "--data",
            "sample",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "ACTCACHE_DIR": str(root), **ONE_BLAS_THREAD},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out / "report.html")
    modules = imported_modules(done.stderr)
    assert "metrics.cka" in modules and "sklearn" in modules, "importtime saw the job's imports"
    heavy = sorted(m for m in modules if m.split(".")[0] in {"torch", "transformers"})
    assert heavy == [], heavy[:5]

    table = read_table(out / "metrics.csv")
    with open_activations(model="minilm-l6", data="sample") as acts:
        examples = acts.examples
        languages = sorted(set(examples.language))
        assert len(languages) == 15 and acts.layers == tuple(range(7))
        retrieval = table[table.metric == "retrieval_p1"]
        pairs = {(s, t) for s in languages for t in languages if s != t}
        assert len(retrieval) == 7 * 210
        assert set(zip(retrieval.layer, retrieval.src_lang, retrieval.tgt_lang, strict=True)) == {
            (layer, s, t) for layer in range(7) for s, t in pairs
        }
        layer = 6
        bounds = p1_bounds(acts.pooled(layer).compute(), list(examples.language), position_keys(examples))
    got = csv_values(table, "retrieval_p1")
    assert bounds.keys() == pairs
    for pair, (low, high) in bounds.items():
        assert low <= got[str(layer), "", *pair] <= high, pair
    exact = [low for low, high in bounds.values() if low == high]
    assert len(exact) >= 180 and 0.05 < np.mean(exact) < 1.0, "most pairs have no near-tie: one right answer"

    cka = table[table.metric == "cka"]
    assert len(cka) == 49
    diagonal = cka[cka.layer.astype(str) == cka.layer_b.astype(str)]
    np.testing.assert_allclose(diagonal.value.astype(float), 1.0, rtol=0, atol=1e-9)
    for column in ("probe_language", "probe_label"):
        probes = table[table.metric == column]
        assert sorted(probes.layer) == list(range(7)) and probes.value.between(0, 1).all()
