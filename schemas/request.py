"""The extraction request: everything that determines the stored values, and nothing else.

Its canonical JSON is what the cache key hashes (see `cache.keys`). Batch size, device,
shard size and worker count do not change a stored value and so are not here: they are
provenance, recorded in the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from schemas.errors import ConfigError
from schemas.store import POOLING_BY_STACK, POOLINGS

__all__ = [
    "LOGITS_MODES",
    "STORE_DTYPES",
    "ExtractionRequest",
    "OutputSpec",
    "parse_layers",
    "parse_logits_mode",
    "parse_store_dtype",
]

LOGITS_MODES = ("none", "topk:K", "full")
STORE_DTYPES = ("float16", "bfloat16", "float32")
_TOPK = re.compile(r"^topk:(-?\d+)$")


def parse_logits_mode(value: str) -> str:
    """'none', 'topk:K' (K >= 1) or 'full'."""
    text = str(value).strip().lower()
    match = _TOPK.match(text)
    if text in ("none", "full") or (match and int(match.group(1)) >= 1):
        return text
    raise ConfigError(f"invalid logits mode {value!r}; use 'none', 'topk:K' with K >= 1 (e.g. 'topk:10'), or 'full'")


def parse_store_dtype(value: str) -> str:
    """The storage dtype of activations: 'float16' (default), 'bfloat16' or 'float32'."""
    text = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(str(value).lower(), str(value).lower())
    if text not in STORE_DTYPES:
        raise ConfigError(f"invalid storage dtype {value!r}; use one of {', '.join(STORE_DTYPES)}")
    return text


def parse_layers(value: str | int | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    """'all'/None -> None (every layer); '0,6,12' or '-1' or [0, 6] -> a tuple of indices.

    Indices count into the hidden-states tuple (0 = embeddings); negative ones count from the
    last and are resolved against the model's depth by `OutputSpec.resolve_layers`.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "")):
        return None
    if isinstance(value, int):
        return (value,)
    try:
        items = [int(v) for v in value.split(",")] if isinstance(value, str) else [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(
            f"invalid layers {value!r}; use 'all', one index like '-1', or a list like '0,6,12'"
        ) from None
    if not items:
        raise ConfigError(f"invalid layers {value!r}: no index given; use 'all' or e.g. '0,6,12'")
    return tuple(items)


@dataclass(frozen=True)
class OutputSpec:
    """What is stored: hidden-state layers, pooling, logits mode and storage dtype.

    `layers` None means all; `pooling` names the pooled arrays to store, among each stack's
    own (`POOLING_BY_STACK`: the mean over every non-pad position, special tokens included,
    as sentence-transformers pools, plus the first token for encoder stacks and the last
    for decoder stacks; see `poolings`); `token_level` False keeps only the pooled arrays.
    """

    layers: str | tuple[int, ...] | None = None  # parsed to a tuple of indices or None (all)
    logits: str = "topk:10"
    store_dtype: str = "float16"
    token_level: bool = True
    pooling: tuple[str, ...] = ("mean", "first", "last")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "logits", parse_logits_mode(self.logits))
        object.__setattr__(self, "store_dtype", parse_store_dtype(self.store_dtype))
        asked = (self.pooling,) if isinstance(self.pooling, str) else tuple(self.pooling)
        unknown = [how for how in asked if how not in POOLINGS]
        if unknown:
            raise ConfigError(f"unknown pooling {unknown[0]!r}; use any of {', '.join(POOLINGS)}")
        # One spelling per choice (order and repeats do not change what is stored), so one key.
        object.__setattr__(self, "pooling", tuple(how for how in POOLINGS if how in asked))

    def poolings(self, stack: str) -> tuple[str, ...]:
        """The pooled arrays stored for `stack`: its own poolings that `pooling` asks for."""
        return tuple(how for how in POOLING_BY_STACK[stack] if how in self.pooling)

    @property
    def topk(self) -> int | None:
        """K of 'topk:K', else None."""
        return int(self.logits.split(":")[1]) if self.logits.startswith("topk:") else None

    def resolve_layers(self, n_states: int) -> tuple[int, ...]:
        """The stored indices (non-negative, sorted) for a model with `n_states` hidden states."""
        layers = parse_layers(self.layers)  # already parsed in __post_init__; this narrows the type
        if layers is None:
            return tuple(range(n_states))
        resolved: set[int] = set()
        for layer in layers:
            if not -n_states <= layer < n_states:
                raise ConfigError(
                    f"layer {layer} is out of range: the model has {n_states} hidden states "
                    f"(0 = embeddings ... {n_states - 1}; negative counts from the last, down to "
                    f"{-n_states}). Fix: --layers all, or indices in that range."
                )
            resolved.add(layer % n_states)
        return tuple(sorted(resolved))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputSpec:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class ExtractionRequest:
    """The keyed inputs of one extraction.

    `model`: hf_id, revision or content_hash, arch, dtype, quantization, tokenizer content
    hash and kwargs (and any runner option that changes values, e.g. the seq2seq
    decoder-input policy). `dataset`: name, content hash of the rows used (in order),
    split, config, text fields, limit. `outputs`: the `OutputSpec`.
    """

    model: Mapping[str, Any]
    dataset: Mapping[str, Any]
    outputs: OutputSpec = OutputSpec()

    def __post_init__(self) -> None:
        for part, required in (("model", ("hf_id",)), ("dataset", ("content_hash",))):
            value = getattr(self, part)
            missing = [name for name in required if name not in value]
            if missing:
                raise ConfigError(f"ExtractionRequest.{part} lacks {missing}; it identifies the stored values")
            object.__setattr__(self, part, MappingProxyType(dict(value)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": _plain(self.model),
            "dataset": _plain(self.dataset),
            "outputs": self.outputs.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractionRequest:
        return cls(model=data["model"], dataset=data["dataset"], outputs=OutputSpec.from_dict(data["outputs"]))


def _plain(value: Any) -> Any:
    """JSON-ready copy: mappings -> dicts, tuples -> lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
