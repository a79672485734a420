"""Synthetic stores of known pooled vectors for the metrics tests, written through the real StoreWriter.

Every example is one token long and only pooled arrays are stored (`token_level=False`), in
float32, so `Activations.pooled` gives back exactly the arrays written here. Example chunks
are small, so the row blocks of a metrics job cross chunks and shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache import StoreWriter
from pipeline.plan import plan_geometry
from schemas.arrays import build_arrays
from schemas.request import ExtractionRequest, OutputSpec
from schemas.store import SPECIAL_MASK, TOKEN_IDS, pooled_name

EXAMPLE_CHUNK = 8
SHARD_EXAMPLES = 20  # a shard closes on the first chunk boundary at or past this many examples
STACK = "encoder"


@dataclass(frozen=True)
class StoreSpec:
    """What one synthetic store holds: pooled vectors per pooling, (stored layers, n, hidden), float32."""

    pooled: Mapping[str, np.ndarray]
    examples: Mapping[str, Sequence[Any]]
    layers: tuple[int, ...]
    n_states: int
    model: str = "org/fake-a"
    dataset_hash: str = "rows-v1"
    alias: str = "fake-a__data"


def write_store(root: Path, spec: StoreSpec) -> Path:
    """Write `spec` as a complete store under cache root `root`; return its directory."""
    first = next(iter(spec.pooled.values()))
    n_layers, n, hidden = first.shape
    assert n_layers == len(spec.layers), "one pooled slice per stored layer"
    request = ExtractionRequest(
        model={"hf_id": spec.model, "revision": "0" * 40, "dtype": "fp32"},
        dataset={"name": "fake", "content_hash": spec.dataset_hash, "split": "test", "text_fields": ["text"]},
        outputs=OutputSpec(
            layers=spec.layers, logits="none", store_dtype="float32", token_level=False, pooling=tuple(spec.pooled)
        ),
    )
    arrays = build_arrays(
        stacks={STACK: hidden},
        n_layers=n_layers,
        store_dtype="float32",
        poolings={STACK: tuple(spec.pooled)},
        token_level=False,
    )
    lengths = np.ones(n, dtype=np.int64)
    geometry = plan_geometry(
        lengths.tolist(), shard_tokens=SHARD_EXAMPLES, token_chunk=EXAMPLE_CHUNK, example_chunk=EXAMPLE_CHUNK
    )
    writer = StoreWriter.open_or_create(
        root,
        request,
        geometry=geometry,
        arrays=arrays,
        layers=spec.layers,
        n_states=spec.n_states,
        stacks=(STACK,),
        examples=spec.examples,
        provenance={"batch_size": 1},
        aliases=(spec.alias,),
    )
    with writer:
        for shard in writer.geometry.shards:
            rows = slice(shard.ex_start, shard.ex_stop)
            values: dict[str, np.ndarray] = {
                TOKEN_IDS: np.zeros(shard.n_tokens, dtype=np.int32),
                SPECIAL_MASK: np.zeros(shard.n_tokens, dtype=np.int8),
                **{pooled_name(STACK, how): np.asarray(v, dtype=np.float32)[:, rows] for how, v in spec.pooled.items()},
            }
            with writer.claim(shard.index) as claimed:
                writer.write_shard(claimed, values, lengths[rows].tolist())
        assert writer.finalize().complete
    assert len(writer.geometry.shards) >= 3, "the tests want blocks that cross shards"
    return writer.path


@dataclass(frozen=True)
class Parallel:
    """A parallel corpus: `n_pairs` premise/hypothesis pairs per language, rows shuffled."""

    languages: list[str]
    ids: list[str]
    fields: list[str]
    labels: list[int]
    meaning: np.ndarray  # (n, dim): the vector every translation of a row shares

    @property
    def examples(self) -> dict[str, list[Any]]:
        return {
            "id": self.ids,
            "language": self.languages,
            "field": self.fields,
            "label": self.labels,
            "row": list(range(len(self.ids))),  # unique: no two rows share it
        }

    @property
    def keys(self) -> list[tuple[str, str]]:
        """What makes two rows translations: the same id and the same field."""
        return list(zip(self.fields, self.ids, strict=True))


def parallel(pairs: Mapping[str, int], dim: int, seed: int) -> Parallel:
    """`pairs[language]` pairs in each language (pair ids 0 .. count-1), each with a premise and a hypothesis."""
    rng = np.random.default_rng(seed)
    rows = [
        (lang, i, field) for lang, count in pairs.items() for i in range(count) for field in ("premise", "hypothesis")
    ]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    n_meanings = max(pairs.values())
    meanings = {(i, f): rng.standard_normal(dim) for i in range(n_meanings) for f in ("premise", "hypothesis")}
    return Parallel(
        languages=[lang for lang, _, _ in rows],
        ids=[f"pair-{i:03d}" for _, i, _ in rows],
        fields=[field for _, _, field in rows],
        labels=[i % 3 for _, i, _ in rows],
        meaning=np.stack([meanings[i, f] for _, i, f in rows]),
    )


def layer_vectors(data: Parallel, layers: int, seed: int, *, meaning_weight: Sequence[float]) -> np.ndarray:
    """(layers, n, dim) float32: each layer mixes the shared meaning, a per-language offset and noise."""
    rng = np.random.default_rng(seed)
    n, dim = data.meaning.shape
    names = sorted(set(data.languages))
    offsets = {lang: rng.standard_normal(dim) * 1.5 for lang in names}
    by_row = np.stack([offsets[lang] for lang in data.languages])
    out = [weight * data.meaning + by_row + rng.standard_normal((n, dim)) + 2.0 for weight in meaning_weight[:layers]]
    return np.stack(out).astype(np.float32)
