"""Stage 3, plan: tokenized lengths -> shard plan and chunk geometry, fixed before any shard runs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from schemas import ConfigError, OutputSpec
from schemas.arrays import ArraySpec, store_itemsize
from schemas.geometry import Geometry, ShardRange

__all__ = [
    "DEFAULT_MAX_FULL_LOGITS_GB",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_TOKENS",
    "check_full_logits",
    "default_token_chunk",
    "plan",
    "plan_geometry",
    "shard_tokens_for",
]

DEFAULT_SHARD_TOKENS = 16384  # a shard's buffers for 13 layers x 768 float16: ~330 MB
# ...and fewer tokens where a token stores more: a run holds two shards' buffers (one filling, one
# being written), so Llama 3 8B's 33 x 4096 bfloat16 states (270 KB a token) at 16,384 tokens would
# take 8.8 GB of host memory, and fault it all in fresh before the first shard is on the disk.
DEFAULT_SHARD_BYTES = 384 << 20
MIN_SHARD_TOKENS = 256
DEFAULT_MAX_FULL_LOGITS_GB = 20.0


def shard_tokens_for(arrays: Iterable[ArraySpec]) -> int:
    """The default tokens per shard of a store of `arrays`: as many as fill DEFAULT_SHARD_BYTES with
    the token arrays, DEFAULT_SHARD_TOKENS at most, MIN_SHARD_TOKENS at least."""
    token_bytes = sum(spec.row_bytes for spec in arrays if spec.axis == "token")
    return int(max(MIN_SHARD_TOKENS, min(DEFAULT_SHARD_TOKENS, DEFAULT_SHARD_BYTES // max(1, token_bytes))))


def plan(lengths: Sequence[int] | np.ndarray, *, shard_tokens: int, hidden: int, store_dtype: str) -> Geometry:
    """Shards of about `shard_tokens` tokens; chunks of one layer ~2 MB, never much above a shard."""
    itemsize = store_itemsize(store_dtype)
    token_chunk = min(default_token_chunk(hidden, itemsize), 2 ** math.ceil(math.log2(max(2, shard_tokens))))
    mean = max(1.0, float(np.mean(lengths))) if len(lengths) else 1.0
    # Shards end on multiples of the example chunk: make it at most a shard's worth of examples (one,
    # for examples longer than a shard), so a shard ends less than a shard's worth past shard_tokens.
    example_chunk = int(min(1024, 2 ** math.floor(math.log2(max(1.0, shard_tokens / mean)))))
    return plan_geometry(lengths, shard_tokens=shard_tokens, token_chunk=token_chunk, example_chunk=example_chunk)


def default_token_chunk(hidden: int, itemsize: int, target_bytes: int = 2 << 20) -> int:
    """Tokens per chunk so that one layer's chunk is about `target_bytes` (a power of two, 256..65536)."""
    tokens = max(1, target_bytes // max(1, hidden * itemsize))
    return int(min(65536, max(256, 2 ** round(math.log2(tokens)))))


def plan_geometry(
    lengths: Sequence[int] | np.ndarray, *, shard_tokens: int, token_chunk: int, example_chunk: int
) -> Geometry:
    """Split examples into shards of about `shard_tokens` tokens, in blocks of `example_chunk`.

    A shard closes once it holds `shard_tokens` tokens or more; it always ends on a
    multiple of `example_chunk` (or at the last example), and its tokens start on a
    multiple of `token_chunk` of the physical axis.
    """
    for name, value in (
        ("shard_tokens", shard_tokens),
        ("token_chunk", token_chunk),
        ("example_chunk", example_chunk),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive number of tokens/examples, got {value!r}")
    counts = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if (counts < 0).any():
        raise ConfigError("token lengths cannot be negative")
    shards: list[ShardRange] = []
    ex_start = tok_start = phys_start = 0
    tokens = 0
    n = len(counts)
    # Tokens per block of examples in numpy: the loop below is per block, not per example.
    blocks = np.add.reduceat(counts, np.arange(0, n, example_chunk)).tolist() if n else []
    for block_start, block_tokens in zip(range(0, n, example_chunk), blocks, strict=True):
        block_stop = min(n, block_start + example_chunk)
        tokens += block_tokens
        if tokens >= shard_tokens or block_stop == n:
            shard = ShardRange(len(shards), ex_start, block_stop, tok_start, tok_start + tokens, phys_start)
            shards.append(shard)
            ex_start, tok_start, phys_start = block_stop, shard.tok_stop, shard.phys_stop(token_chunk)
            tokens = 0
    return Geometry(n, tok_start, int(token_chunk), int(example_chunk), tuple(shards))


def check_full_logits(outputs: OutputSpec, n_tokens: int, vocab: int, limit_gb: float) -> str:
    """Size of full logits, said before anything runs ('' for other modes); above `limit_gb` it is refused."""
    if outputs.logits != "full":
        return ""
    itemsize = store_itemsize(outputs.store_dtype)
    size_gb = n_tokens * vocab * itemsize / 1e9
    if size_gb > limit_gb:
        raise ConfigError(
            f"full logits would take {size_gb:.1f} GB ({n_tokens} tokens x {vocab} vocabulary x {itemsize} B), "
            f"above the {limit_gb:g} GB limit. Fix: use --logits topk:K (values, ids, target log-prob and "
            "entropy per token), or raise the limit with --max-full-logits-gb."
        )
    return f"full logits: {n_tokens} tokens x {vocab} vocabulary x {itemsize} B = {size_gb:.2f} GB before compression"
