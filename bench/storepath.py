"""The store path's ceiling: `extract` with a zero-cost model (`bench.standin`) against the disk's own write speed.

    python -m bench.storepath [--quick] [--profile] [--texts N] [--llama-texts N]

For each shape (XLM-R base: 13 x 768; Llama 3 8B: 33 x 4096), the real pipeline runs over
the shipped sample's texts, repeated, with the stand-in as its model: tokenize, plan,
batch, reduce, write, commit. The store path's time is the run and finalize stages (the
model loaded and the store open) plus an fsync of the store's files, so that both sides
end with the bytes on the disk; the physical limit is the same number of bytes (hidden
states as stored, float16) written to a file in the same directory with
`numpy.ndarray.tofile` and `os.fsync`, best of one write before and one after. Target:
ratio >= 0.7. Prints a table and JSON, and writes it to bench/results/.

`--profile` also runs the XLM-R shape once under cProfile, on every thread the run starts
(the main thread, the background writer, zarr's event loop and pools), and writes the top
costs to bench/results/<date>-<host>-storepath-profile.txt (cumulative and own time, top 25 each).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import os
import pstats
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench import standin  # noqa: E402
from bench.run import write_texts  # noqa: E402

TEXTS = {"xlmr-base": 3360, "llama3-8b": 840}  # ~75k / ~19k tokens: ~1.5 / ~5 GB of hidden states, 5 / 9 shards
QUICK_TEXTS = {"xlmr-base": 160, "llama3-8b": 80}
TARGET = 0.7
_BLOCK = 64 << 20  # bytes per tofile call of the disk measurement


def texts_file(path: Path, n: int) -> Path:
    """`n` texts of the shipped sample, repeated and numbered (`bench.run.write_texts`)."""
    per_copy = write_texts(path, copies=1)
    write_texts(path, copies=-(-n // per_copy), limit=n)
    return path


def disk_seconds(directory: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file in `directory` with `ndarray.tofile`, then `os.fsync`."""
    block = np.random.default_rng(0).standard_normal(_BLOCK // 2).astype(np.float16)
    path = directory / "disk-limit.bin"
    started = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            part = block if left >= block.nbytes else block[: left // 2]
            part.tofile(fh)
            left -= part.nbytes
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def fsync_tree(root: Path) -> float:
    """Seconds to fsync every file and directory under `root` (what the store path left in the page cache)."""
    started = time.perf_counter()
    for folder, _, files in os.walk(root):
        for name in (*files, "."):
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - started


def run_standin(
    shape: str,
    data: Path,
    tmp: Path,
    *,
    runner: standin.StandIn | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """One extraction of `data` with the `shape` stand-in into a fresh cache under `tmp`: its figures.

    Without `runner`, the stand-in is made here: its bank on `device`, its tokenizer copied from
    `tokenizer` (default MiniLM-L6's, `standin.checkpoint`).
    """
    from pipeline.extract import ExtractConfig, extract

    directory = tmp / f"standin-{shape}"
    if not (directory / "config.json").is_file():
        standin.checkpoint(shape, directory, tokenizer=tokenizer)
    runner = runner or standin.StandIn(directory, device=device)
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{shape}-", dir=tmp))
    cfg = ExtractConfig(model=str(directory), data=str(data), cache_dir=str(cache), logits="none", quiet=True)
    started = time.perf_counter()
    result = extract(cfg, out=io.StringIO(), runner=runner)
    wall = time.perf_counter() - started
    synced = fsync_tree(result.path)
    s = result.summary
    stages = s["stage_seconds"]
    seconds = stages["run"] + stages["finalize"] + synced
    hidden_bytes = s["tokens"] * runner.shape.bytes_per_token
    return {
        "shape": shape,
        "device": str(runner.device),
        "n_states": runner.shape.n_states,
        "hidden": runner.shape.hidden,
        "states_dtype": str(runner.shape.dtype).removeprefix("torch."),
        "texts": s["examples"],
        "tokens": s["tokens"],
        "shards": s["shards"],
        "hidden_bytes": hidden_bytes,
        "store_bytes": s["bytes"],
        "extract_wall_s": wall,
        "stage_seconds": stages,
        "writer_busy_s": s["writer_seconds"],
        "fsync_s": synced,
        "store_path_s": seconds,
        "tokens_per_s": s["tokens"] / seconds,
        "gb_per_s": hidden_bytes / seconds / 1e9,
        "gb_per_s_unsynced": hidden_bytes / (stages["run"] + stages["finalize"]) / 1e9,
        "store": str(result.path),
    }


def measure(
    tmp: Path,
    *,
    quick: bool = False,
    texts: dict[str, int] | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Every shape's store-path figures and disk limit, measured in `tmp` (the store's disk); the
    stand-ins' banks on `device` (on a GPU the reduction runs there, as a model's would)."""
    import shutil

    counts = texts or (QUICK_TEXTS if quick else TEXTS)
    results: dict[str, Any] = {"loadavg_before": os.getloadavg()[0], "shapes": {}}
    for shape, n in counts.items():
        data = texts_file(tmp / f"texts-{shape}.jsonl", n)
        nbytes_guess = n * 22 * standin.SHAPES[shape].bytes_per_token
        before = disk_seconds(tmp, nbytes_guess)  # warms the disk path too; rescaled below
        figures = run_standin(shape, data, tmp, device=device, tokenizer=tokenizer)
        shutil.rmtree(Path(figures.pop("store")).parents[1])  # the cache: free the disk before the next write
        after = disk_seconds(tmp, figures["hidden_bytes"])
        disk_gb_s = max(nbytes_guess / before, figures["hidden_bytes"] / after) / 1e9
        figures |= {
            "disk_gb_per_s_before": nbytes_guess / before / 1e9,
            "disk_gb_per_s_after": figures["hidden_bytes"] / after / 1e9,
            "disk_gb_per_s": disk_gb_s,
            "ratio": figures["gb_per_s"] / disk_gb_s,
        }
        results["shapes"][shape] = figures
    results["loadavg_after"] = os.getloadavg()[0]
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for `bench/run.py`'s table (measure, value, target)."""
    rows = []
    for shape, f in results["shapes"].items():
        rows.append(
            (
                f"store-path ceiling, zero-cost {shape} ({f['n_states']} x {f['hidden']}, {f['tokens']} tokens): "
                "tokens/s, GB/s of float16 hidden states / disk `tofile`+fsync",
                f"{f['tokens_per_s']:.0f} tok/s, {f['gb_per_s']:.2f} / {f['disk_gb_per_s']:.2f} GB/s "
                f"= {f['ratio']:.2f}",
                f">= {TARGET}",
            )
        )
    return rows


def table(results: dict[str, Any]) -> str:
    lines = ["| measure | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table_rows(results)]
    for shape, f in results["shapes"].items():
        st = f["stage_seconds"]
        lines.append(
            f"{shape}: run {st['run']:.1f} s (writer busy {f['writer_busy_s']:.1f} s), "
            f"finalize {st['finalize']:.2f} s, "
            f"fsync {f['fsync_s']:.1f} s; without the fsync {f['gb_per_s_unsynced']:.2f} GB/s; "
            f"whole extract() {f['extract_wall_s']:.1f} s; {f['store_bytes'] / f['hidden_bytes']:.2f} bytes on disk "
            "per hidden-state byte"
        )
    return "\n".join(lines)


class _ThreadProfiles:
    """cProfile on the calling thread and on every thread started while active (Python 3.11 has no
    `threading.setprofile_all_threads`): each new thread's first profile event starts its own profiler."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _start(self, *_: Any) -> None:
        profile = cProfile.Profile()
        with self._lock:
            self.profiles.append(profile)
        profile.enable()  # replaces this hook on the new thread

    def __enter__(self) -> _ThreadProfiles:
        threading.setprofile(self._start)
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        self.profiles[0].disable()

    def stats(self) -> pstats.Stats:
        stats = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            stats.add(profile)
        return stats


def profile(
    tmp: Path, out: Path, n_texts: int, *, device: str = "cpu", tokenizer: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """One XLM-R-shaped stand-in run under cProfile (all threads), its bank on `device`; top 25 by
    cumulative and by own time written to `out`. Returns `out` and the run's figures."""
    data = texts_file(tmp / "texts-profile.jsonl", n_texts)
    directory = standin.checkpoint("xlmr-base", tmp / "standin-profile", tokenizer=tokenizer)
    runner = standin.StandIn(directory, device=device)
    with _ThreadProfiles() as profiles:
        figures = run_standin("xlmr-base", data, tmp, runner=runner)
    text = io.StringIO()
    print(
        f"{n_texts} texts, {figures['tokens']} tokens, XLM-R-base stand-in on {device}; all threads merged\n",
        file=text,
    )
    stats = profiles.stats()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(25)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())
    return out, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few texts per shape")
    parser.add_argument("--texts", type=int, help=f"texts for the XLM-R shape (default {TEXTS['xlmr-base']})")
    parser.add_argument("--llama-texts", type=int, help=f"texts for the Llama shape (default {TEXTS['llama3-8b']})")
    parser.add_argument("--profile", action="store_true", help="also profile one XLM-R run (cProfile, all threads)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    texts = dict(QUICK_TEXTS if args.quick else TEXTS)
    texts["xlmr-base"] = args.texts or texts["xlmr-base"]
    texts["llama3-8b"] = args.llama_texts or texts["llama3-8b"]
    stem = f"{dt.date.today().isoformat()}-{socket.gethostname()}-storepath{'-quick' if args.quick else ''}"
    with tempfile.TemporaryDirectory(prefix="actcache-storepath-") as name:
        # The profile first: zarr's event loop and thread pools start with the first store, and only
        # threads started under the profiler are seen.
        found = profile(Path(name), args.out / f"{stem}-profile.txt", texts["xlmr-base"])[0] if args.profile else None
        results = measure(Path(name), texts=texts)
        if found is not None:
            results["profile"] = str(found)
    results |= {"date": dt.date.today().isoformat(), "host": socket.gethostname(), "quick": args.quick}
    from bench.run import save

    save(results, args.out, stem, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
