"""`EncoderModelRunner`: BERT-style encoders, with the masked-LM head when the checkpoint has one."""

from __future__ import annotations

from typing import Any

from pipeline.models.base import BaseModelRunner
from pipeline.models.hub import read_config
from schemas import CheckpointError

__all__ = ["EncoderModelRunner"]


class EncoderModelRunner(BaseModelRunner):
    """Encoder-only models (mBERT, XLM-R, LaBSE, MiniLM).

    Loads `AutoModelForMaskedLM` when the checkpoint carries the head's weights, so
    `logits` are the MLM logits; sentence encoders saved without a head (LaBSE, MiniLM)
    load as a plain `AutoModel` and give `logits=None` rather than a randomly
    initialised head. `has_lm_head` says which happened.
    """

    arch = "encoder_only"
    hidden_field = "encoder_hidden_states"
    # The masked-LM head of a checkpoint loaded as a bare encoder (when its head is incomplete).
    unused_weights = (*BaseModelRunner.unused_weights, r"^cls\.", r"^lm_head\.")

    def _load_model(self) -> Any:
        from transformers import AutoModel, AutoModelForMaskedLM

        self.has_lm_head = False
        if not _may_have_lm_head(read_config(self.checkpoint.path)):
            return self._from_pretrained(AutoModel)  # saved as a bare encoder: load it once, as that
        try:
            model, info = self._from_pretrained(AutoModelForMaskedLM, check=False)
        except CheckpointError:
            pass  # no masked-LM class for this config: a plain encoder it is
        else:
            if not info["missing_keys"]:
                self._check_loading_info(AutoModelForMaskedLM, info)
                self.has_lm_head = True
                return model
            del model  # the head would be random weights: not logits anyone wants
        return self._from_pretrained(AutoModel)


def _may_have_lm_head(config: dict[str, Any]) -> bool:
    """False when config.json says the checkpoint was saved as a bare encoder (BertModel, ...)."""
    architectures = config.get("architectures") or []
    return not architectures or any(not name.endswith("Model") for name in architectures)
