"""`BufferPool`: a shard's buffers, two sets at most, the second faulted in beside the first shard's compute."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pipeline import buffers as buffers_module
from pipeline.buffers import BufferPool
from pipeline.tuning import _resident
from schemas.arrays import build_arrays
from schemas.geometry import ShardRange
from schemas.store import hidden_name

pytestmark = pytest.mark.unit


def _resident_bytes() -> int:
    resident = _resident()
    if resident is None:
        pytest.skip("resident memory is read from /proc (Linux)")
    return resident


def _shards(n: int, tokens: int) -> list[ShardRange]:
    return [ShardRange(i, 10 * i, 10 * (i + 1), tokens * i, tokens * (i + 1), tokens * i) for i in range(n)]


def test_the_second_shards_buffers_are_resident_before_any_batch_writes_them() -> None:
    arrays = build_arrays(stacks={"encoder": 512}, n_layers=8, store_dtype="float16", poolings={"encoder": ("mean",)})
    shards = _shards(3, 8192)
    pool = BufferPool(arrays, shards)
    first, _ = pool.take(shards[0])
    set_bytes = sum(a.nbytes for a in first.values())  # ~67 MB: fresh memory (glibc maps it apart)
    before = _resident_bytes()
    pool.prefault()
    second, views = pool.take(shards[1])  # waits for the faults
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


def test_close_cuts_the_faulting_short_and_waits_for_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    started = threading.Event()

    def held_fault_in(buffers: dict[str, Any], cancel: threading.Event) -> None:
        started.set()
        seen["cancelled"] = cancel.wait(timeout=30)  # stands for a set too large to fault in before close
        seen["ended"] = True

    monkeypatch.setattr(buffers_module, "_fault_in", held_fault_in)
    arrays = build_arrays(stacks={"encoder": 256}, n_layers=4, store_dtype="float32", poolings={"encoder": ()})
    shards = _shards(2, 4096)
    pool = BufferPool(arrays, shards)
    pool.take(shards[0])
    pool.prefault()
    assert started.wait(timeout=30)
    pool.close()
    assert seen == {"cancelled": True, "ended": True}  # told to stop, and its thread had ended when close returned
    assert not any(t.name == "actcache-prefault" for t in threading.enumerate())
    second, _ = pool.take(shards[1])  # the spare was let go: a fresh set
    assert second[hidden_name("encoder")].shape == (4, 4096, 256)


def test_a_cancelled_fault_in_stops_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers_module, "_FAULT_STEP", 1 << 20)
    arrays = build_arrays(stacks={"encoder": 512}, n_layers=8, store_dtype="float16", poolings={"encoder": ()})
    pool = BufferPool(arrays, _shards(1, 8192))
    fresh = pool._new()
    cancel = threading.Event()
    cancel.set()
    before = _resident_bytes()
    buffers_module._fault_in(fresh, cancel)
    assert _resident_bytes() - before < (1 << 20)  # not one step: ~64 MB stay unmapped
    buffers_module._fault_in(fresh, threading.Event())
    assert _resident_bytes() - before >= 0.9 * sum(a.nbytes for a in fresh.values())
