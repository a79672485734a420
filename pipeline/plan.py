"""Stage 3, plan: tokenized lengths -> shard plan and chunk geometry, fixed before any shard runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from schemas import ConfigError, OutputSpec
from schemas.store import Geometry, default_token_chunk, plan_geometry

__all__ = ["DEFAULT_MAX_FULL_LOGITS_GB", "DEFAULT_SHARD_TOKENS", "check_full_logits", "plan"]

DEFAULT_SHARD_TOKENS = 16384  # a shard's buffers for 13 layers x 768 float16: ~330 MB
DEFAULT_MAX_FULL_LOGITS_GB = 20.0


def plan(lengths: Sequence[int] | np.ndarray, *, shard_tokens: int, hidden: int, store_dtype: str) -> Geometry:
    """Shards of about `shard_tokens` tokens; chunks of one layer ~2 MB, never much above a shard."""
    itemsize = 4 if store_dtype == "float32" else 2
    token_chunk = min(default_token_chunk(hidden, itemsize), 2 ** math.ceil(math.log2(max(2, shard_tokens))))
    mean = max(1.0, float(np.mean(lengths))) if len(lengths) else 1.0
    # Shards end on multiples of the example chunk: make it about a shard's worth of examples.
    example_chunk = int(min(1024, max(4, 2 ** math.floor(math.log2(max(1.0, shard_tokens / mean))))))
    return plan_geometry(list(lengths), shard_tokens=shard_tokens, token_chunk=token_chunk, example_chunk=example_chunk)


def check_full_logits(outputs: OutputSpec, n_tokens: int, vocab: int, limit_gb: float) -> str:
    """Size of full logits, said before anything runs ('' for other modes); above `limit_gb` it is refused."""
    if outputs.logits != "full":
        return ""
    itemsize = 4 if outputs.store_dtype == "float32" else 2
    size_gb = n_tokens * vocab * itemsize / 1e9
    if size_gb > limit_gb:
        raise ConfigError(
            f"full logits would take {size_gb:.1f} GB ({n_tokens} tokens x {vocab} vocabulary x {itemsize} B), "
            f"above the {limit_gb:g} GB limit. Fix: use --logits topk:K (values, ids, target log-prob and "
            "entropy per token), or raise the limit with --max-full-logits-gb."
        )
    return f"full logits: {n_tokens} tokens x {vocab} vocabulary x {itemsize} B = {size_gb:.2f} GB before compression"
