"""Stage 1, resolve: model spec + dataset spec + what to store -> a request and its cache key.

Nothing heavy happens here: the checkpoint is found (not loaded), the tokenizer and the
rows are read, so that a complete store for the key is a cache hit without loading the
model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import cache_key
from cache.paths import is_local
from pipeline.datasets import Examples, load_examples
from pipeline.models import resolve_spec
from pipeline.models.base import Prepared, prepare, quantization_bits
from pipeline.models.helpers import resolve_dtype
from pipeline.tokenize import Tokenized, tokenize_examples, tokenizer_hash
from schemas import CheckpointError, ExtractionRequest, ModelSpec, OutputSpec
from schemas.dataset import DatasetSpec
from schemas.model import parse_dtype_name
from schemas.store import DATASETS_DIR, TOKENIZED_DIR

__all__ = ["Resolved", "model_depths", "resolve"]


@dataclass(frozen=True)
class Resolved:
    """Everything the later stages need, decided once."""

    spec: ModelSpec
    prepared: Prepared  # checkpoint, config, tokenizer, max length: the runner reuses them
    tokenizer_hash: str
    examples: Examples
    request: ExtractionRequest
    key: str
    n_states: int
    hidden_size: int
    vocab_size: int
    layers: tuple[int, ...]
    quant_bits: int | None
    dtype: str

    def tokenize(self, cache_dir: Path, progress: Callable[[int], object] | None = None) -> Tokenized:
        """These examples through this tokenizer at the model's max length, cached under `cache_dir`
        (the work directory `resolve` was given) by content."""
        return tokenize_examples(
            self.examples,
            self.prepared.tokenizer,
            max_length=self.prepared.max_length,
            cache_dir=cache_dir / TOKENIZED_DIR,
            tok_hash=self.tokenizer_hash,
            progress=progress,
        )


def model_depths(config: dict[str, Any], arch: str) -> tuple[int, int, int]:
    """(hidden states per stack, hidden size, vocabulary) from a config.json."""
    layers = next((config[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if config.get(k)), None)
    hidden = next((config[k] for k in ("hidden_size", "d_model", "n_embd") if config.get(k)), None)
    if layers is None or hidden is None:
        raise CheckpointError(
            f"config.json of model_type {config.get('model_type')!r} names no layer count or hidden size; "
            "actcache cannot lay out its hidden states."
        )
    if arch == "seq2seq":
        # Both stacks are stored layer by layer under one layer index: keep their common depth.
        layers = min(int(layers), int(config.get("num_decoder_layers") or layers))
    return int(layers) + 1, int(hidden), int(config.get("vocab_size") or 0)


def resolve(
    model: str | ModelSpec,
    dataset: DatasetSpec,
    outputs: OutputSpec,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    quantization: bool | int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    cache_dir: Path | None = None,
) -> Resolved:
    """Decide everything about a request without loading the model; `cache_dir` remembers weight-file digests."""
    spec = resolve_spec(model)
    dtype_name = parse_dtype_name(dtype) if dtype is not None else spec.dtype
    resolve_dtype(dtype_name)
    bits = quantization_bits(spec, quantization)
    prepared = prepare(spec, revision=revision, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    checkpoint, max_length = prepared.checkpoint, prepared.max_length
    n_states, hidden, vocab = model_depths(prepared.config, spec.arch)
    layers = outputs.resolve_layers(n_states)
    tok_hash = tokenizer_hash(prepared.tokenizer)
    arrow_cache = cache_dir / DATASETS_DIR if cache_dir is not None and is_local(cache_dir) else None
    examples = load_examples(dataset, arrow_cache)
    model_identity = {
        **checkpoint.identity(memo_dir=cache_dir),
        "arch": spec.arch,
        "dtype": dtype_name,
        "quantization": bits,
        "tokenizer_hash": tok_hash,
        "tokenizer_kwargs": {"max_length": max_length, "truncation": True},
        "decoder_input": "shifted" if spec.arch == "seq2seq" else None,
    }
    request = ExtractionRequest(model=model_identity, dataset=examples.identity(), outputs=outputs)
    return Resolved(
        spec,
        prepared,
        tok_hash,
        examples,
        request,
        cache_key(request),
        n_states,
        hidden,
        vocab,
        layers,
        bits,
        dtype_name,
    )
