"""Figures of distributed extraction (by hand, not in `make test`): workers against one process on this machine.

    .venv/bin/python -m bench.distributed [--copies 4] [--runs 2] [--shard-tokens 4096]

On the real MiniLM-L6 over the shipped sample x --copies: throughput (tokens / run-stage
second) of `--workers 2` (2 processes x 1 torch thread) against one process with all the
cores as torch threads, runs alternating, median of --runs; the set-up before the first
shard of a `--workers` run (cluster start and the model loaded on every worker); and the
scheduler's own cost per task (a no-op task's round trip on a local cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import ENV, extract_cmd, write_texts


def _run(model: str, data: Path, cache: Path, *extra: str) -> dict[str, Any]:
    subprocess.run(extract_cmd(model, data, cache, *extra), env=ENV, check=True, stdout=subprocess.DEVNULL)
    summary: dict[str, Any] = json.loads((cache / "summary.json").read_text())
    return summary


def _noop(i: int) -> int:
    return i


def scheduler_overhead(tasks: int = 200) -> dict[str, float]:
    """Seconds per task: one at a time (round trip through the scheduler), and a batch of `tasks` at once."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.submit(_noop, -1, pure=False).result()  # warm
        started = time.perf_counter()
        for i in range(tasks):
            client.submit(_noop, i, pure=False).result()
        serial = (time.perf_counter() - started) / tasks
        started = time.perf_counter()
        client.gather([client.submit(_noop, i, pure=False) for i in range(tasks)])
        batch = (time.perf_counter() - started) / tasks
    return {"round_trip_s": serial, "per_task_in_a_batch_s": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--shard-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    shard = ("--shard-tokens", str(args.shard_tokens))
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "workers": []}
    with tempfile.TemporaryDirectory(prefix="actcache-bench-dist-") as tmp:
        data = Path(tmp) / "texts.jsonl"
        n = write_texts(data, args.copies)
        for i in range(args.runs):
            runs["single"].append(_run("minilm-l6", data, Path(tmp) / f"single{i}", *shard))
            runs["workers"].append(_run("minilm-l6", data, Path(tmp) / f"workers{i}", *shard, "--workers", "2"))

    def rate(s: dict[str, Any]) -> float:
        return float(s["tokens_computed"]) / s["stage_seconds"]["run"]

    single = statistics.median(rate(s) for s in runs["single"])
    workers = statistics.median(rate(s) for s in runs["workers"])
    figures = {
        "texts": n,
        "tokens": runs["single"][0]["tokens"],
        "shards": runs["single"][0]["shards"],
        "cores": os.cpu_count(),
        "single_tokens_per_s": round(single),
        "workers_tokens_per_s": round(workers),
        "throughput_ratio": round(workers / single, 3),
        "single_load_model_s": statistics.median(s["stage_seconds"]["load model"] for s in runs["single"]),
        "workers_set_up_s": statistics.median(s["stage_seconds"]["load model"] for s in runs["workers"]),
        "workers_close_s": statistics.median(s["stage_seconds"]["finalize"] for s in runs["workers"]),
        "single_total_s": statistics.median(s["seconds"] for s in runs["single"]),
        "workers_total_s": statistics.median(s["seconds"] for s in runs["workers"]),
        "stage_seconds": {k: [s["stage_seconds"] for s in v] for k, v in runs.items()},
        "scheduler": scheduler_overhead(),
    }
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
