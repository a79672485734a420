"""Assertions shared by tests that compare stored values with an independent forward pass."""

from __future__ import annotations

import numpy as np
import torch


def assert_float16_of(got: np.ndarray, expected: torch.Tensor) -> None:
    """`got` is `expected` (float32, from a forward of the text alone) stored as float16.

    The pipeline ran the text in a padded batch: float32 values that differ by ~1e-7 can
    round to neighbouring float16 values, so exact for almost all, never a step further.
    """
    want = expected.to(torch.float16).numpy()
    assert got.dtype == np.float16 and got.shape == want.shape
    step = np.spacing(np.abs(want)).astype(np.float32)
    assert np.all(np.abs(got.astype(np.float32) - want.astype(np.float32)) <= step)
    assert np.mean(got == want) > 0.99
