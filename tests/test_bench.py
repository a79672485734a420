"""The benchmark's main pieces still run, on small data: a smoke test, not a benchmark.

The measurements belong to `make bench` (`ARGS=--quick` runs every one of them, in about a
minute). Here the actcache contender runs once through the command and wrapper `bench/run.py`
times, the figures it derives from that run are checked against hand-derived bounds (bytes on
disk, padding), never against time, and the bare forward loop runs on the same texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run as bench
from bench.contenders import bare, texts_of

pytestmark = pytest.mark.integration

N_TEXTS = 40


def test_bench_pieces_run_on_small_data(minilm_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    assert bench.write_texts(data, copies=1, limit=N_TEXTS) == N_TEXTS
    texts = texts_of(data)
    assert len(texts) == len(set(texts)) == N_TEXTS

    # The actcache contender: the CLI command the bench times, in the wrapper that times it.
    seconds, peak_kib = bench.timed(bench.extract_cmd("minilm-l6", data, tmp_path / "run", "--logits", "none"))
    assert seconds > 0 and peak_kib > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name in ("path", "padding_share", "stage_seconds", "writer_seconds", "tokens", "tokens_computed", "shards"):
        assert name in summary, f"bench/run.py reads {name!r} from --summary-json"
    assert summary["tokens_computed"] == summary["tokens"] > 0
    # Length-sorted batches pad less than batches in dataset order.
    assert 0 <= summary["padding_share"] < bench.padding_in_dataset_order(str(minilm_path), data)
    # float16 hidden states: at most 2 bytes a value plus chunk headers (no pad tokens stored).
    assert 0.5 < bench.hidden_bytes_per_value(Path(summary["path"])) <= 2.05

    # The bare forward loop contender, on the same texts.
    bare(str(minilm_path), texts, bench.BATCH, 256)


@pytest.mark.parametrize(("shape", "n_texts"), [("xlmr-base", 60), ("llama3-8b", 12)])
def test_standin_store_holds_what_the_standin_returned(shape: str, n_texts: int, tmp_path: Path) -> None:
    """The store-path bench's zero-cost model through the real pipeline: a complete store whose
    hidden states are, token by token, the bank rows the stand-in handed out for that example."""
    import io

    import numpy as np
    import torch

    from bench import standin
    from cache import open_activations
    from pipeline.extract import ExtractConfig, extract

    data = tmp_path / "texts.jsonl"
    bench.write_texts(data, copies=1, limit=n_texts)
    directory = standin.checkpoint(shape, tmp_path / "standin")
    runner = standin.StandIn(directory, record=True)
    cfg = ExtractConfig(
        model=str(directory), data=str(data), cache_dir=str(tmp_path / "cache"), logits="none", quiet=True,
        batch_size=8, shard_tokens=128,
    )  # fmt: skip
    result = extract(cfg, out=io.StringIO(), runner=runner)
    assert result.manifest.complete and len(result.manifest.geometry.shards) > 1
    assert result.manifest.request["model"]["hf_id"] == str(directory.resolve())  # its own key, no real model's

    acts = open_activations(str(result.path))
    offsets, ids = np.asarray(acts.offsets), np.asarray(acts.token_ids)
    example_of = {tuple(ids[offsets[e] : offsets[e + 1]].tolist()): e for e in range(n_texts)}
    assert len(example_of) == n_texts  # the texts are numbered: every example is told apart by its tokens
    assert acts.layers == tuple(range(runner.shape.n_states))
    hidden = [np.asarray(acts.hidden(layer, lazy=False)) for layer in acts.layers]
    seen = []
    for batch_ids, mask, offset, stride in runner.calls:
        for row in range(batch_ids.shape[0]):
            n = int(mask[row].sum())
            example = example_of[tuple(batch_ids[row, :n].tolist())]
            seen.append(example)
            bank_rows = offset + row * stride + torch.arange(n)
            for layer in acts.layers:
                expected = runner.bank[layer, bank_rows].to(torch.float16).numpy()
                np.testing.assert_array_equal(hidden[layer][offsets[example] : offsets[example + 1]], expected)
    assert sorted(seen) == list(range(n_texts))  # each example computed once, and every one stored
