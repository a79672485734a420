"""Stage 4-5, run and write: each pending shard's examples through the model, then into the store.

Inside a shard, examples are sorted longest first and cut into batches of at most
`batch_size` where the padding saved pays for another forward call (`pipeline.batching`);
results are placed back in dataset order in the shard's buffers (`BufferPool`), each batch's
after the next one's forward call (on a GPU the host places one batch while the device
computes the next; `pipeline.staging`). A background thread (`BackgroundWriter`) writes and
commits finished shards while the model computes the next one. With a `StopFlag` (the CLI's
Ctrl-C and SIGTERM), a run stops after the batch in hand: the shard in progress is dropped
(its claim released, nothing committed) and the shards already handed to the writer are
committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from cache import StoreWriter
from cache.faults import crash_point
from pipeline.batching import batches
from pipeline.buffers import BufferPool
from pipeline.reduce import BatchResult, Reducer
from pipeline.staging import HostStaging
from pipeline.stop import RESUME_HINT, StopFlag, signal_name
from pipeline.tokenize import Tokenized
from pipeline.writer_thread import BackgroundWriter
from schemas import Interrupted
from schemas.arrays import ArraySpec
from schemas.geometry import ShardRange

__all__ = ["RunHooks", "RunStats", "ShardWork", "run_shard", "run_shards"]

_WAIT_SECONDS = 0.2


@dataclass
class RunStats:
    shards_written: int = 0
    shards_waited: list[int] = field(default_factory=list)  # held by another process when we came to them
    tokens: int = 0
    examples: int = 0
    computed_positions: int = 0  # padded batch positions the model ran over
    seconds: float = 0.0
    write_seconds: float = 0.0  # the background writer's busy time


class RunHooks:
    """Where the host may tune its process around a run; each does nothing here (see `pipeline.tuning`)."""

    def run_started(self) -> None:
        """Set-up is done and the shards are about to run."""

    def shard_done(self) -> None:
        """A shard was handed to the writer."""

    def writer_started(self) -> None:
        """Runs on the background writer's thread, first."""

    def run_ended(self) -> None:
        """The last shard is committed (or the run failed or stopped)."""


def run_shards(
    runner: Any,
    tokenized: Tokenized,
    writer: StoreWriter,
    reducer: Reducer,
    *,
    batch_size: int,
    progress: Any,
    stop: StopFlag | None = None,
    hooks: RunHooks | None = None,
) -> RunStats:
    """Compute and commit every pending shard, waiting for shards other live processes hold.

    When two processes run the same request, each takes the shards the other has not
    claimed and then waits for the other's commits, so both finish with a complete store;
    a shard whose holder dies is taken over. Once `stop` is set, the run stops after the
    batch in hand and raises `Interrupted`.
    """
    stats = RunStats()
    started = time.perf_counter()
    flag = stop or StopFlag()
    hooks = hooks or RunHooks()
    background = BackgroundWriter(writer, on_start=hooks.writer_started)
    pending = writer.pending_shards()
    pool = BufferPool(writer.manifest.arrays, pending)
    staging = HostStaging()
    writing: dict[str, np.ndarray] | None = None  # the buffers of the shard the writer has

    def wait(held: list[ShardRange]) -> None:  # the rest is held by other live processes (or our writer thread)
        pool.close()  # a spare set no shard may need (a taken-over shard gets a fresh one): not held while waiting
        stats.shards_waited.extend(s.index for s in held if s.index not in stats.shards_waited)
        background.check()
        if not background.wait_idle(_WAIT_SECONDS):  # ours: go on the moment its commit is done
            time.sleep(_WAIT_SECONDS)

    hooks.run_started()
    try:
        with flag.listen():
            for shard, claim in writer.claim_pending(wait=wait):
                try:
                    buffers, views = pool.take(shard)
                    if stats.shards_written == 0 and len(pending) > 1 and not flag.stop:
                        # The next shard's fresh memory faults in beside this shard's compute, not on its own
                        # critical path; later shards reuse the two sets.
                        pool.prefault()
                    work = run_shard(
                        runner, tokenized, writer.manifest.arrays, reducer, shard, views,
                        batch_size=batch_size, progress=progress, flag=flag, stats=stats, staging=staging,
                    )  # fmt: skip
                except BaseException:
                    claim.close()
                    raise
                if work is None:  # stopped mid-shard: drop it, keep what is committed
                    claim.close()
                    break
                background.put((claim, *work))  # waits for the previous write
                del work
                del views
                if writing is not None:
                    pool.give_back(writing)
                writing = buffers
                stats.shards_written += 1
                hooks.shard_done()
    finally:
        try:
            try:
                pool.close()
            finally:
                background.close()
        finally:
            hooks.run_ended()
            stats.seconds = time.perf_counter() - started
            stats.write_seconds = background.busy
    if flag.signum is not None:
        raise Interrupted(
            f"stopped by {signal_name(flag.signum)} after {stats.shards_written} shard(s) were committed; "
            + RESUME_HINT,
            flag.signum,
        )
    return stats


class ShardWork(NamedTuple):
    """A computed shard: exactly the arguments of `StoreWriter.write_shard`, which commits it."""

    shard: ShardRange
    arrays: dict[str, np.ndarray]
    lengths: Any  # np.ndarray of each example's token count (write_shard takes it as a Sequence[int])
    stats: dict[str, Any]


def run_shard(
    runner: Any,
    tokenized: Tokenized,
    arrays: tuple[ArraySpec, ...],
    reducer: Reducer,
    shard: ShardRange,
    buffers: dict[str, np.ndarray],
    *,
    batch_size: int,
    progress: Any,
    flag: StopFlag,
    stats: RunStats,
    staging: HostStaging,
) -> ShardWork | None:
    """Fill `buffers` with `shard`'s results in dataset order: what to write, or None if stopped.

    The one shard function: the local loop (`run_shards`) and a Dask worker's task
    (`pipeline.distributed`) both call it and hand its result to `StoreWriter.write_shard`.
    `progress` is a tqdm-like bar (`update`, `set_postfix_str`); `stats` is added to;
    `staging` is the host memory batches are gathered into, kept from shard to shard by the caller.
    Each batch is placed in `buffers` after the next one's forward call, which on a GPU returns
    before its kernels finish: the host places one batch while the device computes the next.
    """
    lengths = tokenized.lengths[shard.ex_start : shard.ex_stop]
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]  # token offset of each example in the shard
    columns = tokenized.flat(shard.ex_start, shard.ex_stop)
    groups = batches(lengths, batch_size)
    nonfinite: dict[str, list[int]] = {}
    placing: tuple[BatchResult, np.ndarray, list[tuple[int, int, int]]] | None = None  # the batch before
    for number, members in enumerate(groups, 1):
        at, sizes = starts[members], lengths[members]
        batch, special = _collate(columns, at, sizes, runner)
        out = runner.forward(batch, logits=reducer.wants_logits)
        if placing is not None:  # while a GPU computes this batch (its kernels run on after forward returns)
            _scatter(arrays, buffers, *placing)
        result: BatchResult = reducer(out, special, into=buffers, starts=at, staging=staging)
        positions = int(batch["input_ids"].numel())
        del out, batch  # every layer of this batch: not held on the device through the next forward pass
        placing = (result, members, _runs(at, sizes))
        for stack, counts in result.nonfinite.items():
            total = nonfinite.setdefault(stack, [0] * len(counts))
            nonfinite[stack] = [a + b for a, b in zip(total, counts, strict=True)]
        n_tokens = int(sum(result.lengths))
        stats.tokens += n_tokens
        stats.computed_positions += positions
        stats.examples += len(members)
        progress.set_postfix_str(f"{stats.examples} examples", refresh=False)
        progress.update(n_tokens)
        crash_point("mid-batch")
        if flag.stop and number < len(groups):  # a shard whose last batch is done is committed
            return None
    if placing is not None:
        _scatter(arrays, buffers, *placing)
    return ShardWork(shard, buffers, lengths, {"nonfinite": nonfinite})


def _collate(
    columns: dict[str, np.ndarray], starts: np.ndarray, lengths: np.ndarray, runner: Any
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded tensors for examples at `starts` (with `lengths`) of a shard's flat columns.

    Also returns their special-token mask.
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
    return {k: v.to(runner.device) for k, v in batch.items()}, padded("special_tokens_mask", 0)


def _runs(starts: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(shard position, batch position, length) of each run of tokens that is contiguous in both
    the shard and the batch's results (examples back to back, batch order): an example, or
    neighbours in the dataset that are neighbours in the batch too (equal lengths)."""
    runs: list[tuple[int, int, int]] = []
    at = 0
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        if runs and runs[-1][0] + runs[-1][2] == start:
            shard, batch, run = runs[-1]
            runs[-1] = (shard, batch, run + length)
        elif length:
            runs.append((start, at, length))
        at += length
    return runs


def _scatter(
    arrays: tuple[ArraySpec, ...],
    buffers: dict[str, np.ndarray],
    result: BatchResult,
    members: np.ndarray,
    runs: list[tuple[int, int, int]],
) -> None:
    """Put a batch's results at their places in the shard (dataset order). Token arrays move
    run by run as slices, at copy speed (a fancy-indexed scatter of XLM-R's 13 x 768 float16
    rows ran at 0.4 GB/s here). Waits for the batch's copies to the host first."""
    result.wait()
    for spec in arrays:
        axis: tuple[Any, ...] = (slice(None),) * len(spec.leading)
        if spec.name in result.token_arrays:
            source, target = result.token_arrays[spec.name], buffers[spec.name]
            for shard, batch, length in runs:
                target[(*axis, slice(shard, shard + length))] = source[(*axis, slice(batch, batch + length))]
        elif spec.name in result.example_arrays:
            buffers[spec.name][(*axis, members)] = result.example_arrays[spec.name]
