"""`HostStaging`: a batch's gathered states reuse one host buffer per name (CPU side; CUDA in bench.gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.staging import HostStaging, _capacity

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def test_batches_reuse_one_buffer_and_their_arrays_are_that_memory() -> None:
    staging = HostStaging()
    first = staging.target("h", (3, 40, 8), torch.float16, CPU)
    first.copy_(torch.arange(first.numel()).view(first.shape))
    array, copy = staging.to_host("h", first)
    assert copy is None  # nothing in flight on the CPU
    assert array.shape == (3, 40, 8) and array.dtype == np.float16
    assert array.ctypes.data == first.data_ptr()  # the gathered values, not a copy of them
    np.testing.assert_array_equal(array, np.arange(first.numel()).reshape(first.shape))

    smaller = staging.target("h", (3, 25, 8), torch.float16, CPU)
    assert smaller.data_ptr() == first.data_ptr()  # no fresh memory (and its page faults) per batch
    assert staging.target("other", (3, 25, 8), torch.float16, CPU).data_ptr() != first.data_ptr()


def test_a_larger_batch_or_another_dtype_gets_a_new_buffer() -> None:
    staging = HostStaging()
    first = staging.target("h", (2, 10, 4), torch.float16, CPU)
    within = staging.target("h", (2, 12, 4), torch.float16, CPU)  # 25% room for a slightly larger batch
    assert within.data_ptr() == first.data_ptr()
    larger = staging.target("h", (2, 40, 4), torch.float16, CPU)
    assert larger.data_ptr() != first.data_ptr() and larger.shape == (2, 40, 4)
    assert staging.target("h", (2, 10, 4), torch.float32, CPU).dtype == torch.float32
    assert staging.target("h", (2, 0, 4), torch.float32, CPU).shape == (2, 0, 4)  # a batch of empty examples


def test_a_pinned_buffer_takes_the_whole_power_of_two_block_torch_hands_out() -> None:
    assert _capacity(1000, torch.float16, pinned=True) == 1024  # 2,000 bytes: a 2,048-byte block
    assert _capacity(1024, torch.float16, pinned=True) == 1024
    assert _capacity(1025, torch.float32, pinned=True) == 2048  # 4,100 bytes: 8,192
    assert _capacity(3, torch.float32, pinned=True) == 4
    assert _capacity(1000, torch.float16, pinned=False) == 1250


def test_bfloat16_reaches_the_host_as_its_bits() -> None:
    staging = HostStaging()
    values = torch.tensor([[1.0, -2.5, 3.0e38, float("nan")]], dtype=torch.bfloat16)
    target = staging.target("h", tuple(values.shape), torch.bfloat16, CPU)
    target.copy_(values)
    array, _ = staging.to_host("h", target)
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, values.view(torch.int16).numpy().view(np.uint16))
