"""`make bench --quick` once, so the benchmark keeps working: every figure is there and sane.

No assertion on time: the figures checked are the ones the run itself can vouch for
(bytes on disk, padding, ratios that must be positive), against hand-derived bounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("*-quick.json")
    r = json.loads(result.read_text())
    assert r["quick"] is True and r["texts"] > 0
    for name in ("actcache", "bare", "st"):
        assert len(r["seconds"][name]) == 1 and r["seconds"][name][0] > 0
    assert r["overhead_vs_bare"] > 0 and r["vs_sentence_transformers"] > 0
    # Length-sorted batches pad less than batches in dataset order.
    assert 0 <= r["padding_ours"] < r["padding_dataset_order"]
    # float16 hidden states: at most 2 bytes a value plus chunk headers (no pad tokens
    # stored); float32 twice that, give or take compression.
    assert 0.5 < r["bytes_per_value_fp16"] <= 2.05
    assert 1.5 * r["bytes_per_value_fp16"] < r["bytes_per_value_fp32"] <= 4.1
    # Top-10 logits per token: 10 float32 values + 10 int32 ids + target log-prob and entropy
    # (float32) = 88 B before compression; chunk headers on a small store add a little.
    logits = r["logits"]
    assert 0 < logits["topk_bytes_per_token"] <= 1.1 * (10 * (4 + 4) + 2 * 4)
    assert logits["full_fp16_bytes_per_token"] == 2 * logits["vocab"]
    assert r["read"]["token_layer_mb_s"] > 0 and r["read"]["raw_npy_mb_s"] > 0
    assert r["rss_kib_1x"] > 0 and r["rss_kib_4x"] > 0
    resume = r["resume"]
    assert resume["tokens_after"] + resume["tokens_before_kill"] >= resume["tokens"] > 0
    assert resume["compute_ratio"] >= 1 and resume["wall_ratio"] > 0 and resume["shards"] >= 1
    assert "| measure | value | target |" in done.stdout
