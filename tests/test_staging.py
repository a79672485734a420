"""Host memory reused from batch to batch and shard to shard: `HostStaging` (a batch's gathered states,
one buffer per name; CPU side, CUDA in bench.gpu) and `BufferPool` (a shard's buffers)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipeline.buffers import BufferPool
from pipeline.staging import HostStaging, _capacity
from pipeline.tuning import _resident
from schemas.arrays import build_arrays
from schemas.geometry import ShardRange
from schemas.store import hidden_name

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


def _resident_bytes() -> int:
    resident = _resident()
    assert resident is not None, "the test reads resident memory from /proc (Linux)"
    return resident


def test_the_second_shards_buffers_are_faulted_in_on_a_thread_beside_the_first_shard() -> None:
    arrays = build_arrays(stacks={"encoder": 512}, n_layers=8, store_dtype="float16", poolings={"encoder": ("mean",)})
    shards = [ShardRange(i, 100 * i, 100 * (i + 1), 8192 * i, 8192 * (i + 1), 8192 * i) for i in range(3)]
    pool = BufferPool(arrays, shards)
    first, _ = pool.take(shards[0])
    set_bytes = sum(a.nbytes for a in first.values())  # ~67 MB, 64 of them hidden states
    before = _resident_bytes()
    pool.prefault()
    assert any(t.name == "actcache-prefault" for t in threading.enumerate())
    second, views = pool.take(shards[1])  # waits for the faults: the set is resident before any batch writes it
    assert _resident_bytes() - before >= 0.9 * set_bytes
    assert not any(t.name == "actcache-prefault" for t in threading.enumerate())
    assert all(second[name] is not first[name] for name in first)
    resident = _resident_bytes()
    for view in views.values():
        view[...] = 1  # what the shard's batches do: no page of this set is fresh any more
    assert _resident_bytes() - resident < 0.1 * set_bytes
    pool.give_back(first)
    third, _ = pool.take(shards[2])
    assert all(third[name] is first[name] for name in first)  # still two sets: no third is made


def test_closing_the_pool_waits_for_a_set_being_faulted_in() -> None:
    arrays = build_arrays(stacks={"encoder": 256}, n_layers=4, store_dtype="float32", poolings={"encoder": ()})
    shards = [ShardRange(i, 10 * i, 10 * (i + 1), 4096 * i, 4096 * (i + 1), 4096 * i) for i in range(2)]
    pool = BufferPool(arrays, shards)
    pool.take(shards[0])
    pool.prefault()
    pool.close()
    assert not any(t.name == "actcache-prefault" for t in threading.enumerate())
    second, _ = pool.take(shards[1])  # the spare was let go: a fresh set
    assert second[hidden_name("encoder")].shape == (4, 4096, 256)
