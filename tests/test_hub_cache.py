"""The user's own command through a populated Hugging Face cache: real Hub ids, offline.

The cache is built by `tests.hfcache` in the layouts huggingface_hub and datasets write
(blobs + snapshot symlinks + refs/main for models; prepared Arrow files under
<namespace>___<name>/<config>/<version>/<commit>/ for datasets), so the code path that
resolves Hub ids, revisions and snapshots runs for real here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from cache import open_activations
from pipeline.datasets import XNLI_LANGUAGES, load_examples, resolve_dataset
from pipeline.extract import ExtractConfig, ExtractResult, extract
from schemas import ModelNotAvailableError
from tests import hfcache
from tests.checks import assert_float16_of
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ROWS = [json.loads(line) for line in hfcache.SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hfcache.build(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def home(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return hf_home


def run(model: str, data: str, cache: Path, **options: Any) -> ExtractResult:
    cfg = ExtractConfig(model=model, data=data, cache_dir=str(cache), quiet=True, **options)
    return extract(cfg, out=open(os.devnull, "w"))


def test_make_extract_labse_xnli_runs_offline_end_to_end(home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(REPO)}
    args = ["extract", "--model", "labse", "--data", "xnli", "--cache-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    store = Path(done.stdout.strip().splitlines()[-1])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"]
    model, dataset = manifest["request"]["model"], manifest["request"]["dataset"]
    assert model["hf_id"] == "sentence-transformers/LaBSE"
    assert model["revision"] == hfcache.commit_for("sentence-transformers/LaBSE", 0)
    assert (dataset["path"], dataset["revision"]) == ("facebook/xnli", hfcache.XNLI_COMMIT)
    assert manifest["provenance"]["model_source"] == "hub"
    acts = open_activations(model="labse", data="xnli", cache_dir=tmp_path)
    assert acts.n_examples == 15 * 4 * 2 and sorted(acts.examples["language"].unique()) == list(XNLI_LANGUAGES)
    # Values are the snapshot's: a direct forward of the resolved snapshot directory agrees.
    snapshot = hfcache.repo_dir(home, "sentence-transformers/LaBSE") / "snapshots" / model["revision"]
    direct = transformers.AutoModel.from_pretrained(snapshot, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot)
    ex = acts.example(7)
    text = SAMPLE_ROWS[[r["language"] for r in SAMPLE_ROWS].index(ex.metadata["language"]) + ex.metadata["row"]]
    with torch.no_grad():
        states = direct(**tokenizer([text[ex.metadata["field"]]], return_tensors="pt"), output_hidden_states=True)
    assert_float16_of(ex.hidden["encoder"], torch.stack(states.hidden_states)[:, 0])


@pytest.mark.parametrize("key", ["llama3", "mt5", "xlmr", "mbert", "minilm"])
def test_every_registry_model_runs_on_xnli(home: Path, tmp_path: Path, key: str) -> None:
    from pipeline.models import REGISTRY

    result = run(key, "xnli", tmp_path, limit=1)
    model = result.manifest.request["model"]
    assert result.manifest.complete and result.manifest.geometry.n_examples == 15 * 2
    assert model["revision"] == hfcache.commit_for(REGISTRY[key].hf_id, 0)
    assert result.manifest.request["dataset"]["revision"] == hfcache.XNLI_COMMIT
    assert model["quantization"] == (8 if key == "llama3" else None)  # the registry's bitsandbytes default
    assert result.manifest.stacks == {"mt5": ("encoder", "decoder"), "llama3": ("decoder",)}.get(key, ("encoder",))


def test_revisions_make_keys(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES[:4]), encoding="utf-8")
    own = tmp_path / "hf"
    shutil.copytree(home / "hub" / "models--xlm-roberta-base", own / "hub" / "models--xlm-roberta-base", symlinks=True)
    second = hfcache.add_model(own, "xlm-roberta-base", "xlmr", seed=1, main=False)
    os.environ["HF_HOME"] = str(own)  # restored by the `home` fixture's monkeypatch
    first = run("xlmr", str(data), tmp_path / "acts")
    pinned = run("xlmr", str(data), tmp_path / "acts", revision=second)
    assert pinned.key != first.key and pinned.manifest.request["model"]["revision"] == second
    (own / "hub" / "models--xlm-roberta-base" / "refs" / "main").write_text(second)
    moved = run("xlmr", str(data), tmp_path / "acts")
    assert moved.key == pinned.key != first.key and moved.cache_hit
    elsewhere = tmp_path / "other-place"
    shutil.copytree(own, elsewhere, symlinks=True)
    os.environ["HF_HOME"] = str(elsewhere)
    again = run("xlmr", str(data), tmp_path / "acts")
    assert again.key == pinned.key and again.cache_hit, "the same commit through another cache path is the same key"


def test_absent_id_or_revision_names_the_id_the_cache_and_the_fix(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError) as err:
        run("labse", "sample", tmp_path, revision="v9.9")
    message = str(err.value)
    assert "'sentence-transformers/LaBSE' at revision 'v9.9'" in message and str(home / "hub") in message
    assert "HF_HUB_OFFLINE" in message
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", "--model", "mt5", "--data", "xnli", "--cache-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'google/mt5-base'" in done.stderr and str(tmp_path / "empty" / "hub") in done.stderr


def test_xnli_entry_does_what_its_documentation_says(home: Path) -> None:
    by_language = {lang: [r for r in SAMPLE_ROWS if r["language"] == lang] for lang in XNLI_LANGUAGES}
    examples = load_examples(resolve_dataset("xnli"))
    assert examples.spec.split == "test" and examples.revision == hfcache.XNLI_COMMIT
    assert len(examples) == 15 * 4 * 2
    meta = examples.metadata.to_pydict()
    assert meta["language"] == [lang for lang in XNLI_LANGUAGES for _ in range(8)]
    assert meta["field"][:4] == ["premise", "hypothesis", "premise", "hypothesis"]
    de = meta["language"].index("de")
    assert [examples.text(de), examples.text(de + 1)] == [
        by_language["de"][0]["premise"],
        by_language["de"][0]["hypothesis"],
    ]
    assert meta["label"][de] == by_language["de"][0]["label"]
    validation = load_examples(resolve_dataset("xnli", split="validation"))
    assert len(validation) == 15 * 2 * 2
    pairs = load_examples(resolve_dataset("xnli", pair=True, limit=1))
    assert len(pairs) == 15 and pairs.text(0) == (by_language["ar"][0]["premise"], by_language["ar"][0]["hypothesis"])
    assert "field" not in pairs.metadata.column_names
    two = load_examples(resolve_dataset("xnli", config="en,de"))
    assert sorted(set(two.metadata["language"].to_pylist())) == ["de", "en"] and len(two) == 2 * 4 * 2


def test_two_revisions_of_one_hub_model_are_two_stores_of_their_own_values(
    tiny_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinning another commit of the same Hub id is another store holding that commit's values, not a
    cache hit on the first. Both commits hold the same tokenizer and config, so only the revision
    tells the two requests apart (tiny tokenizers trained twice need not come out the same)."""
    home = tmp_path / "hf"
    repo_id = "bert-base-multilingual-cased"  # the registry's `mbert`
    source = tiny_dir("bert")
    main = hfcache.commit_for(repo_id, 0)
    hfcache.add_snapshot(home, repo_id, source, main)
    retrained = tmp_path / "retrained"
    shutil.copytree(source, retrained)
    torch.manual_seed(1)  # other weights, same config and tokenizer
    transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(source)).save_pretrained(retrained)
    other = hfcache.commit_for(repo_id, 1)
    hfcache.add_snapshot(home, repo_id, retrained, other, main=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES[:3]), encoding="utf-8")
    first = run("mbert", str(data), tmp_path / "acts", logits="none")
    pinned = run("mbert", str(data), tmp_path / "acts", logits="none", revision=other)
    requested = [dict(r.manifest.request["model"]) for r in (first, pinned)]
    assert [m.pop("revision") for m in requested] == [main, other]
    assert requested[0] == requested[1], "the two requests differ in their revision alone"
    assert not pinned.cache_hit, "another revision must not be served from the first one's store"
    assert pinned.key != first.key and pinned.path != first.path
    assert sorted((tmp_path / "acts" / "stores").glob("*.zarr")) == sorted([first.path, pinned.path])
    snapshots = hfcache.repo_dir(home, repo_id) / "snapshots"
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshots / main)
    for result, commit in ((first, main), (pinned, other)):
        direct = transformers.AutoModel.from_pretrained(snapshots / commit, dtype=torch.float32).eval()
        ex = open_activations(result.key, cache_dir=tmp_path / "acts").example(1)
        with torch.no_grad():
            states = direct(**tokenizer([SENTENCES[1]], return_tensors="pt"), output_hidden_states=True)
        assert_float16_of(ex.hidden["encoder"], torch.stack(states.hidden_states)[:, 0])
