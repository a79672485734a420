"""Rows -> examples: texts and metadata in dataset order, built column-wise in Arrow, against rows written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import datasets as datasets_module
from pipeline.datasets import load_examples, resolve_dataset

pytestmark = pytest.mark.unit

ROWS = [
    {"text": "a b", "other": "x", "id": 1, "language": "en"},
    {"text": None, "other": " ", "id": 2, "language": "de", "late": "q"},
    {"text": "c", "other": "y", "id": 3, "language": "en", "field": "its own"},
    {"text": "d", "other": "z", "id": 4, "language": "en"},
]


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _meta(examples: object) -> dict[str, list[object]]:
    return examples.metadata.to_pydict()  # type: ignore[attr-defined]


def test_two_text_columns_are_examples_row_by_row_with_the_rows_metadata(
    rows: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One text column with a missing value (null) and one without: both kinds of Arrow column interleave.
    Empty texts are counted over slices of 3 examples (a pass over the texts copies one slice)."""
    monkeypatch.setattr(datasets_module, "_SLICE", 3)
    examples = load_examples(resolve_dataset(str(rows), text_columns=("text", "other")), tmp_path / "arrow")
    assert [examples.text(i) for i in range(len(examples))] == ["a b", "x", "", " ", "c", "y", "d", "z"]
    meta = _meta(examples)
    assert meta["id"] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert meta["row"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert meta["field"] == ["text", "other"] * 4, "the example's own field wins over a column of that name"
    assert meta["late"] == [None, None, "q", "q", None, None, None, None]
    assert examples.n_empty() == 2


def test_pairs_and_a_limit_per_language(rows: Path, tmp_path: Path) -> None:
    pairs = load_examples(resolve_dataset(str(rows), text_columns=("text", "other"), pair=True), tmp_path / "arrow")
    assert [pairs.text(i) for i in range(len(pairs))] == [("a b", "x"), ("", " "), ("c", "y"), ("d", "z")]
    assert _meta(pairs)["field"] == [None, None, "its own", None], "with --pair a field column is the row's"
    assert pairs.n_empty() == 1, "empty only where both sides are"
    limited = load_examples(resolve_dataset(str(rows), limit=2), tmp_path / "arrow")
    assert _meta(limited)["id"] == [1, 2, 3], "the first two rows of each language, in dataset order"
    assert _meta(limited)["row"] == [0, 1, 2]


def test_the_arrow_cache_holds_one_copy_of_a_file_and_a_selection_is_its_rows(rows: Path, tmp_path: Path) -> None:
    """A file's rows are kept once as Arrow (no second file as big as the dataset's); a split that
    selects rows through an indices mapping still gives those rows, not the table under it."""
    import datasets

    from pipeline.dataset_tables import _split

    examples = load_examples(resolve_dataset(str(rows)), tmp_path / "arrow")
    assert [examples.text(i) for i in range(len(examples))] == ["a b", "", "c", "d"]
    copies = sorted(p.name for p in (tmp_path / "arrow").rglob("*.arrow"))
    assert len(copies) == 1, f"one Arrow copy of the file, not {copies}"
    loaded = datasets.Dataset.from_list(ROWS).select([3, 1])
    assert loaded.data.num_rows == 4, "the control: select keeps the table and maps indices"
    picked = _split(datasets.DatasetDict({"train": loaded}), resolve_dataset(str(rows)))
    assert picked.data.table.column("id").to_pylist() == [4, 2]
