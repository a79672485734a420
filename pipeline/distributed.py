"""Running an extraction's shards as tasks on a Dask distributed cluster (`--workers N`, `--scheduler ADDRESS`).

The client (`pipeline.extract`) resolves, tokenizes, plans and holds the store's writer lease
as in a local run; here each pending shard becomes one task. A worker loads the model once
and keeps it for every shard it runs (a per-process cache), claims the shard (on a disk the
same flock as a local run, freed by the kernel when a worker dies), computes it with
`pipeline.run.run_shard`, the local run's own shard function, writes and commits it straight
to the store and returns only its counts: activations never pass through the scheduler.

A task's exception is not retried (a model that does not load fails the same way again): it
is one `WorkerError` on the client naming the worker, and the other tasks are cancelled. A
worker that dies mid-shard (SIGKILL, out of memory) is the scheduler's to handle: it runs the
shard again elsewhere, up to `distributed.scheduler.allowed-failures` times.

The cache root may be a local or shared POSIX disk, or an object store (s3://, gs://): there
the client holds the store's lease object for the run, and a worker writes only while it
still names the run (`cache.objectlease`); the tokenized data goes up beside the stores
(`share_tokenized`) and each node fetches it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.faults import crash_point
from cache.paths import as_path, is_local, is_url, work_dir
from cache.writer import StoreWriter
from pipeline.models.hub import ResolvedCheckpoint
from pipeline.reduce import Reducer
from pipeline.run import RunHooks, RunStats, run_shard
from pipeline.stop import RESUME_HINT, StopFlag, signal_name
from schemas import ConfigError, ModelSpec, WorkerError
from schemas.geometry import ShardRange
from schemas.store import TOKENIZED_DIR

__all__ = [
    "ShardJob",
    "WorkerModel",
    "connect",
    "describe_model",
    "gpu_per_worker",
    "local_torch_threads",
    "release_worker_state",
    "run_on_cluster",
    "shard_task",
    "share_tokenized",
]

_CONNECT_SECONDS = 30  # to reach a --scheduler, and for a --workers cluster to start
_POLL_SECONDS = 0.1  # how often the client looks at a stop request while shards run
_CLAIM_WAIT_SECONDS = 0.2  # a shard another live process holds: look again after this


@dataclass(frozen=True)
class WorkerModel:
    """What a worker needs to load the model the client resolved: paths and options, never weights.

    `checkpoint` is the client's resolved directory (a shared path); `identity` the cache
    key's view of it, checked on the worker so a different file at that path is refused.
    """

    spec: dict[str, Any]  # ModelSpec.to_dict(): a spec's mapping proxy does not pickle
    checkpoint: ResolvedCheckpoint
    identity: dict[str, Any]
    memo_dir: str  # the cache root, where weight-file digests are remembered
    device: str | None
    dtype: str
    quantization: bool | int | None
    trust_remote_code: bool
    allow_pickle: bool
    gpu_per_worker: bool = False  # a --workers cluster on a CUDA machine: worker i takes cuda:i


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard task needs besides its index: a few hundred bytes on the wire."""

    model: WorkerModel
    store: str  # a path or URL
    run: str | None  # on an object store: the run that holds the store's lease (`StoreWriter.run`)
    tokenized: str  # the tokenized dataset's Arrow file under <root>/tokenized/ (a path or URL)
    reducer: Reducer
    batch_size: int
    torch_threads: int | None  # None: the worker's own thread count


def share_tokenized(local_file: str, root: Path) -> str:
    """Where workers read the tokenized data: the client's Arrow file on a disk root; for an object store
    root, a copy uploaded under `<root>/tokenized/` (content-addressed: once), which nodes fetch."""
    if is_local(root):
        return local_file
    remote = root / TOKENIZED_DIR / Path(local_file).name
    if not remote.exists():
        remote.fs.put_file(local_file, remote.path)  # type: ignore[attr-defined]  # a UPath
    return str(remote)


# -- the client side -------------------------------------------------------------------------


@contextlib.contextmanager
def connect(*, workers: int | None, scheduler: str | None, client: Any, say: Callable[..., None]) -> Iterator[Any]:
    """A `distributed.Client`: the caller's, one attached to `scheduler`, or one on a new local cluster.

    A cluster started here (`workers` processes, one task thread each, the cores split
    between them as torch threads) is closed on exit; an attached one is left running.
    """
    if client is not None:
        with _releasing(client):
            yield client
        return

    import logging

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(
            "--workers/--scheduler run on Dask's distributed scheduler, which is not installed. "
            "Fix: pip install 'actcache[distributed]'."
        ) from None

    if scheduler:
        try:
            attached = Client(scheduler, timeout=_CONNECT_SECONDS, set_as_default=False)
        except OSError as exc:
            raise ConfigError(
                f"could not reach the Dask scheduler at {scheduler!r} within {_CONNECT_SECONDS} s ({exc}). "
                "Fix: start it (dask scheduler, or your cluster's own launcher) and pass the address it prints."
            ) from None
        with attached, _releasing(attached):  # closing a client leaves its cluster running
            say(f"dask: attached to {scheduler}, dashboard {attached.dashboard_link}")
            yield attached
        return
    if workers is None or workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    with _nanny_environment():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,  # one shard at a time per worker: its cores go to torch (ShardJob.torch_threads)
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        with cluster, Client(cluster, set_as_default=False, timeout=_CONNECT_SECONDS) as local:
            say(f"dask: {workers} local worker processes, dashboard {local.dashboard_link}")
            yield local


@contextlib.contextmanager
def _nanny_environment() -> Iterator[None]:
    """The environment a local cluster's workers start in; this process's own, as it was, on exit.

    The nannies of a `LocalCluster` live in this process and write their workers' variables
    (`distributed.nanny.pre-spawn-environ`) into its `os.environ`, at start and at each worker
    restart: they are put back. Of those variables our workers go without `MALLOC_TRIM_THRESHOLD_`:
    glibc reads any such setting as "fixed thresholds", so malloc's mmap threshold stays at
    128 KiB and every activation tensor of a batch is a fresh mmap, faulted in page by page and
    unmapped again (2 M page faults, seconds of system time per `bench.distributed` run: the
    throughput of 2 workers was 0.69 of one process with it, 0.85 without).
    """
    import dask

    saved = dict(os.environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update((k, v) for k, v in saved.items() if os.environ.get(k) != v)


@contextlib.contextmanager
def _releasing(client: Any) -> Iterator[None]:
    """On exit, the workers of a cluster we did not start let go of the model and buffers they hold."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a worker gone or a client closing: nothing to release there
            client.run(release_worker_state, on_error="ignore")


def gpu_per_worker(workers: int | None, device: str | None) -> bool:
    """Whether the workers of a `--workers` cluster each take a GPU of their own (CUDA here, no device named)."""
    import torch

    return workers is not None and device in (None, "auto", "cuda") and torch.cuda.is_available()


def local_torch_threads(workers: int | None) -> int | None:
    """Torch threads per worker of a `--workers` cluster: this machine's cores split between them."""
    return max(1, (os.cpu_count() or 1) // workers) if workers else None


def describe_model(client: Any, model: WorkerModel, tokenized: str) -> dict[str, Any]:
    """Load the model and the tokenized data on every worker at once; what the first of them says of the model.

    The client never loads the model: whether the checkpoint has an LM head (and so which
    arrays the store has) is the workers' answer. Every worker is warm before the first shard
    is submitted, so no shard waits behind a load and no load competes with a shard for the
    cores. A worker that cannot load either is a `WorkerError` here, before any shard runs.
    """
    addresses = list(client.scheduler_info(n_workers=-1).get("workers", {})) or [None]
    futures = [
        client.submit(
            _warm_task,
            model,
            tokenized,
            key=f"actcache-warm-{uuid.uuid4().hex[:8]}-{i}",
            workers=[a] if a else None,
            pure=False,
        )
        for i, a in enumerate(addresses)
    ]
    try:
        facts = [dict(_result(f)) for f in futures]
    except WorkerError as exc:
        raise WorkerError(f"{exc} No shard was submitted; committed shards are kept. Fix the cause and rerun.") from exc
    finally:
        client.cancel(futures)
    return facts[0] | {
        "workers": len(futures) if addresses != [None] else 0,
        "scheduler": client.scheduler.address,
        "load_seconds": max(f["seconds"] for f in facts),
    }


def run_on_cluster(
    client: Any,
    job: ShardJob,
    pending: list[ShardRange],
    *,
    store_key: str,
    total_shards: int,
    progress: Any,
    stop: StopFlag | None = None,
    hooks: RunHooks | None = None,
) -> RunStats:
    """Submit one task per pending shard and wait for all; the counts they return, summed.

    Once `stop` is set (Ctrl-C, SIGTERM), the tasks not yet done are cancelled and
    `Interrupted` is raised: what the workers committed is kept, nothing partial is.
    `hooks` hear of the run as in a local one (`shard_done` once per shard a worker committed).
    """
    from distributed import as_completed

    hooks = hooks or RunHooks()
    hooks.run_started()
    stats = RunStats()
    started = time.perf_counter()
    flag = stop or StopFlag()
    run = uuid.uuid4().hex[:8]  # a key of an earlier run (a failed task the scheduler still holds) is never reused
    futures = [
        client.submit(shard_task, job, s.index, key=f"actcache-{store_key}-shard-{s.index}-{run}", pure=False)
        for s in pending
    ]
    done = total_shards - len(pending)
    try:
        results = as_completed(futures, loop=client.loop)
        with flag.listen():
            while not results.is_empty():
                batch = results.next_batch(block=False)
                if not batch:
                    if flag.stop:
                        break
                    time.sleep(_POLL_SECONDS)
                    continue
                for future in batch:
                    try:
                        counts = _result(future)
                    except WorkerError as exc:
                        raise WorkerError(
                            f"{exc} The other shards were cancelled; {done} of {total_shards} shards are committed "
                            "and kept. Fix the cause and rerun the same command to continue."
                        ) from exc
                    done += 1
                    hooks.shard_done()
                    crash_point("client-shard-done")
                    stats.shards_written += 0 if counts["skipped"] else 1
                    for name in ("tokens", "examples", "computed_positions"):
                        setattr(stats, name, getattr(stats, name) + counts[name])
                    stats.write_seconds += counts["write_seconds"]
                    alive = client.scheduler_info(n_workers=0).get("n_workers", "?")
                    progress.set_postfix_str(f"shards {done}/{total_shards}, workers {alive}", refresh=False)
                    progress.update(counts["tokens"])
    finally:
        client.cancel(futures)  # those still running, and the scheduler's memory of the others
        stats.seconds = time.perf_counter() - started
        hooks.run_ended()
    if flag.signum is not None:
        from schemas import Interrupted

        raise Interrupted(
            f"stopped by {signal_name(flag.signum)}; the shards not yet started were cancelled (one running finishes "
            f"or is dropped whole), at least {done} of {total_shards} shards are committed; " + RESUME_HINT,
            flag.signum,
        )
    return stats


def _result(future: Any) -> Mapping[str, Any]:
    """A finished task's result; a worker's death `allowed-failures` times over is a `WorkerError` too."""
    from distributed import KilledWorker

    try:
        return dict(future.result())
    except KilledWorker as exc:
        raise WorkerError(
            f"the worker running task {future.key!r} died each time it ran it (last: {exc.last_worker.address}; "
            "killed, out of memory?). Fix: give workers more memory (or a smaller --batch-size/--shard-tokens)."
        ) from None


# -- the worker side -------------------------------------------------------------------------


class _WorkerState:
    """What a worker process keeps between tasks: one model, one tokenized dataset, one buffer pool,
    the host staging of gathered batches.

    A different model (another extract on the same cluster) replaces the one held. The lock
    runs one shard at a time per worker process, whatever its thread count: one model, one
    set of buffers, and the worker's cores for torch.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.model: tuple[WorkerModel, Any] | None = None
        self.tokenized: tuple[str, Any] | None = None
        self.pools: tuple[str, Any] | None = None
        self.staging: Any = None  # pipeline.staging.HostStaging, made by the first shard


_state = _WorkerState()


def _warm_task(model: WorkerModel, tokenized: str) -> dict[str, Any]:
    with _state.lock:
        started = time.perf_counter()
        with _as_worker_error("could not load the model"):
            runner = _runner(model)
        with _as_worker_error("could not read the tokenized data"):
            _tokenized(tokenized)
        return {
            "has_lm_head": getattr(runner, "has_lm_head", True),
            "device": str(runner.device),
            "worker": _worker_name(),
            "seconds": time.perf_counter() - started,
        }


def shard_task(job: ShardJob, index: int) -> dict[str, Any]:
    """Run shard `index` on this worker: load (or reuse) the model, claim, compute, write, commit; its counts."""
    with _state.lock, _as_worker_error(f"could not run shard {index}"):
        started = time.perf_counter()
        runner = _runner(job.model)
        tokenized = _tokenized(job.tokenized)
        with StoreWriter.open(as_path(job.store), run=job.run) as writer:
            # Held by another live process: it commits, or dies and frees it. Committed (by a first attempt
            # or another run): nothing is yielded.
            wait = lambda held: time.sleep(_CLAIM_WAIT_SECONDS)  # noqa: E731
            claimed = next(writer.claim_pending(wait=wait, only={index}), None)
            if claimed is None:
                return _counts(index, RunStats(), 0.0, started, skipped=True)
            shard, claim = claimed
            with claim:
                pool = _pool(writer)
                buffers, views = pool.take(shard)
                stats = RunStats()
                with _torch_threads(job.torch_threads):
                    work = run_shard(
                        runner, tokenized, writer.manifest.arrays, job.reducer, shard, views,
                        batch_size=job.batch_size, progress=_NoBar(), flag=StopFlag(), stats=stats,
                        staging=_staging(),
                    )  # fmt: skip
                assert work is not None  # nothing sets this flag
                write_started = time.perf_counter()
                writer.write_shard(*work)
                del work, views
                pool.give_back(buffers)
        return _counts(index, stats, time.perf_counter() - write_started, started, skipped=False)


def _counts(index: int, stats: RunStats, write_seconds: float, started: float, *, skipped: bool) -> dict[str, Any]:
    return {
        "index": index,
        "skipped": skipped,
        "tokens": stats.tokens,
        "examples": stats.examples,
        "computed_positions": stats.computed_positions,
        "write_seconds": write_seconds,
        "seconds": time.perf_counter() - started,
        "worker": _worker_name(),
    }


def release_worker_state() -> None:
    """Drop the model, data and buffers this worker holds (the client calls it on an attached cluster's workers)."""
    with _state.lock:
        _state.model = _state.tokenized = _state.pools = _state.staging = None


def _staging() -> Any:
    """This worker's host staging, reused from shard to shard (pinned on a GPU; grown once per doubling)."""
    if _state.staging is None:
        from pipeline.staging import HostStaging

        _state.staging = HostStaging()
    return _state.staging


@contextlib.contextmanager
def _as_worker_error(doing: str) -> Iterator[None]:
    """Any error of a task as one `WorkerError` naming this worker and the cause (it crosses to the client)."""
    try:
        yield
    except WorkerError:
        raise
    except Exception as exc:
        cause = " ".join(str(exc).split()) or "no message"
        raise WorkerError(f"worker {_worker_name()} {doing}: {type(exc).__name__}: {cause}") from None


def _worker_name() -> str:
    import socket

    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:  # not in a worker (called directly, as in a test)
        address = "in-process"
    return f"{address} (pid {os.getpid()} on {socket.gethostname()})"


def _runner(model: WorkerModel) -> Any:
    """The worker's runner for `model`: loaded on first use, then kept."""
    if _state.model is not None and _state.model[0] == model:
        return _state.model[1]
    _state.model = None  # let the previous model go before loading the next
    from pipeline.models import load_model
    from pipeline.models.base import prepare

    spec = ModelSpec.from_dict(model.spec)
    # Load from the client's resolved directory, not by resolving the name again on this machine.
    local = dataclasses.replace(spec, hf_id=str(model.checkpoint.path), revision=None, package=None)
    prepared = prepare(local, trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle)
    identity = model.checkpoint.identity(memo_dir=Path(model.memo_dir))
    if identity != {k: model.identity.get(k) for k in identity}:
        raise WorkerError(
            f"the checkpoint at {str(model.checkpoint.path)!r} on worker {_worker_name()} is not the one the client "
            f"resolved ({identity} here, {model.identity} there): its files changed since, or this node has "
            "another copy. Fix: give every node the same files and rerun."
        )
    device = model.device
    if model.gpu_per_worker:  # untested here (no GPU): worker i of a --workers cluster takes cuda:i
        import torch
        from distributed import get_worker

        device = f"cuda:{int(get_worker().name) % torch.cuda.device_count()}"
    runner = load_model(
        spec,
        device=device,
        dtype=model.dtype,
        quantization=model.quantization,
        trust_remote_code=model.trust_remote_code,
        allow_pickle=model.allow_pickle,
        prepared=prepared,
    )
    _state.model = (model, runner)
    return runner


def _tokenized(path: str) -> Any:
    """The tokenized dataset the client saved (memory-mapped Arrow), with its lengths; kept for the next shard."""
    if _state.tokenized is not None and _state.tokenized[0] == path:
        return _state.tokenized[1]
    from pipeline.tokenize import Tokenized

    # max_length is the client's business: a shard needs ids and lengths.
    tokenized = Tokenized.open(_local_copy(path), max_length=0)
    _state.tokenized = (path, tokenized)
    return tokenized


def _local_copy(path: str) -> Path:
    """`path` itself; for a URL under `<root>/tokenized/`, this node's copy in the root's `work_dir` (fetched once)."""
    if not is_url(path):
        return Path(path)
    remote = as_path(path)
    local = work_dir(remote.parent.parent) / TOKENIZED_DIR / remote.name
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f"{local.name}.{uuid.uuid4().hex}.partial")
        try:
            remote.fs.get_file(remote.path, str(partial))  # type: ignore[attr-defined]  # a UPath
            os.replace(partial, local)  # whole or not at all: another worker of this node may fetch it too
        finally:
            partial.unlink(missing_ok=True)
    return local


def _pool(writer: StoreWriter) -> Any:
    """This worker's buffers for `writer`'s store, reused from shard to shard (no page faults of fresh memory)."""
    if _state.pools is None or _state.pools[0] != writer.key:
        from pipeline.buffers import BufferPool

        _state.pools = (writer.key, BufferPool(writer.manifest.arrays, []))
    return _state.pools[1]


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads for one shard (the worker's cores), as they were afterwards.

    Dask starts worker processes with OMP_NUM_THREADS=1, so torch would use one core.
    """
    import torch

    if n is None:
        from distributed import get_worker

        with contextlib.suppress(ValueError):
            n = get_worker().state.nthreads
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _NoBar:
    """A progress bar that shows nothing: a worker's shard is counted on the client when it returns."""

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass
