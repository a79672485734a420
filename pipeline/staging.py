"""`HostStaging`: the host memory a batch's gathered hidden states land in, reused from batch to batch.

A batch's real tokens of the kept layers are gathered into one (L, T, H) array per stack
(`Reducer`). Fresh memory for it every batch costs its page faults (the kernel zeroes every
page before the gather writes it) and, on a GPU, a blocking copy through the driver's own
bounce buffer. Here each name keeps one buffer, grown when a batch needs more:

- states on the CPU are gathered straight into it;
- states on a CUDA device are gathered there and copied into page-locked (pinned) memory
  without blocking, so the copy runs at the bus's speed and `pipeline.run` places the previous
  batch in the shard while the device computes the next one; `wait()` is the copy's end.

A buffer is overwritten by the next batch: its arrays must be placed before the next `target`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["HostStaging", "host_array"]

_GROWTH = 1.25  # batches differ in size: room for a slightly larger one than the largest yet


class HostStaging:
    """Reused host buffers, by name, and the end of the copies into them (see the module's docstring)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, bool], torch.Tensor] = {}
        self._copied: Any = None  # a torch.cuda.Event after the last copy in flight

    def target(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty tensor of `shape` to gather `name`'s values into: the host buffer itself on the
        CPU, device memory elsewhere (`to_host` then copies it)."""
        if device.type == "cpu":
            return self._buffer(name, shape, dtype, pinned=False)
        return torch.empty(shape, dtype=dtype, device=device)

    def to_host(self, name: str, values: torch.Tensor) -> np.ndarray:
        """`values` (a tensor from `target`) as a numpy array of host memory, valid once `wait()` returns:
        from a CUDA device the copy is only started here."""
        if values.device.type == "cpu":
            return host_array(values)
        cuda = values.device.type == "cuda"
        host = self._buffer(name, tuple(values.shape), values.dtype, pinned=cuda)
        host.copy_(values, non_blocking=cuda)
        if cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(values.device))
        return host_array(host)

    def wait(self) -> None:
        """Return once every copy `to_host` started has landed."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
        size = int(np.prod(shape))
        flat = self._buffers.get((name, pinned))  # keyed by pinning: `is_pinned()` may start CUDA on a CPU run
        if flat is None or flat.numel() < size or flat.dtype != dtype:
            flat = torch.empty(int(size * _GROWTH), dtype=dtype, pin_memory=pinned)
            self._buffers[(name, pinned)] = flat
        return flat[:size].view(shape)


def host_array(values: torch.Tensor) -> np.ndarray:
    """A host tensor as the numpy array the store keeps, sharing its memory (bfloat16 as its uint16 bits)."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()
