"""bitsandbytes on this CPU: the layer shapes its kernels take, and one clear error where they cannot.

The tests hold on either kind of x86 CPU: with AVX512-BF16 bitsandbytes runs 4-bit layers
through a packed kernel that needs in_features % 64 == 0 and out_features % 32 == 0
(`bitsandbytes.functional._convert_weight_packed_for_cpu`); without it, any shape runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch

from pipeline.models import load_model
from pipeline.models.quantization import packed_4bit_cpu, unsupported_shape
from schemas import QuantizationUnsupportedError
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_the_shape_rule_is_what_the_packed_kernel_needs() -> None:
    assert unsupported_shape(4, CPU, 64, 32, packed=True) == ""
    assert unsupported_shape(4, CPU, 128, 96, packed=True) == ""
    assert unsupported_shape(4, CPU, 32, 64, packed=True) == "in_features 32 is not a multiple of 64"
    assert unsupported_shape(4, CPU, 64, 48, packed=True) == "out_features 48 is not a multiple of 32"
    assert unsupported_shape(4, CPU, 96, 16, packed=True) == (
        "out_features 16 is not a multiple of 32 and in_features 96 is not a multiple of 64"
    )
    # Only the packed CPU kernel is picky: other CPUs, 8 bits and CUDA take any shape.
    assert unsupported_shape(4, CPU, 32, 16, packed=False) == ""
    assert unsupported_shape(8, CPU, 32, 16, packed=True) == ""
    assert unsupported_shape(4, torch.device("cuda"), 32, 16, packed=True) == ""


@pytest.mark.parametrize("n_in, n_out", [(32, 32), (64, 32), (64, 48), (96, 64), (128, 64), (64, 128), (48, 96)])
def test_the_shape_rule_matches_the_real_kernel_on_this_cpu(n_in: int, n_out: int) -> None:
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) * 0.1, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    why = unsupported_shape(4, CPU, n_in, n_out, packed=packed_4bit_cpu())
    try:
        with torch.inference_mode():
            layer(torch.randn(3, n_in))
    except (RuntimeError, AssertionError) as exc:
        assert why, f"the rule accepts {n_in} -> {n_out}, but the kernel failed: {exc}"
    else:
        assert not why, f"the rule refuses {n_in} -> {n_out} ({why}), but the kernel ran"


def test_a_llama_too_narrow_for_this_cpus_4bit_kernel_is_refused_before_loading(
    tiny_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_dir("llama")  # hidden 32: every layer is narrower than the packed kernel's 64
    if not packed_4bit_cpu():  # this CPU takes any shape: the same model loads and runs in 4 bits
        runner = load_model(path, device="cpu", dtype="fp32", quantization=4)
        assert type(runner.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
        assert runner.forward(runner.tokenize(SENTENCES[:2])).logits.isfinite().all()
        return
    import transformers

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the shapes were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(QuantizationUnsupportedError) as err:
        load_model(path, device="cpu", dtype="fp32", quantization=4)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj (32 -> 32: in_features 32 is not a multiple of 64)" in message
    assert "--no-quantize" in message and "other bit width" in message and "GPU" in message


def test_extract_refuses_such_a_model_in_one_line_before_any_work(tiny_dir: Any, tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "Hello world."}\n{"text": "Hallo Welt."}\n', encoding="utf-8")
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "pipeline", "extract", "--model", str(tiny_dir("llama")), "--data", str(data),
            "--quantize", "4", "--device", "cpu", "--dtype", "fp32", "--quiet", "--cache-dir", str(cache)]  # fmt: skip
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    if not packed_4bit_cpu():
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actcache: error: bitsandbytes cannot run"), done.stderr
    assert "in_features 32 is not a multiple of 64" in lines[0] and "--no-quantize" in lines[0]
    assert not (cache / "tokenized").exists() and not list(cache.glob("stores/*")), "nothing was written"


@pytest.mark.parametrize("bits, kernel", [(4, "matmul_4bit"), (8, "matmul")])
def test_a_kernel_that_computes_wrong_values_stops_the_load(
    tiny_dir: Any, monkeypatch: pytest.MonkeyPatch, bits: int, kernel: str
) -> None:
    path = tiny_dir("llama_wide")
    load_model(path, device="cpu", dtype="fp32", quantization=bits)  # the real kernel passes the probe
    real = getattr(bnb, kernel)
    # Right numbers in the wrong places, as a kernel reading its weights in the wrong layout gives.
    monkeypatch.setattr(bnb, kernel, lambda *a, **k: real(*a, **k).flip(-1))
    with pytest.raises(QuantizationUnsupportedError) as err:
        load_model(path, device="cpu", dtype="fp32", quantization=bits)
    message = str(err.value)
    assert "computes wrong values" in message and "layer model.layers.0.self_attn.q_proj" in message
    assert "--no-quantize" in message


def test_a_kernel_that_fails_stops_the_load_with_the_layer_named(
    tiny_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("N must be divisible by block_n")

    monkeypatch.setattr(bnb, "matmul_4bit", broken)
    with pytest.raises(QuantizationUnsupportedError) as err:
        load_model(tiny_dir("llama_wide"), device="cpu", dtype="fp32", quantization=4)
    message = str(err.value)
    assert "layer model.layers.0.self_attn.q_proj (Linear4bit, 64 -> 64)" in message
    assert "N must be divisible by block_n" in message and "--no-quantize" in message
