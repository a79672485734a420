"""Figures of the metrics beyond the peers (issue 21), by hand: debiased CKA, mutual k-NN, margin retrieval.

    .venv/bin/python -m bench.beyond [--examples 100000] [--scale 4] [--rows 20000] [--work DIR]

On the synthetic stores of `bench.metrics` (7 layers x 384, float16, 10 languages), each run in a
fresh process (`bench.metrics --child ...`), so its peak RSS is its own:
- debiased CKA (every layer pair, one streaming pass) against plain exact CKA: wall time at 1x
  (target <= 1.2x) and peak RSS at 1x and --scale x (target: 4x within 1.15x of 1x);
- mutual k-NN (k = 10, layer 4 against layer 3) and margin retrieval (k = 4, with plain cosine
  P@1 from the same blocks), on the first --rows examples: wall time against reading their input
  (that layer's pooled vectors of those rows) and against plain cosine retrieval of the same rows.
Writes bench/results/<date>-<host>-beyond.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import tempfile
from pathlib import Path
from typing import Any

from bench.metrics import LANGUAGES, REPO, run_child, say
from bench.run import save
from pipeline.plan import DEFAULT_SHARD_TOKENS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000, help="examples of the 1x store (default 100,000)")
    parser.add_argument("--scale", type=int, default=4, help="the larger store, for peak RSS (default 4x)")
    parser.add_argument("--rows", type=int, default=20_000, help="examples for mknn and retrieval (O(n^2))")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="keep (and reuse) the stores here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    n = -(-args.examples // len(LANGUAGES)) * len(LANGUAGES)
    rows = -(-args.rows // len(LANGUAGES)) * len(LANGUAGES)
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "host": socket.gethostname(),
        "examples": n,
        "scale": args.scale,
        "rows": rows,
        "command": " ".join([".venv/bin/python -m bench.beyond", *(argv or [])]),
    }
    with tempfile.TemporaryDirectory(prefix="actcache-bench-beyond-") as tmp:
        root = args.work or Path(tmp)
        cache = str(root / "cache")
        stores = {}
        for size, count in (("1x", n), ("4x", n * args.scale)):
            with say(f"write {size} store ({count} examples)"):
                stores[size] = run_child(
                    "write", "--cache-dir", cache, "--examples", str(count), "--shard-tokens", str(DEFAULT_SHARD_TOKENS)
                )["path"]
        cka: dict[str, Any] = {}
        for name in ("cka", "cka-debiased"):
            for size, path in stores.items():
                with say(f"{name} {size}"):
                    cka[f"{name} {size}"] = run_child(name, "--store", path, "--cache-dir", cache)
        results["cka"] = cka
        near: dict[str, Any] = {}
        for name in ("read-layer", "retrieval", "retrieval-margin", "mknn"):
            with say(f"{name} on {rows} rows"):
                near[name] = run_child(
                    name, "--store", stores["1x"], "--cache-dir", cache, "--layer", str(args.layer), "--rows", str(rows)
                )
        results["neighbours"] = near
    results["debiased_over_plain_s"] = cka["cka-debiased 1x"]["seconds"] / cka["cka 1x"]["seconds"]
    results["rss_4x_over_1x"] = {
        name: cka[f"{name} 4x"]["vm_hwm_kib"] / cka[f"{name} 1x"]["vm_hwm_kib"] for name in ("cka", "cka-debiased")
    }
    save(results, args.out, f"{results['date']}-{results['host']}-beyond", table(results))
    return 0


def table(r: dict[str, Any]) -> str:
    cka, near = r["cka"], r["neighbours"]
    lines = [
        f"| {r['examples']:,} examples, 7 x 7 layer pairs | wall s (1x) | peak RSS 1x / {r['scale']}x MiB | ratio |",
        "|---|---|---|---|",
    ]
    for name in ("cka", "cka-debiased"):
        small, large = cka[f"{name} 1x"], cka[f"{name} 4x"]
        lines.append(
            f"| {name} | {small['seconds']:.2f} | {small['vm_hwm_kib'] / 1024:.0f} / {large['vm_hwm_kib'] / 1024:.0f} "
            f"| {large['vm_hwm_kib'] / small['vm_hwm_kib']:.2f} |"
        )
    lines.append(f"\ndebiased / plain CKA wall time: {r['debiased_over_plain_s']:.2f} (target <= 1.2)\n")
    read = near["read-layer"]["seconds"]
    lines += [f"| {r['rows']:,} examples, one layer | wall s | / read ({read:.2f} s) |", "|---|---|---|"]
    for name in ("retrieval", "retrieval-margin", "mknn"):
        lines.append(f"| {name} | {near[name]['seconds']:.2f} | {near[name]['seconds'] / read:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
