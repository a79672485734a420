"""End to end: `extract` on tiny models of every family and on the real MiniLM, checked against
a direct Hugging Face forward of each example alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import transformers

from cache import open_activations, verify
from pipeline import plan, reduce
from pipeline import run as pipeline_run
from pipeline.extract import ExtractConfig, extract
from pipeline.run import RunHooks
from pipeline.staging import HostStaging
from schemas import ConfigError
from tests.checks import assert_float16_of
from tests.mappings import resident_kib
from tests.texts import SENTENCES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
FAMILY_CLASSES = {
    "bert": ("AutoModelForMaskedLM", ("encoder",)),
    "bert_plain": ("AutoModel", ("encoder",)),
    "xlmr": ("AutoModelForMaskedLM", ("encoder",)),
    "llama": ("AutoModelForCausalLM", ("decoder",)),
    "mt5": ("AutoModelForSeq2SeqLM", ("encoder", "decoder")),
}


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    rows = [{"id": i, "text": t, "language": "xx"} for i, t in enumerate(SENTENCES * 2)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


def run(model: str | Path, data: str | Path, cache: Path, **options: Any) -> Any:
    cfg = ExtractConfig(model=str(model), data=str(data), cache_dir=str(cache), quiet=True, **options)
    return extract(cfg, out=open(os.devnull, "w"))


def direct_forward(
    path: Path, family: str, text: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    auto, _ = FAMILY_CLASSES[family]
    model = getattr(transformers, auto).from_pretrained(path, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    kwargs: dict[str, Any] = {}
    if family == "mt5":
        start = torch.full((1, 1), model.config.decoder_start_token_id)
        kwargs["decoder_input_ids"] = torch.cat([start, ids[:, :-1]], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, **kwargs)
    if family == "mt5":
        stacks = {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
    else:
        stacks = {FAMILY_CLASSES[family][1][0]: out.hidden_states}
    return ids[0], stacks, getattr(out, "logits", None)


class _RecordingStaging(HostStaging):
    """The run's host staging, logging the order of its calls; each copy is handed back as a GPU's
    would be: an array that holds NaN until its event's `synchronize()` (logged) lands the values."""

    log: ClassVar[list[tuple[str, int]]] = []

    def target(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.log.append(("target", len(self.log)))
        return super().target(name, shape, dtype, device)

    def to_host(self, name: str, values: torch.Tensor) -> tuple[np.ndarray, Any]:
        array, _ = super().to_host(name, values)
        landed, batch = array.copy(), len(self.log)
        array[...] = np.nan  # in flight: a read before the wait stores NaN

        def synchronize(_: Any) -> None:
            self.log.append(("wait", batch))
            array[...] = landed

        self.log.append(("to_host", batch))
        return array, type("Copy", (), {"synchronize": synchronize})()


@pytest.mark.parametrize("family", ["bert", "mt5"])  # mT5: two stacks, two copies a batch
def test_a_gathered_batch_is_placed_after_its_copy_lands_and_before_the_next_batch_reuses_the_buffer(
    family: str, tiny_dir: Any, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol a GPU run depends on and a CPU run cannot show by itself: each batch's copies to
    the host are waited for once, before the batch is placed and before the next batch is gathered."""
    monkeypatch.setattr(reduce, "_DIRECT_TOKENS", 10**9)
    monkeypatch.setattr(pipeline_run, "HostStaging", _RecordingStaging)
    monkeypatch.setattr(_RecordingStaging, "log", [])
    path = tiny_dir(family)
    result = run(path, texts_file, tmp_path / "cache", store_dtype="float32", shard_tokens=60, batch_size=5)
    log, stacks = _RecordingStaging.log, len(FAMILY_CLASSES[family][1])
    assert result.manifest.complete and len(result.manifest.geometry.shards) > 2
    kinds = [kind for kind, _ in log]
    batches = kinds.count("target") // stacks
    per_batch = ["target"] * stacks + ["to_host"] * stacks + ["wait"] * stacks
    assert batches > len(result.manifest.geometry.shards) and kinds == per_batch * batches
    assert sorted(at for kind, at in log if kind == "wait") == [at for kind, at in log if kind == "to_host"]
    acts = open_activations(result.key, cache_dir=tmp_path / "cache")
    for i in (0, len(SENTENCES) + 1):
        for stack, states in direct_forward(path, family, (SENTENCES * 2)[i])[1].items():
            expected = torch.stack(states)[:, 0].numpy()
            np.testing.assert_allclose(acts.example(i).hidden[stack], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("place", ["direct", "gathered"])
@pytest.mark.parametrize("family", list(FAMILY_CLASSES))
def test_stored_values_equal_a_direct_forward_of_each_example(
    family: str, place: str, tiny_dir: Any, texts_file: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways hidden states reach the shard: cast straight into place per example, or gathered per batch."""
    monkeypatch.setattr(reduce, "_DIRECT_TOKENS", 0 if place == "direct" else 10**9)
    path = tiny_dir(family)
    cache = shared_cache / place
    result = run(path, texts_file, cache, store_dtype="float32", shard_tokens=60, batch_size=5, logits="topk:4")
    acts = open_activations(result.key, cache_dir=cache)
    assert result.manifest.complete and len(result.manifest.geometry.shards) > 2
    n_states = len(direct_forward(path, family, "x")[1][FAMILY_CLASSES[family][1][0]])
    assert acts.layers == tuple(range(n_states))
    texts = SENTENCES * 2
    assert acts.n_examples == len(texts)
    topk = {k: v.compute() for k, v in acts.logits_topk().items()} if family != "bert_plain" else None
    offsets = acts.offsets.compute()
    for i in range(0, len(texts), 3):
        ids, stacks, logits = direct_forward(path, family, texts[i])
        ex = acts.example(i)
        np.testing.assert_array_equal(ex.token_ids, ids.numpy())
        for stack, states in stacks.items():
            expected = torch.stack(states)[:, 0].numpy()  # (layers, tokens, hidden)
            np.testing.assert_allclose(ex.hidden[stack], expected, atol=1e-5, rtol=1e-5)
            mean = acts.pooled(-1, how="mean", stack=stack)[i].compute()
            np.testing.assert_allclose(mean, expected[-1].mean(0), atol=1e-5, rtol=1e-5)
            edge = "first" if stack == "encoder" else "last"
            edge_value = acts.pooled(2, how=edge, stack=stack)[i].compute()
            np.testing.assert_allclose(edge_value, expected[2][0 if edge == "first" else -1], atol=1e-5, rtol=1e-5)
        if topk is None:
            assert logits is None or family == "bert_plain"
            continue
        span = slice(offsets[i], offsets[i + 1])
        direct_top = torch.topk(logits[0], k=4, dim=-1)
        np.testing.assert_allclose(topk["values"][span], direct_top.values.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(topk["ids"][span], direct_top.indices.numpy())
        logp = torch.log_softmax(logits[0], -1)
        if family == "llama":  # position t scores the next token; the last has none
            expected_lp = logp[torch.arange(len(ids) - 1), ids[1:]].numpy()
            np.testing.assert_allclose(topk["target_logprob"][span][:-1], expected_lp, atol=1e-5, rtol=1e-5)
            assert np.isnan(topk["target_logprob"][span][-1])
        else:
            np.testing.assert_allclose(
                topk["target_logprob"][span], logp[torch.arange(len(ids)), ids].numpy(), atol=1e-5, rtol=1e-5
            )
        entropy = -(logp.exp() * logp).sum(-1).numpy()
        np.testing.assert_allclose(topk["entropy"][span], entropy, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mt5"])  # mT5: two stacks share the float32 buffer mean pooling uses
def test_mean_pooling_of_bfloat16_states_is_each_layers_float32_mean(
    family: str, tiny_dir: Any, texts_file: Path, tmp_path: Path
) -> None:
    """A model run in bfloat16: every layer's stored mean is the float32 mean of that layer's stored
    tokens (float32 store: the bfloat16 values exactly), which are a bfloat16 forward of the text alone."""
    path = tiny_dir(family)
    result = run(path, texts_file, tmp_path, dtype="bf16", store_dtype="float32", shard_tokens=60, batch_size=5)
    acts = open_activations(result.key, cache_dir=tmp_path)
    assert result.manifest.complete and len(result.manifest.geometry.shards) > 2
    texts = SENTENCES * 2
    for stack in FAMILY_CLASSES[family][1]:
        means = np.stack([acts.pooled(layer, how="mean", stack=stack).compute() for layer in acts.layers], axis=1)
        for i in range(0, len(texts), 3):
            tokens = acts.example(i).hidden[stack]  # (layers, tokens, hidden)
            np.testing.assert_allclose(means[i], tokens.mean(axis=1, dtype=np.float64), rtol=1e-5, atol=1e-6)
    for i in range(0, len(texts), 7):
        for stack, states in direct_forward(path, family, texts[i], torch.bfloat16)[1].items():
            expected = torch.stack(states)[:, 0].float().numpy()
            scale = np.abs(expected).max(axis=(1, 2), keepdims=True)  # a padded batch rounds a little apart
            assert np.all(np.abs(acts.example(i).hidden[stack] - expected) <= 0.05 * scale)


@pytest.mark.parametrize("family", ["bert", "xlmr", "llama", "mt5"])
def test_stored_special_mask_is_the_tokenizers_own(
    family: str, tiny_dir: Any, texts_file: Path, shared_cache: Path
) -> None:
    """Each example's stored `special_mask` is what its tokenizer says for the text alone: [CLS]/[SEP]
    (BERT), <s>/</s> (XLM-R), the begin-of-text token (Llama), the closing </s> (mT5)."""
    path = tiny_dir(family)
    # The options of test_stored_values_equal_a_direct_forward_of_each_example: its store, when it ran first.
    result = run(path, texts_file, shared_cache, store_dtype="float32", shard_tokens=60, batch_size=5, logits="topk:4")
    acts = open_activations(result.key, cache_dir=shared_cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    stored, ids, offsets = acts.special_mask.compute(), acts.token_ids.compute(), acts.offsets.compute()
    texts = SENTENCES * 2
    assert acts.n_examples == len(texts)
    for i, text in enumerate(texts):
        encoded = tokenizer(text, return_special_tokens_mask=True)
        span = slice(offsets[i], offsets[i + 1])
        np.testing.assert_array_equal(ids[span], encoded["input_ids"], err_msg=f"example {i}")
        np.testing.assert_array_equal(stored[span], encoded["special_tokens_mask"], err_msg=f"example {i}")
    expected_per_example = {"bert": 2, "xlmr": 2, "llama": 1, "mt5": 1}[family]
    assert int(stored.sum()) == expected_per_example * len(texts), "the mask marks the specials, and only them"


def test_float16_storage_is_within_float16_rounding(tiny_dir: Any, texts_file: Path, shared_cache: Path) -> None:
    path = tiny_dir("xlmr")
    result = run(path, texts_file, shared_cache, store_dtype="float16", layers="0,-1", logits="none")
    acts = open_activations(result.key, cache_dir=shared_cache)
    assert acts.layers == (0, 2)
    for i in (0, 5, 9):
        _, stacks, _ = direct_forward(path, "xlmr", (SENTENCES * 2)[i])
        expected = torch.stack(stacks["encoder"])[[0, 2], 0]
        assert_float16_of(acts.example(i).hidden["encoder"], expected)


def test_real_minilm_pooled_equals_sentence_transformers(minilm_path: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    result = run("minilm-l6", "sample", tmp_path / "c", store_dtype="float32", limit=12)
    acts = open_activations(model="minilm-l6", data="sample", cache_dir=tmp_path / "c")
    assert acts.key == result.key and acts.n_examples == 15 * 12 * 2
    texts = [
        row[field]
        for row in map(json.loads, (REPO / "pipeline/data/xnli_sample.jsonl").read_text(encoding="utf-8").splitlines())
        if row["pair"] < 12
        for field in ("premise", "hypothesis")
    ]
    assert acts.examples["language"].nunique() == 15
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, normalize_embeddings=True)
    pooled = acts.pooled(-1).compute()
    mine = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(mine, reference, atol=1e-5)


def test_rerun_is_a_cache_hit_without_loading_the_model(
    tiny_dir: Any, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run(tiny_dir("bert"), texts_file, tmp_path / "c")
    assert not first.cache_hit

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr("pipeline.models.load_model", refuse)
    second = run(tiny_dir("bert"), texts_file, tmp_path / "c", batch_size=7, shard_tokens=99)
    assert second.cache_hit and second.key == first.key and second.path == first.path
    changed = tiny_dir("bert")  # same model, other data: another key, so a real run
    with pytest.raises(AssertionError, match="must not load"):
        run(changed, texts_file, tmp_path / "c", limit=3)


@pytest.mark.parametrize("shard_tokens", [60, 100_000])
def test_a_run_makes_two_sets_of_shard_buffers_at_most_the_second_faulted_in_beside_the_first_shard(
    tiny_dir: Any, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard_tokens: int
) -> None:
    from pipeline.buffers import BufferPool

    calls = {"_new": 0, "prefault": 0}

    def counting(name: str) -> Any:
        real = getattr(BufferPool, name)

        def counted(self: BufferPool, *args: Any) -> Any:
            calls[name] += 1
            return real(self, *args)

        return counted

    for name in calls:
        monkeypatch.setattr(BufferPool, name, counting(name))
    result = run(tiny_dir("bert"), texts_file, tmp_path / "c", store_dtype="float32", shard_tokens=shard_tokens)
    several = len(result.manifest.geometry.shards) > 1
    assert several == (shard_tokens == 60)
    # The second set is made by `prefault` as the first shard starts; one shard needs none.
    assert calls == ({"_new": 2, "prefault": 1} if several else {"_new": 1, "prefault": 0})
    assert not any(t.name == "actcache-prefault" for t in threading.enumerate())
    # That the faulted-in set holds the batches' values, not the faults' zeros: every multi-shard
    # comparison with a direct forward above (test_stored_values_equal_a_direct_forward_of_each_example).


def test_default_shard_size_is_set_by_the_bytes_a_token_stores(
    tiny_dir: Any, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --shard-tokens a shard holds about DEFAULT_SHARD_BYTES of token arrays (a wide model's
    shards hold fewer tokens); the budget is shrunk here to 40 of a tiny Llama's tokens."""
    path = tiny_dir("llama")
    config = json.loads((path / "config.json").read_text())
    # By hand: token id (int32), special mask (int8), every state in float32, top-4 values and ids, log-prob, entropy.
    token_bytes = 4 + 1 + (config["num_hidden_layers"] + 1) * config["hidden_size"] * 4 + 4 * (4 + 4) + 4 + 4
    monkeypatch.setattr(plan, "DEFAULT_SHARD_BYTES", 40 * token_bytes + token_bytes // 2)
    monkeypatch.setattr(plan, "MIN_SHARD_TOKENS", 1)
    result = run(path, texts_file, tmp_path / "c", store_dtype="float32", batch_size=5, logits="topk:4")
    shards = result.manifest.geometry.shards
    assert result.manifest.provenance["shard_tokens"] == 40
    # ~500 tokens: one shard at the old fixed default, here shards closed at the first example block past 40
    assert len(shards) > 5 and all(s.n_tokens >= 40 for s in shards[:-1]), [s.n_tokens for s in shards]
    acts = open_activations(result.key, cache_dir=tmp_path / "c")
    for i in (0, len(SENTENCES) + 5, 2 * len(SENTENCES) - 1):
        ids, stacks, _ = direct_forward(path, "llama", (SENTENCES * 2)[i])
        np.testing.assert_array_equal(acts.example(i).token_ids, ids.numpy())
        expected = torch.stack(stacks["decoder"])[:, 0].numpy()
        np.testing.assert_allclose(acts.example(i).hidden["decoder"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_examples_arrow_pages_are_not_resident_while_the_shards_run(
    tiny_dir: Any, texts_file: Path, tmp_path: Path
) -> None:
    """The texts and metadata are read for the last time before the run (the store has the metadata):
    their memory-mapped pages are handed back, not kept resident through every shard."""
    cache = tmp_path / "c"
    under = str(cache / "datasets")

    class Look(RunHooks):
        def run_started(self) -> None:
            self.mapped = resident_kib(lambda a, b, path: path.startswith(under) and path.endswith(".arrow"))
            self.any_mapping = any(under in line for line in Path("/proc/self/maps").read_text().splitlines())

    look = Look()
    cfg = ExtractConfig(model=str(tiny_dir("bert")), data=str(texts_file), cache_dir=str(cache), quiet=True)
    assert extract(cfg, out=open(os.devnull, "w"), hooks=look).manifest.complete
    assert look.any_mapping, "the examples come from memory-mapped Arrow files under the cache root"
    assert look.mapped == 0


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    acts = open_activations(str(path))
    arrays = {name: np.asarray(acts._logical(name).compute()) for name in (a.name for a in acts.manifest.arrays)}
    arrays["offsets"] = acts.offsets.compute()
    return arrays


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tiny_dir: Any, texts_file: Path, tmp_path: Path) -> None:
    args = [
        sys.executable, "-m", "pipeline", "extract", "--model", str(tiny_dir("llama")), "--data", str(texts_file),
        "--shard-tokens", "24", "--batch-size", "2", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_cache, clean_cache = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([*args, "--cache-dir", str(killed_cache)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    markers: list[Path] = []
    deadline = time.monotonic() + 120
    while len(markers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        markers = list(killed_cache.glob("stores/*.zarr/shards/*.json"))
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = next(killed_cache.glob("stores/*.zarr"))
    done_before = len(list(store.glob("shards/*.json")))
    manifest = json.loads((store / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < done_before < len(manifest["geometry"]["shards"])
    resumed = subprocess.run(
        [*args, "--cache-dir", str(killed_cache)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(store)
    subprocess.run([*args, "--cache-dir", str(clean_cache)], cwd=REPO, env=env, check=True, capture_output=True)
    clean_store = next(clean_cache.glob("stores/*.zarr"))
    assert clean_store.name == store.name, "same request, same key"
    assert verify(str(store)).ok
    a, b = _store_arrays(store), _store_arrays(clean_store)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _mt5_cli(model: Path, data: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "extract", "--model", str(model), "--data", str(data), "--shard-tokens", "24",
        "--batch-size", "1", "--quiet", "--cache-dir", str(cache), "--summary-json", str(cache / "summary.json"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mt5_uninterrupted(tiny_dir: Any, texts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of an uninterrupted CLI run of the interrupted test's command."""
    cache = tmp_path_factory.mktemp("mt5-uninterrupted")
    args = _mt5_cli(tiny_dir("mt5"), texts_file, cache)
    subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True)
    return next(cache.glob("stores/*.zarr"))


@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_after_the_batch_in_hand_and_the_rerun_finishes(
    tiny_dir: Any, texts_file: Path, tmp_path: Path, mt5_uninterrupted: Path, signum: int, said: str
) -> None:
    cache = tmp_path / "c"
    cache.mkdir()
    args = _mt5_cli(tiny_dir("mt5"), texts_file, cache)
    # The same command plans the same shards. Batches hold one example and shards run in order, so
    # the process signalling itself after batch `stop_at` (deterministic: never "whenever the test got
    # round to it", so it cannot finish first) is in the middle of shard `mid`, shards before it done.
    shards = json.loads((mt5_uninterrupted / "manifest.json").read_text())["geometry"]["shards"]
    mid = next(s for s in shards[2:-1] if s["ex_stop"] - s["ex_start"] >= 2)
    stop_at = mid["ex_start"] + 1
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ACTCACHE_CRASH_AT": f"mid-batch:{stop_at}",
        "ACTCACHE_CRASH_SIGNAL": signal.Signals(signum).name,
    }
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signum, (done.returncode, done.stderr)  # 130 for Ctrl-C, 143 for SIGTERM
    store = next(cache.glob("stores/*.zarr"))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["geometry"]["shards"] == shards and not manifest["complete"]
    committed = sorted(int(p.stem) for p in store.glob("shards/*.json"))
    # After the batch in hand: the shards finished before it are committed, the one in hand is dropped.
    assert committed == list(range(mid["index"])), (committed, stop_at, shards)
    assert done.stderr.strip() == (
        f"actcache: stopped by {said} after {len(committed)} shard(s) were committed; "
        "rerun the same command to continue from there."
    )
    assert not list(store.glob("shards/*.claim")), "claims are released on a clean stop"
    report = verify(str(store))
    assert report.done == committed and not report.corrupt, "the shard in progress was dropped, not half-committed"
    env = {k: v for k, v in env.items() if not k.startswith("ACTCACHE_CRASH")}
    (cache / "summary.json").unlink(missing_ok=True)
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((cache / "summary.json").read_text())
    redo = sum(s["tok_stop"] - s["tok_start"] for s in shards if s["index"] not in committed)
    assert summary["tokens_computed"] == redo, "the rerun computes only the shards that were not committed"
    assert verify(str(store)).ok and json.loads((store / "manifest.json").read_text())["complete"]
    assert store.name == mt5_uninterrupted.name, "same request, same key"
    a, b = _store_arrays(store), _store_arrays(mt5_uninterrupted)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_extract_prints_the_path_last_and_store_commands_work(
    tiny_dir: Any, texts_file: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cache = ["--cache-dir", str(tmp_path / "c")]

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=check,
        )

    done = cli("extract", "--model", str(tiny_dir("bert")), "--data", str(texts_file), "--limit", "5", *cache)
    lines = done.stdout.strip().splitlines()
    store = Path(lines[-1])
    assert store.is_dir() and any(line.startswith("complete: 5 examples") for line in lines)
    listing = cli("ls", *cache).stdout
    assert store.name.removesuffix(".zarr") in listing and "complete" in listing
    shown = cli("show", str(store), *cache).stdout
    assert '"complete": true' in shown and "size on disk" in shown
    assert cli("verify", str(store), *cache).returncode == 0
    chunk = next(p for p in (store / "encoder_hidden_states" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-3])
    bad = cli("verify", str(store), *cache, check=False)
    assert bad.returncode == 1 and "corrupt shard 0" in bad.stdout and "reset to pending" in bad.stdout
    redo = cli("extract", "--model", str(tiny_dir("bert")), "--data", str(texts_file), "--limit", "5", *cache)
    assert Path(redo.stdout.strip().splitlines()[-1]) == store and cli("verify", str(store), *cache).returncode == 0
    help_text = cli("extract", "--help").stdout
    for option in (
        "--layers",
        "--logits",
        "--store-dtype",
        "--shard-tokens",
        "--cache-dir",
        "--force",
        "examples:",
    ):
        assert option in help_text


def test_bad_inputs_fail_clearly_before_any_work(tiny_dir: Any, texts_file: Path, tmp_path: Path) -> None:
    from pipeline.datasets import DatasetNotAvailableError

    model = tiny_dir("bert")
    cache = tmp_path / "c"
    with pytest.raises(ConfigError, match=r"no column 'sentence'; its columns are \['id', 'text', 'language'\]"):
        run(model, texts_file, cache, text_columns=("sentence",))
    with pytest.raises(ConfigError, match=r"no split 'validation'; it has \['train'\]"):
        run(model, texts_file, cache, split="validation")
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        run(model, texts_file, cache, layers="0,9")
    with pytest.raises(ConfigError, match="'topk:K' with K >= 1"):
        run(model, texts_file, cache, logits="topk:0")
    with pytest.raises(ConfigError, match="above the 1e-06 GB limit.*--logits topk:K"):
        run(model, texts_file, cache, logits="full", max_full_logits_gb=1e-6)
    with pytest.raises(DatasetNotAvailableError, match="unknown dataset 'nosuch'.*sample"):
        run(model, "nosuch", cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"could not read .*broken.jsonl'?: line 2 is not valid JSON"):
        run(model, broken, cache)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text\nok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="line 3 is not valid UTF-8"):
        run(model, latin1, cache)
    assert not list(cache.glob("stores/*.zarr")), "nothing written for bad input"


def test_xnli_offline_without_cache_names_dataset_and_fix(
    tiny_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.datasets import DatasetNotAvailableError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DatasetNotAvailableError) as err:
        run(tiny_dir("bert"), "xnli", tmp_path / "c", limit=2)
    message = str(err.value)
    assert "'facebook/xnli'" in message and str(tmp_path / "hf") in message and "--data path.jsonl" in message


def test_empty_and_long_texts_are_stored_and_counted(tiny_dir: Any, tmp_path: Path) -> None:
    data = tmp_path / "odd.csv"
    data.write_text("text,label\n,0\n   ,1\n" + '"' + "bank " * 200 + '",2\nshort,3\n', encoding="utf-8")
    result = run(tiny_dir("xlmr"), data, tmp_path / "c", logits="none")
    assert result.summary["truncated"] == 1 and result.summary["empty"] == 2
    acts = open_activations(result.key, cache_dir=tmp_path / "c")
    lengths = np.diff(acts.offsets.compute())
    assert lengths.tolist()[:2] == [2, 2] and lengths[2] == 64  # <s></s> and the model's maximum
    assert acts.examples["label"].tolist() == [0, 1, 2, 3]


def test_same_rows_in_any_file_format_or_place_are_the_same_dataset(tiny_dir: Any, tmp_path: Path) -> None:
    import pandas as pd

    rows = pd.DataFrame({"text": SENTENCES[:6], "label": list(range(6))})
    files = {
        "jsonl": tmp_path / "a" / "rows.jsonl",
        "json": tmp_path / "b" / "rows.json",
        "csv": tmp_path / "c" / "rows.csv",
        "parquet": tmp_path / "d" / "rows.parquet",
    }
    for path in files.values():
        path.parent.mkdir()
    rows.to_json(files["jsonl"], orient="records", lines=True, force_ascii=False)
    rows.to_json(files["json"], orient="records", force_ascii=False)
    rows.to_csv(files["csv"], index=False)
    rows.to_parquet(files["parquet"])
    results = {fmt: run(tiny_dir("bert"), path, tmp_path / "cache", logits="none") for fmt, path in files.items()}
    assert len({r.key for r in results.values()}) == 1, "a dataset is identified by its rows, not its file"
    assert [r.cache_hit for r in results.values()] == [False, True, True, True]
    acts = open_activations(results["csv"].key, cache_dir=tmp_path / "cache")
    assert acts.examples["label"].tolist() == list(range(6))
    rows.iloc[::-1].to_csv(files["csv"], index=False)
    assert run(tiny_dir("bert"), files["csv"], tmp_path / "cache", logits="none").key != results["csv"].key
