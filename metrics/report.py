"""One self-contained HTML report of a metrics run: facts, the plots inline, a compact table per metric.

>>> from metrics.report import write_report
>>> write_report(table, pngs, Path("out/report.html"), title="LaBSE on XNLI", facts={"store": "labse__xnli"})
...                                                                 # doctest: +SKIP

Self-contained: the PNGs are embedded as base64 data URIs and the CSS is inline, so the file can be
mailed or archived alone. Every string that reaches the page goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache.files import atomic_write_bytes
from metrics.job import CONFIDENCE
from metrics.plots import (
    CHANCE_SUFFIX,
    HEATMAPS,
    MAX_PAIR_LINES,
    PROBE_PREFIX,
    RETRIEVALS,
    _cka_pivot,
    _normalize,
    _pair_pivot,
    caption_for,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["write_report"]

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } th.row { text-align: left; }
table.facts td { text-align: left; font-family: ui-monospace, monospace; }
.scroll { overflow-x: auto; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
p.note { color: #555; font-size: .9em; }
"""


def write_report(table: pd.DataFrame, pngs: Sequence[Path], out: Path, *, title: str, facts: Mapping[str, str]) -> Path:
    """Write the HTML report of `table` and its plots `pngs` to `out` (atomically); return `out`.

    `facts` are the run's particulars shown first, key -> value (store names, keys, parameters).
    """
    tidy = _normalize(table)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if facts:
        parts.append('<table class="facts">')
        parts += [f'<tr><th class="row">{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in facts.items()]
        parts.append("</table>")
    if pngs:
        parts.append("<h2>Plots</h2>")
        parts += [_figure(Path(p)) for p in pngs]
    parts.append("<h2>Tables</h2>")
    sections = list(_sections(tidy))
    parts += sections if sections else ['<p class="note">The metrics table is empty.</p>']
    parts.append("</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "\n".join(parts).encode("utf-8"), durable=False)
    return out


def _figure(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    caption = _e(caption_for(png))
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
    )


def _sections(tidy: pd.DataFrame) -> Iterator[str]:
    for metric, what in RETRIEVALS.items():
        retrieval = tidy[tidy.metric == metric]
        for (store, store_b), rows in retrieval.groupby(["store", "store_b"], sort=True):
            yield from _retrieval(rows, f"{store} vs {store_b}" if store_b else store, what)
    for metric, what in HEATMAPS.items():
        matrix = tidy[tidy.metric == metric]
        for (store, store_b), rows in matrix.groupby(["store", "store_b"], sort=True):
            name = f"{store} vs {store_b}" if store_b else store
            yield f"<h3>{_e(what[0].upper() + what[1:])}: {_e(name)}</h3>"
            yield _table(
                _cka_pivot(rows, within=not store_b),
                corner=f"layer of {store} \\ layer of {store_b or store}",
                shade=True,
            )
    probes = tidy[tidy.metric.str.startswith(PROBE_PREFIX)]
    for store, rows in probes.groupby("store", sort=True):
        yield from _probes(rows, store)
    yield from _intervals(tidy)
    known = tidy.metric.isin([*RETRIEVALS, *HEATMAPS]) | tidy.metric.str.startswith(PROBE_PREFIX)
    for metric, rows in tidy[~known].groupby("metric", sort=True):
        # A metric this report has no layout for still shows, as its mean per store and layer.
        yield f"<h3>{_e(metric)}: mean by store and layer</h3>"
        yield _table(rows.pivot_table(index="store", columns="layer", values="value", aggfunc="mean"), corner="store")


def _retrieval(rows: pd.DataFrame, name: str, what: str) -> Iterator[str]:
    by_pair = _pair_pivot(rows)
    if by_pair.shape[1] <= MAX_PAIR_LINES:
        by_pair.columns = [f"{src} → {tgt}" for src, tgt in by_pair.columns]
        yield f"<h3>{_e(what)}: {_e(name)}</h3>"
        yield _table(by_pair, corner="layer", shade=True)
        return
    # A layer x pair pivot is 210 columns wide for 15 languages: summaries instead.
    import pandas as pd

    summary = pd.DataFrame(
        {
            "mean": by_pair.mean(axis=1),
            "min": by_pair.min(axis=1),
            "max": by_pair.max(axis=1),
            "pairs": by_pair.count(axis=1),
        }
    )
    yield f"<h3>{_e(what)}: {_e(name)}, over {by_pair.shape[1]} language pairs</h3>"
    yield _table(summary, corner="layer", shade=True)
    by_source = by_pair.T.groupby(level="src_lang").mean()
    yield f"<h3>{_e(what)}: {_e(name)}, mean over target languages, by source language and layer</h3>"
    yield _table(by_source, corner="source \\ layer", shade=True)


def _probes(rows: pd.DataFrame, store: str) -> Iterator[str]:
    is_chance = rows.metric.str.endswith(CHANCE_SUFFIX)
    accuracy = rows[~is_chance].pivot_table(index="layer", columns="metric", values="value", aggfunc="mean")
    if accuracy.empty:
        return
    accuracy.columns = [str(c).removeprefix(PROBE_PREFIX) for c in accuracy.columns]
    yield f"<h3>Linear probe accuracy: {_e(store)}</h3>"
    yield _table(accuracy.sort_index(), corner="layer", shade=True)
    chance = rows[is_chance].groupby("metric").value.mean()
    if len(chance):
        levels = ", ".join(
            f"{m.removeprefix(PROBE_PREFIX).removesuffix(CHANCE_SUFFIX)} {v:.3f}" for m, v in chance.items()
        )
        yield f'<p class="note">Chance level: {_e(levels)}.</p>'


def _intervals(tidy: pd.DataFrame) -> Iterator[str]:
    """Every row that has a bootstrap interval, as value [low, high], a table per metric."""
    bounded = tidy.dropna(subset=["ci_low", "ci_high"])
    for metric, rows in bounded.groupby("metric", sort=True):
        yield f"<h3>{_e(metric)}: {CONFIDENCE:.0%} bootstrap intervals</h3>"
        keys = [c for c in ("store", "store_b", "layer", "layer_b", "src_lang", "tgt_lang") if rows[c].notna().any()]
        keys = [c for c in keys if rows[c].astype(str).ne("").any()]
        yield _plain_table(
            [*keys, "value", f"{CONFIDENCE:.0%} interval"],
            [
                [_label(getattr(row, c)) for c in keys] + [f"{row.value:.3f}", f"[{row.ci_low:.3f}, {row.ci_high:.3f}]"]
                for row in rows.sort_values(keys).itertuples()
            ],
        )


def _plain_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Rows of text under a header, escaped."""
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in body)
    return f'<div class="scroll"><table><tr>{header}</tr>{rows}</table></div>'


def _table(frame: pd.DataFrame, *, corner: str, shade: bool = False) -> str:
    """`frame` as an HTML table; with `shade`, cells of values in [0, 1] tinted by their value."""
    head = "".join(f"<th>{_e(_label(c))}</th>" for c in frame.columns)
    body = []
    for index, row in frame.iterrows():
        cells = "".join(_cell(v, shade) for v in row)
        body.append(f'<tr><th class="row">{_e(_label(index))}</th>{cells}</tr>')
    return (
        f'<div class="scroll"><table><tr><th class="row">{_e(corner)}</th>{head}</tr>'
        + "".join(body)
        + "</table></div>"
    )


def _cell(value: Any, shade: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td></td>"
    number = float(value)
    text = f"{int(number)}" if number.is_integer() and abs(number) > 1 else f"{number:.3f}"
    if shade and 0.0 <= number <= 1.0:
        return f'<td style="background: rgba(49, 104, 142, {0.55 * number:.2f})">{_e(text)}</td>'
    return f"<td>{_e(text)}</td>"


def _label(value: Any) -> str:
    """Layers arrive as floats (NaN-able columns); they read as integers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
