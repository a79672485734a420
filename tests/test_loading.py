"""Resolution, quantization and real weights: the paths a model takes from a name to a runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from pipeline.models import ResolvedCheckpoint, load_model, resolve_checkpoint
from pipeline.models.registry import REGISTRY, get_spec
from schemas import ModelSpec
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _hub_cache(root: Path, repo_id: str, snapshots: dict[str, Path], main: str) -> Path:
    """A Hugging Face hub cache in huggingface_hub's layout: refs/main -> snapshots/<commit>/."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    for commit, source in snapshots.items():
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    return root


def test_registry_holds_the_proposal_models() -> None:
    assert set(REGISTRY) == {"mbert", "xlmr", "mt5", "llama3", "labse", "minilm", "minilm-l6"}
    assert REGISTRY["labse"].hf_id == "sentence-transformers/LaBSE"
    assert REGISTRY["xlmr"].hf_id == "xlm-roberta-base"
    assert REGISTRY["mt5"].arch == "seq2seq"
    llama = REGISTRY["llama3"]
    assert (llama.hf_id, llama.arch, llama.dtype, llama.use_bitsandbytes) == (
        "meta-llama/Meta-Llama-3-8B", "decoder_only", "bf16", True,
    )  # fmt: skip
    assert get_spec("minilm-l6").hf_id == "sentence-transformers/all-MiniLM-L6-v2"


def test_minilm_l6_resolves_offline_to_the_packaged_weights(minilm_path: Path) -> None:
    checkpoint = resolve_checkpoint(get_spec("minilm-l6"))
    assert checkpoint == ResolvedCheckpoint(minilm_path.resolve(), checkpoint.hf_id, "package")
    assert len(checkpoint.identity()["content_hash"]) == 64


def test_hub_id_resolves_through_the_local_cache(
    tiny_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _hub_cache(
        tmp_path / "hf",
        "org/tiny-bert",
        {COMMIT_A: tiny_dir("bert"), COMMIT_B: tiny_dir("bert_plain")},
        COMMIT_A,
    )
    monkeypatch.setenv("HF_HOME", str(home))
    spec = ModelSpec(name="tiny", hf_id="org/tiny-bert", arch="encoder_only")
    runner = load_model(spec, device="cpu")
    assert runner.checkpoint.revision == COMMIT_A
    assert runner.checkpoint.path == home / "hub/models--org--tiny-bert/snapshots" / COMMIT_A
    assert runner.has_lm_head
    pinned = load_model(spec, device="cpu", revision=COMMIT_B)
    assert pinned.checkpoint.revision == COMMIT_B and not pinned.has_lm_head


def test_minilm_l6_matches_sentence_transformers(minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    runner = load_model("minilm-l6", device="cpu")
    assert runner.checkpoint.source == "package" and not runner.has_lm_head
    batch = runner.tokenize(SENTENCES)
    out = runner.forward(batch)
    assert len(out.encoder_hidden_states) == 7 and out.encoder_hidden_states[-1].shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.encoder_hidden_states[-1] * mask).sum(1) / mask.sum(1)
    mine = torch.nn.functional.normalize(pooled, dim=-1)
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(
        SENTENCES, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits, layer_class, min_cosine", [(8, "Linear8bitLt", 0.999), (4, "Linear4bit", 0.9)])
def test_bitsandbytes_quantized_llama_runs_close_to_fp32(
    tiny_dir: Any, bits: int, layer_class: str, min_cosine: float
) -> None:
    path = tiny_dir("llama_wide")  # layer shapes that every bitsandbytes CPU kernel takes
    full = load_model(path, device="cpu", dtype="fp32")
    quantized = load_model(path, device="cpu", dtype="fp32", quantization=bits)
    assert quantized.quant_bits == bits
    assert type(quantized.model.model.layers[0].mlp.down_proj).__name__ == layer_class
    batch = full.tokenize(SENTENCES[:6])
    a, b = full.forward(batch), quantized.forward(batch)
    real = batch["attention_mask"].bool()
    assert len(b.decoder_hidden_states) == len(a.decoder_hidden_states)
    cosine = torch.nn.functional.cosine_similarity(a.logits[real], b.logits[real], dim=-1)
    assert cosine.min() > min_cosine, f"{bits}-bit logits drifted: min cosine {cosine.min():.4f}"
    assert not torch.equal(a.logits, b.logits), "quantization must actually change the weights"


def test_quantization_off_overrides_the_spec(tiny_dir: Any) -> None:
    spec = ModelSpec(name="q", hf_id=str(tiny_dir("llama")), arch="decoder_only", use_bitsandbytes=True)
    runner = load_model(spec, device="cpu", quantization=False)
    assert runner.quant_bits is None
    assert type(runner.model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_bf16_load_and_forward(tiny_dir: Any) -> None:
    runner = load_model(tiny_dir("llama"), device="cpu", dtype="bf16")
    out = runner.forward(runner.tokenize(SENTENCES[:2]))
    assert runner.model.dtype == torch.bfloat16 and out.decoder_hidden_states[-1].dtype == torch.bfloat16


def test_pickle_weights_load_when_allowed(tiny_dir: Any, tmp_path: Path) -> None:
    source = tiny_dir("bert")
    target = shutil.copytree(source, tmp_path / "pickled")
    model = transformers.AutoModelForMaskedLM.from_pretrained(source)
    (target / "model.safetensors").unlink()
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    runner = load_model(target, device="cpu", allow_pickle=True)
    batch = runner.tokenize(SENTENCES[:1])
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(runner.forward(batch).logits, expected, atol=1e-6, rtol=0)


def test_cli_lists_models() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "models"], capture_output=True, text=True, check=True)
    for key, spec in REGISTRY.items():
        assert key in done.stdout and spec.hf_id in done.stdout


def test_directory_arch_is_inferred(tiny_dir: Any, tmp_path: Path) -> None:
    from pipeline.models import spec_from_directory

    assert spec_from_directory(tiny_dir("mt5")).arch == "seq2seq"
    assert spec_from_directory(tiny_dir("llama")).arch == "decoder_only"
    assert spec_from_directory(tiny_dir("xlmr")).arch == "encoder_only"
    config = json.loads((tiny_dir("bert") / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]


def test_weight_digests_are_remembered_so_a_rerun_reads_only_changed_files(
    tiny_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.models import hub

    model = shutil.copytree(tiny_dir("bert"), tmp_path / "model")
    read: list[str] = []
    real = hub._file_sha256
    monkeypatch.setattr(hub, "_file_sha256", lambda path: read.append(path.name) or real(path))
    memo = tmp_path / "cache"
    first = hub.content_hash(model, memo)
    n_files = len(read)
    assert n_files >= 3 and list((memo / "hashes").glob("*.json"))
    assert hub.content_hash(model, memo) == first and len(read) == n_files, "nothing changed, nothing read"
    with open(model / "config.json", "a") as fh:
        fh.write("\n")
    changed = hub.content_hash(model, memo)
    assert changed != first and read[n_files:] == ["config.json"], "only the changed file is read again"
    assert changed == hub.content_hash(model) == hub.content_hash(model, tmp_path / "fresh"), "the memo is exact"


def test_a_cache_hit_on_a_local_directory_reads_no_weights(
    tiny_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.extract import ExtractConfig, extract
    from pipeline.models import hub

    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "Hello world."}\n', encoding="utf-8")
    cfg = ExtractConfig(model=str(tiny_dir("bert")), data=str(data), cache_dir=str(tmp_path / "c"), quiet=True)
    first = extract(cfg)
    read: list[str] = []
    real = hub._file_sha256
    monkeypatch.setattr(hub, "_file_sha256", lambda path: read.append(path.name) or real(path))
    again = extract(cfg)
    assert again.cache_hit and again.key == first.key and read == []
