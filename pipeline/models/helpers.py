"""Small translations shared by the runners: user strings -> torch dtypes and devices."""

from __future__ import annotations

import re

import torch

from schemas import ConfigError
from schemas.model import DTYPE_ALIASES, parse_dtype_name

__all__ = ["coerce_device", "resolve_dtype"]

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DEVICE_FORMS = "'auto', 'cpu', 'cuda', 'cuda:N', an int N (= 'cuda:N'), 'mps', or a torch.device"
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def resolve_dtype(value: str | torch.dtype | None, default: str = "fp32") -> torch.dtype:
    """Translate 'bf16', 'float16', 'half', torch.float32, ... into a `torch.dtype`.

    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(value, torch.dtype):
        if value not in _TORCH_DTYPES.values():
            raise ConfigError(f"unsupported dtype {value!r}; accepted: {', '.join(sorted(DTYPE_ALIASES))}")
        return value
    return _TORCH_DTYPES[parse_dtype_name(default if value is None else value)]


def coerce_device(value: str | int | torch.device | None = None) -> torch.device:
    """Translate None/'auto' (the best available), 'cpu', 'cuda:1', 1, ... into a `torch.device`.

    Asking for an accelerator this machine lacks is an error, not a silent CPU fallback.
    """
    if value is None or value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise ConfigError(f"invalid device {value!r}; accepted: {_DEVICE_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"invalid device {value!r}; accepted: {_DEVICE_FORMS}")
        value = f"cuda:{value}"
    if isinstance(value, str):
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ConfigError(f"invalid device {value!r}; accepted: {_DEVICE_FORMS}")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(device)!r} asked for, but this torch ({torch.__version__}) sees no "
                "CUDA GPU. Fix: use device='cpu' (--device cpu) or 'auto'."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} GPU(s) "
                "are visible. Fix: pick an index below that, or 'auto'."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for, but MPS is not available here. Fix: use 'cpu' or 'auto'.")
    return device
