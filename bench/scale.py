"""Scale (issue 16): set-up, run, cache hit and reads from 10 thousand to a million examples.

    .venv/bin/python -m bench.scale [--quick] [--rows 10000,100000,1000000] [--budget-s 1800] [--no-profile]
                                    [--work DIR]

Synthetic short multilingual texts (3-60 words, mostly short, words drawn from the shipped sample's
15 languages; `id` and `language` columns) in a .jsonl, through a tiny random BERT
(`tests.factory.save_tiny("bert")`), `--batch-size 128 --logits topk:5`. For each row count:
`actcache extract` as a whole process (seconds per stage from --summary-json, padding share, peak
RSS), the same command again three times (a cache hit: the median's figures, each run kept), then
opening the store, reading its examples table and `actcache ls`. A row count whose estimate (the
last one's cost, scaled by rows) would take the whole bench past --budget-s is skipped, and said
so. Then, at the largest size whose resolve + tokenize took over 5 s (else the largest run), the
set-up is profiled in-process (cProfile, top 30 by cumulative time): `extract` on a cache hit, and
resolve + tokenize + plan with the tokenized copy cached. The padding share and batches per shard
at batch 32 and 128 are recomputed from the stored lengths with the run's own batching
(`pipeline.batching`), beside the fixed cut it replaced (longest first inside a shard, `batch_size`
at a time).

Prints JSON and a markdown table; writes bench/results/<date>-<host>-scale[-quick].json.
--quick is a smoke run at 2,000 rows (well under a minute).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import REPO, timed
from pipeline.batching import batches

SAMPLE = REPO / "pipeline" / "data" / "xnli_sample.jsonl"
BATCH = 128
LOGITS = "topk:5"
DEFAULT_ROWS = (10_000, 100_000, 1_000_000)
QUICK_ROWS = (2_000,)
HIT_RUNS = 3  # the cache hit is timed this many times; the median is its figure
PROFILE_OVER_S = 5.0  # profile the largest size whose resolve + tokenize took longer than this
STAGES = ("resolve", "tokenize", "plan", "load model", "open store", "run", "finalize")


def word_pools() -> dict[str, list[str]]:
    """Words of each of the sample's 15 languages (pairs of characters where a script has no spaces)."""
    pools: dict[str, list[str]] = {}
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for field in ("premise", "hypothesis"):
            text = row[field]
            words = text.split() if " " in text else [text[i : i + 2] for i in range(0, len(text), 2)]
            pools.setdefault(row["language"], []).extend(words)
    return {language: sorted(set(words)) for language, words in sorted(pools.items())}


def write_rows(path: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """`n` rows {"id", "language", "text"}: 3-60 words, log-normal around 6 (most short, a long tail)."""
    rng = np.random.default_rng(seed)
    pools = word_pools()
    languages = list(pools)
    lang = rng.integers(len(languages), size=n)
    words = np.clip(np.rint(np.exp(rng.normal(np.log(6), 0.6, size=n))), 3, 60).astype(np.int64)
    picks = rng.random(int(words.sum()))
    ends = np.cumsum(words)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            pool = pools[languages[lang[i]]]
            chosen = (picks[ends[i] - words[i] : ends[i]] * len(pool)).astype(np.int64)
            text = " ".join(pool[j] for j in chosen)
            out.write(json.dumps({"id": f"s{i:08d}", "language": languages[lang[i]], "text": text}, ensure_ascii=False))
            out.write("\n")
    return {"words_mean": float(words.mean()), "words_max": int(words.max()), "bytes": path.stat().st_size}


def extract_cmd(model: Path, data: Path, cache: Path) -> list[str]:
    """bench.run's `extract_cmd` at this bench's batch size and logits."""
    cache.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", "pipeline", "extract", "--model", str(model), "--data", str(data),
        "--cache-dir", str(cache), "--batch-size", str(BATCH), "--logits", LOGITS, "--quiet",
        "--summary-json", str(cache / "summary.json"),
    ]  # fmt: skip


def fixed_cut(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The run's batching before issue 16: longest first, cut every `batch_size` examples."""
    order = np.argsort(-lengths, kind="stable")
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def padding(
    lengths: np.ndarray,
    shards: list[tuple[int, int]],
    batch: int,
    cut: Callable[[np.ndarray, int], list[np.ndarray]] = batches,
) -> tuple[float, float]:
    """Padding share of the positions computed and batches per shard, each shard batched by `cut`
    (the run's own, `pipeline.batching.batches`, unless told)."""
    computed = count = 0
    for start, stop in shards:
        shard = lengths[start:stop]
        groups = cut(shard, batch)
        computed += int(shard[[g[0] for g in groups]] @ [len(g) for g in groups])  # each group longest first
        count += len(groups)
    return (1 - int(lengths.sum()) / computed if computed else 0.0), count / max(1, len(shards))


def padding_figures(lengths: np.ndarray, shards: list[tuple[int, int]]) -> dict[str, float]:
    """Padding share and batches per shard at batch 32 and 128: as run, and by the fixed cut (before)."""
    figures = {"shard_examples_mean": float(np.mean([b - a for a, b in shards]))}
    for batch in (32, 128):
        figures[f"batch{batch}"], figures[f"batches_per_shard{batch}"] = padding(lengths, shards, batch)
        before = padding(lengths, shards, batch, fixed_cut)
        figures[f"batch{batch}_fixed_cut"], figures[f"batches_per_shard{batch}_fixed_cut"] = before
    return figures


def read_costs(store: Path, cache: Path) -> dict[str, Any]:
    """Open the store, read its examples table, list the cache: in this process, and `actcache ls` as one."""
    import pandas  # noqa: F401  (imports are start-up, not the read)

    from cache import list_stores, open_activations

    t = time.perf_counter()
    open_activations(str(store))
    first = time.perf_counter() - t  # the first in this process imports the readers (dask, zarr)
    t = time.perf_counter()
    acts = open_activations(str(store))
    opened = time.perf_counter() - t
    t = time.perf_counter()
    table = acts.examples
    examples = time.perf_counter() - t
    t = time.perf_counter()
    list_stores(cache)
    listed = time.perf_counter() - t
    ls_s, ls_rss = timed([sys.executable, "-m", "pipeline", "ls", "--cache-dir", str(cache)])
    lengths = np.diff(np.asarray(acts.offsets.compute()))
    shards = [(s.ex_start, s.ex_stop) for s in acts.manifest.geometry.shards]
    return {
        "open_first_s": first,
        "open_s": opened,
        "examples_s": examples,
        "examples_columns": list(map(str, table.columns)),
        "list_stores_s": listed,
        "ls_process_s": ls_s,
        "ls_rss_kib": ls_rss,
        "padding": padding_figures(lengths, shards),
        "tokens_mean": float(lengths.mean()),
        "tokens_max": int(lengths.max()),
    }


def measure(rows: int, model: Path, tmp: Path) -> dict[str, Any]:
    started = time.perf_counter()
    data, cache = tmp / f"rows{rows}.jsonl", tmp / f"cache{rows}"
    t = time.perf_counter()
    figures: dict[str, Any] = {"rows": rows, "data": write_rows(data, rows)}
    figures["write_data_s"] = time.perf_counter() - t
    cmd = extract_cmd(model, data, cache)
    figures["extract_s"], figures["extract_rss_kib"] = timed(cmd)
    summary = json.loads((cache / "summary.json").read_text())
    figures["summary"] = summary
    # A hit is a few seconds, most of it start-up, and this VM's runs of it spread by ~1 s: the median of
    # HIT_RUNS, each run kept.
    runs = []
    for _ in range(HIT_RUNS):
        seconds, rss = timed(cmd)
        hit = json.loads((cache / "summary.json").read_text())
        if not hit.get("cache_hit"):
            raise RuntimeError(f"the rerun at {rows} rows was not a cache hit: {hit}")
        runs.append((seconds, rss, hit["seconds"]))
    figures["hit_runs"] = [{"s": s, "rss_kib": r, "seconds_in_process": p} for s, r, p in runs]
    figures["hit_s"], figures["hit_rss_kib"], figures["hit_seconds_in_process"] = sorted(runs)[len(runs) // 2]
    figures |= read_costs(Path(summary["path"]), cache)
    figures["measure_s"] = time.perf_counter() - started
    return figures


def shard_rates(rows: int, model: Path, tmp: Path, n: int = 10, rounds: int = 2) -> dict[str, Any]:
    """Tokens/s of `run_shard` alone (no writer, no store) over the first and the last `n` shards of the
    plan at `rows`, `rounds` times alternating: whether the compute loop's cost per token depends on where
    in the dataset a shard is (with the tokenized copy the extract cached)."""
    from cache import cache_root
    from cache.catalog import read_manifest
    from cache.paths import store_path, work_dir
    from pipeline.buffers import BufferPool
    from pipeline.datasets import resolve_dataset
    from pipeline.models import load_model
    from pipeline.reduce import Reducer
    from pipeline.resolve import resolve
    from pipeline.run import RunStats, run_shard
    from pipeline.staging import HostStaging
    from pipeline.stop import StopFlag
    from schemas import OutputSpec

    data, cache = tmp / f"rows{rows}.jsonl", tmp / f"cache{rows}"
    side, outputs = work_dir(cache_root(str(cache))), OutputSpec(logits=LOGITS)
    resolved = resolve(str(model), resolve_dataset(str(data)), outputs, cache_dir=side)
    tokenized = resolved.tokenize(side)
    manifest = read_manifest(store_path(cache_root(str(cache)), resolved.key))
    poolings = {"encoder": outputs.poolings("encoder")}
    reducer = Reducer(
        layers=resolved.layers, stacks=("encoder",), poolings=poolings, store_dtype=outputs.store_dtype,
        topk=outputs.topk, logits=LOGITS, target="observed", token_level=True,
    )  # fmt: skip
    runner = load_model(str(model), device="cpu")
    shards = manifest.geometry.shards
    picked = {"first": shards[:n], "last": shards[-n:]}
    pool = BufferPool(manifest.arrays, [*picked["first"], *picked["last"]])
    seen: dict[str, list[float]] = {"first": [], "last": []}
    staging = HostStaging()  # kept from shard to shard, as run_shards keeps it
    quiet = type("Quiet", (), {"update": lambda self, k: None, "set_postfix_str": lambda self, *a, **k: None})()
    for _ in range(rounds):
        for where, group in picked.items():
            for shard in group:
                buffers, views = pool.take(shard)
                started = time.perf_counter()
                run_shard(
                    runner, tokenized, manifest.arrays, reducer, shard, views,
                    batch_size=BATCH, progress=quiet, flag=StopFlag(), stats=RunStats(), staging=staging,
                )  # fmt: skip
                seen[where].append(shard.n_tokens / (time.perf_counter() - started))
                pool.give_back(buffers)
    return {
        "rows": rows,
        "shards": len(shards),
        **{f"{where}_tok_s_median": float(np.median(rates)) for where, rates in seen.items()},
        "last_over_first": float(np.median(seen["last"]) / np.median(seen["first"])),
    }


def profile_setup(rows: int, model: Path, tmp: Path, top: int = 30) -> dict[str, Any]:
    """cProfile of `extract` on a cache hit, and of resolve + tokenize + plan (tokenized copy cached)."""
    from cache import cache_root
    from cache.paths import work_dir
    from pipeline.datasets import resolve_dataset
    from pipeline.extract import ExtractConfig, extract
    from pipeline.plan import DEFAULT_SHARD_TOKENS, plan
    from pipeline.resolve import resolve
    from schemas import OutputSpec

    data, cache = tmp / f"rows{rows}.jsonl", tmp / f"cache{rows}"
    cfg = ExtractConfig(
        model=str(model), data=str(data), cache_dir=str(cache), batch_size=BATCH, logits=LOGITS, quiet=True
    )

    def setup() -> None:
        side = work_dir(cache_root(str(cache)))
        resolved = resolve(str(model), resolve_dataset(str(data)), OutputSpec(logits=LOGITS), cache_dir=side)
        tokenized = resolved.tokenize(side)
        plan(tokenized.lengths, shard_tokens=DEFAULT_SHARD_TOKENS, hidden=resolved.hidden_size, store_dtype="float16")

    result: dict[str, Any] = {"rows": rows}
    extract(cfg, out=io.StringIO())  # imports and first-use costs out of the profiles
    for name, call in (("cache_hit", lambda: extract(cfg, out=io.StringIO())), ("setup", setup)):
        profiler = cProfile.Profile()
        t = time.perf_counter()
        profiler.runcall(call)
        result[f"{name}_s"] = time.perf_counter() - t
        for key in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(top if key == "cumulative" else 15)
            result[f"{name}_{key}"] = _short_paths(text.getvalue())
    return result


def _short_paths(text: str) -> str:
    """Profile lines with paths relative to the repository, or to site-packages for libraries."""
    import sysconfig

    return text.replace(str(REPO) + os.sep, "").replace(sysconfig.get_paths()["purelib"] + os.sep, "")


def table(r: dict[str, Any]) -> str:
    head = (
        "| rows | tokens | write data s | resolve | tokenize | plan | load model | open store | run | finalize "
        "| extract s "
        "| run tok/s | padding (run) | peak RSS MiB | cache hit s | hit RSS MiB | open ms | examples ms "
        "| ls (process) s | list_stores ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f in r["sizes"]:
        s = f["summary"]
        stages = s["stage_seconds"]
        rate = s["tokens"] / stages["run"] if stages.get("run") else float("nan")
        lines.append(
            f"| {f['rows']:,} | {s['tokens']:,} | {f['write_data_s']:.1f} | "
            + " | ".join(f"{stages.get(k, float('nan')):.2f}" for k in STAGES)
            + f" | {f['extract_s']:.1f} | {rate:,.0f} | {100 * s['padding_share']:.1f}%"
            f" | {f['extract_rss_kib'] / 1024:.0f}"
            f" | {f['hit_s']:.2f} | {f['hit_rss_kib'] / 1024:.0f} | {1000 * f['open_s']:.0f} | "
            f"{1000 * f['examples_s']:.0f} | {f['ls_process_s']:.2f} | {1000 * f['list_stores_s']:.0f} |"
        )
    lines += ["", "| rows | set-up s per 1M rows (resolve+tokenize+plan) | cache hit s per 1M rows "
              "beyond the smallest size's (start-up) |", "|---|---|---|"]  # fmt: skip
    first = r["sizes"][0] if r["sizes"] else {}
    for f in r["sizes"]:
        stages = f["summary"]["stage_seconds"]
        setup = sum(stages.get(k, 0.0) for k in ("resolve", "tokenize", "plan"))
        extra = f["rows"] - first["rows"]
        beyond = f"{1e6 * (f['hit_s'] - first['hit_s']) / extra:.1f}" if extra else "-"
        lines.append(f"| {f['rows']:,} | {1e6 * setup / f['rows']:.1f} | {beyond} |")
    lines += ["", "| rows | padding, batch 32 / 128: as run | fixed cut (before) | batches per shard, 32 / 128: "
              "as run | fixed cut (before) | examples per shard |", "|---|---|---|---|---|---|"]  # fmt: skip
    for f in r["sizes"]:
        p = f["padding"]
        lines.append(
            f"| {f['rows']:,} | {100 * p['batch32']:.1f}% / {100 * p['batch128']:.1f}% | "
            f"{100 * p['batch32_fixed_cut']:.1f}% / {100 * p['batch128_fixed_cut']:.1f}% | "
            f"{p['batches_per_shard32']:.1f} / {p['batches_per_shard128']:.1f} | "
            f"{p['batches_per_shard32_fixed_cut']:.1f} / {p['batches_per_shard128_fixed_cut']:.1f} | "
            f"{p['shard_examples_mean']:.0f} |"
        )
    lines += [f"skipped: {s}" for s in r["skipped"]]
    return "\n".join([*lines, "", targets(r)])


def targets(r: dict[str, Any]) -> str:
    """Issue 16's targets against the largest size measured, and 10M rows extrapolated from it (linearly)."""
    if not r["sizes"]:
        return ""
    first, last = r["sizes"][0], r["sizes"][-1]
    per_m = 1e6 / last["rows"]
    stages = last["summary"]["stage_seconds"]
    setup = sum(stages.get(k, 0.0) for k in ("resolve", "tokenize", "plan"))
    encode = r.get("tokenizer_us_per_text", float("nan"))  # the Rust tokenizer's own cost, per example
    rates = [f["summary"]["tokens"] / f["summary"]["stage_seconds"]["run"] for f in r["sizes"]]
    extra = last["rows"] - first["rows"]
    hit = 1e6 * (last["hit_s"] - first["hit_s"]) / extra if extra else float("nan")
    lines = [
        "| target (issue 16) | measured |",
        "|---|---|",
        f"| resolve + tokenize + plan <= 10 s per 1M rows | {setup * per_m:.1f} s per 1M at {last['rows']:,} rows, "
        f"of which the tokenizer's own encode {encode:.1f} us/example = {encode:.1f} s per 1M |",
        f"| cache hit <= 2 s per 1M rows beyond start-up | {hit:.2f} s per 1M "
        f"({first['rows']:,} -> {last['rows']:,}) |",
        f"| open the store <= 1 s at 1M | {last['open_s']:.2f} s at {last['rows']:,} |",
        f"| examples table <= 1 s at 1M | {last['examples_s']:.2f} s at {last['rows']:,} |",
        f"| `actcache ls` <= 1 s at 1M | {last['ls_process_s']:.2f} s (a whole process) at {last['rows']:,} |",
        f"| run tokens/s within 10% across sizes | {min(rates):,.0f} - {max(rates):,.0f} tok/s "
        f"(max/min {max(rates) / min(rates):.2f}) |",
        f"| (the compute loop alone, first vs last shards at {last['rows']:,}) | "
        + (
            f"{r['shard_rates']['first_tok_s_median']:,.0f} vs {r['shard_rates']['last_tok_s_median']:,.0f} tok/s "
            f"(last/first {r['shard_rates']['last_over_first']:.2f}) |"
            if "shard_rates" in r
            else "- |"
        ),
        f"| padding <= 5% at batch 32 and 128 | {100 * last['padding']['batch32']:.1f}% / "
        f"{100 * last['padding']['batch128']:.1f}% |",
    ]
    if last["rows"] < 10_000_000:
        scaled = {k: v * 1e7 / last["rows"] for k, v in stages.items()}
        lines += [
            "",
            f"10M rows, extrapolated linearly from {last['rows']:,} (not measured): "
            + ", ".join(f"{k} {v:,.0f} s" for k, v in scaled.items())
            + "; peak RSS of the extract at the sizes measured: "
            + ", ".join(f"{f['extract_rss_kib'] / 1024:.0f} MiB" for f in r["sizes"]),
        ]
    return "\n".join(lines)


def tokenizer_floor(model: Path, data: Path, n: int = 50_000) -> float:
    """Microseconds per example of the tokenizer's own Rust `encode_batch_fast` on `n` of the bench's texts."""
    from transformers import AutoTokenizer

    texts = []
    with data.open(encoding="utf-8") as rows:
        for _, line in zip(range(n), rows, strict=False):
            texts.append(json.loads(line)["text"])
    backend = AutoTokenizer.from_pretrained(model).backend_tokenizer
    backend.enable_truncation(64)
    started = time.perf_counter()
    for i in range(0, len(texts), 4096):
        backend.encode_batch_fast(texts[i : i + 4096])
    return 1e6 * (time.perf_counter() - started) / len(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run at 2,000 rows")
    parser.add_argument("--rows", help="comma-separated row counts (default 10000,100000,1000000)")
    parser.add_argument(
        "--budget-s", type=float, default=1800.0, help="skip a size whose estimate passes this (default 30 min)"
    )
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile of set-up")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, help="where the data and caches go (default: the system's temp dir)")
    args = parser.parse_args(argv)
    sizes = (
        [int(n) for n in args.rows.replace("_", "").split(",") if n]
        if args.rows
        else list(QUICK_ROWS if args.quick else DEFAULT_ROWS)
    )
    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "host": socket.gethostname(),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "batch_size": BATCH,
        "logits": LOGITS,
        "model": "tests.factory tiny BERT (hidden 32, 2 layers, vocab 300, max length 64)",
        "sizes": [],
        "skipped": [],
    }
    results["work"] = str(args.work or tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="actcache-bench-scale-", dir=args.work) as tmp_name:
        tmp = Path(tmp_name)
        from tests.factory import save_tiny

        model = save_tiny("bert", tmp / "tiny-bert")
        for rows in sorted(sizes):
            done = results["sizes"]
            if done:
                last = done[-1]
                estimate = last["measure_s"] * rows / last["rows"]
                spent = time.perf_counter() - started
                if spent + estimate > args.budget_s:
                    results["skipped"].append(
                        f"{rows:,} rows: estimated {estimate:.0f} s from {last['rows']:,} rows "
                        f"({last['measure_s']:.0f} s, scaled by rows), {spent:.0f} s spent, "
                        f"budget {args.budget_s:.0f} s"
                    )
                    continue
            print(f"{rows:,} rows ...", file=sys.stderr, flush=True)
            done.append(measure(rows, model, tmp))
        if results["sizes"]:
            print("per-shard compute at the start and the end of the largest size ...", file=sys.stderr, flush=True)
            results["shard_rates"] = shard_rates(results["sizes"][-1]["rows"], model, tmp)
            results["tokenizer_us_per_text"] = tokenizer_floor(model, tmp / f"rows{results['sizes'][-1]['rows']}.jsonl")
        if args.profile and results["sizes"]:
            slow = [
                f
                for f in results["sizes"]
                if f["summary"]["stage_seconds"]["resolve"] + f["summary"]["stage_seconds"]["tokenize"] > PROFILE_OVER_S
            ]
            chosen = (slow or results["sizes"])[-1]["rows"]
            print(f"profiling set-up at {chosen:,} rows ...", file=sys.stderr, flush=True)
            results["profile"] = profile_setup(chosen, model, tmp)
            results["profile"]["over_5s"] = bool(slow)
    results["total_s"] = time.perf_counter() - started
    from bench.run import save

    tag = "-quick" if args.quick else "-shm" if str(args.work or "").startswith("/dev/shm") else ""
    save(results, args.out, f"{results['date']}-{results['host']}-scale{tag}", table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
