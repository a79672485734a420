"""bfloat16, which numpy lacks: stored as its uint16 bit patterns, shown as float32 (exactly).

The one place the store converts: the writer turns float32 values into bits (a runner hands
bits already: torch casts on the device and the bits are viewed, not converted), the reader
turns bits back into float32. The store's `encoding` attribute tells other Zarr clients the same.
"""

from __future__ import annotations

import numpy as np

from schemas.store import BFLOAT16_NAN_BITS

__all__ = ["from_bits", "shown", "to_bits"]


def to_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even, NaN kept NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint16(BFLOAT16_NAN_BITS), rounded.astype(np.uint16))


def from_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (every bfloat16 is a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def shown(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as users see them: `dtype` is the array's logical dtype."""
    return from_bits(values) if dtype == "bfloat16" else values
