"""`Seq2SeqModelRunner`: encoder-decoder models (mT5), with a documented decoder-input policy.

An encoder-decoder needs decoder inputs even when we only want to look at its states.
Policy (``decoder_input``):

- ``"shifted"`` (default): teacher forcing on the input text itself. The decoder reads
  ``[decoder_start] + input_ids[:-1]`` under the same mask as the encoder, so decoder
  position t has seen tokens < t and its logits score token t: decoder states and logits
  line up one-to-one with the input tokens (the "observed token" of each position).
- ``"start"``: a single decoder position holding ``decoder_start_token_id``; the
  decoder states and logits describe the first token the model would generate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.models.base import BaseModelRunner
from schemas import CheckpointError, ConfigError, ModelOutputs

__all__ = ["DECODER_INPUT_POLICIES", "Seq2SeqModelRunner"]

DECODER_INPUT_POLICIES = ("shifted", "start")


class Seq2SeqModelRunner(BaseModelRunner):
    """Encoder-decoder models: both stacks' hidden states; cross-attentions in `extra` on request."""

    arch = "seq2seq"
    hidden_field = "encoder_hidden_states"

    def __init__(self, *args: Any, decoder_input: str = "shifted", **kwargs: Any) -> None:
        if decoder_input not in DECODER_INPUT_POLICIES:
            choices = ", ".join(DECODER_INPUT_POLICIES)
            raise ConfigError(f"unknown decoder_input policy {decoder_input!r}; use one of {choices}")
        self.decoder_input = decoder_input
        super().__init__(*args, **kwargs)

    def _load_model(self) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        model = self._from_pretrained(AutoModelForSeq2SeqLM)
        if model.config.decoder_start_token_id is None:
            raise CheckpointError(
                f"{str(self.checkpoint.path)!r} sets no decoder_start_token_id in config.json; "
                "the decoder cannot be fed. Fix: set it (T5/mT5 use the pad id, 0)."
            )
        return model

    def _model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = super()._model_inputs(batch)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        start = self.model.config.decoder_start_token_id
        if self.decoder_input == "start":
            inputs["decoder_input_ids"] = ids.new_full((ids.shape[0], 1), start)
            inputs["decoder_attention_mask"] = mask.new_ones((ids.shape[0], 1))
        else:
            shifted = ids.new_full(ids.shape, self.tokenizer.pad_token_id)
            shifted[:, 1:] = ids[:, :-1]
            shifted[:, 0] = start
            inputs["decoder_input_ids"] = shifted
            inputs["decoder_attention_mask"] = mask
        return inputs

    def _outputs(self, inputs: Mapping[str, torch.Tensor], out: Any) -> ModelOutputs:
        extra: dict[str, Any] = {
            "decoder_input_ids": inputs["decoder_input_ids"],
            "decoder_attention_mask": inputs["decoder_attention_mask"],
        }
        if self.output_attentions:
            extra |= {
                "encoder_attentions": out.encoder_attentions,
                "decoder_attentions": out.decoder_attentions,
                "cross_attentions": out.cross_attentions,
            }
        return ModelOutputs(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            logits=getattr(out, "logits", None),  # the body alone (BART's, forward(logits=False)) has none
            encoder_hidden_states=out.encoder_hidden_states,
            decoder_hidden_states=out.decoder_hidden_states,
            extra=extra,
        )
