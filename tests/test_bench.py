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
