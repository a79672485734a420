"""actcache touches only what it wrote, and options mean what they say: each case a real CLI run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import chaos

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _snapshot(top: Path, skip: Path) -> dict[str, str]:
    """Every file under `top` but those under `skip`, with a digest of its bytes."""
    seen = {}
    for path in sorted(top.rglob("*")):
        if path.is_file() and skip not in path.parents:
            seen[str(path.relative_to(top))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, Any]:
    """A fake home: unrelated files, a web app's folder with a manifest.json, the cache root inside."""
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("buy milk\n")
    app = home / "webapp"
    (app / "sub").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my app", "schema_version": 2}')
    (app / "sub" / "data.txt").write_text("precious\n")
    data = home / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"sentence number {i}"}) + "\n" for i in range(12)))
    root = home / "actcache"
    env = {
        **chaos._env(),
        "HOME": str(home),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }
    env.pop("ACTCACHE_DIR", None)
    return {"home": home, "app": app, "data": data, "root": root, "env": env}


def _cli(home: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=home["home"], env=home["env"], capture_output=True, text=True
    )


def test_no_command_touches_anything_outside_the_cache_root(home: dict[str, Any], tiny_dir: Any) -> None:
    model, root = str(tiny_dir("bert")), str(home["root"])
    before = _snapshot(home["home"], home["root"])
    extract = ["extract", "--model", model, "--data", str(home["data"]), "--cache-dir", root, "--quiet"]
    done = _cli(home, *extract)
    assert done.returncode == 0, done.stderr
    store = done.stdout.strip().splitlines()[-1]
    for args in (
        extract,  # a cache hit
        ["extract", "--model", model, "--data", str(home["data"]), "--text-column", "nope", "--cache-dir", root],
        ["ls", "--cache-dir", root],
        ["show", store],
        ["verify", store],
        ["gc", "--cache-dir", root, "--older-than", "0"],
        ["rm", str(home["app"]), "--cache-dir", root],
        ["show", str(home["app"])],
        ["verify", str(home["app"])],
        ["rm", store, "--cache-dir", root],
    ):
        _cli(home, *args)
    assert _snapshot(home["home"], home["root"]) == before, "a file outside the cache root was made or changed"
    assert not (home["home"] / ".cache" / "huggingface" / "datasets").exists(), "datasets' Arrow copies are ours"


def test_rm_show_and_verify_refuse_a_folder_that_is_not_a_store(home: dict[str, Any]) -> None:
    for command in ("rm", "show", "verify"):
        done = _cli(home, command, str(home["app"]), "--cache-dir", str(home["root"]))
        assert done.returncode == 2, (command, done.stderr)
        assert "is not an actcache store" in done.stderr and "neither reads nor removes it" in done.stderr
        assert "actcache rm" not in done.stderr, "never advise removing what is not ours"
    assert (home["app"] / "sub" / "data.txt").read_text() == "precious\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["ls", "--cache-dir", ""], "--cache-dir is empty"),
        (["gc", "--cache-dir", "", "--older-than", "1"], "--cache-dir is empty"),
        (["ls", "--cache-dir", "{home}/notes/todo.txt"], "is a file"),
        (["gc", "--older-than", "-1", "--cache-dir", "{root}"], "0 or more"),
        (["gc", "--older-than", "nan", "--cache-dir", "{root}"], "0 or more"),
    ],
)
def test_cache_dir_and_gc_options_are_checked(home: dict[str, Any], args: list[str], message: str) -> None:
    args = [a.format(home=home["home"], root=home["root"]) for a in args]
    done = _cli(home, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 if "--older-than" not in args else True
    assert not (home["home"] / "stores").exists() and not (home["home"] / "aliases").exists()


@pytest.mark.parametrize("name", ["stores", "aliases", "tokenized", "datasets"])
def test_a_cache_root_whose_directory_is_a_file(home: dict[str, Any], tiny_dir: Any, name: str) -> None:
    home["root"].mkdir()
    (home["root"] / name).write_text("oops")
    for args in (
        ["ls"],
        ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"])],
        ["gc", "--older-than", "0"],
    ):
        done = _cli(home, *args, "--cache-dir", str(home["root"]))
        assert done.returncode == 2 and "is a file, where actcache keeps a directory" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (home["root"] / name).read_text() == "oops"


def test_ls_lists_a_store_whose_manifest_is_not_an_object(home: dict[str, Any], tiny_dir: Any) -> None:
    args = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(home["root"])]
    store = Path(_cli(home, *args, "--quiet").stdout.strip().splitlines()[-1])
    (store / "manifest.json").write_text("[1, 2, 3]")
    done = _cli(home, "ls", "--cache-dir", str(home["root"]))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert store.name.removesuffix(".zarr") in done.stdout and "not an object" in done.stdout, done.stdout


def test_a_fresh_incomplete_store_survives_gc_with_a_bad_age(home: dict[str, Any], tiny_dir: Any) -> None:
    env = {**home["env"], "ACTCACHE_CRASH_AT": "after-marker"}
    args = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(home["root"])]
    subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--shard-tokens", "16", "--quiet"],
        cwd=home["home"], env=env, capture_output=True, text=True,
    )  # fmt: skip
    stores = list((home["root"] / "stores").glob("*.zarr"))
    assert len(stores) == 1
    for age in ("-1", "nan", "-inf"):
        _cli(home, "gc", "--older-than", age, "--cache-dir", str(home["root"]))
    assert stores[0].is_dir()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text-column", "text", "--text-column", "text"], "is given more than once"),
        (["--config", "en"], "applies to Hub datasets"),
        (["--device", "gpu"], "invalid device"),
        (["--summary-json", "{home}/missing/run.json"], "does not exist"),
        (["--summary-json", "{home}/notes"], "is a directory"),
    ],
)
def test_extract_options_are_checked_even_on_a_cache_hit(
    home: dict[str, Any], tiny_dir: Any, extra: list[str], message: str
) -> None:
    base = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(home["root"])]
    if not (home["root"] / "stores").exists():
        assert _cli(home, *base, "--quiet").returncode == 0
    done = _cli(home, *base, *[a.format(home=home["home"]) for a in extra])
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_layers_with_negative_indices_work_as_the_help_writes_them(home: dict[str, Any], tiny_dir: Any) -> None:
    args = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(home["root"])]
    done = _cli(home, *args, "--layers", "-1,-2", "--quiet")
    assert done.returncode == 0, done.stderr
    from cache import open_activations

    acts = open_activations(done.stdout.strip().splitlines()[-1])
    assert acts.layers == (acts.manifest.n_states - 2, acts.manifest.n_states - 1)


@pytest.mark.parametrize(
    "rows, column, kind",
    [
        ([{"text": "fine"}, {"text": {"a": 1}}], "text", "dict"),
        ([{"text": 1}, {"text": 2}], "text", "int"),
        ([{"text": "fine"}, {"text": ["a", "b"]}], "text", "list"),
    ],
)
def test_text_columns_that_are_not_text_are_refused(
    home: dict[str, Any], tiny_dir: Any, rows: list[dict[str, Any]], column: str, kind: str
) -> None:
    data = home["home"] / "odd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _cli(
        home, "extract", "--model", str(tiny_dir("bert")), "--data", str(data), "--cache-dir", str(home["root"])
    )
    assert done.returncode == 2, done.stderr
    assert f"text column {column!r} holds {kind} values" in done.stderr and "row " in done.stderr, done.stderr
    assert not list((home["root"] / "stores").glob("*.zarr")) if (home["root"] / "stores").exists() else True


def test_a_null_text_stays_an_empty_example(home: dict[str, Any], tiny_dir: Any) -> None:
    data = home["home"] / "nulls.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": None}) + "\n")
    done = _cli(
        home, "extract", "--model", str(tiny_dir("bert")), "--data", str(data), "--cache-dir", str(home["root"])
    )
    assert done.returncode == 0 and "1 empty" in done.stderr + done.stdout, done.stderr


def test_no_stores_dir_is_made_in_the_current_directory(home: dict[str, Any]) -> None:
    _cli(home, "ls", "--cache-dir", "")
    assert sorted(os.listdir(home["home"])) == ["notes", "texts.jsonl", "webapp"]


def test_datasets_arrow_copies_live_under_the_root_and_gc_cleans_them(home: dict[str, Any], tiny_dir: Any) -> None:
    root = home["root"]
    args = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(root)]
    assert _cli(home, *args, "--quiet").returncode == 0
    assert any((root / "datasets").rglob("*.arrow")), "datasets' Arrow copy of the local file is under the root"
    assert any((root / "tokenized").iterdir())
    done = _cli(home, "gc", "--older-than", "0", "--cache-dir", str(root))
    assert done.returncode == 0, done.stderr
    assert not any((root / "datasets").iterdir()) and not any((root / "tokenized").iterdir())
    assert list((root / "stores").glob("*.zarr")), "a complete store is never gc'ed"
    assert _cli(home, *args, "--quiet").returncode == 0, "and the next run rebuilds what gc removed"


def test_a_bad_summary_path_is_refused_before_the_run(home: dict[str, Any], tiny_dir: Any) -> None:
    base = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(home["root"])]
    done = _cli(home, *base, "--summary-json", str(home["home"] / "missing" / "run.json"))
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr
    assert not list(home["root"].glob("stores/*.zarr")), "refused before any store was written"


def test_gc_keeps_fresh_tokenized_and_arrow_copies(home: dict[str, Any], tiny_dir: Any) -> None:
    root = home["root"]
    args = ["extract", "--model", str(tiny_dir("bert")), "--data", str(home["data"]), "--cache-dir", str(root)]
    assert _cli(home, *args, "--quiet").returncode == 0
    before = sorted(p.name for d in ("tokenized", "datasets") for p in (root / d).iterdir())
    assert before, "the run left tokenized and Arrow copies"
    assert _cli(home, "gc", "--cache-dir", str(root), "--older-than", "7").returncode == 0
    assert sorted(p.name for d in ("tokenized", "datasets") for p in (root / d).iterdir()) == before


def test_gc_with_a_negative_infinite_age_gets_its_own_message(home: dict[str, Any]) -> None:
    """argparse would take `-inf` for an option; the CLI passes it on to the age check, which names it."""
    done = _cli(home, "gc", "--cache-dir", str(home["root"]), "--older-than", "-inf")
    assert done.returncode == 2 and "finite number of days" in done.stderr, done.stderr
