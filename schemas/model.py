"""The model contracts: what a model is (`ModelSpec`) and what a forward pass returns (`ModelOutputs`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from schemas.errors import ConfigError

if TYPE_CHECKING:  # torch stays out of the ground floor's import time
    import torch

__all__ = [
    "ARCHS",
    "DTYPE_ALIASES",
    "ModelOutputs",
    "ModelSpec",
    "parse_arch",
    "parse_dtype_name",
    "parse_quant_bits",
]

Arch = Literal["encoder_only", "decoder_only", "seq2seq"]
ARCHS: tuple[str, ...] = ("encoder_only", "decoder_only", "seq2seq")

# Canonical short dtype names and every spelling a user may type for them.
DTYPE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "fp32": "fp32", "float32": "fp32", "float": "fp32", "full": "fp32",
        "fp16": "fp16", "float16": "fp16", "half": "fp16",
        "bf16": "bf16", "bfloat16": "bf16",
    }
)  # fmt: skip


def parse_arch(value: str) -> str:
    """Return `value` if it names an architecture family, else raise `ConfigError`."""
    if value not in ARCHS:
        raise ConfigError(f"unknown architecture family {value!r}; use one of {', '.join(ARCHS)}")
    return value


def parse_dtype_name(value: str) -> str:
    """Map a user spelling ('bfloat16', 'half', ...) to its canonical short name ('bf16', ...)."""
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ConfigError(f"invalid dtype {value!r}; accepted: {', '.join(sorted(DTYPE_ALIASES))}")
    return DTYPE_ALIASES[key]


def parse_quant_bits(value: int) -> int:
    """bitsandbytes loads weights in 8 or 4 bits; anything else is an error."""
    if value not in (4, 8):
        raise ConfigError(f"invalid quantization bits {value!r}; bitsandbytes supports 8 or 4")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A model the pipeline can load, and how.

    `name` is the registry key, `hf_id` the Hugging Face repository (or a local directory),
    `arch` picks the runner, `dtype` is the preferred precision ('fp32', 'fp16', 'bf16'),
    `use_bitsandbytes` turns on quantized loading in `quant_bits` (8 or 4) bits,
    `tokenizer_kwargs` go to every tokenizer call (e.g. ``{"max_length": 512}``),
    `revision` pins a branch, tag or commit, and `package` names a Python package whose
    ``get_model_path()`` ships the weights (used before the Hub when it is installed).

    >>> ModelSpec(name="labse", hf_id="sentence-transformers/LaBSE", arch="encoder_only")
    ModelSpec(name='labse', hf_id='sentence-transformers/LaBSE', arch='encoder_only', ...)
    """

    name: str
    hf_id: str
    arch: str
    dtype: str = "fp32"
    use_bitsandbytes: bool = False
    tokenizer_kwargs: Mapping[str, Any] | None = None
    quant_bits: int = 8
    revision: str | None = None
    package: str | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.hf_id:
            raise ConfigError(f"a ModelSpec needs a name and an hf_id, got {self.name!r}, {self.hf_id!r}")
        parse_arch(self.arch)
        object.__setattr__(self, "dtype", parse_dtype_name(self.dtype))
        parse_quant_bits(self.quant_bits)
        if self.tokenizer_kwargs is not None:
            object.__setattr__(self, "tokenizer_kwargs", MappingProxyType(dict(self.tokenizer_kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `ModelSpec.from_dict` inverts it."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.tokenizer_kwargs is not None:
            data["tokenizer_kwargs"] = dict(self.tokenizer_kwargs)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from `to_dict` output; unknown fields are an error."""
        known = set(cls.__dataclass_fields__)
        extra = set(data) - known
        if extra:
            raise ConfigError(f"unknown ModelSpec field(s) {sorted(extra)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelOutputs:
    """What one forward pass returns, whatever the architecture.

    Shapes (B = batch, S = encoder/input positions, T = decoder positions, V = vocabulary):

    - `input_ids`, `attention_mask`: (B, S); 0 in the mask marks padding.
    - `logits`: (B, S, V) for encoders with a masked-LM head and for decoders; (B, T, V)
      for seq2seq (decoder positions); None for encoders without a head (LaBSE, MiniLM).
    - `encoder_hidden_states`: tuple of n_layers + 1 tensors (B, S, H), index 0 = embeddings;
      None for decoder-only models.
    - `decoder_hidden_states`: the same for the decoder stack, (B, T, H) for seq2seq and
      (B, S, H) for decoder-only models; None for encoders.
    - `extra`: the rest, e.g. ``decoder_input_ids``/``decoder_attention_mask`` (seq2seq),
      ``attentions``/``cross_attentions`` when the runner was asked for them.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def stacks(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The hidden-state stacks present, by name ('encoder', 'decoder')."""
        found = {"encoder": self.encoder_hidden_states, "decoder": self.decoder_hidden_states}
        return {name: states for name, states in found.items() if states is not None}
