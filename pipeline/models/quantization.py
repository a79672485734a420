"""bitsandbytes on the device in use: its config, the layers it can take there, a probe that its kernels are right.

bitsandbytes runs 4-bit layers on a CPU with AVX512-BF16 through a packed kernel
(`bitsandbytes.functional._convert_weight_packed_for_cpu`, taken on the first forward) that
needs `out_features % 32 == 0` (its `block_n`) and `in_features % 64 == 0` (one row of
4-bit blocks per absmax row); other CPUs and CUDA take any shape. A layer it cannot take
fails there with an assertion or a reshape error deep in a forward pass, so
`check_quantizable` names such layers before any weight is loaded, and `probe_quantized`
runs one layer of each shape after loading and compares it with its own dequantized
weights, so a kernel that errs, or returns wrong values, stops the load.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.models.hub import load_config
from schemas import QuantizationUnsupportedError
from schemas.model import parse_quant_bits

__all__ = [
    "PACKED_4BIT_BLOCK_IN",
    "PACKED_4BIT_BLOCK_OUT",
    "bitsandbytes_config",
    "check_quantizable",
    "packed_4bit_cpu",
    "probe_quantized",
    "unsupported_shape",
]

PACKED_4BIT_BLOCK_OUT = 32  # `block_n` of the packed CPU layout: output rows are packed 32 at a time
PACKED_4BIT_BLOCK_IN = 64  # the 4-bit blocksize: absmax is reshaped to (out, in // 64)
# The probe's tolerance: relative error of a layer against its own dequantized weights.
# Rounding in the kernels (bf16 compute, int8 activations) stays under 1%; a kernel that
# reads its weights in the wrong layout is off by ~100%.
_PROBE_MAX_ERROR = 0.05
_NO_QUANT = "load without quantization (quantization=False, --no-quantize)"
_FIX = f"Fix: {_NO_QUANT}, try the other bit width, or use a GPU."


def _bitsandbytes(bits: int) -> Any:
    """bitsandbytes, imported without its import-time advice (on AVX512-BF16 CPUs it warns that the
    optional `kernels` package, fetched from the Hub, is missing; its built-in kernel runs instead)."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizationUnsupportedError(
            f"{bits}-bit loading needs bitsandbytes, which cannot be imported here ({exc}). "
            f"Fix: pip install 'bitsandbytes>=0.45', or {_NO_QUANT}."
        ) from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


def bitsandbytes_config(bits: int, device: torch.device, compute_dtype: torch.dtype) -> Any:
    """A `BitsAndBytesConfig` for `bits` (8 or 4), after checking bitsandbytes can run on `device`."""
    parse_quant_bits(bits)
    bitsandbytes = _bitsandbytes(bits)
    supported = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if device.type not in supported:
        raise QuantizationUnsupportedError(
            f"bitsandbytes {bitsandbytes.__version__} cannot run {bits}-bit layers on "
            f"{str(device)!r}; it supports {', '.join(sorted(supported))}. Fix: load on one of "
            f"those devices, or {_NO_QUANT}."
        )
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


@functools.cache
def packed_4bit_cpu() -> bool:
    """True when bitsandbytes will run 4-bit layers on this CPU through its packed AVX512-BF16 kernel."""
    return bool(_bitsandbytes(4).functional.has_avx512bf16())


def unsupported_shape(bits: int, device: torch.device, in_features: int, out_features: int, *, packed: bool) -> str:
    """Why bitsandbytes cannot run a `bits`-bit (in_features -> out_features) layer on `device`; '' if it can.

    `packed`: whether this CPU takes the packed 4-bit path (`packed_4bit_cpu()`).
    """
    if bits != 4 or device.type != "cpu" or not packed:
        return ""
    reasons = []
    if out_features % PACKED_4BIT_BLOCK_OUT:
        reasons.append(f"out_features {out_features} is not a multiple of {PACKED_4BIT_BLOCK_OUT}")
    if in_features % PACKED_4BIT_BLOCK_IN:
        reasons.append(f"in_features {in_features} is not a multiple of {PACKED_4BIT_BLOCK_IN}")
    return " and ".join(reasons)


def _layers_to_quantize(config: Any, trust_remote_code: bool) -> Iterator[tuple[str, int, int]]:
    """(name, in_features, out_features) of every linear layer transformers would quantize, from the config alone."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    keep = get_keys_to_not_convert(model)
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and should_convert_module(name, keep):
            yield name, module.in_features, module.out_features


def check_quantizable(
    model_dir: Path, bits: int, device: torch.device, *, model_name: str, trust_remote_code: bool = False
) -> None:
    """Raise `QuantizationUnsupportedError` naming every layer of the model in `model_dir` that `bits` bits
    cannot take on `device`; its config is read only where a kernel there is picky about shapes."""
    packed = bits == 4 and device.type == "cpu" and packed_4bit_cpu()
    if not packed:
        return
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    bad = [
        f"{name} ({n_in} -> {n_out}: {why})"
        for name, n_in, n_out in _layers_to_quantize(config, trust_remote_code)
        if (why := unsupported_shape(bits, device, n_in, n_out, packed=packed))
    ]
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise QuantizationUnsupportedError(
            f"bitsandbytes cannot run {model_name!r} in {bits} bits on this CPU: its AVX512-BF16 4-bit kernel "
            f"needs layers whose in_features are a multiple of {PACKED_4BIT_BLOCK_IN} and out_features a "
            f"multiple of {PACKED_4BIT_BLOCK_OUT}; {len(bad)} layer(s) are not: {shown}. {_FIX}"
        )


def _dequantized(module: Any) -> torch.Tensor:
    """The float32 weights a bitsandbytes layer holds, read back from its own quantized state."""
    weight = module.weight
    if hasattr(weight, "quant_state"):  # Params4bit
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * (weight.SCB.float()[:, None] / 127)  # Int8Params: int8 rows, per-row scale


@torch.inference_mode()
def probe_quantized(model: torch.nn.Module, dtype: torch.dtype, bits: int, *, model_name: str) -> None:
    """Run one bitsandbytes layer of each shape on random inputs; raise if its kernel fails or computes wrong values."""
    bitsandbytes = _bitsandbytes(bits)
    kinds = (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)
    seen: set[tuple[type, int, int]] = set()
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        shape = (type(module), module.in_features, module.out_features)
        if shape in seen:
            continue
        seen.add(shape)
        weight = _dequantized(module)
        x = torch.randn(4, module.in_features, generator=generator).to(weight.device)
        expected = x @ weight.T
        if module.bias is not None:
            expected += module.bias.float()
        where = f"layer {name} ({type(module).__name__}, {module.in_features} -> {module.out_features})"
        try:
            got = module(x.to(dtype)).float()
        except (RuntimeError, AssertionError, ValueError) as exc:  # bitsandbytes asserts on shapes it cannot take
            raise QuantizationUnsupportedError(
                f"bitsandbytes cannot run {model_name!r}'s {where} on this device: {type(exc).__name__}: {exc}. {_FIX}"
            ) from exc
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
        if not error <= _PROBE_MAX_ERROR:  # NaN counts as wrong
            raise QuantizationUnsupportedError(
                f"bitsandbytes computes wrong values for {model_name!r}'s {where} on this device: relative "
                f"error {error:.3g} against its own dequantized weights (at most {_PROBE_MAX_ERROR} expected). {_FIX}"
            )
