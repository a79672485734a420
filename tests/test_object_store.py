"""Extraction onto an object store (a real S3 API server, moto, on localhost): one process and a Dask cluster.

The commit protocol without flock or rename: the same values as a local store, a lease object
created by a conditional put that a second run is refused on, a killed client's lease taken
over by the rerun, which resumes, and a worker of a run whose lease is gone writing nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cache import StoreWriter, open_activations, remove_store, verify
from cache.catalog import read_manifest
from cache.lease import writer_lease, writers_path
from cache.paths import as_path, store_path
from pipeline.cli import main
from pipeline.extract import ExtractConfig, extract
from pipeline.run import RunHooks
from pipeline.stop import StopFlag
from schemas import Interrupted, StoreInUseError
from schemas.store import hidden_name
from tests import chaos

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SHARDS = {"data": "sample", "limit": 4, "shard_tokens": 256, "batch_size": 8}  # ~1.1k tokens, 5 shards


def _config(model: Path, cache: str | Path, **options: Any) -> ExtractConfig:
    return ExtractConfig(model=str(model), cache_dir=str(cache), **{"quiet": True, **SHARDS, **options})


def _one_thread(
    model: Path, cache: str | Path, *, stop: StopFlag | None = None, hooks: Any = None, **options: Any
) -> Any:
    """A single-process run with the workers' torch thread count: a matmul's sums split the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract(_config(model, cache, **options), stop=stop, hooks=hooks)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_store(tiny_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The request's store on a local disk: what every S3 store here must equal value for value."""
    return _one_thread(tiny_dir("bert"), tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def client(s3: dict[str, str]) -> Iterator[Any]:
    """Two worker processes of one thread, started after the S3 server (they inherit its endpoint)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False, timeout=60) as c,
    ):
        c.wait_for_workers(2, timeout=60)
        yield c


def _same_as(url: Any, local: Any) -> None:
    assert chaos._lost(chaos._arrays(url), chaos._arrays(local.path)) == 0
    assert verify(str(url)).ok


def test_one_process_writes_an_s3_store_equal_to_the_local_one(
    bucket: str, tiny_dir: Any, local_store: Any, _cache_root: Path
) -> None:
    result = _one_thread(tiny_dir("bert"), f"{bucket}/cache")
    assert str(result.path).startswith(f"{bucket}/cache/stores/") and result.key == local_store.key
    assert result.manifest.complete and not result.cache_hit
    _same_as(result.path, local_store)
    assert not writers_path(result.path).exists(), "the lease object is deleted when the run ends"
    assert open_activations(result.key, cache_dir=f"{bucket}/cache").key == result.key  # by key, through the alias
    # Only stores and aliases go to the bucket; the tokenized copy stays on this machine.
    assert {p.name for p in as_path(f"{bucket}/cache").iterdir()} == {"stores", "aliases"}
    assert list((_cache_root / "remote").glob("*/tokenized/*.arrow"))
    assert _one_thread(tiny_dir("bert"), f"{bucket}/cache").cache_hit
    # A flipped chunk: verify finds it and resets its shard, and the same extract redoes exactly that one.
    spec = result.manifest.array(hidden_name("encoder"))
    chunk = result.path / spec.name / spec.shard_chunks(result.manifest.geometry.shards[2], result.manifest.geometry)[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    report = verify(str(result.path), reset=True)
    assert list(report.corrupt) == [2] and report.reset == [2]
    redone = _one_thread(tiny_dir("bert"), f"{bucket}/cache", quiet=False)
    assert not redone.cache_hit and redone.summary["tokens_computed"] == result.manifest.geometry.shards[2].n_tokens
    _same_as(redone.path, local_store)


def test_two_workers_write_an_s3_store_equal_to_the_single_process_one(
    client: Any, bucket: str, tiny_dir: Any, local_store: Any
) -> None:
    spread = extract(_config(tiny_dir("bert"), f"{bucket}/cache"), client=client)
    assert spread.key == local_store.key and spread.manifest.complete
    _same_as(spread.path, local_store)
    markers = [json.loads(m.read_bytes()) for m in (spread.path / "shards").iterdir()]
    assert len({m["writer"] for m in markers}) == 2, "both workers wrote shards"
    assert as_path(f"{bucket}/cache/tokenized").is_dir(), "the workers read the tokenized data from the bucket"


class _StopAfterFirstShard(RunHooks):
    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def shard_done(self) -> None:
        self.flag.request(signal.SIGINT)


def test_a_run_is_refused_while_another_holds_the_lease_and_resumes_after(
    bucket: str, tiny_dir: Any, local_store: Any
) -> None:
    cache = f"{bucket}/cache"
    flag = StopFlag()
    with pytest.raises(Interrupted):  # a first run commits one shard, then stops (one thread, as the local store)
        _one_thread(tiny_dir("bert"), cache, stop=flag, hooks=_StopAfterFirstShard(flag))
    store = store_path(as_path(cache), local_store.key)
    with writer_lease(store) as held:  # another live run (this process) writes the store
        assert held is not None and json.loads(writers_path(store).read_bytes())["run"] == held.run
        with pytest.raises(StoreInUseError) as refused:
            extract(_config(tiny_dir("bert"), cache))
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(refused.value)
        assert str(writers_path(store)) in str(refused.value), "the lease object is named, to delete if dead"
        with pytest.raises(StoreInUseError):
            remove_store(str(store), as_path(cache))
        with pytest.raises(StoreInUseError, match="no longer leased to this run"):
            StoreWriter.open(store, run="an-earlier-run")  # a worker of another run writes nothing
        assert read_manifest(store).complete is False
    resumed = _one_thread(tiny_dir("bert"), cache, quiet=False)
    assert resumed.manifest.complete
    _same_as(resumed.path, local_store)
    assert remove_store(local_store.key, as_path(cache)) == store  # no run holds it now
    assert not store.exists() and not writers_path(store).exists()
    [alias] = (as_path(cache) / "aliases").iterdir()
    assert local_store.key not in json.loads(alias.read_bytes())["keys"]


def test_a_lease_of_another_host_is_refused_naming_it(
    bucket: str, tiny_dir: Any, local_store: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = f"{bucket}/cache"
    store = store_path(as_path(cache), local_store.key)
    holder = "pid 4242 on gpu-node-17 since 2026-12-01T10:00:00+00:00"
    writers_path(store).write_bytes(json.dumps({"run": "elsewhere", "holder": holder}).encode())
    status = main(["extract", "--model", str(tiny_dir("bert")), "--cache-dir", cache, "--data", "sample",
                   "--limit", "4", "--shard-tokens", "256", "--batch-size", "8"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert holder in err and str(writers_path(store)) in err and "delete that lease object" in err, err
    writers_path(store).unlink()  # that run is known to be dead: the fix the message names
    assert _one_thread(tiny_dir("bert"), cache).manifest.complete


@pytest.mark.parametrize("where", ["s3", "disk"])
def test_a_killed_client_is_resumed_by_the_same_command(
    s3: dict[str, str], bucket: str, tiny_dir: Any, local_store: Any, tmp_path: Path, where: str
) -> None:
    """SIGKILL the client of a `--workers 2` run after its second shard: the same command resumes and finishes.

    On S3 the dead client's lease object stays behind and the rerun takes it over (its holder
    is a dead process of this host); on a disk the kernel dropped its flock.
    """
    cache = f"{bucket}/cache" if where == "s3" else str(tmp_path / "cache")
    args = [sys.executable, "-m", "pipeline", "extract", "--model", str(tiny_dir("bert")), "--cache-dir", cache,
            "--data", "sample", "--limit", "4", "--shard-tokens", "256", "--batch-size", "8",
            "--workers", "2"]  # fmt: skip
    env = {**os.environ, **s3, "PYTHONPATH": str(REPO), "ACTCACHE_DIR": str(tmp_path / "local")}
    killed = subprocess.Popen(
        args, env={**env, "ACTCACHE_CRASH_AT": "client-shard-done:2"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = killed.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)  # its worker processes, orphaned by the kill
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    store = store_path(as_path(cache), local_store.key)
    assert not read_manifest(store).complete
    if where == "s3":
        assert writers_path(store).exists(), "a killed run cannot delete its lease"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stdout, done.stdout
    _same_as(store, local_store)
    assert where == "disk" or not writers_path(store).exists()


def test_a_creation_that_stopped_before_its_manifest_is_made_again(
    bucket: str, tiny_dir: Any, local_store: Any
) -> None:
    """No rename on S3: a store is written in place, manifest last; objects without one are a stopped creation."""
    cache = f"{bucket}/cache"
    store = store_path(as_path(cache), local_store.key)
    (store / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (store / "hidden_encoder" / "c" / "0" / "0" / "0").write_bytes(b"left by a creation that was killed")
    result = _one_thread(tiny_dir("bert"), cache)
    assert result.manifest.complete
    _same_as(result.path, local_store)
