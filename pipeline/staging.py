"""`HostStaging`: the host memory a batch's gathered hidden states land in, reused from batch to batch.

A batch's real tokens of the kept layers are gathered into one (L, T, H) array per stack
(`Reducer`). Fresh memory for it every batch costs its page faults (the kernel zeroes every
page before the gather writes it) and, on a GPU, a blocking copy through the driver's own
bounce buffer. Here each name keeps one buffer, grown when a batch needs more:

- states on the CPU are gathered straight into it;
- states on a CUDA device are gathered there and copied into page-locked (pinned) memory on a
  side stream of that device, without blocking: the copy runs at the bus's speed beside the
  next batch's forward pass, and `pipeline.run` places the batch in the shard once the copy's
  event has completed, while the device computes the next one.

Mean pooling of states narrower than float32 casts each layer into one such buffer too
(`Reducer`): on the CPU, a fresh float32 copy per layer costs more in page faults than the cast.

A buffer is overwritten by the next batch: its arrays must be placed before the next `target`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torch.cuda import Event, Stream

__all__ = ["HostStaging", "host_array"]

_GROWTH = 1.25  # batches differ in size: room for a slightly larger one than the largest yet


class HostStaging:
    """Reused host buffers, by name, and a copy stream per CUDA device (see the module's docstring)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, bool], torch.Tensor] = {}
        self._streams: dict[torch.device, Stream] = {}

    def target(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty tensor of `shape` to gather `name`'s values into: the host buffer itself on the
        CPU, device memory elsewhere (`to_host` then copies it)."""
        if device.type == "cpu":
            return self._buffer(name, shape, dtype, pinned=False)
        return torch.empty(shape, dtype=dtype, device=device)

    def to_host(self, name: str, values: torch.Tensor) -> tuple[np.ndarray, Event | None]:
        """`values` (a tensor from `target`) as a numpy array of host memory, and, from a CUDA device,
        the event of its copy, which is only started here: read the array after `event.synchronize()`."""
        if values.device.type == "cpu":
            return host_array(values), None
        if values.device.type != "cuda":  # another accelerator: a plain, blocking copy
            host = self._buffer(name, tuple(values.shape), values.dtype, pinned=False)
            host.copy_(values)
            return host_array(host), None
        host = self._buffer(name, tuple(values.shape), values.dtype, pinned=True)
        side = self._stream(values.device)
        side.wait_stream(torch.cuda.current_stream(values.device))  # the gather that wrote `values` first
        with torch.cuda.stream(side):
            host.copy_(values, non_blocking=True)
        values.record_stream(side)  # the allocator keeps `values` until the copy is done, though freed before
        copied = torch.cuda.Event()
        copied.record(side)
        return host_array(host), copied

    def _stream(self, device: torch.device) -> Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
        size = int(np.prod(shape))
        flat = self._buffers.get((name, pinned))  # keyed by pinning: `is_pinned()` may start CUDA on a CPU run
        if flat is None or flat.numel() < size or flat.dtype != dtype:
            flat = torch.empty(_capacity(size, dtype, pinned=pinned), dtype=dtype, pin_memory=pinned)
            self._buffers[(name, pinned)] = flat
        return flat[:size].view(shape)


def _capacity(size: int, dtype: torch.dtype, *, pinned: bool) -> int:
    """Elements to allocate for `size`: pinned memory is handed out in powers of two of bytes and
    kept by torch's allocator once freed, so a pinned buffer takes its whole block (it grows
    at most once per doubling; what it held before is at most as much again)."""
    if not pinned:
        return int(size * _GROWTH)
    itemsize = dtype.itemsize
    return max(1, (1 << (size * itemsize - 1).bit_length()) // itemsize)


def host_array(values: torch.Tensor) -> np.ndarray:
    """A host tensor as the numpy array the store keeps, sharing its memory (bfloat16 as its uint16 bits)."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()
