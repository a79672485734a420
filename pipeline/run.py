"""Stage 4-5, run and write: each pending shard's examples through the model, then into the store.

Inside a shard, batches are formed by length (longest first) so little compute goes to
padding; results are placed back in dataset order in the shard's buffers. A bounded
background thread writes and commits finished shards while the model computes the next
one. Ctrl-C (or SIGTERM) stops after the batch in hand: the shard in progress is dropped (its claim
released, nothing committed) and the shards already handed to the writer are committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import gc
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache import StoreWriter
from cache.files import crash_point
from pipeline.reduce import BatchResult, Reducer
from pipeline.tokenize import Tokenized
from schemas import ActcacheError, StoreFullError
from schemas.store import OFFSETS, ArraySpec, ShardRange

__all__ = ["RESUME_HINT", "STOP_SIGNALS", "Interrupted", "RunStats", "run_shards", "signal_name"]

_WAIT_SECONDS = 0.2
# The writer compresses and writes while the model computes; on few cores it would take turns
# with the forward pass, so it runs niced and fills the gaps (it needs ~5% of a shard's time).
_WRITER_NICENESS = 10
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class Interrupted(ActcacheError):
    """The run was stopped by a signal (Ctrl-C, SIGTERM); committed shards are kept, rerun to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class RunStats:
    shards_written: int = 0
    shards_waited: list[int] = field(default_factory=list)  # held by another process when we came to them
    tokens: int = 0
    examples: int = 0
    computed_positions: int = 0  # padded batch positions the model ran over
    seconds: float = 0.0
    write_seconds: float = 0.0  # the background writer's busy time


# What SLURM, Kubernetes and systemd send before a kill is handled like Ctrl-C.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "rerun the same command to continue from there."


def signal_name(signum: int) -> str:
    """How a stop signal is named to the user: Ctrl-C for SIGINT, else the signal's name."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class _StopFlag:
    """The first SIGINT or SIGTERM sets the flag (stop after the batch in hand); a second acts as if we were absent."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def stop(self) -> bool:
        return self.signum is not None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.stop:
            previous = self._previous[signum]
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # None: set from C
            signal.raise_signal(signum)
            return
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._previous = {signum: signal.signal(signum, self) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)


class _BackgroundWriter:
    """A thread that writes and commits one shard while the next is computed; errors re-raised."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self.busy = 0.0
        self.thread = threading.Thread(target=self._loop, name="actcache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        with contextlib.suppress(OSError):  # Linux: niceness is per thread, so the model keeps the cores
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICENESS)
        while (item := self.queue.get()) is not None:
            claim, shard, arrays, lengths, stats = item
            del item  # no reference to the buffers outlives the write
            started = time.perf_counter()
            try:
                if self.error is None:
                    self.writer.write_shard(shard, arrays, lengths, stats)
            except BaseException as exc:  # handed to the main thread, which raises it
                self.error = exc
            finally:
                del arrays
                claim.close()
                self.busy += time.perf_counter() - started
                self.queue.task_done()

    def put(self, item: Any) -> None:
        """Hand a shard over once the previous one is written (so its buffers can be reused)."""
        self.queue.join()
        self.check()
        self.queue.put(item)

    def check(self) -> None:
        if self.error is None:
            return
        if isinstance(self.error, OSError) and self.error.errno in _NO_SPACE:
            pending = self.writer.pending_shards()
            need = self.writer.bytes_for(pending)
            raise StoreFullError(
                f"out of space writing to {str(self.writer.path.parent.parent)!r} "
                f"({self.error.strerror or self.error}): {len(pending)} shard(s) still to write need up to "
                f"{need / 2**20:.0f} MiB more. Fix: free that much space there (or pass --cache-dir on a "
                "larger disk) and rerun the same command; committed shards are kept."
            ) from self.error
        raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()


def run_shards(
    runner: Any,
    tokenized: Tokenized,
    writer: StoreWriter,
    reducer: Reducer,
    *,
    batch_size: int,
    progress: Any,
) -> RunStats:
    """Compute and commit every pending shard, waiting for shards other live processes hold.

    When two processes run the same request, each takes the shards the other has not
    claimed and then waits for the other's commits, so both finish with a complete store;
    a shard whose holder dies is taken over.
    """
    stats = RunStats()
    started = time.perf_counter()
    flag = _StopFlag()
    background = _BackgroundWriter(writer)
    pool = _BufferPool(writer.manifest.arrays, writer.pending_shards())
    writing: dict[str, np.ndarray] | None = None  # the buffers of the shard the writer has
    # The model, tokenizer, dataset and imported modules live for the whole run; without this
    # every full collection walks them all again (~4% of a MiniLM run's CPU time, by perf).
    gc.freeze()
    try:
        with flag.installed():
            for shard, claim in _claimable(writer, background, stats, progress):
                buffers, views = pool.take(shard)
                try:
                    shard_stats = _compute_shard(
                        runner,
                        tokenized,
                        writer.manifest.arrays,
                        reducer,
                        shard,
                        views,
                        batch_size,
                        progress,
                        flag,
                        stats,
                    )
                except BaseException:
                    claim.close()
                    raise
                if shard_stats is None:  # stopped mid-shard: drop it, keep what is committed
                    claim.close()
                    break
                lengths = tokenized.lengths[shard.ex_start : shard.ex_stop]
                background.put((claim, shard, views, lengths, shard_stats))  # waits for the previous write
                del views
                if writing is not None:
                    pool.give_back(writing)
                writing = buffers
                stats.shards_written += 1
                _trim_heap()
    finally:
        gc.unfreeze()
        background.close()
        stats.seconds = time.perf_counter() - started
        stats.write_seconds = background.busy
    if flag.signum is not None:
        raise Interrupted(
            f"stopped by {signal_name(flag.signum)} after {stats.shards_written} shard(s) were committed; "
            + RESUME_HINT,
            flag.signum,
        )
    return stats


def _claimable(
    writer: StoreWriter, background: _BackgroundWriter, stats: RunStats, progress: Any
) -> Iterator[tuple[ShardRange, contextlib.ExitStack]]:
    """Pending shards as this process claims them, until none is pending (others' commits included)."""
    while pending := writer.pending_shards():
        claimed_any = False
        for shard in pending:
            claim = writer.try_claim(shard)
            if claim is not None:
                claimed_any = True
                yield shard, claim
            elif shard.index not in stats.shards_waited:
                stats.shards_waited.append(shard.index)
        if not claimed_any:
            background.check()
            # The rest is held by other live processes (or our own writer thread): wait for commits.
            time.sleep(_WAIT_SECONDS)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc), once a shard.

    Batches of every length allocate and free activations of every size; glibc keeps the
    freed memory, fragmented, so without this peak RSS creeps up with the number of shards
    (+14% at 4x the data, measured) instead of staying flat. Dask's workers do the same.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _BufferPool:
    """Shard buffers, sized for the largest pending shard and reused: one set being written
    while the next shard fills another, so memory stays at two sets and no shard pays the
    page faults of fresh memory (~90 MB a shard for MiniLM's 7 layers).

    Every element a shard's views cover is overwritten by its batches (each token and each
    example is placed once), so reused memory holds nothing stale.
    """

    def __init__(self, arrays: tuple[ArraySpec, ...], shards: list[ShardRange]) -> None:
        self.arrays = [spec for spec in arrays if spec.name != OFFSETS]
        self.capacity = {
            axis: max((_logical(axis, shard) for shard in shards), default=0) for axis in ("token", "example")
        }
        self.free: list[dict[str, np.ndarray]] = []

    def take(self, shard: ShardRange) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A set of buffers, and its views sized for `shard`."""
        for axis, size in self.capacity.items():
            if _logical(axis, shard) > size:  # not planned for (pending when the run began): grow
                self.capacity[axis] = _logical(axis, shard)
                self.free.clear()
        if self.free:
            buffers = self.free.pop()
        else:
            buffers = {
                spec.name: np.empty(
                    (*spec.leading, self.capacity[_axis(spec)], *spec.trailing), dtype=spec.physical_dtype
                )
                for spec in self.arrays
            }
        views = {
            spec.name: buffers[spec.name][
                (*(slice(None) for _ in spec.leading), slice(0, _logical(_axis(spec), shard)))
            ]
            for spec in self.arrays
        }
        return buffers, views

    def give_back(self, buffers: dict[str, np.ndarray]) -> None:
        self.free.append(buffers)


def _axis(spec: ArraySpec) -> str:
    return "token" if spec.axis == "token" else "example"


def _logical(axis: str, shard: ShardRange) -> int:
    return shard.n_tokens if axis == "token" else shard.n_examples


def _compute_shard(
    runner: Any,
    tokenized: Tokenized,
    arrays: tuple[ArraySpec, ...],
    reducer: Reducer,
    shard: ShardRange,
    buffers: dict[str, np.ndarray],
    batch_size: int,
    progress: Any,
    flag: _StopFlag,
    stats: RunStats,
) -> dict[str, Any] | None:
    """Fill `buffers` with `shard`'s results in dataset order; its stats, or None if stopped."""
    lengths = tokenized.lengths[shard.ex_start : shard.ex_stop]
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]  # token offset of each example in the shard
    columns = tokenized.flat(shard.ex_start, shard.ex_stop)
    order = np.argsort(-lengths, kind="stable")  # longest first: padding stays small
    nonfinite: dict[str, list[int]] = {}
    for begin in range(0, len(order), batch_size):
        members = order[begin : begin + batch_size]
        batch, special, tokens = _collate(columns, starts[members], lengths[members], runner)
        result: BatchResult = reducer(runner.forward(batch), special)
        _scatter(arrays, buffers, result, members, tokens)
        for stack, counts in result.nonfinite.items():
            total = nonfinite.setdefault(stack, [0] * len(counts))
            nonfinite[stack] = [a + b for a, b in zip(total, counts, strict=True)]
        n_tokens = int(sum(result.lengths))
        stats.tokens += n_tokens
        stats.computed_positions += int(batch["input_ids"].numel())
        stats.examples += len(members)
        progress.set_postfix_str(f"{stats.examples} examples", refresh=False)
        progress.update(n_tokens)
        crash_point("mid-batch")
        if flag.stop:
            return None
    return {"nonfinite": nonfinite}


def _collate(
    columns: dict[str, np.ndarray], starts: np.ndarray, lengths: np.ndarray, runner: Any
) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
    """Right-padded tensors for examples at `starts` (with `lengths`) of a shard's flat columns.

    Also returns their special-token mask and the shard positions of their real tokens in
    batch order: where each token of the batch's results goes.
    """
    width = int(lengths.max(initial=0))
    real = np.arange(width)[None, :] < lengths[:, None]
    tokens = (starts[:, None] + np.arange(width)[None, :])[real]

    def padded(name: str, fill: int) -> torch.Tensor:
        out = np.full(real.shape, fill, dtype=np.int64)
        out[real] = columns[name][tokens]
        return torch.from_numpy(out)

    batch = {
        "input_ids": padded("input_ids", runner.tokenizer.pad_token_id),
        "attention_mask": torch.from_numpy(real.astype(np.int64)),
    }
    if "token_type_ids" in columns:
        batch["token_type_ids"] = padded("token_type_ids", 0)
    return {k: v.to(runner.device) for k, v in batch.items()}, padded("special_tokens_mask", 0), tokens


def _scatter(
    arrays: tuple[ArraySpec, ...],
    buffers: dict[str, np.ndarray],
    result: BatchResult,
    members: np.ndarray,
    tokens: np.ndarray,
) -> None:
    """Put a batch's results at their places in the shard (dataset order)."""
    for spec in arrays:
        axis: tuple[Any, ...] = (slice(None),) * len(spec.leading)
        if spec.name in result.token_arrays:
            buffers[spec.name][(*axis, tokens)] = result.token_arrays[spec.name]
        elif spec.name in result.example_arrays:
            buffers[spec.name][(*axis, members)] = result.example_arrays[spec.name]
