"""rm and gc never remove a store from under a live writer, and gc removes only what it can prove abandoned."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cache.catalog import list_stores, remove_store
from cache.cleanup import GcResult, gc
from cache.files import flocked, lock_path
from cache.lease import exclusive_lease, writer_lease, writers_path
from schemas import ConfigError, StoreInUseError
from schemas.store import MANIFEST_FILE, ZARR_JSON
from tests.storegen import complete_store, open_writer, synthetic

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(root)],
        cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True,
    )  # fmt: skip


def _age(path: Path, days: float = 10) -> None:
    """Make `path` and everything under it look untouched for `days`."""
    when = time.time() - days * 86400
    for dirpath, _dirs, files in os.walk(path):
        for name in [*files, "."]:
            os.utime(os.path.join(dirpath, name), (when, when))


def _snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _incomplete_store(root: Path, dataset_hash: str = "stale") -> Path:
    """A store created and never written: its manifest says incomplete."""
    return open_writer(root, synthetic(), dataset_hash=dataset_hash).path


def _set_format(store: Path, version: int) -> None:
    """Stamp `store` as written by schema version `version` (its signature and its manifest)."""
    meta = json.loads((store / ZARR_JSON).read_text())
    meta["attributes"]["actcache"]["schema_version"] = version
    (store / ZARR_JSON).write_text(json.dumps(meta))
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    manifest["schema_version"] = version
    (store / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture()
def holder(_cache_root: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process writing a store: it holds the store's writer lease and a claim on shard 1."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cache.lease import writer_lease\n"
        "from tests.storegen import open_writer, synthetic\n"
        "w = open_writer(Path(sys.argv[1]), synthetic(), dataset_hash='held')\n"
        "with writer_lease(w.path), w.claim(1):\n"
        "    print(w.path, flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(_cache_root)],
        cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _held_store(proc: subprocess.Popen[str]) -> Path:
    assert proc.stdout is not None
    return Path(proc.stdout.readline().strip())


# -- gc: only what it can prove abandoned --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda m: m.write_bytes(m.read_bytes()[:100]), id="truncated"),
        pytest.param(lambda m: m.unlink(), id="missing"),
        pytest.param(lambda m: m.write_text("[1, 2]"), id="not-an-object"),
    ],
)
def test_gc_keeps_a_complete_store_whose_manifest_is_damaged(
    _cache_root: Path, damage: Callable[[Path], object]
) -> None:
    writer, _ = complete_store(_cache_root)
    damage(writer.path / MANIFEST_FILE)
    _age(writer.path)
    before = _snapshot(writer.path)
    done = _cli(_cache_root, "gc", "--older-than", "7")
    assert done.returncode == 0, done.stderr
    assert _snapshot(writer.path) == before, "gc touched a store it cannot read"
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"actcache: kept {writer.path}: ") and f"run `actcache verify {writer.key}`" in line
    assert "0 removed" in done.stdout and "1 kept" in done.stdout
    # ... and the advice works: verify rebuilds the manifest and finds every shard intact.
    verified = _cli(_cache_root, "verify", writer.key)
    n = len(writer.geometry.shards)
    assert f"{n}/{n} shards verified" in verified.stdout and "manifest rebuilt" in verified.stdout, verified.stdout


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "incomplete"])
def test_gc_leaves_stores_of_a_newer_format(_cache_root: Path, complete: bool) -> None:
    path = complete_store(_cache_root)[0].path if complete else _incomplete_store(_cache_root)
    _set_format(path, 3)
    _age(path)
    result = gc(older_than_days=7)
    assert path.is_dir() and result.removed == ()
    [kept] = result.kept
    assert kept.path == path and "written by a newer actcache (format 3" in kept.reason
    with pytest.raises(ConfigError, match="gc --format 3 would remove the stores of a newer actcache"):
        gc(older_than_days=7, formats=[3])
    assert path.is_dir()


def test_gc_removes_an_old_incomplete_store_and_nothing_else(_cache_root: Path) -> None:
    done, _ = complete_store(_cache_root)
    stale = _incomplete_store(_cache_root)
    fresh = _incomplete_store(_cache_root, "fresh")
    for path in (done.path, stale):
        _age(path)
    result = gc(older_than_days=7)
    assert result == GcResult(removed=(stale,), kept=())
    assert done.path.is_dir() and fresh.is_dir() and not stale.exists()
    assert not lock_path(stale).exists() and not writers_path(stale).exists(), "no lock files left behind"
    assert {i.key for i in list_stores()} == {done.key, fresh.name.removesuffix(".zarr")}


def test_gc_keeps_an_old_store_with_one_file_written_lately_deep_inside(_cache_root: Path) -> None:
    """A run resuming an old store writes chunk files folders below its root, whose own mtime stays old:
    the newest file anywhere under the store counts."""
    stale = _incomplete_store(_cache_root)
    deep = max((p for p in stale.rglob("*") if p.is_file()), key=lambda p: len(p.parts))
    assert len(deep.relative_to(stale).parts) >= 2, "the control: a file in a folder of the store"
    _age(stale)
    os.utime(deep)  # written now
    assert gc(older_than_days=7) == GcResult(removed=(), kept=()) and stale.is_dir()
    _age(stale)
    assert gc(older_than_days=7).removed == (stale,)


def test_gc_keeps_a_store_whose_every_shard_is_committed(_cache_root: Path) -> None:
    """A crash before finalize (or a manifest rebuilt by verify) leaves all the data, marked incomplete."""
    writer, _ = complete_store(_cache_root)
    manifest = json.loads((writer.path / MANIFEST_FILE).read_text())
    (writer.path / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    _age(writer.path)
    [kept] = gc(older_than_days=7).kept
    assert kept.path == writer.path and "every shard is committed" in kept.reason and writer.path.is_dir()


def test_gc_format_still_removes_older_formats_at_any_age(_cache_root: Path) -> None:
    old = _incomplete_store(_cache_root)
    _set_format(old, 1)
    assert gc(older_than_days=7).kept == (), "a young store is no news"
    _age(old)
    [kept] = gc(older_than_days=7).kept
    assert "actcache gc --format 1" in kept.reason and old.is_dir(), "age alone never removes another format"
    assert gc(older_than_days=7, formats=[1]).removed == (old,) and not old.exists()


def test_gc_leaves_what_is_not_an_actcache_store(_cache_root: Path) -> None:
    photos = _cache_root / "stores" / "photos"
    photos.mkdir(parents=True)
    (photos / "cat.jpg").write_bytes(b"meow")
    unsigned = _cache_root / "stores" / f"{'0' * 32}.zarr"
    unsigned.mkdir()
    (unsigned / ZARR_JSON).write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    _age(_cache_root / "stores")
    result = gc(older_than_days=0)
    assert result.removed == () and photos.is_dir() and unsigned.is_dir()
    assert {k.path: "not an actcache store" in k.reason for k in result.kept} == {photos: True, unsigned: True}


def test_gc_leaves_a_creation_under_way(_cache_root: Path) -> None:
    store = _cache_root / "stores" / f"{'a' * 32}.zarr"
    creation = store.with_name(f"{store.name}.{'f' * 32}.incomplete")
    creation.mkdir(parents=True)
    (creation / ZARR_JSON).write_text("{}")
    _age(creation)
    with flocked(lock_path(store)):  # as StoreWriter holds it while it creates the store
        [kept] = gc(older_than_days=7).kept
        assert kept.path == creation and "holds the lock" in kept.reason and creation.is_dir()
    assert gc(older_than_days=7).removed == (creation,) and not creation.exists()


# -- a live writer: rm and gc refuse, naming it ---------------------------------------------------------------------


def test_rm_refuses_a_live_writer_naming_it(_cache_root: Path, holder: subprocess.Popen[str]) -> None:
    store = _held_store(holder)
    before = _snapshot(store)
    done = _cli(_cache_root, "rm", store.name.removesuffix(".zarr"))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("actcache: error: store ") and "is in use" in line, line
    assert f"pid {holder.pid} on " in line and "(writing shard 1)" in line, line
    assert store.is_dir() and _snapshot(store) == before
    holder.send_signal(signal.SIGKILL)  # the writer dies: the kernel drops its lease; its claim file stays
    holder.wait()
    assert (store / "shards" / "000001.claim").read_text().startswith(f"pid {holder.pid}")
    done = _cli(_cache_root, "rm", store.name.removesuffix(".zarr"))
    assert done.returncode == 0 and not store.exists(), done.stderr


def test_gc_keeps_an_old_incomplete_store_a_live_writer_holds(_cache_root: Path, holder: subprocess.Popen[str]) -> None:
    store = _held_store(holder)
    _age(store)
    done = _cli(_cache_root, "gc", "--older-than", "7")
    assert done.returncode == 0 and store.is_dir(), done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"actcache: kept {store}: ") and f"pid {holder.pid} on " in line, line


def test_a_writer_between_shards_is_another_process(_cache_root: Path) -> None:
    """A writer holding no claim is "another process"; a claim file a killed writer left names no one."""
    store = _incomplete_store(_cache_root)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"pid {dead.stdout.strip()} on {socket.gethostname()} since 2026-01-01T00:00:00+00:00"
    (store / "shards" / "000002.claim").write_text(stale)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cache.lease import writer_lease\n"
        "with writer_lease(Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(store)], cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreInUseError, match=r"is in use: another process holds its writer lease.*Fix: ") as err:
            remove_store(store)
        assert stale.split(" since")[0] not in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.is_dir()


def test_rm_in_a_process_that_writes_the_store_says_so(_cache_root: Path) -> None:
    store = _incomplete_store(_cache_root)
    with writer_lease(store):
        with pytest.raises(StoreInUseError, match=rf"this process \(pid {os.getpid()}: close its StoreWriter first\)"):
            remove_store(store)
    assert remove_store(store) == store and not store.exists()


def test_a_writer_waiting_for_the_lease_finds_the_store_gone_and_holds_a_live_lease(_cache_root: Path) -> None:
    """The removal unlinks the lease file it holds: a writer that was waiting must not keep the dead file's lock."""
    store = _incomplete_store(_cache_root)
    entered, leave, seen = threading.Event(), threading.Event(), {}

    def writer() -> None:
        with writer_lease(store):
            seen["exists"] = store.exists()
            entered.set()
            leave.wait(30)

    with exclusive_lease(store):
        thread = threading.Thread(target=writer)
        thread.start()
        assert not entered.wait(0.5), "a writer got in while the store is being removed"
        shutil.rmtree(store)
        writers_path(store).unlink()
    try:
        assert entered.wait(10) and seen == {"exists": False}
        with pytest.raises(StoreInUseError):  # the waiting writer's lease is the one on the file there now
            with exclusive_lease(store):
                pass
    finally:
        leave.set()
        thread.join()


# -- imports run one way ---------------------------------------------------------------------------------------------


def test_catalog_never_imports_integrity() -> None:
    source = (REPO / "cache" / "catalog.py").read_text()
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert "cache.integrity" not in imported, "catalog sits below integrity: integrity imports it, not the reverse"
    code = "import sys, cache.catalog; print('cache.integrity' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **ENV}, capture_output=True)
    assert done.stdout.strip() == b"False", done.stderr


def test_metrics_never_imports_pipeline() -> None:
    """metrics/ sits beside pipeline/ on cache/: an analysis machine runs it without torch or transformers."""
    for path in sorted((REPO / "metrics").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            heavy = [n for n in names if n.split(".")[0] in ("pipeline", "torch", "transformers")]
            assert not heavy, f"{path.name} imports {heavy}"
