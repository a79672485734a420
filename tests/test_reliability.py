"""Faults injected for real: kills, corruption, concurrent runs, a full disk, overflow, bad places."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cache import open_activations, verify
from cache.integrity import marker_path
from pipeline import reduce
from pipeline.extract import ExtractConfig, extract
from schemas import CacheDirError, IncompleteStoreError
from schemas.store import MANIFEST_FILE, hidden_name
from tests import chaos
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tiny_dir: Any) -> Any:
    with tempfile.TemporaryDirectory(prefix="actcache-reliability-") as tmp:
        root = Path(tmp)
        data = root / "texts.jsonl"
        rows = SENTENCES * 3
        data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
        model = shutil.copytree(tiny_dir("llama"), root / "model")
        clean = subprocess.run(
            chaos._args(model, data, root / "clean"), cwd=REPO, env=chaos._env(), capture_output=True, text=True
        )
        assert clean.returncode == 0, clean.stderr
        yield model, data, Path(clean.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("point", ["mid-write:25", "mid-commit:5", "finalize"])
def test_sigkill_at_a_crash_point_loses_nothing(workdir: Any, tmp_path: Path, point: str) -> None:
    model, data, clean = workdir
    outcome = chaos.kill_once(point, model, data, tmp_path, None)
    store = next(tmp_path.glob("stores/*.zarr"))
    assert outcome.verified and chaos._lost(chaos._arrays(store), chaos._arrays(clean)) == 0
    if point == "finalize":
        assert outcome.redone == 0, "every shard was committed before finalize: none is redone"
    else:
        assert 0 < outcome.redone < outcome.shards, "only the shards not yet committed are redone"
    assert not list(store.rglob("*.partial")), "crash leftovers are cleaned on resume"


def _rerun(model: Path, data: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(chaos._args(model, data, cache), cwd=REPO, env=chaos._env(), capture_output=True, text=True)


def _shard_chunk(store: Path, index: int, which: int = 0) -> Path:
    from cache.catalog import read_manifest

    manifest = read_manifest(store)
    spec = manifest.array(hidden_name("decoder"))
    return store / spec.name / spec.shard_chunks(manifest.geometry.shards[index], manifest.geometry)[which]


def test_every_corruption_is_found_reset_and_redone_alone(workdir: Any, tmp_path: Path) -> None:
    model, data, clean = workdir
    store = tmp_path / clean.name
    shutil.copytree(clean, store)
    flipped, truncated, deleted = _shard_chunk(store, 1), _shard_chunk(store, 3, 1), _shard_chunk(store, 5)
    raw = bytearray(flipped.read_bytes())
    raw[-1] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:10])
    deleted.unlink()
    marker_path(store, 7).unlink()  # a deleted marker
    marker_path(store, 9).write_text("{ not json")  # a corrupt marker
    (store / MANIFEST_FILE).write_text('{"schema_version": 1, "key": ')  # a corrupt manifest
    env = chaos._env()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", str(store)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    for index in (1, 3, 5, 9):
        assert f"corrupt shard {index}" in done.stdout, done.stdout
    assert "missing (never committed): shards 7" in done.stdout and "manifest corrupt" in done.stdout
    with pytest.raises(IncompleteStoreError, match=r"missing shards \[1, 3, 5, 7, 9\]"):
        open_activations(str(store))
    partial = open_activations(str(store), allow_partial=True)
    assert partial.n_examples < open_activations(str(clean)).n_examples, "failed shards are never served"
    # Rerunning the extract into this cache redoes exactly those shards.
    cache = tmp_path / "cache"
    (cache / "stores").mkdir(parents=True)
    shutil.move(store, cache / "stores" / store.name)
    store = cache / "stores" / store.name
    before = {p.name: p.stat().st_mtime_ns for p in (store / "shards").glob("*.json")}
    assert _rerun(model, data, cache).returncode == 0
    after = {p.name: p.stat().st_mtime_ns for p in (store / "shards").glob("*.json")}
    rewritten = sorted(int(name.split(".")[0]) for name in after if before.get(name) != after[name])
    assert rewritten == [1, 3, 5, 7, 9]
    assert verify(str(store)).ok and chaos._lost(chaos._arrays(store), chaos._arrays(clean)) == 0


def test_two_runs_of_one_request_at_once_both_finish(workdir: Any, tmp_path: Path) -> None:
    model, data, clean = workdir
    args = chaos._args(model, data, tmp_path)
    procs = [
        subprocess.Popen(args, cwd=REPO, env=chaos._env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    store = next(tmp_path.glob("stores/*.zarr"))
    assert verify(str(store)).ok and chaos._lost(chaos._arrays(store), chaos._arrays(clean)) == 0


def test_different_requests_share_a_cache_dir(workdir: Any, tmp_path: Path) -> None:
    model, data, _ = workdir
    base = chaos._args(model, data, tmp_path)
    procs = [
        subprocess.Popen(
            [*base, "--layers", layers],
            cwd=REPO,
            env=chaos._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for layers in ("all", "0,-1")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    stores = {Path(out.strip().splitlines()[-1]) for out, _ in outs}
    assert len(stores) == 2 and all(verify(str(s)).ok for s in stores)


def test_full_disk_is_a_clear_error_and_the_same_command_resumes(workdir: Any, tmp_path: Path) -> None:
    model, data, _ = workdir
    args = [*chaos._args(model, data, tmp_path), "--store-dtype", "float32", "--shard-tokens", "400"]

    def small_disk() -> None:  # files above 40 kB fail, as on a disk with 40 kB left
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    full = subprocess.run(args, cwd=REPO, env=chaos._env(), capture_output=True, text=True, preexec_fn=small_disk)
    assert full.returncode == 2, full.stderr
    assert f"out of space writing to '{tmp_path}'" in full.stderr and "MiB more" in full.stderr
    assert "rerun the same command" in full.stderr
    resumed = subprocess.run(args, cwd=REPO, env=chaos._env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert verify(resumed.stdout.strip().splitlines()[-1]).ok


@pytest.mark.parametrize("place", ["direct", "gathered"])
def test_float16_overflow_is_counted_recorded_and_warned(
    tiny_dir: Any, tmp_path: Path, place: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted the same whichever way hidden states reach the shard (see `pipeline.reduce`)."""
    import transformers

    monkeypatch.setattr(reduce, "_DIRECT_TOKENS", 0 if place == "direct" else 10**9)

    model_dir = tmp_path / "hot"
    model = transformers.AutoModel.from_pretrained(tiny_dir("bert_plain"))
    with torch.no_grad():
        model.encoder.layer[-1].output.LayerNorm.weight.mul_(1e6)  # last layer's values ~1e6 > float16's 65504
    model.save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(tiny_dir("bert_plain")).save_pretrained(model_dir)
    out = tmp_path / "out.txt"
    with open(out, "w") as fh:
        result = extract(
            ExtractConfig(model=str(model_dir), data="sample", limit=1, cache_dir=str(tmp_path / "c")), out=fh
        )
    counts = result.manifest.stats["nonfinite"]["encoder"]
    assert counts[:-1] == [0] * (len(counts) - 1) and counts[-1] > 0, counts
    printed = out.read_text()
    assert "non-finite values" in printed and "--store-dtype bfloat16" in printed
    assert np.isinf(open_activations(result.key, cache_dir=tmp_path / "c").hidden(-1).compute()).any()
    safe = extract(
        ExtractConfig(
            model=str(model_dir),
            data="sample",
            limit=1,
            cache_dir=str(tmp_path / "c"),
            store_dtype="bfloat16",
            quiet=True,
        )
    )
    assert sum(safe.manifest.stats["nonfinite"]["encoder"]) == 0


def test_unwritable_cache_dir_is_a_clear_error(tiny_dir: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheDirError, match=r"cache dir '.*a-file/cache' is not writable.*--cache-dir"):
        extract(ExtractConfig(model=str(tiny_dir("bert")), data="sample", limit=1, cache_dir=str(blocker / "cache")))


@pytest.mark.parametrize("name", ["../../escape", "/etc", "a/../../b"])
def test_names_never_produce_paths_outside_the_cache_dir(tmp_path: Path, name: str) -> None:
    from cache.paths import alias_name, alias_path

    root = tmp_path / "root"
    for alias in (alias_name(name, "xnli"), alias_name("labse", name), name):
        path = alias_path(root, alias).resolve()
        assert path.is_relative_to(root.resolve()), path


def test_a_key_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    for command in ("show", "verify", "rm"):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", command, "0" * 32, "--cache-dir", str(tmp_path)],
            cwd=REPO, env=chaos._env(), capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 2 and f"no store '{'0' * 32}'" in done.stderr and "actcache ls" in done.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=chaos._env(), capture_output=True, text=True
    )


def test_rm_of_a_store_that_is_a_symbolic_link_deletes_nothing(tmp_path: Path) -> None:
    elsewhere = tmp_path / "not-ours"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "manifest.json").write_text("{}")
    (elsewhere / "sub" / "data.txt").write_text("keep me")
    key = "1" * 32
    (tmp_path / "root" / "stores").mkdir(parents=True)
    link = tmp_path / "root" / "stores" / f"{key}.zarr"
    link.symlink_to(elsewhere, target_is_directory=True)
    for ref in (key, str(link)):
        done = _cli("rm", ref, "--cache-dir", str(tmp_path / "root"))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert "is a symbolic link" in line and "never deletes through a link" in line
    assert (elsewhere / "sub" / "data.txt").read_text() == "keep me" and link.is_symlink()
    assert _cli("gc", "--older-than", "0", "--cache-dir", str(tmp_path / "root")).returncode == 0
    assert (elsewhere / "sub" / "data.txt").read_text() == "keep me" and link.is_symlink()
    # The stores/ directory itself a link: the store behind it is not ours to delete either.
    other = tmp_path / "other-root"
    other.mkdir()
    (other / "stores").symlink_to(tmp_path / "root" / "stores", target_is_directory=True)
    link.unlink()
    (tmp_path / "root" / "stores" / f"{key}.zarr").mkdir()
    (tmp_path / "root" / "stores" / f"{key}.zarr" / "manifest.json").write_text("{}")
    done = _cli("rm", key, "--cache-dir", str(other))
    assert done.returncode == 2 and "is a symbolic link" in done.stderr, done.stderr
    assert _cli("gc", "--older-than", "0", "--cache-dir", str(other)).returncode == 0
    assert (tmp_path / "root" / "stores" / f"{key}.zarr" / "manifest.json").is_file()


def test_an_error_with_a_multi_line_cause_is_still_one_line_and_a_closed_pipe_is_no_error(
    tiny_dir: Any, tmp_path: Path
) -> None:
    model = shutil.copytree(tiny_dir("llama"), tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()  # transformers' own message for this spans several lines
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "Hello."}\n', encoding="utf-8")
    done = _cli("extract", "--model", str(model), "--data", str(data), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "could not load a tokenizer" in done.stderr
    listing = subprocess.run(
        f"{sys.executable} -m pipeline models | head -1", shell=True, cwd=REPO, env=chaos._env(),
        capture_output=True, text=True,
    )  # fmt: skip
    assert listing.stdout.startswith("key") and listing.stderr == ""


def test_an_os_failure_is_one_line_and_debug_shows_the_traceback(workdir: Any, tmp_path: Path) -> None:
    model, data, _clean = workdir
    args = ["extract", "--model", str(model), "--data", str(data), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    bad = str(tmp_path / ("x" * 300) / "summary.json")  # a name the file system refuses: ENAMETOOLONG
    done = _cli(*args, "--summary-json", bad)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("actcache: error: File name too long") and bad in line and "--debug" in line
    debug = _cli(*args, "--summary-json", bad, "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line
