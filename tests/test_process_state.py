"""The Python API leaves the process as it found it: gc, signal handlers, progress bars, logging, threads, environment.

A metrics job or a notebook imports actcache, extracts and reads; afterwards its process must
be what it was. Checked in a fresh interpreter (so nothing from the test session blurs it),
against the state the same process had before it imported actcache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration

PROBE = r"""
import gc, json, logging, os, signal, sys, threading
import dask.array, datasets, numpy, transformers, zarr

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ)
LOGGERS = ("", "bitsandbytes", "bitsandbytes.autograd._functions")

def snapshot():
    return {
        "gc": [gc.isenabled(), list(gc.get_threshold()), gc.get_freeze_count()],
        "signals": {signal.Signals(s).name: repr(signal.getsignal(s)) for s in SIGNALS},
        "datasets_bars": datasets.is_progress_bar_enabled(),
        "datasets_verbosity": datasets.logging.get_verbosity(),
        "transformers_bars": transformers.utils.logging.is_progress_bar_enabled(),
        "transformers_verbosity": transformers.utils.logging.get_verbosity(),
        "log_filters": {n: len(logging.getLogger(n).filters) for n in LOGGERS},
        "log_levels": {n: logging.getLogger(n).level for n in ("", "bitsandbytes", "datasets", "transformers")},
        # tqdm's monitor thread belongs to tqdm (datasets' bars start one and keep it): not ours.
        "threads": sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor"),
    }

def environ():
    return dict(os.environ)

# The libraries' own lazily started threads (zarr's I/O loop, dask's scheduler pool) exist in any
# process that used them before; start them here, so what follows measures actcache alone.
# zarr's loop hands file I/O to its executor, which grows to its full size under a many-chunk write.
scratch = zarr.create_array(store=sys.argv[2] + "-scratch", shape=(256,), chunks=(1,), dtype="int8")
scratch[:] = 1
scratch[:]
dask.array.ones(4, chunks=2).sum().compute()
# distributed's own threads (its event loop, its offload pool) outlive any client, ours or not.
from distributed import Client, LocalCluster
with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as c, Client(c, set_as_default=False) as cl:
    cl.submit(sum, [1]).result()
states = {"start": snapshot()}
from pipeline.extract import ExtractConfig, extract
from cache import open_activations
import pipeline.cli, pipeline.models, cache.reader, cache.writer, cache.catalog
states["imported"] = snapshot()
config = ExtractConfig(model=sys.argv[1], data="sample", limit=2, shard_tokens=256, cache_dir=sys.argv[2], quiet=True)
result = extract(config)
states["extracted"] = snapshot()
# A local cluster's nannies live in this process and write their workers' variables into it.
# (Against the environment after a local extract: torch and sklearn set variables of their own on first use.)
states["environ before workers"] = environ()
extract(ExtractConfig(model=sys.argv[1], data="sample", limit=2, shard_tokens=256, cache_dir=sys.argv[2] + "-workers",
                      quiet=True, workers=1))
states["extracted on workers"] = snapshot()
states["environ after workers"] = environ()
with open_activations(result.path) as acts:
    acts.hidden(-1, lazy=False)
    acts.pooled(-1).compute()
states["read"] = snapshot()
print(json.dumps(states))
"""


def test_the_python_api_leaves_the_process_as_it_found_it(tiny_dir: Any, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACTCACHE_CRASH_AT": "mid-batch"}  # only the CLI arms it
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_dir("llama")), str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    states = json.loads(done.stdout.strip().splitlines()[-1])
    start = states["start"]
    assert start["gc"][0] and start["datasets_bars"] and start["transformers_bars"], "a pristine process to compare"
    for stage in ("imported", "extracted", "extracted on workers", "read"):
        changed = {k: _difference(start[k], v) for k, v in states[stage].items() if v != start[k]}
        assert not changed, f"after {stage}: {changed}"
    environ = _difference(states["environ before workers"], states["environ after workers"])
    assert not environ, f"extract(workers=1) changed os.environ: {environ}"


def _difference(before: Any, after: Any) -> Any:
    """`(before, after)`; for mappings, of the differing entries only."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return before, after


CONSOLE = r"""
import atexit, gc, sys
from pipeline.cli import console, main
status = main(["show", "no-such-store", "--cache-dir", sys.argv[1]])
print("after main", status, gc.get_freeze_count(), flush=True)
atexit.register(lambda: print("at exit", gc.get_freeze_count(), flush=True))
sys.argv = ["actcache", "show", "no-such-store", "--cache-dir", sys.argv[1]]
console()
"""


def test_the_console_script_exits_with_mains_status_and_skips_the_last_collections(tmp_path: Path) -> None:
    """`console()` (the `actcache` script, `python -m pipeline`) exits with `main()`'s status, its objects frozen
    out of the shutdown's garbage collections; `main()` alone, as a Python caller runs it, freezes nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", CONSOLE, str(tmp_path / "cache")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    lines = done.stdout.split("\n")
    status = int(lines[0].split()[2])
    assert status != 0 and lines[0] == f"after main {status} 0", done.stdout + done.stderr
    assert done.returncode == status, done.stderr
    assert lines[1].startswith("at exit ") and int(lines[1].split()[2]) > 1000, done.stdout
