"""`DecoderModelRunner`: causal language models (Llama 3), optionally loaded in 8 or 4 bits."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from pipeline.models.base import BaseModelRunner

__all__ = ["DecoderModelRunner"]


class _OncePerMessage(logging.Filter):
    """Let each distinct message through once: bitsandbytes logs its fp16 cast on every matmul."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.msg not in self._seen
        self._seen.add(record.msg)
        return first


@contextlib.contextmanager
def _filtered(logger: logging.Logger, log_filter: logging.Filter) -> Iterator[None]:
    """`log_filter` on `logger` for the block only: the process's logging is left as it was."""
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


_BNB_LOGGER = logging.getLogger("bitsandbytes.autograd._functions")


class DecoderModelRunner(BaseModelRunner):
    """Decoder-only causal LMs; `decoder_hidden_states` holds the layer outputs.

    Llama has no pad token: the end-of-text token pads, always on the right and always
    masked, so real tokens keep positions 0..n-1 and never attend to padding. `logits`
    at position t are the prediction of token t + 1.
    """

    arch = "decoder_only"
    hidden_field = "decoder_hidden_states"

    def _forward_scope(self) -> contextlib.AbstractContextManager[Any]:
        if not hasattr(self, "_once"):
            self._once = _OncePerMessage()  # per runner: each distinct message is shown once per model
        return _filtered(_BNB_LOGGER, self._once)

    def _load_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        model = self._from_pretrained(AutoModelForCausalLM)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model
