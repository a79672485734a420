"""`DecoderModelRunner`: causal language models (Llama 3), optionally loaded in 8 or 4 bits."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pipeline.models.base import BaseModelRunner
from schemas import CheckpointError

__all__ = ["DecoderModelRunner"]

# bitsandbytes warns on every 8-bit matmul that fp32 inputs are cast to fp16; once is plenty.
warnings.filterwarnings("once", message=r"MatMul8bitLt: inputs will be cast")


class DecoderModelRunner(BaseModelRunner):
    """Decoder-only causal LMs; `decoder_hidden_states` holds the layer outputs.

    Llama has no pad token: the end-of-text token pads, always on the right and always
    masked, so real tokens keep positions 0..n-1 and never attend to padding. `logits`
    at position t are the prediction of token t + 1.
    """

    arch = "decoder_only"
    hidden_field = "decoder_hidden_states"
    supports_quantization = True

    def _load_tokenizer(self) -> Any:
        tokenizer = super()._load_tokenizer()
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise CheckpointError(
                    f"the tokenizer in {str(self.checkpoint.path)!r} has neither a pad nor an "
                    "end-of-sequence token to pad batches with. Fix: set tokenizer.pad_token and "
                    "save it again."
                )
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = self._from_pretrained(AutoModelForCausalLM)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model
