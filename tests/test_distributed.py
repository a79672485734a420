"""Extraction on a real Dask cluster (`--workers`, `client=`): same values and key, worker deaths, load failures."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import StoreWriter, verify
from cache.catalog import read_manifest
from cache.faults import arm_from_environment
from pipeline.extract import ExtractConfig, extract
from pipeline.run import RunHooks
from pipeline.stop import StopFlag
from schemas import Interrupted, WorkerError
from tests import chaos

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SHARDS = {"data": "sample", "limit": 4, "shard_tokens": 256, "batch_size": 8}  # ~1.1k tokens, 5 shards


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Two worker processes of one thread, started for this module and closed by it."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False, timeout=60) as c,
    ):
        c.wait_for_workers(2, timeout=60)
        yield c


def _config(model: Path, cache: Path, **options: Any) -> ExtractConfig:
    return ExtractConfig(model=str(model), cache_dir=str(cache), **{"quiet": True, **SHARDS, **options})


def _single(model: Path, cache: Path) -> Any:
    """The single-process store, with the workers' torch thread count: a matmul's sums split the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract(_config(model, cache))
    finally:
        torch.set_num_threads(threads)


def test_two_workers_write_the_single_process_store_value_for_value(client: Any, tiny_dir: Any, tmp_path: Path) -> None:
    single = _single(tiny_dir("bert"), tmp_path / "one")
    spread = extract(_config(tiny_dir("bert"), tmp_path / "two"), client=client)
    assert spread.key == single.key and spread.manifest.complete
    assert len(spread.manifest.geometry.shards) >= 4, "enough shards for both workers"
    assert chaos._lost(chaos._arrays(spread.path), chaos._arrays(single.path)) == 0
    assert spread.manifest.provenance["workers"] == 2 and single.manifest.provenance["workers"] is None
    writers = {json.loads(m.read_text())["writer"] for m in (spread.path / "shards").glob("*.json")}
    assert len(writers) == 2, f"both workers wrote shards: {writers}"
    assert verify(str(spread.path)).ok


def test_a_worker_killed_mid_shard_is_replaced_and_the_run_completes(
    client: Any, tiny_dir: Any, tmp_path: Path
) -> None:
    single = _single(tiny_dir("bert"), tmp_path / "one")
    victim = sorted(client.scheduler_info()["workers"])[0]
    client.run(arm_from_environment, {"ACTCACHE_CRASH_AT": "mid-batch:2"}, workers=[victim])  # SIGKILL mid-shard
    spread = extract(_config(tiny_dir("bert"), tmp_path / "two"), client=client)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
    assert victim not in client.scheduler_info()["workers"], "the armed worker died"
    assert spread.manifest.complete and verify(str(spread.path)).ok
    assert chaos._lost(chaos._arrays(spread.path), chaos._arrays(single.path)) == 0


class _StopAfterFirstShard(RunHooks):
    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def shard_done(self) -> None:
        self.flag.request(signal.SIGINT)


class _BreakWeightsOnceResolved(io.StringIO):
    """The run's output: once the client has resolved (and hashed) the checkpoint, its weights are truncated."""

    def __init__(self, weights: Path) -> None:
        super().__init__()
        self.weights = weights

    def write(self, text: str) -> int:
        if "-> key" in text:
            self.weights.write_bytes(self.weights.read_bytes()[:1000])
        return super().write(text)


def test_a_model_workers_cannot_load_is_one_error_and_committed_shards_are_kept(
    client: Any, tiny_dir: Any, tmp_path: Path
) -> None:
    model = shutil.copytree(tiny_dir("bert"), tmp_path / "model")
    weights = model / "model.safetensors"
    intact = weights.read_bytes()
    flag = StopFlag()
    with pytest.raises(Interrupted):  # a first run commits one shard, then stops
        extract(_config(model, tmp_path / "cache"), stop=flag, hooks=_StopAfterFirstShard(flag))
    cfg = _config(model, tmp_path / "cache", quiet=False)
    with pytest.raises(WorkerError) as caught:
        extract(cfg, out=_BreakWeightsOnceResolved(weights), client=client)
    message = str(caught.value)
    assert "\n" not in message and "worker tcp://" in message and "model.safetensors" in message, message
    assert "committed shards are kept" in message, message
    [store] = (tmp_path / "cache" / "stores").glob("*.zarr")
    manifest = read_manifest(store)
    with StoreWriter(store, manifest) as writer:
        assert writer.done_shards() == {0} and not manifest.complete
    weights.write_bytes(intact)
    assert extract(cfg, out=io.StringIO(), client=client).manifest.complete  # the same command finishes it


def test_a_stop_on_the_client_cancels_the_rest_keeps_what_is_committed_and_the_rerun_finishes(
    client: Any, tiny_dir: Any, tmp_path: Path
) -> None:
    """Ctrl-C (or SIGTERM) on the client after the first shard returns: one `Interrupted` saying how to resume."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = extract(_config(tiny_dir("bert"), tmp_path / "one", shard_tokens=64))
    finally:
        torch.set_num_threads(threads)
    flag = StopFlag()
    cfg = _config(tiny_dir("bert"), tmp_path / "two", shard_tokens=64)  # ~18 shards: most not started at the stop
    with pytest.raises(Interrupted) as caught:
        extract(cfg, client=client, stop=flag, hooks=_StopAfterFirstShard(flag))
    assert caught.value.signum == signal.SIGINT and "rerun the same command" in str(caught.value), caught.value
    [store] = (tmp_path / "two" / "stores").glob("*.zarr")
    manifest = read_manifest(store)
    with StoreWriter(store, manifest) as writer:
        done = writer.done_shards()
    assert 1 <= len(done) < len(manifest.geometry.shards) and not manifest.complete, done
    resumed = extract(cfg, client=client)
    assert resumed.manifest.complete and verify(str(resumed.path)).ok
    assert chaos._lost(chaos._arrays(resumed.path), chaos._arrays(single.path)) == 0


def test_cli_workers_runs_end_to_end_and_prints_the_store_last(tiny_dir: Any, tmp_path: Path) -> None:
    args = ["--model", str(tiny_dir("bert")), "--data", "sample", "--limit", "2", "--shard-tokens", "256"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", *args, "--workers", "2", "--cache-dir", str(tmp_path / "c")],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "dask: 2 local worker processes, dashboard http" in done.stdout
    assert Path(lines[-1]).is_dir() and verify(lines[-1]).ok
    assert read_manifest(Path(lines[-1])).provenance["workers"] == 2
