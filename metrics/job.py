"""A metrics job: one or two stores in, `metrics.csv`, PNG plots and an HTML report out.

`run_metrics(MetricsConfig(...))` opens the stores (key, alias, path or URL), works out
languages, alignment and labels from their example metadata, runs each requested metric
per layer, and writes the tidy table, the plots and the report under `out`. Each metric's
rows are cached under the cache root by the stores' keys and the metric's parameters, so a
rerun (or another `--out`) is a read of a small CSV.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache.files import atomic_write_bytes
from cache.keys import hash_value
from cache.paths import cache_root, work_dir
from metrics.cka import DEFAULT_CKA_MEMORY, cka_matrix
from metrics.neighbours import knn_indices, knn_overlap
from metrics.probes import DEFAULT_PROBE_MEMORY, probe_accuracy
from metrics.retrieval import Alignment, Outcomes, retrieval_outcomes
from metrics.rows import StoreRows
from schemas import ConfigError
from schemas.store import METRICS_DIR

__all__ = ["COLUMNS", "DEFAULT_METRICS", "METRICS", "MetricsConfig", "MetricsResult", "run_metrics"]

COLUMNS = ("metric", "store", "store_b", "layer", "layer_b", "src_lang", "tgt_lang", "value", "ci_low", "ci_high")
METRICS = {  # what each measures, in one line (--help)
    "retrieval": "cross-lingual retrieval P@1: the share of items whose cosine nearest neighbour in another "
    "language is their translation (rows retrieval_p1)",
    "cka": "linear CKA between layers (and against --against): exact, biased estimator (rows cka)",
    "probe": "linear probe accuracy, stratified k-fold: how linearly decodable language and label are "
    "(rows probe_<column>)",
    "cka_debiased": "linear CKA from the unbiased HSIC estimator: ~0 for unrelated layers even with few examples "
    "(rows cka_debiased)",
    "mknn": "mutual k-nearest-neighbour alignment: the share of each example's --mknn-k cosine neighbours two "
    "layers have in common (rows mknn)",
    "retrieval_margin": "retrieval P@1 by the ratio margin of Artetxe and Schwenk (2019), which discounts hub "
    "vectors; beside plain cosine P@1 (rows retrieval_margin_p1 and retrieval_p1)",
}
DEFAULT_METRICS = ("retrieval", "cka", "probe")  # the others cost more or repeat these: asked by name
MIN_BOOTSTRAP = 10  # fewer resamples give no usable 95% interval
CONFIDENCE = 0.95
POOLINGS = ("mean", "first", "last")
LANGUAGE_COLUMN = "language"
LABEL_COLUMN = "label"
FIELD_COLUMN = "field"
AUTO_ALIGN = "id"  # where translations share it; else an item's index within its language (and field), as XNLI's
BY_POSITION = "index within language"
_VERSION = 2  # of the metrics' rows: a change that alters them (2: interval columns) makes cached results stale


@dataclass(frozen=True)
class MetricsConfig:
    """What `actcache metrics` runs. `store` (and `against`) as `open_activations` takes them.

    `metrics` None: each of `DEFAULT_METRICS` the store's metadata allows (retrieval needs a
    `language` column and aligned items, probes a column to predict). `layers` None: all
    stored. `bootstrap` B > 0: 95% intervals from B resamples of the examples (of aligned
    groups for retrieval, random halves for CKA: `_half_samples`), drawn from `seed`, in
    `ci_low` / `ci_high`.
    """

    store: str
    out: str | os.PathLike[str]
    against: str | None = None
    metrics: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    pooling: str = "mean"
    center: bool = False  # retrieval: subtract each language's mean vector first
    align_column: str | None = None  # None: `id` where translations share it, else `row`
    folds: int = 5
    seed: int = 0
    mknn_k: int = 10
    margin_k: int = 4
    bootstrap: int = 0
    cka_memory: int = DEFAULT_CKA_MEMORY
    probe_memory: int = DEFAULT_PROBE_MEMORY
    cache_dir: str | os.PathLike[str] | None = None
    quiet: bool = False
    use_cache: bool = True


@dataclass
class MetricsResult:
    """Where the job wrote, its table (pandas), and which metrics were read from the cache."""

    out: Path
    table: Any
    csv: Path
    report: Path
    plots: list[Path]
    cached: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_metrics(config: MetricsConfig, *, say: Callable[[str], None] | None = None) -> MetricsResult:
    """Run the job `config` describes; see the module docstring."""
    import pandas as pd

    from cache import open_activations

    say = say or (lambda _: None)
    _check(config)
    root = cache_root(config.cache_dir)
    with contextlib.ExitStack() as scope:
        acts = scope.enter_context(open_activations(config.store, cache_dir=config.cache_dir))
        other = (
            scope.enter_context(open_activations(config.against, cache_dir=config.cache_dir))
            if config.against
            else None
        )
        if other is not None:
            _same_examples(acts, other)
        layers = _layers(acts, config.layers, config.pooling)
        table = acts.examples
        plan = _plan(config, table)
        results: list[Any] = []
        cached: list[str] = []
        notes: list[str] = list(plan.notes)
        for metric in plan.metrics:
            params = _params(config, metric, plan, layers, acts, other)
            memo = work_dir(root) / METRICS_DIR / f"{hash_value(params, length=32)}.csv"
            if config.use_cache and memo.is_file():
                rows = pd.read_csv(
                    memo,
                    keep_default_na=False,
                    na_values={"value": [""], "ci_low": [""], "ci_high": [""]},
                    dtype={"store_b": str, "src_lang": str, "tgt_lang": str},
                )
                cached.append(metric)
            else:
                with _bar(config, metric) as tick:
                    rows = pd.DataFrame(_compute(metric, config, plan, acts, other, layers, tick), columns=COLUMNS)
                memo.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(memo, rows.to_csv(index=False).encode(), durable=False)
            say(f"{metric}: {len(rows)} rows{' (cached)' if metric in cached else ''}")
            notes += _undefined(rows)
            results.append(rows)
        names = {acts.key: _name(acts)} | ({other.key: _name(other)} if other is not None else {})
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.concat(results, ignore_index=True) if results else pd.DataFrame(columns=COLUMNS)
    csv = out / "metrics.csv"
    atomic_write_bytes(csv, frame.to_csv(index=False).encode(), durable=False)
    from metrics.plots import plot_metrics
    from metrics.report import write_report

    pngs = plot_metrics(pd.concat([frame, _chance_rows(plan, table, _name(acts))], ignore_index=True), out)
    facts = {
        "store": f"{names[acts.key]} ({acts.key})",
        **({"against": f"{names[other.key]} ({other.key})"} if other is not None else {}),
        "examples": str(acts.n_examples),
        "layers": ", ".join(str(v) for v in layers),
        "pooling": config.pooling,
        "alignment": plan.align or "-",
        "languages": ", ".join(plan.languages) or "-",
        "retrieval centring": "per-language mean subtracted" if config.center else "none",
        "probes": f"{config.folds}-fold stratified, seed {config.seed}",
        **({"mknn": f"k = {config.mknn_k}"} if "mknn" in plan.metrics else {}),
        **({"retrieval margin": f"k = {config.margin_k}"} if "retrieval_margin" in plan.metrics else {}),
        "intervals": (
            f"{CONFIDENCE:.0%} percentile bootstrap, {config.bootstrap} resamples (seed {config.seed}): of the "
            "examples' results for mknn (neighbour lists fixed) and probes (out-of-fold predictions fixed), of "
            "aligned groups' queries for retrieval (candidates fixed); CKA recomputed on random halves of the "
            "examples, their spread placed about the estimate"
            if config.bootstrap
            else "none (--bootstrap B)"
        ),
        **{f"note {i + 1}": text for i, text in enumerate(notes)},
    }
    report = write_report(frame, pngs, out / "report.html", title=f"actcache metrics: {names[acts.key]}", facts=facts)
    return MetricsResult(out, frame, csv, report, pngs, cached, notes)


# -- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    metrics: tuple[str, ...]
    languages: tuple[str, ...]
    align: str | None  # the alignment column used by retrieval
    alignment: Alignment | None
    probes: tuple[str, ...]  # metadata columns probed: language, label
    notes: tuple[str, ...] = ()


def _check(config: MetricsConfig) -> None:
    unknown = [m for m in config.metrics or () if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)} (comma-separated)")
    if config.pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {config.pooling!r}; choose from {', '.join(POOLINGS)}")
    if config.folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {config.folds}")
    for flag, k in (("--mknn-k", config.mknn_k), ("--margin-k", config.margin_k)):
        if k < 1:
            raise ConfigError(f"{flag} must be at least 1, got {k}")
    if config.bootstrap < 0:
        raise ConfigError(f"--bootstrap counts resamples: got {config.bootstrap}. Fix: 0 (no intervals) or B >= 10")
    if 0 < config.bootstrap < MIN_BOOTSTRAP:
        raise ConfigError(
            f"--bootstrap {config.bootstrap}: too few resamples for a {CONFIDENCE:.0%} interval. "
            f"Fix: 0 (no intervals) or at least {MIN_BOOTSTRAP}; 1000 for figures in a paper."
        )


def _plan(config: MetricsConfig, table: Any) -> _Plan:
    """Which metrics run, on which metadata; explicit requests that cannot run are errors naming the fix."""
    asked = config.metrics
    wanted = asked or DEFAULT_METRICS
    columns = list(table.columns)
    n = len(table)
    languages = tuple(sorted({str(v) for v in table[LANGUAGE_COLUMN]})) if LANGUAGE_COLUMN in columns else ()
    metrics: list[str] = []
    notes: list[str] = []
    align, alignment = None, None

    def cannot(metric: str, why: str, fix: str) -> None:
        if asked:
            raise ConfigError(f"cannot run {metric}: {why}. Fix: {fix}")
        notes.append(f"{metric} skipped: {why}")

    for retrieval in ("retrieval", "retrieval_margin"):
        if retrieval not in wanted:
            continue
        if len(languages) < 2:
            why = f"the examples have {'one language' if languages else 'no language column'}"
            fix = "extract a dataset of several languages (a `language` column) or --metrics cka,probe"
            cannot(retrieval, why, fix)
            continue
        if alignment is None:
            align, alignment = _aligned(config.align_column, table, columns)
        if _no_pairs(alignment):
            why = f"no item shares its {align!r} value with an item of another language"
            cannot(retrieval, why, "name the column translations share with --align-column")
        else:
            metrics.append(retrieval)
    if "retrieval_margin" in metrics and "retrieval" in metrics:
        metrics.remove("retrieval")  # the margin's pass reports plain cosine P@1 beside it
    if "cka" in wanted:
        metrics.append("cka")
    if "cka_debiased" in wanted:
        if n < 4:
            cannot(
                "cka_debiased",
                f"the unbiased estimator needs at least 4 examples; the store has {n}",
                "--metrics cka, or a store of at least 4 examples",
            )
        else:
            metrics.append("cka_debiased")
    if "mknn" in wanted:
        if n <= config.mknn_k:
            why = f"{config.mknn_k} neighbours need more than {config.mknn_k} examples; the store has {n}"
            cannot("mknn", why, f"a smaller --mknn-k (below {n})")
        else:
            metrics.append("mknn")
    probes: list[str] = []
    if "probe" in wanted:
        candidates = ([LANGUAGE_COLUMN] if len(languages) >= 2 else []) + (
            [LABEL_COLUMN] if LABEL_COLUMN in columns and table[LABEL_COLUMN].notna().all() else []
        )
        for column in candidates:
            counts = table[column].astype(str).value_counts()
            if len(counts) < 2:
                notes.append(f"probe_{column} skipped: every example has {column} {counts.index[0]!r}")
            elif counts.min() < config.folds:
                notes.append(
                    f"probe_{column} skipped: {column} {counts.idxmin()!r} has {counts.min()} examples, fewer than "
                    f"the {config.folds} folds (--folds)"
                )
            else:
                probes.append(column)
        if probes:
            metrics.append("probe")
        else:
            why = "no column to predict has 2 classes of at least --folds examples each (language, label)"
            cannot(
                "probe",
                why + (f"; {'; '.join(notes)}" if notes else ""),
                "leave probes out (--metrics retrieval,cka) or lower --folds",
            )
    return _Plan(tuple(metrics), languages, align, alignment, tuple(probes), tuple(notes))


def _aligned(asked: str | None, table: Any, columns: list[str]) -> tuple[str, Alignment]:
    """The alignment column (asked, else `id` where translations share it, else `BY_POSITION`) and its alignment."""
    if asked is not None:
        if asked not in columns:
            raise ConfigError(
                f"the examples have no column {asked!r} to align translations by; they have {columns}. "
                "Fix: pass one of those to --align-column."
            )
        return asked, _alignment(table, asked)
    if AUTO_ALIGN in columns and not _no_pairs(by_id := _alignment(table, AUTO_ALIGN)):
        return AUTO_ALIGN, by_id
    return BY_POSITION, _alignment(table, BY_POSITION)


def _alignment(table: Any, column: str) -> Alignment:
    """Items align by `column`'s value (`BY_POSITION`: their index within their language), and by `field`
    (premise with premise) where examples carry one."""
    fields = table[FIELD_COLUMN] if FIELD_COLUMN in table.columns else None
    if column == BY_POSITION:
        by = [table[LANGUAGE_COLUMN]] + ([fields] if fields is not None else [])
        values = table.groupby(by, sort=False).cumcount().tolist()
    else:
        values = table[column].tolist()
    field_values = fields.tolist() if fields is not None else [None] * len(values)
    keys = [None if v is None or v != v else (f, v) for v, f in zip(values, field_values, strict=True)]  # v != v: NaN
    return Alignment.of([str(v) for v in table[LANGUAGE_COLUMN]], keys)


def _no_pairs(alignment: Alignment) -> bool:
    """Whether no alignment group has items in two languages."""
    keyed = alignment.group >= 0
    pairs = np.unique(np.stack([alignment.group[keyed], alignment.language[keyed]]), axis=1)
    return not pairs.size or np.bincount(pairs[0]).max() < 2


def _layers(acts: Any, asked: Sequence[int] | None, pooling: str) -> tuple[int, ...]:
    """The stored layers asked for (all by default), as hidden-state indices; errors name the stored ones."""
    for layer in asked or acts.layers[:1]:
        acts.pooled(layer, pooling)  # lazy: reads nothing, raises naming what the store holds
    n = acts.manifest.n_states
    return tuple(dict.fromkeys(v % n for v in asked)) if asked is not None else tuple(acts.layers)


def _same_examples(acts: Any, other: Any) -> None:
    mine, theirs = acts.manifest.request["dataset"], other.manifest.request["dataset"]
    if mine.get("content_hash") != theirs.get("content_hash") or acts.n_examples != other.n_examples:
        raise ConfigError(
            f"stores {acts.key} and {other.key} hold different examples ({acts.n_examples} from "
            f"{mine.get('name')!r}, {other.n_examples} from {theirs.get('name')!r}); CKA and mutual k-NN "
            "between them compare example by example. Fix: extract both models over the same data "
            "(same --data, --split, --limit)."
        )


def _name(acts: Any) -> str:
    aliases = acts.manifest.aliases
    return str(aliases[0]) if aliases else acts.key[:12]


def _params(
    config: MetricsConfig, metric: str, plan: _Plan, layers: tuple[int, ...], acts: Any, other: Any
) -> dict[str, Any]:
    """Everything a metric's rows depend on: its cache key."""
    common = {
        "version": _VERSION,
        "metric": metric,
        "store": acts.key,
        "name": _name(acts),
        "layers": list(layers),
        "pooling": config.pooling,
        **({"bootstrap": config.bootstrap, "seed": config.seed} if config.bootstrap else {}),
    }
    against = {"against": other.key, "name_b": _name(other)} if other is not None else {}
    if metric == "retrieval":
        return common | {"center": config.center, "align": plan.align}
    if metric == "retrieval_margin":
        return common | {"center": config.center, "align": plan.align, "k": config.margin_k}
    if metric in ("cka", "cka_debiased"):
        return common | against
    if metric == "mknn":
        return common | against | {"k": config.mknn_k}
    probes = {"probes": list(plan.probes), "folds": config.folds, "seed": config.seed, "memory": config.probe_memory}
    return common | probes


# -- computing ----------------------------------------------------------------------------


def _compute(
    metric: str,
    config: MetricsConfig,
    plan: _Plan,
    acts: Any,
    other: Any,
    layers: tuple[int, ...],
    tick: Callable[[int], None],
) -> Iterator[tuple[Any, ...]]:
    """The metric's rows: COLUMNS' values, the interval NaN (empty in the CSV) without --bootstrap."""
    name = _name(acts)
    rows = [StoreRows(acts, layer, config.pooling) for layer in layers]
    theirs = tuple(other.layers) if other is not None else ()
    their_rows = [StoreRows(other, v, config.pooling) for v in theirs]
    if metric in ("retrieval", "retrieval_margin"):
        assert plan.alignment is not None
        margin_k = config.margin_k if metric == "retrieval_margin" else None
        resamples = list(_group_resamples(plan.alignment, config))
        for layer, vectors in zip(layers, rows, strict=True):
            outcomes = retrieval_outcomes(
                vectors, plan.alignment, center=config.center, margin_k=margin_k, progress=tick
            )
            for kind, label in (("cosine", "retrieval_p1"), ("margin", "retrieval_margin_p1")):
                if kind in outcomes:
                    for (src, tgt), value, low, high in _p1_rows(outcomes[kind], resamples):
                        yield label, name, "", layer, "", src, tgt, value, low, high
    elif metric in ("cka", "cka_debiased"):
        debiased = metric == "cka_debiased"

        def matrix(ys: list[StoreRows] | None, weights: np.ndarray | None) -> np.ndarray:
            return cka_matrix(rows, ys, debiased=debiased, weights=weights, memory=config.cka_memory, progress=tick)

        for ys, name_b, layers_b in ((None, "", layers), *(((their_rows, _name(other), theirs),) if theirs else ())):
            cells = matrix(ys, None)
            draws = np.stack([matrix(ys, w) for w in _half_samples(acts.n_examples, config)] or [cells * np.nan])
            for i, j in np.ndindex(cells.shape):
                low, high = _interval(draws[:, i, j], around=float(cells[i, j]))
                yield metric, name, name_b, layers[i], layers_b[j], "", "", float(cells[i, j]), low, high
    elif metric == "mknn":
        mine = [knn_indices(r, config.mknn_k, progress=tick) for r in rows]
        pairs = [("", layers, mine)]
        if theirs:
            pairs.append((_name(other), theirs, [knn_indices(r, config.mknn_k, progress=tick) for r in their_rows]))
        resamples = list(_resamples(acts.n_examples, config))
        for name_b, layers_b, others in pairs:
            for (i, a), (j, b) in itertools.product(enumerate(mine), enumerate(others)):
                overlap = knn_overlap(a, b)
                low, high = _interval(np.array([w @ overlap / w.sum() for w in resamples]))
                yield "mknn", name, name_b, layers[i], layers_b[j], "", "", float(overlap.mean()), low, high
    else:
        table = acts.examples
        resamples = list(_resamples(acts.n_examples, config))
        for column in plan.probes:
            labels = _codes(table[column])
            for layer, features in zip(layers, rows, strict=True):
                result = probe_accuracy(
                    features, labels, folds=config.folds, seed=config.seed, memory=config.probe_memory, progress=tick
                )
                low, high = _interval(np.array([result.accuracy_of(w) for w in resamples]))
                yield f"probe_{column}", name, "", layer, "", "", "", result.accuracy, low, high


def _undefined(rows: Any) -> list[str]:
    """A note per CKA matrix with undefined cells (NaN: empty in the CSV, blank in the plots), naming the
    layers that make them: within a store, those whose CKA with themselves is undefined; against another
    store, the layers whose whole row (this store) or column (that one) is."""
    notes = []
    for (metric, store_b), cells in rows.groupby(["metric", "store_b"], sort=True):
        if metric not in ("cka", "cka_debiased") or not cells.value.isna().any():
            continue
        undefined = cells.value.isna().groupby([cells.layer, cells.layer_b]).all().unstack()
        if store_b:
            layers = [f"{int(v)} of this store" for v in undefined.index[undefined.all(axis=1)]]
            layers += [f"{int(v)} of {store_b}" for v in undefined.columns[undefined.all(axis=0)]]
        else:
            layers = [str(int(v)) for v in undefined.index if undefined.loc[v, v]]
        why = "features constant over the examples (no variance, so CKA is 0/0)" + (
            ", or an unbiased self-similarity at or below 0 (a near-constant layer)" if metric == "cka_debiased" else ""
        )
        notes.append(
            f"{metric}{f' against {store_b}' if store_b else ''}: {int(cells.value.isna().sum())} cell(s) undefined "
            f"(empty), from layer(s) {', '.join(layers) or 'none whole'}: {why}"
        )
    return notes


# -- intervals ------------------------------------------------------------------------------


def _resamples(n: int, config: MetricsConfig) -> Iterator[np.ndarray]:
    """--bootstrap resamples of n examples, as multiplicities (n,): the same for every metric of a job."""
    rng = np.random.default_rng(config.seed)
    for _ in range(config.bootstrap):
        yield np.bincount(rng.integers(0, n, n), minlength=n)


def _half_samples(n: int, config: MetricsConfig) -> Iterator[np.ndarray]:
    """CKA's resamples: --bootstrap random halves of the n examples (without replacement), as 0/1 weights.

    Not draws with replacement: CKA is a ratio of pair statistics, and a draw's copies of one
    example pair with each other, which brings back the self-terms the debiased estimator
    removes (its resamples of two independent 64-feature layers at n = 64 centre on ~0.5, not
    ~0). A half drawn without replacement has no copies, and its spread is the bootstrap's for
    a mean (variance (1/m - 1/n) s^2 = s^2/n at m = n/2).
    """
    rng = np.random.default_rng(config.seed)
    for _ in range(config.bootstrap):
        weights = np.zeros(n, dtype=np.int64)
        weights[rng.choice(n, n // 2, replace=False)] = 1
        yield weights


def _group_resamples(alignment: Alignment, config: MetricsConfig) -> Iterator[np.ndarray]:
    """--bootstrap resamples of aligned groups (translations stay together), as multiplicities per item."""
    groups = int(alignment.group.max()) + 1
    keyed = alignment.group >= 0
    for counts in _resamples(groups, config):
        weights = np.zeros(len(alignment.group), dtype=np.int64)  # items without a key are never queries
        weights[keyed] = counts[alignment.group[keyed]]
        yield weights


def _p1_rows(outcomes: Outcomes, resamples: list[np.ndarray]) -> Iterator[tuple[tuple[str, str], float, Any, Any]]:
    """(pair, P@1, low, high) per language pair, sorted; the interval NaN without resamples."""
    draws = [outcomes.p1(w) for w in resamples]
    for pair, value in sorted(outcomes.p1().items()):
        values = np.array([d.get(pair, np.nan) for d in draws])  # a resample may draw no query of the pair
        yield (pair, value, *_interval(values))


def _interval(draws: np.ndarray, around: float | None = None) -> tuple[float, float]:
    """The percentile interval of a statistic's bootstrap draws; NaN without resamples or finite draws.

    `around`: the draws' spread about their median, placed about this estimate instead. For CKA's
    half-samples: plain CKA's bias grows as examples get fewer, so a half's CKA sits above the
    whole's; only the spread carries over.
    """
    finite = draws[np.isfinite(draws)]
    if not finite.size:
        return np.nan, np.nan
    tail = (1 - CONFIDENCE) / 2
    low, middle, high = np.quantile(finite, [tail, 0.5, 1 - tail])
    if around is not None and np.isfinite(around):
        low, high = around - (middle - low), around + (high - middle)
    return float(low), float(high)


def _codes(column: Any) -> np.ndarray:
    """A column's classes as integers, in the order of its values as text (no string object per example)."""
    import pandas as pd

    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(str).astype("category")
    order = np.argsort(np.asarray(column.cat.categories, dtype=str))  # as text, as the classes' names sort
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[column.cat.codes.to_numpy()]


def _chance_rows(plan: _Plan, table: Any, name: str) -> Any:
    """The majority class's share per probed column (`probe_<column>_chance`): the plots' chance lines."""
    import pandas as pd

    rows = [
        (
            f"probe_{column}_chance",
            name,
            "",
            "",
            "",
            "",
            "",
            float(table[column].astype(str).value_counts(normalize=True).max()),
            np.nan,
            np.nan,
        )
        for column in plan.probes
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


@contextlib.contextmanager
def _bar(config: MetricsConfig, metric: str) -> Iterator[Callable[[int], None]]:
    from tqdm.auto import tqdm

    with tqdm(desc=metric, unit="row", unit_scale=True, disable=config.quiet, file=sys.stderr, leave=False) as bar:
        yield bar.update
