"""PNG plots of a metrics table: retrieval P@1 by layer, CKA and mutual-k-NN heatmaps, probe accuracy by layer.

>>> from metrics.plots import plot_metrics
>>> pngs = plot_metrics(table, Path("out/plots"))   # doctest: +SKIP

The table is the tidy one the metrics jobs write, one value a row, columns `metrics.job.COLUMNS`;
where it has bootstrap intervals (`ci_low`, `ci_high`), line plots draw them as bands.
matplotlib is imported on first plot and used without pyplot: each plot is its own `Figure`,
so nothing process-wide (backend, rcParams, pyplot's figure list) changes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache.files import atomic_write_bytes
from metrics.job import COLUMNS

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["caption_for", "plot_metrics"]

RETRIEVAL = "retrieval_p1"
RETRIEVAL_MARGIN = "retrieval_margin_p1"
CKA = "cka"
CKA_DEBIASED = "cka_debiased"
MKNN = "mknn"
HEATMAPS = {CKA: "linear CKA", CKA_DEBIASED: "debiased linear CKA", MKNN: "mutual k-NN"}  # row name -> what
RETRIEVALS = {RETRIEVAL: "Retrieval P@1", RETRIEVAL_MARGIN: "Margin retrieval P@1"}
PROBE_PREFIX = "probe_"
CHANCE_SUFFIX = "_chance"

MAX_PAIR_LINES = 12  # above this many language pairs, one line per pair is unreadable
LEGEND_INSIDE_MAX = 5  # more entries than this go outside the axes, where they cover no data
ANNOTATE_MAX_CELLS = 16 * 16  # beyond this, numbers in heatmap cells are too small to read
DPI = 120
LINE_SIZE = (7.0, 4.5)


def plot_metrics(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write one PNG per plot the metrics in `table` call for into `out_dir`; return their paths.

    Retrieval P@1 by layer, a CKA heatmap per pair of stores, probe accuracy by layer, each per
    store; metrics the table lacks get no plot. File names are stable: `retrieval_p1_<store>.png`,
    `retrieval_p1_by_target_<store>.png` (more than 12 language pairs), the same for
    `retrieval_margin_p1`, `cka_<store>.png`, `cka_<store>_vs_<store_b>.png` (likewise
    `cka_debiased_...`, `mknn_...`), `probes_<store>.png`.
    """
    tidy = _normalize(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, fig in _figures(tidy):
        path = out_dir / f"{_safe(stem)}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
        atomic_write_bytes(path, buf.getvalue(), durable=False)
        written.append(path)
    return written


def caption_for(path: Path) -> str:
    """A human caption for a PNG `plot_metrics` wrote, from its file name."""
    stem = Path(path).stem
    for prefix, what in _CAPTIONS:
        if stem.startswith(prefix):
            return f"{what}: {stem.removeprefix(prefix).replace('_vs_', ' vs ')}"
    return stem


_CAPTIONS = (  # longest prefix first: "retrieval_p1_" is a prefix of the by-target name, "cka_" of "cka_debiased_"
    *(
        caption
        for metric, what in RETRIEVALS.items()
        for caption in (
            (f"{metric}_by_target_", f"{what} by layer, per target language (mean over sources)"),
            (f"{metric}_", f"{what} by layer"),
        )
    ),
    (f"{CKA_DEBIASED}_", "Debiased linear CKA, layer by layer"),
    (f"{CKA}_", "Linear CKA, layer by layer"),
    (f"{MKNN}_", "Mutual k-nearest-neighbour alignment, layer by layer"),
    ("probes_", "Linear probe accuracy by layer"),
)


def _normalize(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with text columns as str ("" where absent) and layers as float (NaN where absent)."""
    import pandas as pd

    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing!r}; it needs {list(COLUMNS)!r}")
    tidy = table.loc[:, list(COLUMNS)].copy()
    for col in ("metric", "store", "store_b", "src_lang", "tgt_lang"):
        tidy[col] = tidy[col].fillna("").astype(str)
    for col in ("layer", "layer_b", "value", "ci_low", "ci_high"):
        tidy[col] = pd.to_numeric(tidy[col], errors="coerce")  # "" -> NaN
    return tidy


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def _figures(tidy: pd.DataFrame) -> Iterator[tuple[str, Figure]]:
    """(file stem, figure) for every plot, in a stable order; each figure is dropped after saving."""
    for metric in RETRIEVALS:
        retrieval = tidy[tidy.metric == metric]
        for (store, store_b), rows in retrieval.groupby(["store", "store_b"], sort=True):
            yield from _retrieval(rows, _pair_name(store, store_b), metric)
    for metric in HEATMAPS:
        matrix = tidy[tidy.metric == metric]
        for (store, store_b), rows in matrix.groupby(["store", "store_b"], sort=True):
            yield _heatmap_stem(metric, store, store_b), _cka(rows, store, store_b, metric)
    probes = tidy[tidy.metric.str.startswith(PROBE_PREFIX)]
    for store, rows in probes.groupby("store", sort=True):
        if not rows.metric.str.endswith(CHANCE_SUFFIX).all():
            yield f"probes_{store}", _probes(rows, store)


def _pair_name(store: str, store_b: str) -> str:
    return f"{store}_vs_{store_b}" if store_b else store


def _heatmap_stem(metric: str, store: str, store_b: str) -> str:
    return f"{metric}_{_pair_name(store, store_b)}"


# --- retrieval -------------------------------------------------------------------------------


def _retrieval(rows: pd.DataFrame, name: str, metric: str = RETRIEVAL) -> Iterator[tuple[str, Figure]]:
    by_pair = _pair_pivot(rows)
    layers = _ints(by_pair.index)
    what = RETRIEVALS[metric]
    if by_pair.shape[1] <= MAX_PAIR_LINES:
        fig, ax = _line_axes(f"{what} by layer: {name}", "P@1")
        for i, ((src, tgt), series) in enumerate(by_pair.items()):
            ax.plot(layers, series.to_numpy(), marker="o", markersize=3, color=f"C{i % 10}", label=f"{src} → {tgt}")
            _band(ax, rows[(rows.src_lang == src) & (rows.tgt_lang == tgt)], f"C{i % 10}")
        _finish_lines(ax, layers, legend_title="source → target")
        yield f"{metric}_{name}", fig
        return
    # Too many pairs for a line each (15 languages make 210): a mean with its spread, and the
    # mean per target language, which is where cross-lingual retrieval differs most.
    fig, ax = _line_axes(f"{what} by layer: {name} (mean of {by_pair.shape[1]} pairs)", "P@1")
    ax.fill_between(layers, by_pair.min(axis=1), by_pair.max(axis=1), alpha=0.2, color="C0", label="min…max over pairs")
    ax.plot(layers, by_pair.mean(axis=1).to_numpy(), marker="o", markersize=3, color="C0", label="mean over pairs")
    _finish_lines(ax, layers)
    yield f"{metric}_{name}", fig
    by_target = by_pair.T.groupby(level="tgt_lang").mean().T
    fig, ax = _line_axes(f"{what} by layer and target language: {name}", "P@1 (mean over source languages)")
    for i, (tgt, series) in enumerate(by_target.items()):
        ax.plot(layers, series.to_numpy(), label=str(tgt), **_style(i, by_target.shape[1]))
    _finish_lines(ax, layers, legend_title="target")
    yield f"{metric}_by_target_{name}", fig


# --- CKA -------------------------------------------------------------------------------------


def _cka(rows: pd.DataFrame, store: str, store_b: str, metric: str = CKA) -> Figure:
    from matplotlib.figure import Figure

    matrix = _cka_pivot(rows, within=not store_b)
    values = matrix.to_numpy(dtype=float)
    rows_n, cols_n = values.shape

    # Square cells, the figure sized to the matrix: 7 x 7 is square, 7 x 13 is wide, 33 x 33 still fits.
    cell = min(0.6, 6.0 / max(rows_n, cols_n))
    fig = Figure(figsize=(cols_n * cell + 2.4, rows_n * cell + 1.6), layout="constrained")
    ax = fig.add_subplot()
    # origin="lower": layer 0 at the bottom-left corner, layers growing up and right like a plot's axes.
    image = ax.imshow(values, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
    # The colour bar in an inset beside the axes, so it is exactly as tall as the matrix, whatever its shape.
    bar = ax.inset_axes((1.03, 0.0, 0.22 / (cols_n * cell), 1.0))
    colorbar = fig.colorbar(image, cax=bar)
    colorbar.set_label(HEATMAPS[metric])
    _layer_ticks(ax.set_yticks, ax.set_yticklabels, _ints(matrix.index))
    _layer_ticks(ax.set_xticks, ax.set_xticklabels, _ints(matrix.columns))
    ax.set_ylabel(f"layer of {store}")
    ax.set_xlabel(f"layer of {store_b or store}")
    what = HEATMAPS[metric][0].upper() + HEATMAPS[metric][1:]
    ax.set_title(f"{what}: {store} vs {store_b}" if store_b else f"{what} between layers: {store}")
    if rows_n * cols_n <= ANNOTATE_MAX_CELLS:
        size = 8 if cell >= 0.55 else 7 if cell >= 0.4 else 6
        for i in range(rows_n):
            for j in range(cols_n):
                if values[i, j] == values[i, j]:  # not NaN
                    # Dark text on viridis' light (yellow) end, light text on its dark end.
                    color = "black" if values[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=size, color=color)
    return fig


def _cka_pivot(rows: pd.DataFrame, *, within: bool) -> pd.DataFrame:
    """CKA rows of one (store, store_b) as a matrix: index `layer`, columns `layer_b`, both sorted."""
    # dropna=False: a layer whose every cell is undefined keeps its (blank) row and column.
    matrix = rows.pivot_table(index="layer", columns="layer_b", values="value", aggfunc="mean", dropna=False)
    if within:
        # Within one store CKA is symmetric; a job may have computed one triangle only.
        labels = matrix.index.union(matrix.columns)
        matrix = matrix.reindex(index=labels, columns=labels)
        matrix = matrix.combine_first(matrix.T)
    return matrix.sort_index().sort_index(axis=1)


def _pair_pivot(rows: pd.DataFrame) -> pd.DataFrame:
    """Retrieval rows of one store as a matrix: index `layer` (sorted), columns (`src_lang`, `tgt_lang`)."""
    return rows.pivot_table(
        index="layer", columns=["src_lang", "tgt_lang"], values="value", aggfunc="mean"
    ).sort_index()


def _layer_ticks(set_ticks: Any, set_labels: Any, layers: list[int]) -> None:
    step = max(1, -(-len(layers) // 25))  # at most ~25 labels: Llama-sized stacks have 33 layers
    positions = list(range(0, len(layers), step))
    set_ticks(positions)
    set_labels([str(layers[p]) for p in positions])


# --- probes ----------------------------------------------------------------------------------


def _probes(rows: pd.DataFrame, store: str) -> Figure:
    chance = rows[rows.metric.str.endswith(CHANCE_SUFFIX)]
    probes = rows[~rows.metric.str.endswith(CHANCE_SUFFIX)]
    by_metric = probes.pivot_table(index="layer", columns="metric", values="value", aggfunc="mean").sort_index()
    layers = _ints(by_metric.index)
    fig, ax = _line_axes(f"Linear probe accuracy by layer: {store}", "accuracy")
    for i, (metric, series) in enumerate(by_metric.items()):
        what = str(metric).removeprefix(PROBE_PREFIX)
        color = f"C{i % 10}"
        ax.plot(layers, series.to_numpy(), marker="o", markersize=3, color=color, label=what)
        _band(ax, probes[probes.metric == metric], color)
        level = chance.loc[chance.metric == f"{metric}{CHANCE_SUFFIX}", "value"].dropna()
        if len(level):
            ax.axhline(float(level.mean()), linestyle="--", linewidth=1, color=color, label=f"{what} chance")
    _finish_lines(ax, layers)
    return fig


# --- shared ----------------------------------------------------------------------------------


def _band(ax: Axes, rows: pd.DataFrame, color: str) -> None:
    """The rows' bootstrap interval by layer as a shaded band, where they have one (a gap at a layer without)."""
    rows = rows.sort_values("layer")
    if rows.ci_low.notna().any():
        ax.fill_between(_ints(rows.layer), rows.ci_low.to_numpy(), rows.ci_high.to_numpy(), color=color, alpha=0.18)


def _line_axes(title: str, ylabel: str) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=LINE_SIZE)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    return fig, ax


def _finish_lines(ax: Axes, layers: list[int], *, legend_title: str | None = None) -> None:
    ax.set_ylim(-0.02, 1.02)  # the margin keeps lines at exactly 0 or 1 from being cut in half
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    if len(layers) <= 25:
        ax.set_xticks(layers)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[1])
    if entries > LEGEND_INSIDE_MAX:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title=legend_title, frameon=False, handlelength=3
        )
    elif entries:
        ax.legend(loc="best", fontsize=8, title=legend_title)


def _style(i: int, n: int) -> dict[str, Any]:
    """Colour and line style of the i-th of n lines, so that up to 20 lines stay apart."""
    if n <= 10:
        return {"color": f"C{i}", "marker": "o", "markersize": 3}
    # tab20 pairs a dark and a light shade of each hue; the light ones dashed, so a pair reads as two lines.
    from matplotlib import colormaps

    color = colormaps["tab20"](i % 20)
    return {"color": color, "linestyle": ("-", "--")[i % 2], "marker": "o", "markersize": 3}


def _ints(labels: Any) -> list[int]:
    return [int(x) for x in labels]
