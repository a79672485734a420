"""Batch reduction: `ModelOutputs` of a padded batch -> the ragged, storable arrays of its examples.

Everything here runs on the model's device, so only the values that are kept cross to
the host: the real (non-pad) tokens of the stored layers, pooled vectors, top-k logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.staging import HostStaging, host_array
from schemas import ModelOutputs
from schemas.store import (
    LOGITS_ENTROPY,
    LOGITS_FULL,
    LOGITS_TARGET_LOGPROB,
    LOGITS_TOPK_IDS,
    LOGITS_TOPK_VALUES,
    SPECIAL_MASK,
    TOKEN_IDS,
    hidden_name,
    pooled_name,
)

__all__ = ["BatchResult", "Reducer", "storage_array"]

_LOGIT_CHUNK = 256  # tokens per log-softmax slice: bounds memory for 250k vocabularies
# Placing hidden states straight into the shard costs a copy call (~4 us) per example and
# layer: below this many real tokens per example on average, one gather per layer is cheaper.
_DIRECT_TOKENS = 16


def _storage_tensor(values: torch.Tensor, store_dtype: str) -> torch.Tensor:
    """A tensor cast to the store's dtype (float16, bfloat16 or float32), on its device."""
    return values.to(getattr(torch, store_dtype))


def storage_array(values: torch.Tensor, store_dtype: str) -> np.ndarray:
    """A tensor as the numpy array the store keeps: float16, bfloat16 bits (uint16) or float32."""
    return host_array(_storage_tensor(values, store_dtype).cpu())


@dataclass
class BatchResult:
    """One batch reduced: token arrays (examples back to back, batch order) and example arrays."""

    lengths: list[int]
    token_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # split axis = len(leading)
    example_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    nonfinite: dict[str, list[int]] = field(default_factory=dict)  # per stack, per stored layer
    copies: list[torch.cuda.Event] = field(default_factory=list)  # of token arrays still on their way from a GPU

    def wait(self) -> None:
        """Return once every array here is on the host (a copy from a GPU runs while the host goes on)."""
        for copy in self.copies:
            copy.synchronize()
        self.copies.clear()


@dataclass(frozen=True)
class Reducer:
    """How a runner's outputs become stored arrays: which layers, stacks, poolings, logits, dtype."""

    layers: tuple[int, ...]
    stacks: tuple[str, ...]
    poolings: Mapping[str, tuple[str, ...]]  # per stack, as `OutputSpec.poolings` gives them
    store_dtype: str
    topk: int | None
    logits: str  # 'none' | 'topk:K' | 'full'
    target: str  # 'observed' (MLM, seq2seq) or 'next' (causal)
    token_level: bool = True

    @property
    def wants_logits(self) -> bool:
        """Whether any logits are stored: without, the runner may skip the language-model head."""
        return self.logits != "none"

    def __call__(
        self,
        out: ModelOutputs,
        special_mask: torch.Tensor,
        into: Mapping[str, np.ndarray] | None = None,
        starts: np.ndarray | None = None,
        *,
        staging: HostStaging,
    ) -> BatchResult:
        """Reduce one batch; `special_mask` (B, S) marks special tokens, as the tokenizer said.

        With `into` (the shard's buffers) and `starts` (each example's first token in them), on
        the CPU, hidden states are cast straight from the padded outputs into place, one copy
        per example and layer, and `token_arrays` leaves them out: one pass over the values,
        not three (gather, cast, scatter). Otherwise each stack's kept layers are gathered into
        `staging`'s buffers (reused: the next call overwrites them) and, from a GPU, copied there
        last and without blocking: call `result.wait()` before reading `token_arrays`.
        """
        mask = out.attention_mask.bool()
        lengths = mask.sum(1)
        result = BatchResult(lengths=[int(n) for n in lengths.tolist()])
        gathered: dict[str, torch.Tensor] = {}
        ids = out.input_ids[mask]
        result.token_arrays[TOKEN_IDS] = ids.to(torch.int32).cpu().numpy()
        result.token_arrays[SPECIAL_MASK] = special_mask.to(mask.device)[mask].to(torch.int8).cpu().numpy()
        direct = (
            into is not None and starts is not None and self.token_level and mask.device.type == "cpu"
            and len(ids) >= _DIRECT_TOKENS * len(lengths)
        )  # fmt: skip
        for stack in self.stacks:
            states = out.stacks()[stack]
            if direct:
                assert into is not None and starts is not None
                target = _tensor(into[hidden_name(stack)])
                result.nonfinite[stack] = self._place(states, target, starts, result.lengths)
            else:
                gathered[hidden_name(stack)], result.nonfinite[stack] = self._gather(
                    states, mask, staging, hidden_name(stack)
                )
            # Mean pooling reads float32: each layer is cast into one reused buffer, not a fresh copy per
            # layer, whose page faults cost the CPU 5-9x the cast itself (bfloat16 states of Llama's size).
            wide = None
            if "mean" in self.poolings[stack] and states[0].dtype != torch.float32:
                wide = staging.target("mean pooling", tuple(states[0].shape), torch.float32, mask.device)
            for how in self.poolings[stack]:
                pooled = torch.stack([_pool(states[i], mask, lengths, how, wide) for i in self.layers])
                result.example_arrays[pooled_name(stack, how)] = storage_array(pooled, self.store_dtype)
        if self.wants_logits and out.logits is not None:
            result.token_arrays |= self._logits(out, mask)
        if self.token_level:  # the big copies last: everything above waits for the device, they need not
            for name, stored in gathered.items():
                result.token_arrays[name], copy = staging.to_host(name, stored)
                result.copies += [copy] if copy is not None else []
        return result

    def _gather(
        self, states: tuple[torch.Tensor, ...], mask: torch.Tensor, staging: HostStaging, name: str
    ) -> tuple[torch.Tensor, list[int]]:
        """The real tokens of the kept layers, each example's in order, examples back to back, as
        an (L, T, H) tensor of the store's dtype in `staging`'s `target`, and the non-finite count
        per layer.

        No (L, B, S, H) copy: each layer is gathered once and cast into place (no stacked copy
        at the model's dtype), its peak read on the way.
        """
        shape = (len(self.layers), int(mask.sum()), states[0].shape[-1])  # (L, T, H)
        stored = staging.target(name, shape, getattr(torch, self.store_dtype), mask.device)
        peaks = []
        for j, i in enumerate(self.layers):
            real = states[i][mask]
            peaks.append(_peak(real))
            stored[j] = real
        return stored, _nonfinite(peaks, stored.dtype, lambda j: [stored[j]])

    def _place(
        self, states: tuple[torch.Tensor, ...], target: torch.Tensor, starts: np.ndarray, lengths: list[int]
    ) -> list[int]:
        """Cast each example's real tokens of every kept layer into `target` (L, shard tokens, H) at
        `starts`; returns the non-finite count per layer (the peaks read include padding, so they
        only decide whether to count, on the stored values)."""
        places = [(row, int(start), n) for row, (start, n) in enumerate(zip(starts, lengths, strict=True)) if n]
        peaks = []
        for j, i in enumerate(self.layers):
            for row, start, n in places:
                target[j, start : start + n].copy_(states[i][row, :n])
            peaks.append(_peak(states[i]))
        return _nonfinite(peaks, target.dtype, lambda j: [target[j, s : s + n] for _, s, n in places])

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


def _tensor(buffer: np.ndarray) -> torch.Tensor:
    """A shard buffer as a tensor sharing its memory (bfloat16 bits as bfloat16)."""
    if buffer.dtype == np.uint16:
        return torch.from_numpy(buffer.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(buffer)


def _peak(values: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in `values` (NaN if any is NaN; 0 when empty), read once with no copy."""
    if not values.numel():
        return values.new_zeros(())
    low, high = torch.aminmax(values)
    return torch.maximum(-low, high)


def _nonfinite(peaks: list[torch.Tensor], dtype: torch.dtype, stored: Callable[[int], list[torch.Tensor]]) -> list[int]:
    """Per layer, how many stored values are NaN or infinite (overflow of the cast included).

    Counting on float16 is slow on CPU; a layer whose largest magnitude (`peaks`, of the
    values before the cast) is finite and fits the stored `dtype` has none. `stored(j)` is
    layer j's stored values, counted only where the peak does not fit.
    """
    fits = (torch.stack(peaks).float() <= torch.finfo(dtype).max).tolist()  # NaN compares False
    return [0 if ok else sum(int((~torch.isfinite(v)).sum()) for v in stored(j)) for j, ok in enumerate(fits)]


def _pool(
    states: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, how: str, wide: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, S, H) -> (B, H); pooled in float32. Zero-token examples pool to zeros. `wide`: a float32
    tensor of the states' shape that mean pooling casts them into (None: a fresh one, if they are not float32)."""
    if how == "mean":  # a (B, 1, S) x (B, S, H) product: no masked copy of the states
        states = states.float() if wide is None else wide.copy_(states)
        sums = torch.bmm(mask.to(states.dtype).unsqueeze(1), states).squeeze(1)
        return sums / lengths.clamp(min=1).to(states.dtype)[:, None]
    index = torch.zeros_like(lengths) if how == "first" else (lengths - 1).clamp(min=0)
    picked = states[torch.arange(states.shape[0], device=states.device), index].float()  # (B, H) cast, not (B, S, H)
    return picked * (lengths > 0).to(picked.dtype)[:, None]
