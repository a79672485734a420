"""Synthetic activations for store-only tests: deterministic by seed, so other processes can
regenerate exactly the same shards (a fake runner, as the store knows nothing of models)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache import StoreWriter
from pipeline.plan import plan_geometry
from schemas.arrays import build_arrays
from schemas.geometry import Geometry, ShardRange
from schemas.request import ExtractionRequest, OutputSpec
from schemas.store import (
    LOGITS_ENTROPY,
    LOGITS_TARGET_LOGPROB,
    LOGITS_TOPK_IDS,
    LOGITS_TOPK_VALUES,
    SPECIAL_MASK,
    TOKEN_IDS,
    hidden_name,
    pooled_name,
)

N_STATES = 5  # embeddings + 4 layers
HIDDEN = 8
K = 3


@dataclass
class Synthetic:
    lengths: np.ndarray
    hidden: np.ndarray  # (N_STATES, n_tokens, HIDDEN) float32
    pooled: np.ndarray  # (N_STATES, n_examples, HIDDEN) float32
    token_ids: np.ndarray
    special: np.ndarray
    topk_values: np.ndarray
    topk_ids: np.ndarray
    logprob: np.ndarray
    entropy: np.ndarray
    examples: dict[str, list[Any]]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])


def synthetic(n_examples: int = 37, seed: int = 0) -> Synthetic:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, n_examples)
    lengths[3] = 0  # a zero-token example must round-trip too
    n = int(lengths.sum())
    return Synthetic(
        lengths=lengths,
        hidden=rng.standard_normal((N_STATES, n, HIDDEN)).astype(np.float32) * 3,
        pooled=rng.standard_normal((N_STATES, n_examples, HIDDEN)).astype(np.float32),
        token_ids=rng.integers(0, 1000, n).astype(np.int32),
        special=(rng.random(n) < 0.2).astype(np.uint8),
        topk_values=rng.standard_normal((n, K)).astype(np.float32),
        topk_ids=rng.integers(0, 1000, (n, K)).astype(np.int32),
        logprob=-rng.random(n).astype(np.float32),
        entropy=rng.random(n).astype(np.float32),
        examples={
            "id": [f"ex-{i}" for i in range(n_examples)],
            "language": [["en", "de", "ru", "zh", "ar"][i % 5] for i in range(n_examples)],
            "label": [int(i % 3) for i in range(n_examples)],
        },
    )


def request(store_dtype: str = "float16", dataset_hash: str = "rows-v1", **model: Any) -> ExtractionRequest:
    return ExtractionRequest(
        model={"hf_id": "org/fake", "revision": "0" * 40, "dtype": "fp32", **model},
        dataset={"name": "fake", "content_hash": dataset_hash, "split": "test", "text_fields": ["text"]},
        outputs=OutputSpec(layers=None, logits=f"topk:{K}", store_dtype=store_dtype),
    )


def geometry(data: Synthetic) -> Geometry:
    return plan_geometry(data.lengths.tolist(), shard_tokens=40, token_chunk=16, example_chunk=4)


def open_writer(root: Path, data: Synthetic, store_dtype: str = "float16", **model: Any) -> StoreWriter:
    arrays = build_arrays(
        stacks={"encoder": HIDDEN},
        n_layers=N_STATES,
        store_dtype=store_dtype,
        poolings={"encoder": ("mean", "first")},
        logits=f"topk:{K}",
    )
    return StoreWriter.open_or_create(
        root,
        request(store_dtype, **model),
        geometry=geometry(data),
        arrays=arrays,
        layers=tuple(range(N_STATES)),
        n_states=N_STATES,
        stacks=("encoder",),
        examples=data.examples,
        provenance={"batch_size": 8},
        aliases=("fake__data",),
    )


def shard_arrays(data: Synthetic, shard: ShardRange) -> dict[str, np.ndarray]:
    t, e = slice(shard.tok_start, shard.tok_stop), slice(shard.ex_start, shard.ex_stop)
    return {
        TOKEN_IDS: data.token_ids[t],
        SPECIAL_MASK: data.special[t],
        hidden_name("encoder"): data.hidden[:, t],
        pooled_name("encoder", "mean"): data.pooled[:, e],
        pooled_name("encoder", "first"): data.pooled[:, e] * 2,
        LOGITS_TOPK_VALUES: data.topk_values[t],
        LOGITS_TOPK_IDS: data.topk_ids[t],
        LOGITS_TARGET_LOGPROB: data.logprob[t],
        LOGITS_ENTROPY: data.entropy[t],
    }


def write_shard(writer: StoreWriter, data: Synthetic, index: int) -> None:
    with writer.claim(index) as shard:
        writer.write_shard(shard, shard_arrays(data, shard), data.lengths[shard.ex_start : shard.ex_stop])


if __name__ == "__main__":
    # python -m tests.storegen ROOT SHARD [SHARD ...]: write those shards from another process.
    root, shards = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
    data = synthetic()
    writer = open_writer(root, data)
    for index in shards:
        write_shard(writer, data, index)
    print("wrote", shards)


def complete_store(
    root: Path, store_dtype: str = "float16", order: str = "reverse", data: Synthetic | None = None
) -> tuple[StoreWriter, Synthetic]:
    """A store of `data` (default `synthetic()`) with every shard written (in reverse order by default), finalized,
    closed."""
    data = data or synthetic()
    writer = open_writer(root, data, store_dtype)
    indices = [s.index for s in writer.geometry.shards]
    for index in reversed(indices) if order == "reverse" else indices:
        write_shard(writer, data, index)
    assert writer.finalize().complete
    writer.close()  # done writing: its lease would keep rm and gc off the store
    return writer, data
