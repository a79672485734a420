"""Set-up scales linearly in rows: reading a dataset's examples and their metadata never turns quadratic."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.datasets import load_examples, resolve_dataset

pytestmark = pytest.mark.unit

ROWS = 10_000
SCALE = 4


def _rows(path: Path, n: int) -> Path:
    with path.open("w") as out:
        for i in range(n):
            row = {"text": f"sentence {i}", "id": i, "language": ("en", "de", "fr")[i % 3]}
            if i == n - 1:
                row["note"] = "a column first seen on the last row"
            out.write(json.dumps(row) + "\n")
    return path


def _seconds(path: Path, arrow: Path) -> float:
    spec = resolve_dataset(str(path))
    load_examples(spec, arrow)  # datasets' Arrow copy made, imports warm: what is left is ours
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        examples = load_examples(spec, arrow)
        best = min(best, time.perf_counter() - started)
    assert examples.metadata["note"][:-1] == [None] * (len(examples) - 1), "a late column is None before it"
    return best


def test_load_examples_costs_4x_for_4x_rows_not_16x(tmp_path: Path) -> None:
    """A ratio measured in one run (the machine's speed cancels out): linear is ~4, quadratic ~14 here."""
    small = _seconds(_rows(tmp_path / "small.jsonl", ROWS), tmp_path / "arrow")
    large = _seconds(_rows(tmp_path / "large.jsonl", ROWS * SCALE), tmp_path / "arrow")
    assert large / small < 1.75 * SCALE, f"{SCALE}x rows cost {large / small:.1f}x ({small:.3f} s -> {large:.3f} s)"
