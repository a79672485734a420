"""Every way a user can ask for a model wrongly ends in one clear error that names the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.models import coerce_device, load_model, resolve_dtype
from pipeline.models.quantization import bitsandbytes_config
from schemas import (
    ActcacheError,
    CheckpointError,
    ConfigError,
    ModelNotAvailableError,
    QuantizationUnsupportedError,
    UnknownModelError,
    UnsafeCheckpointError,
)

pytestmark = pytest.mark.unit


def test_unknown_model_lists_the_known_keys() -> None:
    with pytest.raises(UnknownModelError) as err:
        load_model("labse-xxl")
    message = str(err.value)
    assert "'labse-xxl'" in message
    for key in ("labse", "llama3", "mbert", "minilm", "minilm-l6", "mt5", "xlmr"):
        assert key in message
    assert isinstance(err.value, ActcacheError) and isinstance(err.value, LookupError)


def test_offline_without_a_local_copy_names_id_cache_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    # Offline resolution fails at once: no connection or DNS lookup is tried (Python's own audit
    # events see every one), and nothing waits to try again.
    network: list[str] = []
    watching = [True]  # an audit hook cannot be removed: it stops recording after this call

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if watching and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"):
            network.append(f"{event}{args!r}")

    sys.addaudithook(audit)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    try:
        with pytest.raises(ModelNotAvailableError) as err:
            load_model("labse", device="cpu")
    finally:
        watching.clear()
    assert network == [], "offline resolution must not touch the network"
    assert sleeps == [], "offline resolution must not sit in a retry loop"
    message = str(err.value)
    assert "'sentence-transformers/LaBSE'" in message
    assert str(tmp_path / "empty-hf" / "hub") in message
    assert "HF_HUB_OFFLINE" in message and "local model directory" in message
    assert err.value.__cause__ is None, "no chained traceback from deep inside huggingface_hub"
    assert isinstance(err.value, FileNotFoundError)


def test_offline_pinned_revision_absent_names_the_revision(
    tiny_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from schemas import ModelSpec

    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(tiny_dir("bert"), repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableError, match="at revision 'v2.0'"):
        load_model(ModelSpec(name="t", hf_id="org/tiny", arch="encoder_only"), revision="v2.0")


@pytest.mark.parametrize("bad", ["fp8", "int8", "float64", "", "bf 16"])
def test_invalid_dtype_lists_the_accepted_names(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_dtype(bad)
    assert repr(bad) in str(err.value)
    for name in ("bf16", "bfloat16", "fp16", "fp32", "float32", "half"):
        assert name in str(err.value)


def test_invalid_dtype_through_load_model_fails_before_loading() -> None:
    with pytest.raises(ConfigError, match="invalid dtype 'int4'"):
        load_model("minilm-l6", dtype="int4")


def test_resolve_dtype_accepts_every_spelling() -> None:
    assert resolve_dtype("bfloat16") is resolve_dtype("BF16") is resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("half") is resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None, default="fp32") is torch.float32
    with pytest.raises(ConfigError, match="unsupported dtype"):
        resolve_dtype(torch.int8)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0", -1, True, 1.5, "cpu:0:1"])
def test_invalid_device_lists_the_accepted_forms(bad: Any) -> None:
    with pytest.raises(ConfigError) as err:
        coerce_device(bad)
    assert "'auto', 'cpu', 'cuda', 'cuda:N'" in str(err.value)


def test_coerce_device_forms() -> None:
    assert coerce_device("cpu") == coerce_device(" CPU ") == coerce_device(torch.device("cpu"))
    assert coerce_device(None).type in {"cpu", "cuda"} and coerce_device("auto") == coerce_device(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_on_a_machine_without_gpu_says_so() -> None:
    with pytest.raises(ConfigError, match="sees no CUDA GPU.*--device cpu"):
        coerce_device("cuda:0")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        coerce_device(0)


def test_bitsandbytes_missing_is_a_clear_error(tiny_dir: Any) -> None:
    # A fresh interpreter in which bitsandbytes cannot be imported, as on a machine without it.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from pipeline.models import load_model\n"
        "from schemas import QuantizationUnsupportedError\n"
        "try:\n"
        f"    load_model({str(tiny_dir('llama'))!r}, device='cpu', quantization=8)\n"
        "except QuantizationUnsupportedError as e:\n"
        "    print('ERROR:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERROR: 8-bit loading needs bitsandbytes" in done.stdout
    assert "pip install 'bitsandbytes" in done.stdout and "quantization=False" in done.stdout


def test_bitsandbytes_on_an_unsupported_device_is_a_clear_error() -> None:
    with pytest.raises(QuantizationUnsupportedError) as err:
        bitsandbytes_config(4, torch.device("meta"), torch.float32)
    assert "'meta'" in str(err.value) and "cpu" in str(err.value) and "cuda" in str(err.value)


def test_quantization_bits_must_be_4_or_8(tiny_dir: Any) -> None:
    with pytest.raises(ConfigError, match="supports 8 or 4"):
        load_model(tiny_dir("llama"), device="cpu", quantization=3)


def test_quantizing_an_encoder_is_refused(tiny_dir: Any) -> None:
    with pytest.raises(ConfigError, match="decoder-only.*quantization=False"):
        load_model(tiny_dir("bert"), device="cpu", quantization=8)


def test_pickle_only_checkpoint_is_refused(tiny_dir: Any, tmp_path: Path) -> None:
    target = shutil.copytree(tiny_dir("bert"), tmp_path / "pickled")
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle"):
        load_model(target, device="cpu")


def test_directory_without_weights_is_refused(tiny_dir: Any, tmp_path: Path) -> None:
    target = shutil.copytree(tiny_dir("bert"), tmp_path / "noweights")
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weight files"):
        load_model(target, device="cpu")


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty", device="cpu")


def test_remote_code_stays_off_unless_asked(tiny_dir: Any, tmp_path: Path) -> None:
    target = shutil.copytree(tiny_dir("bert"), tmp_path / "remote")
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code=True"):
        load_model(target, device="cpu")


def test_tokenize_rejects_empty_and_non_text(tiny_dir: Any) -> None:
    runner = load_model(tiny_dir("bert"), device="cpu")
    with pytest.raises(ConfigError, match="no texts"):
        runner.tokenize([])
    with pytest.raises(ConfigError, match="item 1 is NoneType"):
        runner.tokenize(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="needs a batch with 'input_ids'"):
        runner.forward({})


def test_empty_text_is_special_tokens_only(tiny_dir: Any) -> None:
    runner = load_model(tiny_dir("bert"), device="cpu")
    batch = runner.tokenize(["", "   "])
    assert batch["attention_mask"].sum(1).tolist() == [2, 2]  # [CLS] [SEP]
    out = runner.forward(batch)
    assert torch.isfinite(out.encoder_hidden_states[-1]).all()


def test_unknown_decoder_input_policy(tiny_dir: Any) -> None:
    with pytest.raises(ConfigError, match="unknown decoder_input policy 'teacher'"):
        load_model(tiny_dir("mt5"), device="cpu", decoder_input="teacher")


def test_long_text_is_truncated_at_the_model_limit(tiny_dir: Any) -> None:
    runner = load_model(tiny_dir("xlmr"), device="cpu")
    batch = runner.tokenize(["bank " * 500])
    assert batch["input_ids"].shape[1] == runner.max_length == 64
    assert torch.isfinite(runner.forward(batch).encoder_hidden_states[-1]).all()


def _copy(tiny_dir: Any, tmp_path: Path, family: str = "bert") -> Path:
    return shutil.copytree(tiny_dir(family), tmp_path / f"broken-{family}")


def test_a_model_directory_without_tokenizer_files_is_refused(tiny_dir: Any, tmp_path: Path) -> None:
    """transformers would build an empty tokenizer: every word [UNK], stored and cached as if real."""
    target = _copy(tiny_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).unlink()
    with pytest.raises(CheckpointError, match="holds no tokenizer vocabulary.*save_pretrained"):
        load_model(target, device="cpu")


@pytest.mark.parametrize("family", ["bert", "llama", "mt5"])
def test_a_config_with_fewer_layers_than_the_weights_is_refused(tiny_dir: Any, tmp_path: Path, family: str) -> None:
    """Weights the config has no place for are dropped by transformers without a word: refused, named."""
    target = _copy(tiny_dir, tmp_path, family)
    config = json.loads((target / "config.json").read_text())
    config[{"mt5": "num_layers"}.get(family, "num_hidden_layers")] -= 1
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not fit its config.json .*unexpected"):
        load_model(target, device="cpu")


@pytest.mark.parametrize("family", ["bert", "llama", "mt5"])
def test_a_config_with_more_layers_than_the_weights_is_refused(tiny_dir: Any, tmp_path: Path, family: str) -> None:
    target = _copy(tiny_dir, tmp_path, family)
    config = json.loads((target / "config.json").read_text())
    field = {"mt5": "num_layers"}.get(family, "num_hidden_layers")
    config[field] += 2
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not fit its config.json .*missing \(would be random\)"):
        load_model(target, device="cpu")


def test_weights_of_the_wrong_size_are_refused(tiny_dir: Any, tmp_path: Path) -> None:
    target = _copy(tiny_dir, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] += 8
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong size|size mismatch"):
        load_model(target, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_file_is_named(tiny_dir: Any, tmp_path: Path, damage: str) -> None:
    target = _copy(tiny_dir, tmp_path)
    weights = target / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) - 100] if damage == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors' is not a whole safetensors file"):
        load_model(target, device="cpu")


def test_a_damaged_pickle_file_is_named(tiny_dir: Any, tmp_path: Path) -> None:
    target = _copy(tiny_dir, tmp_path)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(b"not a torch archive" * 10)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin' is not a whole torch.save archive"):
        load_model(target, device="cpu", allow_pickle=True)


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "holds a JSON list, not an object"),
        ({"hidden_size": "big"}, "hidden_size is 'big', not a whole"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers is 2.5, not a whole"),
        ({"num_hidden_layers": True}, "num_hidden_layers is True, not a whole"),
        ({"num_attention_heads": -2}, "num_attention_heads is -2, not a whole"),
    ],
)
def test_a_config_that_is_not_an_object_of_whole_sizes_is_refused(
    tiny_dir: Any, tmp_path: Path, config: Any, message: str
) -> None:
    target = _copy(tiny_dir, tmp_path)
    if isinstance(config, dict):
        config = json.loads((target / "config.json").read_text()) | config
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(target, device="cpu")
