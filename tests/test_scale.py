"""Set-up scales linearly in rows: reading a dataset's examples and their metadata never turns quadratic."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

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
    assert examples.metadata["note"].to_pylist()[:-1] == [None] * (len(examples) - 1), "a late column is None before it"
    return best


def test_load_examples_costs_4x_for_4x_rows_not_16x(tmp_path: Path) -> None:
    """A ratio measured in one run (the machine's speed cancels out): the per-row code before the fix took 14x
    for 4x rows; linear column work under a fixed cost of reading the file stays at or below 4x."""
    small = _seconds(_rows(tmp_path / "small.jsonl", ROWS), tmp_path / "arrow")
    large = _seconds(_rows(tmp_path / "large.jsonl", ROWS * SCALE), tmp_path / "arrow")
    assert large / small < 1.75 * SCALE, f"{SCALE}x rows cost {large / small:.1f}x ({small:.3f} s -> {large:.3f} s)"


def _python_heap_peak(path: Path, tokenizer: Any, work: Path) -> int:
    """Peak Python-heap bytes (tracemalloc) of loading `path`'s examples and tokenizing them."""
    from pipeline.tokenize import tokenize_examples

    spec = resolve_dataset(str(path))
    load_examples(spec, work / "arrow")  # datasets' Arrow copy made, imports warm
    tracemalloc.start()
    try:
        examples = load_examples(spec, work / "arrow")
        tokenize_examples(examples, tokenizer, max_length=64, cache_dir=work / "tokens", tok_hash="tiny-bert")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_examples_and_their_tokens_are_not_python_objects_per_row(tiny_dir: Any, tmp_path: Path) -> None:
    """Texts and metadata stay in Arrow memory from the file to the tokenized copy: each added row grows the
    Python heap's peak by a few bytes (numpy's row index and lengths), not by a string per text (a str
    alone is >= 49 B); what does not grow with rows is one tokenizer batch of Python lists."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("bert"))
    small = _python_heap_peak(_rows(tmp_path / "small.jsonl", ROWS), tokenizer, tmp_path)
    large = _python_heap_peak(_rows(tmp_path / "large.jsonl", ROWS * SCALE), tokenizer, tmp_path)
    per_row = (large - small) / (ROWS * (SCALE - 1))
    assert per_row < 24, f"{per_row:.0f} B of Python heap per added row ({small} -> {large} B)"
