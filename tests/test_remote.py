"""Stores read from object stores through fsspec: a real S3 API server (moto) on localhost, and memory://."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache import open_activations
from cache.paths import alias_path
from cache.zattrs import root_attributes, zarr_group
from schemas import StoreCorruptError
from schemas.store import OFFSETS, hidden_name
from tests.storegen import complete_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _upload(fs: Any, local: Path, remote: str) -> None:
    for file in local.rglob("*"):
        if file.is_file():
            fs.pipe(f"{remote}/{file.relative_to(local).as_posix()}", file.read_bytes())


@pytest.fixture()
def remote_cache(bucket: str, _cache_root: Path) -> tuple[str, Any, Any]:
    import s3fs

    writer, _ = complete_store(_cache_root)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = bucket.removeprefix("s3://")
    _upload(fs, writer.path, f"{name}/cache/stores/{writer.path.name}")
    alias = alias_path(_cache_root, "fake__data")
    fs.pipe(f"{name}/cache/aliases/{alias.name}", alias.read_bytes())
    return f"{bucket}/cache", writer, fs


def test_open_activations_reads_a_store_on_s3_like_the_local_one(remote_cache: tuple[str, Any, Any]) -> None:
    root, writer, _fs = remote_cache
    local = open_activations(str(writer.path))
    for ref, options in ((f"{root}/stores/{writer.path.name}", {}), (writer.key, {"cache_dir": root})):
        remote = open_activations(ref, **options)
        assert remote.key == local.key and remote.layers == local.layers
        for layer in local.layers:
            np.testing.assert_array_equal(remote.hidden(layer).compute(), local.hidden(layer, lazy=False))
            np.testing.assert_array_equal(remote.pooled(layer, lazy=False), local.pooled(layer, lazy=False))
        np.testing.assert_array_equal(remote.offsets.compute(), local.offsets.compute())
        assert remote.examples.equals(local.examples)
    by_name = open_activations(model="fake", data="data", cache_dir=root)
    assert by_name.key == writer.key


def test_a_corrupt_or_missing_chunk_on_s3_is_the_same_error_as_locally(remote_cache: tuple[str, Any, Any]) -> None:
    """Never the NaN, -1 or bare codec error of a plain zarr read: the shard (or array) and the fix are named."""
    root, writer, fs = remote_cache
    url = f"{root}/stores/{writer.path.name}"
    bucket_path = url.removeprefix("s3://")
    spec = writer.manifest.array(hidden_name("encoder"))
    flipped = spec.shard_chunks(writer.geometry.shards[1], writer.geometry)[0]  # the first layer's
    deleted = spec.shard_chunks(writer.geometry.shards[3], writer.geometry)[-1]  # the last layer's
    raw = bytearray(fs.cat(f"{bucket_path}/{spec.name}/{flipped}"))
    raw[len(raw) // 2] ^= 0x01
    fs.pipe(f"{bucket_path}/{spec.name}/{flipped}", bytes(raw))
    fs.rm(f"{bucket_path}/{spec.name}/{deleted}")
    acts = open_activations(url)
    for key, shard, what in ((flipped, 1, "CRC32C"), (deleted, 3, "missing")):
        layer = acts.layers[int(key.split("/")[1])]  # c/<layer>/<token chunk>/0
        for lazy in (True, False):
            with pytest.raises(StoreCorruptError) as err:
                hidden = acts.hidden(layer, lazy=lazy)
                if lazy:
                    hidden.compute()
            assert f"shard(s) [{shard}]" in str(err.value) and what in str(err.value), err.value
            assert "actcache verify" in str(err.value)
    fs.rm(f"{bucket_path}/{OFFSETS}/c/0")
    with pytest.raises(StoreCorruptError, match="missing"):
        open_activations(url).offsets.compute()
    column = next(iter(root_attributes(zarr_group(writer.path))["metadata_columns"].values()))
    fs.rm(f"{bucket_path}/{column}/c/0")
    with pytest.raises(StoreCorruptError, match="lost chunk files"):
        open_activations(url).examples  # noqa: B018


def test_a_corrupt_metadata_chunk_is_named(_cache_root: Path) -> None:
    writer, _ = complete_store(_cache_root)
    column = next(iter(root_attributes(zarr_group(writer.path))["metadata_columns"].values()))
    chunk = writer.path / column / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(
        StoreCorruptError, match=f"metadata array {column!r}: the chunk file of rows 0-.*checksum"
    ) as err:
        open_activations(str(writer.path)).examples  # noqa: B018
    assert "actcache rm" in str(err.value) and "verify" not in str(err.value), "metadata is not a shard verify resets"
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_ls_show_and_verify_accept_an_s3_url(remote_cache: tuple[str, Any, Any], s3: dict[str, str]) -> None:
    root, writer, fs = remote_cache
    env = {**os.environ, **s3, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True)

    listing = cli("ls", "--cache-dir", root)
    assert listing.returncode == 0 and writer.key in listing.stdout and "complete" in listing.stdout, listing.stderr
    url = f"{root}/stores/{writer.path.name}"
    shown = cli("show", url)
    assert shown.returncode == 0 and '"complete": true' in shown.stdout, shown.stderr
    assert cli("verify", url).returncode == 0
    spec = writer.manifest.array(hidden_name("encoder"))
    key = spec.shard_chunks(writer.geometry.shards[1], writer.geometry)[0]
    chunk = f"{url.removeprefix('s3://')}/{spec.name}/{key}"
    raw = bytearray(fs.cat(chunk))
    raw[len(raw) // 2] ^= 0x01
    fs.pipe(chunk, bytes(raw))
    done = cli("verify", url)
    assert done.returncode == 1 and "corrupt shard 1" in done.stdout and "reset to pending: shards 1" in done.stdout
    assert not fs.exists(f"{url.removeprefix('s3://')}/shards/000001.json"), "its marker is gone: pending again"
    assert not fs.exists(f"{url.removeprefix('s3://')}.writers"), "the lease is let go"


def test_memory_urls_work_too(_cache_root: Path) -> None:
    import fsspec

    writer, _ = complete_store(_cache_root)
    fs = fsspec.filesystem("memory")
    _upload(fs, writer.path, f"/acts/stores/{writer.path.name}")
    remote = open_activations(f"memory://acts/stores/{writer.path.name}")
    local = open_activations(str(writer.path))
    np.testing.assert_array_equal(remote.hidden(-1).compute(), local.hidden(-1, lazy=False))


def test_gc_refuses_a_url_in_one_line_and_file_urls_are_local_paths(_cache_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, says in (
        (["gc", "--cache-dir", "memory://acts"], "local cache root only"),
        (["rm", "0" * 32, "--cache-dir", "memory://acts"], "no store"),
    ):
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert says in done.stderr and "Fix:" in done.stderr, done.stderr
    writer, _ = complete_store(_cache_root)
    assert open_activations(f"file://{writer.path}").key == writer.key
