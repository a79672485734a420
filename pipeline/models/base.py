"""`BaseModelRunner`: load a checkpoint, tokenize texts, run a forward pass -> `ModelOutputs`.

Subclasses pick the model class in `_load_model`; the family-specific bits that remain
(decoder inputs for seq2seq, the pad token for Llama) sit in small hooks.

Padding is always on the right. With absolute or rotary positions counted from the first
token, right padding leaves every real token's position and visible context unchanged, so
an example's hidden states do not depend on its batch neighbours.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.models.helpers import coerce_device, resolve_dtype
from pipeline.models.hub import ResolvedCheckpoint, check_weights, read_config, resolve_checkpoint
from pipeline.models.quantization import bitsandbytes_config, check_quantizable, probe_quantized
from schemas import CheckpointError, ConfigError, ModelOutputs, ModelSpec
from schemas.model import parse_quant_bits

__all__ = ["BaseModelRunner", "Prepared", "load_tokenizer", "max_length_for", "prepare", "quantization_bits"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_UNBOUNDED = 1_000_000  # tokenizers without a limit report ~1e30


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and per-tensor progress bars while we load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def quantization_bits(spec: ModelSpec, quantization: bool | int | None) -> int | None:
    """Bits to load `spec` in: None (full precision), 8 or 4. None for `quantization` = the spec's choice."""
    if quantization is None:
        quantization = spec.use_bitsandbytes
    if quantization is False or quantization == 0:
        return None
    bits = spec.quant_bits if quantization is True else int(quantization)
    parse_quant_bits(bits)
    if spec.arch != "decoder_only":
        raise ConfigError(
            f"bitsandbytes loading is offered for decoder-only models; {spec.name!r} is "
            f"{spec.arch}. Fix: load it without quantization (quantization=False, --no-quantize)."
        )
    return bits


def load_tokenizer(path: Path, spec: ModelSpec, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, padding on the right; decoder-only models pad with end-of-text."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"could not load a tokenizer from {str(path)!r}: {exc}. Fix: save the tokenizer next to "
            "the model (tokenizer.save_pretrained(dir))."
        ) from exc
    specials = set(tokenizer.all_special_tokens)
    if not any(token not in specials for token in tokenizer.get_vocab()):
        # transformers builds an empty tokenizer from a directory without vocabulary files:
        # every word would become the unknown token, and be cached so.
        raise CheckpointError(
            f"{str(path)!r} holds no tokenizer vocabulary (no tokenizer.json, vocab.txt, *.model or vocab.json "
            "there): every word would become the unknown token. Fix: save the tokenizer next to the model "
            "(tokenizer.save_pretrained(dir))."
        )
    tokenizer.padding_side = "right"
    if spec.arch == "decoder_only" and tokenizer.pad_token is None:
        # Llama has no pad token; padded positions are masked, so any id will do.
        if tokenizer.eos_token is None:
            raise CheckpointError(
                f"the tokenizer in {str(path)!r} has neither a pad nor an end-of-sequence token to pad "
                "batches with. Fix: set tokenizer.pad_token and save it again."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Prepared:
    """A checkpoint found and checked, its config, tokenizer and example length: decided once.

    `prepare` makes it without loading weights; `actcache extract` prepares in its resolve
    stage (the cache key needs the tokenizer) and hands it to the runner, which reuses it.
    """

    checkpoint: ResolvedCheckpoint
    config: dict[str, Any]
    safetensors: bool  # False: pickle weights, allowed by the caller
    tokenizer: Any
    max_length: int


def prepare(
    spec: ModelSpec, *, revision: str | None = None, trust_remote_code: bool = False, allow_pickle: bool = False
) -> Prepared:
    """Find `spec`'s checkpoint, check its files, read its config and tokenizer; no weight is loaded."""
    checkpoint = resolve_checkpoint(spec, revision)
    safetensors = check_weights(checkpoint.path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    config = read_config(checkpoint.path)
    tokenizer = load_tokenizer(checkpoint.path, spec, trust_remote_code=trust_remote_code)
    max_length = max_length_for(spec, tokenizer, config.get("max_position_embeddings"))
    return Prepared(checkpoint, config, safetensors, tokenizer, max_length)


def max_length_for(spec: ModelSpec, tokenizer: Any, max_positions: int | None) -> int:
    """Tokens per example: the spec's max_length, capped by the tokenizer's own limit."""
    limits = []
    if spec.tokenizer_kwargs and spec.tokenizer_kwargs.get("max_length"):
        limits.append(int(spec.tokenizer_kwargs["max_length"]))
    if 0 < (tokenizer.model_max_length or 0) < _UNBOUNDED:
        limits.append(int(tokenizer.model_max_length))
    if not limits:
        limits.append(int(max_positions or 512))
    return min(limits)


class BaseModelRunner(ABC):
    """A loaded model and its tokenizer behind one interface.

    >>> runner = load_model("minilm-l6", device="cpu")          # doctest: +SKIP
    >>> out = runner.forward(runner.tokenize(["Hello", "Hallo Welt"]))
    >>> len(out.encoder_hidden_states)                            # embeddings + 6 layers
    7
    """

    arch: ClassVar[str]
    hidden_field: ClassVar[str]  # the ModelOutputs field that receives `hidden_states`

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        quantization: bool | int | None = None,
        output_attentions: bool = False,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        prepared: Prepared | None = None,
    ) -> None:
        if spec.arch != self.arch:
            raise ConfigError(f"{type(self).__name__} runs {self.arch!r} models, not {spec.arch!r} ({spec.name!r})")
        self.spec = spec
        self.device = coerce_device(device)
        self.dtype = resolve_dtype(dtype, default=spec.dtype)
        self.quant_bits = self._quant_bits(quantization)
        self.output_attentions = output_attentions
        self.trust_remote_code = trust_remote_code
        self.prepared = prepared or prepare(
            spec, revision=revision, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        self.checkpoint = self.prepared.checkpoint
        self._safetensors = self.prepared.safetensors
        self.tokenizer = self.prepared.tokenizer
        self.max_length = self.prepared.max_length
        self.model = self._load_model()
        self.model.eval()
        self.model.config.output_hidden_states = True

    # -- loading ---------------------------------------------------------------------------

    @abstractmethod
    def _load_model(self) -> Any:
        """Load and return the model (use `_from_pretrained`)."""

    def _quant_bits(self, quantization: bool | int | None) -> int | None:
        return quantization_bits(self.spec, quantization)

    # Weights a runner never uses, which a checkpoint may lack or carry: a bare encoder's pooler,
    # the heads of a checkpoint saved for a task. Anything else missing, unexpected or mismatched
    # means weights that do not fit the config (a random layer, a wrong size): an error.
    unused_weights: ClassVar[tuple[str, ...]] = (r"(^|\.)pooler\.", r"(^|\.)(classifier|qa_outputs|score)\.")

    def _check_loading_info(self, auto_class: Any, info: dict[str, Any]) -> None:
        problems = {
            "missing (would be random)": [k for k in info.get("missing_keys", ()) if not self._unused(k)],
            "unexpected": [k for k in info.get("unexpected_keys", ()) if not self._unused(k)],
            "of the wrong size": [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())],
            "unreadable": [str(m) for m in info.get("error_msgs", ())],
        }
        found = {what: sorted(keys) for what, keys in problems.items() if keys}
        if found:
            said = "; ".join(
                f"{len(keys)} {what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for what, keys in found.items()
            )
            raise CheckpointError(
                f"the weights in {str(self.checkpoint.path)!r} do not fit its config.json as {auto_class.__name__} "
                f"({said}). Fix: point at a complete checkpoint, or correct config.json (its layer count and sizes) "
                "to match the weights."
            )

    def _unused(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.unused_weights)

    def _from_pretrained(self, auto_class: Any, *, check: bool = True, **kwargs: Any) -> Any:
        """`auto_class.from_pretrained` on the resolved directory with this runner's options.

        With `check`, any weight the model lacks, does not expect or gets at a different size
        is a `CheckpointError` (see `unused_weights`); the model is returned alone.
        Without, the caller judges: (model, loading info).
        """
        options: dict[str, Any] = {
            "dtype": self.dtype,
            "use_safetensors": self._safetensors,
            "trust_remote_code": self.trust_remote_code,
            "local_files_only": True,
            "ignore_mismatched_sizes": True,  # reported in the loading info, and refused by us with names
        }
        if self.output_attentions:
            options["attn_implementation"] = "eager"  # fused kernels return no attention maps
        if self.quant_bits:
            options["quantization_config"] = bitsandbytes_config(self.quant_bits, self.device, self.dtype)
            options["device_map"] = {"": self.device}
            check_quantizable(
                self.checkpoint.path,
                self.quant_bits,
                self.device,
                model_name=self.spec.name,
                trust_remote_code=self.trust_remote_code,
            )
        try:
            with quiet_transformers():
                model, info = auto_class.from_pretrained(
                    str(self.checkpoint.path), **options, **kwargs, output_loading_info=True
                )
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"could not load {str(self.checkpoint.path)!r} as {auto_class.__name__}: {exc}"
            ) from exc
        if check:
            self._check_loading_info(auto_class, info)
        if self.quant_bits:
            probe_quantized(model, self.dtype, self.quant_bits, model_name=self.spec.name)
        else:
            model.to(self.device)
        return model if check else (model, info)

    # -- running ---------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str], **overrides: Any) -> Any:
        """Tokenize `texts` into a right-padded batch of tensors on the runner's device.

        The spec's `tokenizer_kwargs` apply (truncation at `max_length` by default);
        `overrides` win over both.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise ConfigError("tokenize() got no texts; pass at least one string")
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise ConfigError(
                f"tokenize() needs strings; item {bad[0]} is {type(items[bad[0]]).__name__} "
                f"({items[bad[0]]!r}). Fix: convert or drop non-text values first."
            )
        kwargs = {"truncation": True} | dict(self.spec.tokenizer_kwargs or {})
        kwargs |= {"max_length": self.max_length} | overrides
        encoded = self.tokenizer(items, padding=True, return_tensors="pt", **kwargs)
        return encoded.to(self.device)

    def forward(self, batch: Mapping[str, torch.Tensor], *, logits: bool = True) -> ModelOutputs:
        """Run the model on a `tokenize` batch with every hidden state returned.

        With `logits=False` the language-model head is skipped where transformers gives the
        model a body apart from it (`base_model`: BERT, XLM-R, Llama, BART; T5 and mT5 have
        none, so they run whole): the hidden states are the same, and the head is work thrown
        away by a run that stores no logits (XLM-R base's 250k-word projection is more compute
        than its encoder; Llama 3's writes a batch x tokens x 128k tensor).
        """
        if "input_ids" not in batch:
            raise ConfigError("forward() needs a batch with 'input_ids'; build it with runner.tokenize(texts)")
        inputs = self._model_inputs(batch)
        model = self.model if logits else self.model.base_model
        with torch.inference_mode(), self._forward_scope():
            out = model(
                **inputs,
                output_hidden_states=True,
                output_attentions=self.output_attentions,
                return_dict=True,
            )
        return self._outputs(inputs, out)

    def _forward_scope(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around each forward pass; a family may scope its libraries' settings to it."""
        return contextlib.nullcontext()

    def _model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "token_type_ids" in inputs and "token_type_ids" not in self.tokenizer.model_input_names:
            del inputs["token_type_ids"]
        return inputs

    def _outputs(self, inputs: Mapping[str, torch.Tensor], out: Any) -> ModelOutputs:
        """Map the Hugging Face output object onto `ModelOutputs` (one stack: `hidden_field`)."""
        extra = {"attentions": out.attentions} if self.output_attentions else {}
        return ModelOutputs(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            logits=getattr(out, "logits", None),  # a plain encoder has no head, so no logits
            extra=extra,
            **{self.hidden_field: out.hidden_states},
        )

    def __repr__(self) -> str:
        quant = f", {self.quant_bits}-bit" if self.quant_bits else ""
        return f"{type(self).__name__}({self.spec.name!r}, {self.device}, {self.dtype}{quant})"
