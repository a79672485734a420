"""The Zarr store: round trips, ragged slicing, commits, claims, crash leftovers, verify, partial reads."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch
import xxhash
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache import (
    StoreWriter,
    cache_key,
    find_store,
    gc,
    list_stores,
    open_activations,
    read_manifest,
    remove_store,
    verify,
    views,
    zattrs,
)
from cache import claims as claims_module
from cache.chunkio import ChunkFiles
from cache.claims import claim_path
from cache.integrity import marker_path
from cache.paths import alias_path, cache_root
from cache.zattrs import compressors
from schemas import (
    ConfigError,
    IncompleteStoreError,
    LayoutMismatchError,
    SchemaVersionError,
    ShardClaimedError,
    StoreCorruptError,
    StoreNotFoundError,
)
from schemas.geometry import ShardRange
from schemas.store import MANIFEST_FILE, hidden_name, pooled_name
from tests import storegen
from tests.storegen import HIDDEN, N_STATES, complete_store, open_writer, shard_arrays, synthetic, write_shard

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def expected_storage(values: np.ndarray, store_dtype: str) -> np.ndarray:
    """What a store of `store_dtype` should give back, computed by torch, not by us."""
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[store_dtype]
    stored = torch.from_numpy(values).to(torch_dtype)
    return stored.numpy() if store_dtype != "bfloat16" else stored.float().numpy()


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_per_dtype(_cache_root: Path, store_dtype: str) -> None:
    writer, data = complete_store(_cache_root, store_dtype)
    assert len(writer.geometry.shards) > 3, "the test needs several shards"
    acts = open_activations(writer.key)
    assert (acts.n_examples, acts.n_tokens) == (len(data.lengths), int(data.lengths.sum()))
    for layer in range(N_STATES):
        got = acts.hidden(layer).compute()
        np.testing.assert_array_equal(got, expected_storage(data.hidden[layer], store_dtype))
        np.testing.assert_array_equal(acts.pooled(layer).compute(), expected_storage(data.pooled[layer], store_dtype))
        np.testing.assert_array_equal(
            acts.pooled(layer, how="first").compute(), expected_storage(data.pooled[layer] * 2, store_dtype)
        )
    np.testing.assert_array_equal(acts.token_ids.compute(), data.token_ids)
    np.testing.assert_array_equal(acts.special_mask.compute(), data.special)
    np.testing.assert_array_equal(acts.offsets.compute(), data.offsets)
    topk = acts.logits_topk()
    np.testing.assert_array_equal(topk["values"].compute(), data.topk_values)
    np.testing.assert_array_equal(topk["ids"].compute(), data.topk_ids)
    np.testing.assert_array_equal(topk["target_logprob"].compute(), data.logprob)
    np.testing.assert_array_equal(topk["entropy"].compute(), data.entropy)
    assert acts.examples["id"].tolist() == data.examples["id"]
    assert acts.examples["label"].tolist() == data.examples["label"]


def test_chunk_files_are_what_zarr_itself_reads(_cache_root: Path) -> None:
    """The writer's shards are where plain zarr finds them: real rows at token_start, NaN in the gaps."""
    writer, data = complete_store(_cache_root, "float32")
    hidden = zarr.open_array(writer.path / hidden_name("encoder"), mode="r")
    token_ids = zarr.open_array(writer.path / "token_ids", mode="r")
    pooled = zarr.open_array(writer.path / pooled_name("encoder", "mean"), mode="r")
    for shard in writer.geometry.shards:
        phys = slice(shard.phys_start, shard.phys_start + shard.n_tokens)
        logical = slice(shard.tok_start, shard.tok_stop)
        np.testing.assert_array_equal(hidden[:, phys], data.hidden[:, logical])
        np.testing.assert_array_equal(token_ids[phys], data.token_ids[logical])
        tail = hidden[:, phys.stop : shard.phys_stop(writer.geometry.token_chunk)]
        assert np.isnan(tail).all(), "the unused tail of a shard's last chunk reads as NaN, never as data"
    np.testing.assert_array_equal(pooled[:], data.pooled)


def test_reads_match_across_block_sizes_and_the_zarr_fallback(
    _cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dask blocks that start and end mid-chunk and mid-shard, and arrays read through zarr."""
    writer, data = complete_store(_cache_root)
    expected = expected_storage(data.hidden, "float16")
    for block_bytes in (1, 5 * HIDDEN * 2, 64 << 20):  # one chunk, 5 tokens, everything
        monkeypatch.setattr(views, "_BLOCK_BYTES", block_bytes)
        acts = open_activations(writer.key)
        for layer in (0, 3):
            np.testing.assert_array_equal(acts.hidden(layer).compute(), expected[layer])
            np.testing.assert_array_equal(acts.hidden(layer)[7:61].compute(), expected[layer, 7:61])
        np.testing.assert_array_equal(acts.token_ids.compute(), data.token_ids)
    assert open_activations(writer.key)._files(writer.manifest.array(hidden_name("encoder"))) is not None
    eager = open_activations(writer.key).hidden(4, lazy=False)
    assert isinstance(eager, np.ndarray)
    np.testing.assert_array_equal(eager, expected[4])
    pooled = expected_storage(data.pooled, "float16")
    np.testing.assert_array_equal(open_activations(writer.key).pooled(1, lazy=False), pooled[1])
    monkeypatch.setattr(ChunkFiles, "of", classmethod(lambda cls, *a: None))  # as for a codec it does not know
    acts = open_activations(writer.key)
    np.testing.assert_array_equal(acts.hidden(2).compute(), expected[2])
    np.testing.assert_array_equal(acts.hidden(2, lazy=False), expected[2])
    np.testing.assert_array_equal(acts.pooled(1, lazy=False), pooled[1])
    np.testing.assert_array_equal(acts.offsets.compute(), data.offsets)


@pytest.mark.parametrize(
    "dtype, fill",
    [("float16", np.nan), ("float32", np.nan), ("bfloat16", 0x7FC0), ("int64", -1), ("int32", -1), ("int8", -1),
     ("uint8", 0), (None, np.nan)],
)  # fmt: skip
def test_chunk_reads_are_what_zarr_reads(tmp_path: Path, dtype: str | None, fill: Any) -> None:
    """For every codec chain and dtype the store writes (None: the checksum alone), chunkio reads what zarr reads."""
    chain = compressors(dtype or "str")  # text's chain, on numbers
    physical = {"bfloat16": "uint16", None: "float16"}.get(dtype, dtype)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((3, 40, 6)) * 50).astype(physical)  # 40 rows: the last chunk of 16 is short
    array = zarr.create_array(
        tmp_path / "a", shape=data.shape, chunks=(1, 16, 6), dtype=physical, compressors=chain, fill_value=fill
    )
    array[...] = data
    files = ChunkFiles.of(array, tmp_path / "a", 1)
    assert files is not None
    for layer in range(3):
        for start, stop in ((0, 40), (5, 37), (16, 32), (33, 40), (7, 8)):
            np.testing.assert_array_equal(files.read_rows((layer,), start, stop), array[layer, start:stop])


def test_chunk_files_only_for_the_chains_they_implement(tmp_path: Path) -> None:
    """bytes [+ Blosc] + crc32c: ChunkFiles, and it reads what zarr wrote; any other chain: None (zarr's path)."""
    values = np.arange(4 * 20, dtype="float16").reshape(4, 20) / 7  # 20 rows in chunks of 8: the last is short

    def array(name: str, compressors: Any) -> Any:
        a = zarr.create_array(tmp_path / name, shape=(4, 20), chunks=(1, 8), dtype="float16", compressors=compressors)
        a[...] = values
        return a

    assert ChunkFiles.of(array("a", None), tmp_path / "a", 1) is None  # no checksum: zarr's path
    assert ChunkFiles.of(array("b", [ZstdCodec(level=1), Crc32cCodec()]), tmp_path / "b", 1) is None
    implemented = {
        "c": [BloscCodec(cname="lz4"), Crc32cCodec()],  # the float chain
        "d": [BloscCodec(cname="zstd", clevel=1), Crc32cCodec()],  # the integer chain
        "e": [Crc32cCodec()],  # the checksum alone
    }
    for name, chain in implemented.items():
        files = ChunkFiles.of(array(name, chain), tmp_path / name, 1)
        assert files is not None, f"{name}: {chain} is a chain ChunkFiles implements"
        for row in range(4):
            np.testing.assert_array_equal(files.read_rows((row,), 0, 20), values[row], err_msg=name)
            np.testing.assert_array_equal(files.read_rows((row,), 5, 17), values[row, 5:17], err_msg=name)


def test_text_chunk_files_read_and_write_as_zarr_does(tmp_path: Path) -> None:
    """The metadata's text chain (vlen-utf8 + crc32c): ChunkFiles reads zarr's chunks as Python str and writes
    zarr's bytes; without the checksum it is zarr's path."""
    values = np.array(["", "a", "die Bank", "银行", "x" * 300, "ü"] * 4, dtype=object)  # 24 rows, chunks of 10

    def array(name: str, compressors: Any) -> Any:
        a = zarr.create_array(tmp_path / name, shape=(24,), chunks=(10,), dtype=str, compressors=compressors)
        a[...] = values
        return a

    assert ChunkFiles.of(array("bare", None), tmp_path / "bare", 0) is None
    source = array("text", compressors("str"))
    files = ChunkFiles.of(source, tmp_path / "text", 0)
    assert files is not None and files.text
    for start, stop in ((0, 24), (3, 17), (10, 20), (23, 24)):
        rows = files.read_rows((), start, stop)
        assert rows.dtype == object and rows.tolist() == values[start:stop].tolist() == source[start:stop].tolist()
    again = ChunkFiles.of(array("again", compressors("str")), tmp_path / "again", 0)
    assert again is not None
    again.write_rows(values[::-1].copy(), 0, 24)
    source[...] = values[::-1]
    for chunk in ("0", "1", "2"):
        assert (tmp_path / "again" / "c" / chunk).read_bytes() == (tmp_path / "text" / "c" / chunk).read_bytes()


def test_markers_from_before_crc32c_still_verify(_cache_root: Path) -> None:
    """Format-2 stores whose markers hold XXH3-128 hashes of whole chunk files (written before) verify."""
    writer, _ = complete_store(_cache_root)
    marker = marker_path(writer.path, 2)
    legacy = json.loads(marker.read_text())
    legacy["checksum"] = "xxh3_128"
    legacy["checksums"] = {
        array: {key: xxhash.xxh3_128_hexdigest((writer.path / array / key).read_bytes()) for key in keys}
        for array, keys in legacy["checksums"].items()
    }
    marker.write_text(json.dumps(legacy))
    assert verify(writer.key).ok
    chunk = _chunk_file(writer, 2)
    chunk.write_bytes(chunk.read_bytes()[:-3])
    assert sorted(verify(writer.key).corrupt) == [2]


def test_ragged_slices_and_negative_layers(_cache_root: Path) -> None:
    writer, data = complete_store(_cache_root, "float32")
    acts = open_activations(writer.key)
    offsets = data.offsets
    for i in (0, 3, 17, len(data.lengths) - 1, -1):
        ex = acts.example(i)
        j = i % len(data.lengths)
        span = slice(offsets[j], offsets[j + 1])
        assert ex.hidden["encoder"].shape == (N_STATES, data.lengths[j], HIDDEN)
        np.testing.assert_array_equal(ex.hidden["encoder"], data.hidden[:, span])
        np.testing.assert_array_equal(ex.token_ids, data.token_ids[span])
        assert ex.metadata["id"] == f"ex-{j}"
    assert acts.example(3).token_ids.size == 0
    np.testing.assert_array_equal(acts.hidden(-1).compute(), acts.hidden(N_STATES - 1).compute())
    with pytest.raises(ConfigError, match="out of range"):
        acts.hidden(N_STATES)
    with pytest.raises(ConfigError, match="no 'decoder' stack"):
        acts.hidden(0, stack="decoder")
    with pytest.raises(ConfigError, match=r"no 'last' pooling .* \['first', 'mean'\]"):
        acts.pooled(0, how="last")
    with pytest.raises(IndexError):
        acts.example(len(data.lengths))


def test_reader_is_lazy(_cache_root: Path) -> None:
    writer, data = complete_store(_cache_root)
    # Make one chunk of layer 2 fail its checksum: opening and building graphs must not touch it,
    # computing must.
    spec = writer.manifest.array(hidden_name("encoder"))
    key = next(k for k in spec.shard_chunks(writer.geometry.shards[1], writer.geometry) if k.startswith("c/2/"))
    chunk = writer.path / spec.name / key
    chunk.write_bytes(b"not a chunk of this array")
    acts = open_activations(writer.key)
    lazy = acts.hidden(2)
    assert isinstance(lazy, da.Array) and isinstance(acts.pooled(1), da.Array)
    assert lazy.shape == (acts.n_tokens, HIDDEN)
    np.testing.assert_array_equal(acts.hidden(1).compute(), expected_storage(data.hidden[1], "float16"))
    with pytest.raises(StoreCorruptError, match="fails its CRC32C checksum.*actcache verify"):
        lazy.compute()


def test_layers_subset_and_error_names_stored_layers(_cache_root: Path) -> None:
    from pipeline.plan import plan_geometry
    from schemas.arrays import build_arrays

    data = synthetic()
    geometry = plan_geometry(data.lengths.tolist(), shard_tokens=1000, token_chunk=64, example_chunk=64)
    arrays = build_arrays(
        stacks={"encoder": HIDDEN}, n_layers=2, store_dtype="float32", poolings={"encoder": ("mean",)}
    )
    req = storegen.request()
    writer = StoreWriter.open_or_create(
        _cache_root,
        req,
        geometry=geometry,
        arrays=arrays,
        layers=(0, 4),
        n_states=N_STATES,
        stacks=("encoder",),
    )
    with writer.claim(0) as shard:
        writer.write_shard(
            shard,
            {
                "token_ids": data.token_ids,
                "special_mask": data.special,
                hidden_name("encoder"): data.hidden[[0, 4]],
                pooled_name("encoder", "mean"): data.pooled[[0, 4]],
            },
            data.lengths,
        )
    writer.finalize()
    acts = open_activations(writer.key)
    np.testing.assert_array_equal(acts.hidden(-1).compute(), data.hidden[4])
    with pytest.raises(ConfigError, match=r"layer 2 was not stored.*\[0, 4\]"):
        acts.hidden(2)


def test_write_shard_rejects_data_of_the_wrong_shape(_cache_root: Path) -> None:
    data = synthetic()
    writer = open_writer(_cache_root, data)
    with writer.claim(0) as shard:
        arrays = shard_arrays(data, shard)
        arrays[hidden_name("encoder")] = arrays[hidden_name("encoder")][:, :-1]
        with pytest.raises(
            LayoutMismatchError, match=r"'encoder_hidden_states': expected shape .*\(layer, token, hidden\)"
        ):
            writer.write_shard(shard, arrays, data.lengths[shard.ex_start : shard.ex_stop])
        with pytest.raises(LayoutMismatchError, match="lengths summing"):
            writer.write_shard(shard, shard_arrays(data, shard), data.lengths[shard.ex_start : shard.ex_stop] + 1)
    assert writer.done_shards() == set()


def test_incomplete_store_is_an_error_unless_partial(_cache_root: Path) -> None:
    data = synthetic()
    writer = open_writer(_cache_root, data)
    shards = writer.geometry.shards
    for index in (1, 3):
        write_shard(writer, data, index)
    assert not writer.finalize().complete
    with pytest.raises(IncompleteStoreError) as err:
        open_activations(writer.key)
    missing = [s.index for s in shards if s.index not in (1, 3)]
    assert f"missing shards {missing}" in str(err.value) and "allow_partial=True" in str(err.value)
    acts = open_activations(writer.key, allow_partial=True)
    rows = np.concatenate([np.arange(shards[i].ex_start, shards[i].ex_stop) for i in (1, 3)])
    assert acts.n_examples == len(rows)
    assert acts.examples["id"].tolist() == [f"ex-{r}" for r in rows]
    expected_tokens = np.concatenate([data.token_ids[shards[i].tok_start : shards[i].tok_stop] for i in (1, 3)])
    np.testing.assert_array_equal(acts.token_ids.compute(), expected_tokens)
    np.testing.assert_array_equal(acts.offsets.compute(), np.concatenate([[0], np.cumsum(data.lengths[rows])]))
    for j, row in enumerate(rows[:6]):
        span = slice(data.offsets[row], data.offsets[row + 1])
        np.testing.assert_array_equal(acts.example(j).token_ids, data.token_ids[span])


@pytest.mark.parametrize("missing", [0, -1])
def test_finalize_with_one_marker_missing_leaves_the_store_incomplete(_cache_root: Path, missing: int) -> None:
    """Every shard but one committed: finalize must not mark the store complete, in the manifest or in
    zarr.json, and the reader refuses it naming that shard; once it is written, finalize completes."""
    data = synthetic()
    writer = open_writer(_cache_root, data)
    shards = writer.geometry.shards
    assert len(shards) > 3, "the test needs several shards"
    left_out = shards[missing].index
    for shard in shards:
        if shard.index != left_out:
            write_shard(writer, data, shard.index)
    assert not writer.finalize().complete
    assert not read_manifest(writer.path).complete
    root = json.loads((writer.path / "zarr.json").read_text())["attributes"]["actcache"]
    assert root["complete"] is False, "zarr-only readers must not see a complete store"
    committed = zarr.open_group(writer.path, mode="r")["shard_committed"][:]
    assert committed.tolist() == [0 if s.index == left_out else 1 for s in shards]
    with pytest.raises(IncompleteStoreError, match=rf"missing shards \[{left_out}\]"):
        open_activations(writer.key)
    assert verify(writer.key).missing == [left_out]
    write_shard(writer, data, left_out)
    assert writer.finalize().complete and read_manifest(writer.path).complete
    assert json.loads((writer.path / "zarr.json").read_text())["attributes"]["actcache"]["complete"] is True
    np.testing.assert_array_equal(open_activations(writer.key).token_ids.compute(), data.token_ids)


def _resident_pages(path: Path) -> int:
    """How many of `path`'s pages are in the page cache (Linux `mincore` on a private mapping of it)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start  # the mapping cannot close while a ctypes object points into it
    return sum(v & 1 for v in vector)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache residency is read with Linux mincore")
def test_a_shard_leaves_the_page_cache_once_the_next_one_is_written(_cache_root: Path) -> None:
    """A store's chunk files are dropped from the page cache a shard after they are written (they are on
    the disk by then: here `os.sync` makes sure), and the last shard's when the writer closes."""
    probe = _cache_root.parent / "probe"
    probe.write_bytes(b"x" * 65536)
    os.sync()
    with probe.open("rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_pages(probe):
        pytest.skip(f"{probe.parent}'s filesystem keeps file pages in memory whatever is advised (tmpfs)")
    data = synthetic()
    writer = open_writer(_cache_root, data)
    first, second = writer.geometry.shards[:2]

    def chunk_files(shard: ShardRange) -> list[Path]:
        return [
            writer.path / spec.name / key
            for spec in writer.manifest.arrays
            for key in spec.shard_chunks(shard, writer.geometry)
        ]

    write_shard(writer, data, first.index)
    os.sync()
    # Read back, so they are cached whatever the kernel already dropped under load: the control.
    assert all(path.read_bytes() and _resident_pages(path) for path in chunk_files(first)), "read, files are cached"
    write_shard(writer, data, second.index)
    assert [path for path in chunk_files(first) if _resident_pages(path)] == []
    os.sync()
    assert all(path.read_bytes() and _resident_pages(path) for path in chunk_files(second))
    writer.close()
    assert [path for path in chunk_files(second) if _resident_pages(path)] == []
    writer = open_writer(_cache_root, data)  # the rest, then every value read back from the disk
    for shard in writer.geometry.shards[2:]:
        write_shard(writer, data, shard.index)
    assert writer.finalize().complete
    writer.close()
    acts = open_activations(writer.key)
    np.testing.assert_array_equal(acts.token_ids.compute(), data.token_ids)
    np.testing.assert_array_equal(acts.hidden(N_STATES - 1).compute(), expected_storage(data.hidden[-1], "float16"))


def test_requests_differing_only_in_revision_have_different_keys(_cache_root: Path) -> None:
    """The revision is hashed, not only recorded: two commits of one Hub id never share a store."""
    from schemas.request import ExtractionRequest

    a, b = storegen.request(revision="a" * 40), storegen.request(revision="b" * 40)
    assert {k: v for k, v in a.model.items() if k != "revision"} == {
        k: v for k, v in b.model.items() if k != "revision"
    }
    assert (a.dataset, a.outputs) == (b.dataset, b.outputs)
    assert cache_key(a) != cache_key(b)
    assert cache_key(a) == cache_key(ExtractionRequest.from_dict(json.loads(json.dumps(a.to_dict()))))
    data = synthetic()
    writers = [open_writer(_cache_root, data, revision=r) for r in ("a" * 40, "b" * 40)]
    assert writers[0].path != writers[1].path, "two revisions, two stores"
    assert [read_manifest(w.path).request["model"]["revision"] for w in writers] == ["a" * 40, "b" * 40]


def test_two_processes_write_disjoint_shards_at_once(_cache_root: Path) -> None:
    data = synthetic()
    writer = open_writer(_cache_root, data)
    indices = [s.index for s in writer.geometry.shards]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.storegen", str(_cache_root), *map(str, part)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for part in (indices[0::2], indices[1::2])
    ]  # fmt: skip
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert writer.finalize().complete
    acts = open_activations(writer.key)
    np.testing.assert_array_equal(acts.hidden(2).compute(), expected_storage(data.hidden[2], "float16"))
    assert verify(writer.key).ok


def test_claim_is_exclusive_and_taken_over_from_a_dead_process(_cache_root: Path) -> None:
    data = synthetic()
    writer = open_writer(_cache_root, data)
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time\n"
            "from tests.storegen import open_writer, synthetic\n"
            "w = open_writer(__import__('pathlib').Path(sys.argv[1]), synthetic())\n"
            "with w.claim(0):\n"
            "    print('claimed', flush=True)\n"
            "    time.sleep(60)\n",
            str(_cache_root),
        ],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        with pytest.raises(ShardClaimedError, match=f"shard 0 of store .* pid {holder.pid}"):
            with writer.claim(0):
                pass
        claimed = []
        for shard, claim in writer.claim_pending():  # one pass, no waiting
            claimed.append(shard.index)
            claim.close()
        assert claimed[:1] == [1], "claim_pending() skips the held shard"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    write_shard(writer, data, 0)  # the dead holder's claim is taken over
    assert 0 in writer.done_shards()


def test_a_claim_released_while_we_look_is_still_just_taken(_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder (another process, or this one's writer thread) may finish between our lock
    attempt and reading its name: that is a held shard, not a crash."""
    writer = open_writer(_cache_root, synthetic())
    monkeypatch.setattr(claims_module, "try_flock", lambda path: None)  # the lock was held ...
    assert not list((writer.path / "shards").glob("*.claim"))  # ... and its file is gone now
    with pytest.raises(ShardClaimedError, match="released it just now"):
        with writer.claim(0):
            pass
    assert writer.try_claim(writer.geometry.shards[0]) is None


def test_a_chunk_of_fill_values_is_written_like_any_other(_cache_root: Path) -> None:
    """A shard whose values all equal the fill (NaN pooled rows, as for empty texts) still writes its chunks:
    zarr skips such chunks by default, and a missing chunk of a committed shard is corruption."""
    data = synthetic()
    writer = open_writer(_cache_root, data)
    shard = writer.geometry.shards[1]
    with writer.claim(1):
        arrays = shard_arrays(data, shard)
        arrays[pooled_name("encoder", "mean")] = np.full_like(arrays[pooled_name("encoder", "mean")], np.nan)
        writer.write_shard(shard, arrays, data.lengths[shard.ex_start : shard.ex_stop])
    for index in range(len(writer.geometry.shards)):
        if index != 1:
            write_shard(writer, data, index)
    assert writer.finalize().complete and verify(writer.key).ok
    pooled = open_activations(writer.key).pooled(2, lazy=False)
    assert np.isnan(pooled[shard.ex_start : shard.ex_stop]).all()
    np.testing.assert_array_equal(
        pooled[: shard.ex_start], expected_storage(data.pooled[2, : shard.ex_start], "float16")
    )


def test_crash_leftovers_are_ignored_and_cleaned(_cache_root: Path) -> None:
    data = synthetic()
    writer = open_writer(_cache_root, data)
    for index in range(len(writer.geometry.shards)):
        if index != 2:
            write_shard(writer, data, index)
    shard = writer.geometry.shards[2]
    # A crashed writer of shard 2: garbage chunk data, zarr temp files, a temp marker, no marker.
    arrays = {k: (v * 0 + 7).astype(v.dtype) for k, v in shard_arrays(data, shard).items()}
    group_path = writer.path / hidden_name("encoder")
    writer._zarr_group()[hidden_name("encoder")][:, shard.phys_start : shard.phys_start + shard.n_tokens] = arrays[
        hidden_name("encoder")
    ]
    chunk_key = writer.manifest.array(hidden_name("encoder")).shard_chunks(shard, writer.geometry)[0]
    leftover = group_path / f"{chunk_key}.deadbeef.partial"
    leftover.write_bytes(b"half a chunk")
    marker_tmp = writer.path / "shards" / "000002.json.cafe.partial"
    marker_tmp.write_text("{")
    claim_path(writer.path, 2).write_text("pid 1 on a lost host")  # what a killed holder leaves
    acts = open_activations(writer.key, allow_partial=True)
    assert acts.n_examples == len(data.lengths) - shard.n_examples, "shard 2 is not served"
    with pytest.raises(IncompleteStoreError):
        open_activations(writer.key)
    write_shard(writer, data, 2)  # the rerun
    assert not leftover.exists() and not marker_tmp.exists()
    assert writer.finalize().complete and verify(writer.key).ok
    np.testing.assert_array_equal(
        open_activations(writer.key).hidden(1).compute(), expected_storage(data.hidden[1], "float16")
    )


def _chunk_file(writer: StoreWriter, shard_index: int) -> Path:
    spec = writer.manifest.array(hidden_name("encoder"))
    return writer.path / spec.name / spec.shard_chunks(writer.geometry.shards[shard_index], writer.geometry)[-1]


def test_verify_catches_a_flipped_byte_a_truncated_chunk_and_a_valid_chunk_from_elsewhere(_cache_root: Path) -> None:
    writer, data = complete_store(_cache_root)
    assert verify(writer.key).ok
    flipped, truncated, deleted = _chunk_file(writer, 1), _chunk_file(writer, 3), _chunk_file(writer, 4)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-5])
    deleted.unlink()
    stale = _chunk_file(writer, 2)
    stale.write_bytes(_chunk_file(writer, 0).read_bytes())  # whole and self-consistent, but not what shard 2 wrote
    report = verify(writer.key)
    assert not report.ok and sorted(report.corrupt) == [1, 2, 3, 4]
    assert any("checksum mismatch" in p for p in report.corrupt[1])
    assert any("is missing" in p for p in report.corrupt[4])
    assert "corrupt shard 1" in report.summary() and "corrupt shard 3" in report.summary()
    assert read_manifest(writer.path).complete, "without reset verify only reports"
    report = verify(writer.key, reset=True)
    assert report.reset == [1, 2, 3, 4] and not read_manifest(writer.path).complete
    assert {s.index for s in writer.pending_shards()} == {1, 2, 3, 4}
    for index in (1, 2, 3, 4):
        write_shard(writer, data, index)
    assert writer.finalize().complete and verify(writer.key).ok


def test_key_changes_with_every_keyed_input_and_not_with_provenance(_cache_root: Path) -> None:
    from dataclasses import replace

    from schemas.request import ExtractionRequest, OutputSpec

    base = storegen.request()
    keys = {cache_key(base)}
    variants = [
        storegen.request(revision="1" * 40),
        storegen.request(content_hash="weights-b"),
        storegen.request(dtype="bf16"),
        storegen.request(quantization=8),
        storegen.request(tokenizer_hash="tok-b"),
        storegen.request(tokenizer_kwargs={"max_length": 128}),
        storegen.request(dataset_hash="rows-v2"),
        ExtractionRequest(base.model, {**base.dataset, "split": "validation"}, base.outputs),
        ExtractionRequest(base.model, {**base.dataset, "text_fields": ["premise"]}, base.outputs),
        ExtractionRequest(base.model, {**base.dataset, "limit": 10}, base.outputs),
        ExtractionRequest(base.model, base.dataset, replace(base.outputs, layers=(0, 6))),
        ExtractionRequest(base.model, base.dataset, replace(base.outputs, logits="topk:5")),
        ExtractionRequest(base.model, base.dataset, replace(base.outputs, logits="none")),
        ExtractionRequest(base.model, base.dataset, replace(base.outputs, pooling=("mean",))),
        storegen.request(store_dtype="float32"),
        ExtractionRequest(base.model, base.dataset, OutputSpec(logits="topk:3", token_level=False)),
    ]
    for variant in variants:
        key = cache_key(variant)
        assert key not in keys, f"{variant} collides"
        keys.add(key)
    assert cache_key(storegen.request()) == cache_key(base)
    # Provenance (batch size, device, shard size) is not part of a request at all; two writers
    # of one request with different provenance and shard plans meet in the same store.
    data = synthetic()
    a = open_writer(_cache_root, data)
    b = StoreWriter.open_or_create(
        _cache_root, base, geometry=a.geometry, arrays=a.manifest.arrays, layers=a.manifest.layers,
        n_states=N_STATES, stacks=("encoder",), provenance={"batch_size": 64, "device": "cuda:0"},
    )  # fmt: skip
    assert a.path == b.path and b.manifest.provenance == {"batch_size": 8}


def test_key_is_stable_across_processes(_cache_root: Path) -> None:
    code = "from tests.storegen import request; from cache import cache_key; print(cache_key(request()))"
    outs = set()
    for cwd, seed in ((REPO, "1"), (_cache_root.parent, "2")):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True
        )
        outs.add(done.stdout.strip())
    assert outs == {cache_key(storegen.request())}


def test_aliases_ls_show_rm(_cache_root: Path) -> None:
    writer, _ = complete_store(_cache_root)
    acts = open_activations(model="fake", data="data")
    assert acts.key == writer.key
    assert find_store("fake__data") == writer.path == find_store(str(writer.path)) == find_store(writer.key)
    [info] = list_stores()
    assert (info.key, info.complete, info.shards_done, info.aliases) == (
        writer.key, True, info.shards_total, ("fake__data",),
    )  # fmt: skip
    assert info.bytes > 0
    remove_store("fake__data")
    assert not writer.path.exists() and list_stores() == []
    with pytest.raises(StoreNotFoundError, match="actcache ls"):
        open_activations(model="fake", data="data")


def test_gc_removes_only_old_incomplete_stores(_cache_root: Path) -> None:
    done, _ = complete_store(_cache_root)
    stale = open_writer(_cache_root, synthetic(), dataset_hash="other")
    fresh = open_writer(_cache_root, synthetic(), dataset_hash="third")
    stale.close()  # abandoned: no writer holds it any more
    old = time.time() - 10 * 86400
    for path in (done.path, stale.path):
        for dirpath, _dirs, files in os.walk(path):
            for name in [*files, "."]:
                os.utime(os.path.join(dirpath, name), (old, old))
    assert gc(older_than_days=7).removed == (stale.path,)
    assert done.path.exists() and fresh.path.exists() and not stale.path.exists()


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTCACHE_DIR", str(tmp_path / "env"))
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("ACTCACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "actcache"


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/../../b", "..", ""])
def test_aliases_never_leave_the_cache_dir(_cache_root: Path, name: str) -> None:
    path = alias_path(_cache_root, name).resolve()
    assert path.parent == (_cache_root / "aliases").resolve()


def test_unknown_schema_version_is_refused(_cache_root: Path) -> None:
    import json

    writer, _ = complete_store(_cache_root)
    manifest = json.loads((writer.path / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 99
    (writer.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="schema version 99; this actcache reads versions 2"):
        open_activations(writer.key)


def test_xarray_round_trip(_cache_root: Path) -> None:
    writer, data = complete_store(_cache_root, "float32")
    ds = open_activations(writer.key).to_xarray()
    assert ds[hidden_name("encoder")].dims == ("layer", "token", "hidden")
    assert ds["encoder_pooled_mean"].dims == ("layer", "example", "hidden")
    np.testing.assert_array_equal(ds[hidden_name("encoder")].sel(layer=3).values, data.hidden[3])
    np.testing.assert_array_equal(ds["encoder_pooled_mean"].values, data.pooled)
    np.testing.assert_array_equal(ds["offsets"].values, data.offsets)
    assert ds["language"].dims == ("example",) and list(ds["language"].values[:2]) == ["en", "de"]
    assert ds.sizes["token"] == int(data.lengths.sum())


def test_stores_of_an_older_format_are_marked_refused_and_removed_by_gc(_cache_root: Path) -> None:
    old, _ = complete_store(_cache_root)
    current, _ = complete_store(_cache_root, "float32")
    manifest = json.loads((old.path / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 1  # as every store written before format 2 says
    (old.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    root_meta = json.loads((old.path / "zarr.json").read_text())  # format 1's signature: the manifest copy alone
    root_meta["attributes"] = {"actcache_manifest": manifest}
    root_meta.pop("consolidated_metadata", None)
    (old.path / "zarr.json").write_text(json.dumps(root_meta))
    with pytest.raises(
        SchemaVersionError,
        match="schema version 1; this actcache reads versions 2.*older format.*actcache gc --format 1",
    ):
        open_activations(old.key)
    env = {**os.environ, "ACTCACHE_DIR": str(_cache_root)}
    listing = subprocess.run(
        [sys.executable, "-m", "pipeline", "ls"], env=env, capture_output=True, text=True, check=True
    ).stdout
    [row] = [line for line in listing.splitlines() if line.startswith(old.key)]
    assert "format 1" in row and "actcache gc --format 1" in listing
    assert gc(older_than_days=7).removed == () and old.path.exists(), "age alone never removes a complete store"
    assert gc(older_than_days=7, formats=[1]).removed == (old.path,)
    assert not old.path.exists() and current.path.exists()
    with pytest.raises(ConfigError, match="--format takes older formats only"):
        gc(older_than_days=7, formats=[2])


def test_a_shard_claimed_again_is_not_flagged_committed_while_it_is_rewritten(_cache_root: Path) -> None:
    from schemas.store import SHARD_COMMITTED

    writer, data = complete_store(_cache_root)
    flag = writer.path / SHARD_COMMITTED / "c" / "1"
    assert zarr.open_group(writer.path, mode="r")[SHARD_COMMITTED][1] == 1
    marker_path(writer.path, 1).unlink()  # as a crash between the flag and the marker leaves it
    with writer.claim(1) as shard:
        assert not flag.exists(), "zarr-only readers see shard 1 as missing while it is written again"
        assert zarr.open_group(writer.path, mode="r")[SHARD_COMMITTED][1] == 0
        writer.write_shard(shard, shard_arrays(data, shard), data.lengths[shard.ex_start : shard.ex_stop])
    assert flag.exists() and verify(writer.key).ok


@pytest.mark.parametrize("age", [-1.0, float("nan"), float("-inf")])
def test_gc_refuses_an_age_below_zero_or_not_finite(_cache_root: Path, age: float) -> None:
    """The library checks the age itself (not only the CLI): -1 would make every store "old"."""
    fresh = open_writer(_cache_root, synthetic(), dataset_hash="fresh")  # incomplete, being written
    with pytest.raises(ConfigError, match="0 days or more"):
        gc(older_than_days=age)
    assert fresh.path.exists()


def test_examples_table_is_decoded_a_text_chunk_at_a_time(_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over text chunks of 4 values, the table equals what was written: repeating text as a categorical
    with sorted categories, text found mostly distinct midway (`id`) as plain strings."""
    monkeypatch.setattr(zattrs, "TEXT_CHUNK", 4)
    writer, data = complete_store(_cache_root)
    assert zarr.open_array(store=writer.path / "language", mode="r").chunks == (4,)
    table = open_activations(writer.key).examples
    assert table["language"].dtype == "category"
    assert list(table["language"].cat.categories) == sorted(set(data.examples["language"]))
    assert table["id"].dtype != "category" and pd.api.types.is_string_dtype(table["id"])
    for column, values in data.examples.items():
        assert table[column].tolist() == values, column


def test_metadata_columns_of_fill_values_alone_read_back(_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A metadata column whose every value is its array's fill (missing or empty text, -1 labels, NaN scores)
    still has its chunk files, so it reads back as written, not as a store that lost them."""
    monkeypatch.setattr(zattrs, "TEXT_CHUNK", 4)
    data = synthetic()
    n = len(data.lengths)
    data.examples |= {"note": [None] * n, "blank": [""] * n, "label": [-1] * n, "score": [math.nan] * n}
    writer, _ = complete_store(_cache_root, data=data)
    table = open_activations(writer.key).examples
    assert table["note"].tolist() == table["blank"].tolist() == [""] * n
    assert table["label"].tolist() == [-1] * n
    assert np.isnan(table["score"].to_numpy()).all() and len(table) == n


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_hand_written_chunk_files_are_zarrs_byte_for_byte(_cache_root: Path, tmp_path: Path, store_dtype: str) -> None:
    """Every chunk file the writer writes by hand equals the file zarr itself writes for the same values."""
    writer, _ = complete_store(_cache_root, store_dtype)
    group = zarr.open_group(writer.path, mode="r")
    compared = 0
    for spec in writer.manifest.arrays:
        source = group[spec.name]
        again = zarr.create_array(
            tmp_path / spec.name,
            shape=source.shape,
            chunks=source.chunks,
            dtype=source.dtype,
            serializer=source.serializer,
            compressors=source.compressors,
            fill_value=source.fill_value,
            config={"write_empty_chunks": True},
        )
        again[...] = source[...]
        for chunk in sorted((writer.path / spec.name / "c").rglob("*")):
            if chunk.is_file():
                twin = tmp_path / spec.name / chunk.relative_to(writer.path / spec.name)
                assert chunk.read_bytes() == twin.read_bytes(), chunk
                compared += 1
    assert compared > 50


def test_store_bytes_counts_every_file_below_as_find_does(tmp_path: Path) -> None:
    """Allocated bytes of every regular file under a store, nested folders and all, checked against
    find(1)'s own block count of regular files; a symlinked folder is not followed (its files count once,
    where they are)."""
    from cache import store_bytes

    root = tmp_path / "store.zarr"
    for i, size in enumerate([0, 1, 4095, 4096, 70_000, 1 << 20]):
        folder = root / f"a{i % 3}" / "c" / str(i)
        folder.mkdir(parents=True)
        (folder / "0").write_bytes(os.urandom(size))
    (root / "empty" / "deep").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(1 << 20))
    (root / "link").symlink_to(outside, target_is_directory=True)
    found = subprocess.run(["find", str(root), "-type", "f", "-printf", "%b\\n"], capture_output=True, text=True)
    want = 512 * sum(int(n) for n in found.stdout.split())
    assert want >= (1 << 20) + 70_000 + 2 * 4096 and store_bytes(root) == want
