"""Batch reduction: `ModelOutputs` of a padded batch -> the ragged, storable arrays of its examples.

Everything here runs on the model's device, so only the values that are kept cross to
the host: the real (non-pad) tokens of the stored layers, pooled vectors, top-k logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from schemas import ModelOutputs
from schemas.store import (
    LOGITS_ENTROPY,
    LOGITS_FULL,
    LOGITS_TARGET_LOGPROB,
    LOGITS_TOPK_IDS,
    LOGITS_TOPK_VALUES,
    hidden_name,
    pooled_name,
)

__all__ = ["POOLING_BY_STACK", "STACKS_BY_ARCH", "BatchResult", "Reducer", "storage_array"]

# Mean over every real position, special tokens included (as sentence-transformers pools),
# plus the position that summarises a sequence in each kind of stack.
POOLING_BY_STACK = {"encoder": ("mean", "first"), "decoder": ("mean", "last")}
# The stacks stored per family; mT5's decoder lines up with its input tokens ("shifted" policy).
STACKS_BY_ARCH = {"encoder_only": ("encoder",), "decoder_only": ("decoder",), "seq2seq": ("encoder", "decoder")}
_LOGIT_CHUNK = 256  # tokens per log-softmax slice: bounds memory for 250k vocabularies


def storage_array(values: torch.Tensor, store_dtype: str) -> np.ndarray:
    """A tensor as the numpy array the store keeps: float16, bfloat16 bits (uint16) or float32."""
    if store_dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return values.to(getattr(torch, store_dtype)).cpu().numpy()


@dataclass
class BatchResult:
    """One batch reduced: token arrays (examples back to back, batch order) and example arrays."""

    lengths: list[int]
    token_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # split axis = len(leading)
    example_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    nonfinite: dict[str, list[int]] = field(default_factory=dict)  # per stack, per stored layer


@dataclass(frozen=True)
class Reducer:
    """How a runner's outputs become stored arrays: which layers, stacks, logits, dtype."""

    layers: tuple[int, ...]
    stacks: tuple[str, ...]
    store_dtype: str
    topk: int | None
    logits: str  # 'none' | 'topk:K' | 'full'
    target: str  # 'observed' (MLM, seq2seq) or 'next' (causal)
    token_level: bool = True

    def __call__(self, out: ModelOutputs, special_mask: torch.Tensor) -> BatchResult:
        """Reduce one batch; `special_mask` (B, S) marks special tokens, as the tokenizer said."""
        mask = out.attention_mask.bool()
        lengths = mask.sum(1)
        result = BatchResult(lengths=[int(n) for n in lengths.tolist()])
        ids = out.input_ids[mask]
        result.token_arrays["token_ids"] = ids.to(torch.int32).cpu().numpy()
        result.token_arrays["special_mask"] = special_mask.to(mask.device)[mask].to(torch.uint8).cpu().numpy()
        for stack in self.stacks:
            states = torch.stack([out.stacks()[stack][i] for i in self.layers])  # (L, B, S, H)
            real = states[:, mask]  # (L, T, H): each example's tokens in order, examples back to back
            stored = storage_array(real, self.store_dtype) if self.token_level else None
            if stored is not None:
                result.token_arrays[hidden_name(stack)] = stored
            finite = torch.isfinite(real.to(torch.float16 if self.store_dtype == "float16" else real.dtype))
            result.nonfinite[stack] = (~finite).flatten(1).sum(1).tolist()
            for how in POOLING_BY_STACK[stack]:
                result.example_arrays[pooled_name(stack, how)] = storage_array(
                    _pool(states, mask, lengths, how), self.store_dtype
                )
        if self.logits != "none" and out.logits is not None:
            result.token_arrays |= self._logits(out, mask)
        return result

    def _logits(self, out: ModelOutputs, mask: torch.Tensor) -> dict[str, np.ndarray]:
        assert out.logits is not None
        logits = out.logits[mask]  # (T, V)
        ids = out.input_ids
        if self.target == "next":
            # Position t predicts token t + 1; the last real position has no next token (-1).
            nxt = torch.full_like(ids, -1)
            nxt[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -1)
            targets = nxt[mask]
        else:
            targets = ids[mask]
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in (LOGITS_TARGET_LOGPROB, LOGITS_ENTROPY)}
        if self.topk:
            chunks |= {LOGITS_TOPK_VALUES: [], LOGITS_TOPK_IDS: []}
        if self.logits == "full":
            chunks[LOGITS_FULL] = []
        for start in range(0, logits.shape[0], _LOGIT_CHUNK):
            part = logits[start : start + _LOGIT_CHUNK].float()
            logp = torch.log_softmax(part, dim=-1)
            tgt = targets[start : start + _LOGIT_CHUNK]
            picked = logp.gather(1, tgt.clamp(min=0).unsqueeze(1)).squeeze(1)
            chunks[LOGITS_TARGET_LOGPROB].append(torch.where(tgt >= 0, picked, math.nan).cpu().numpy())
            chunks[LOGITS_ENTROPY].append((-(logp.exp() * logp).sum(-1)).cpu().numpy())
            if self.topk:
                top = torch.topk(part, k=min(self.topk, part.shape[-1]), dim=-1)
                chunks[LOGITS_TOPK_VALUES].append(top.values.cpu().numpy())
                chunks[LOGITS_TOPK_IDS].append(top.indices.to(torch.int32).cpu().numpy())
            if self.logits == "full":
                chunks[LOGITS_FULL].append(storage_array(logits[start : start + _LOGIT_CHUNK], self.store_dtype))
        return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in chunks.items()}


def _pool(states: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """(L, B, S, H) -> (L, B, H); pooled in float32. Zero-token examples pool to zeros."""
    states = states.float()
    if how == "mean":
        weights = mask.to(states.dtype)[None, :, :, None]
        return (states * weights).sum(2) / lengths.clamp(min=1).to(states.dtype)[None, :, None]
    index = torch.zeros_like(lengths) if how == "first" else (lengths - 1).clamp(min=0)
    picked = states[:, torch.arange(states.shape[1], device=states.device), index]
    return picked * (lengths > 0).to(states.dtype)[None, :, None]
