"""The model loading stack: `load_model(name | spec | directory)` -> an architecture-aware runner.

>>> from pipeline.models import load_model, list_available_models
>>> list_available_models()
['labse', 'llama3', 'mbert', 'minilm', 'minilm-l6', 'mt5', 'xlmr']
>>> runner = load_model("minilm-l6", device="cpu")                   # doctest: +SKIP
>>> outputs = runner.forward(runner.tokenize(["He deposited the check at the bank."]))
>>> outputs.encoder_hidden_states[0].shape   # embeddings at index 0   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.models.base import BaseModelRunner
from pipeline.models.decoder_only import DecoderModelRunner
from pipeline.models.encoder_only import EncoderModelRunner
from pipeline.models.helpers import coerce_device, resolve_dtype
from pipeline.models.hub import ResolvedCheckpoint, resolve_checkpoint
from pipeline.models.hub import read_config as _read_config
from pipeline.models.registry import REGISTRY, get_spec, list_available_models
from pipeline.models.seq2seq import Seq2SeqModelRunner
from schemas import CheckpointError, ModelSpec

__all__ = [
    "REGISTRY",
    "RUNNERS",
    "BaseModelRunner",
    "DecoderModelRunner",
    "EncoderModelRunner",
    "ResolvedCheckpoint",
    "Seq2SeqModelRunner",
    "coerce_device",
    "get_spec",
    "list_available_models",
    "load_model",
    "resolve_checkpoint",
    "resolve_dtype",
    "resolve_spec",
    "spec_from_directory",
]

RUNNERS: dict[str, type[BaseModelRunner]] = {
    "encoder_only": EncoderModelRunner,
    "decoder_only": DecoderModelRunner,
    "seq2seq": Seq2SeqModelRunner,
}


def load_model(
    model: str | Path | ModelSpec,
    *,
    device: str | int | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    quantization: bool | int | None = None,
    **options: Any,
) -> BaseModelRunner:
    """Load a registry key, a `ModelSpec` or a local model directory behind the right runner.

    `dtype` defaults to the spec's preferred precision; `quantization` to the spec's
    bitsandbytes setting (False turns it off, 8 or 4 picks the bits). Further `options`
    (`output_attentions`, `trust_remote_code`, `allow_pickle`, and `decoder_input` for
    seq2seq) go to the runner.
    """
    spec = resolve_spec(model)
    return RUNNERS[spec.arch](spec, device=device, dtype=dtype, revision=revision, quantization=quantization, **options)


def resolve_spec(model: str | Path | ModelSpec) -> ModelSpec:
    """A `ModelSpec` for a registry key, a spec (returned as is) or a model directory."""
    if isinstance(model, ModelSpec):
        return model
    if str(model) in REGISTRY:
        return REGISTRY[str(model)]
    if Path(model).expanduser().is_dir():
        return spec_from_directory(Path(model).expanduser())
    return get_spec(str(model))  # raises UnknownModelError listing the keys


def spec_from_directory(path: Path) -> ModelSpec:
    """Infer a spec for a `save_pretrained` directory from its config.json."""
    config = _read_config(path)
    return ModelSpec(name=path.resolve().name, hf_id=str(path.resolve()), arch=_infer_arch(config))


def _infer_arch(config: dict[str, Any]) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.get("is_encoder_decoder"):
        return "seq2seq"
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder_only"
    model_type = config.get("model_type", "")
    if architectures or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder_only"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder_only"
    raise CheckpointError(
        f"cannot tell the architecture family of model_type {model_type!r} from its config.json. "
        "Fix: pass ModelSpec(name=..., hf_id=<dir>, arch='encoder_only'|'decoder_only'|'seq2seq')."
    )
