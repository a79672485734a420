"""One hasher for every content address: each value hashed with its type, stable across processes."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache.keys import KEY_LENGTH, Hasher, cache_key, hash_value
from pipeline.datasets import load_examples, resolve_dataset
from schemas.store import SCHEMA_VERSION
from tests import storegen

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
WHEN = dt.datetime(2024, 5, 17, 9, 30, 0)


@pytest.mark.parametrize(
    "values",
    [
        [1, "1", 1.0, True, np.int64(1), np.float32(1.0), decimal.Decimal("1"), [1], (1,)],
        [0, False, None, "None", "", 0.0, -0.0, b"", [], (), {}],
        [WHEN, WHEN.isoformat(), str(WHEN), WHEN.date(), WHEN.date().isoformat(), WHEN.time()],
        [b"abc", "abc", "b'abc'", [97, 98, 99]],
        [decimal.Decimal("1.5"), "1.5", 1.5, decimal.Decimal("1.50")],
        [["a", "b"], "ab", ("a", "b"), ["ab"], ["a", ["b"]], {"a": "b"}],
        [math.nan, math.inf, -math.inf, "nan", "inf", None],
        [dt.timedelta(seconds=1), 1, dt.timedelta(microseconds=1_000_000 - 1)],
        [np.array([1, 2]), [1, 2], np.array([1, 2], dtype=np.int32), np.array([[1, 2]]), np.array([1.0, 2.0])],
    ],
    ids=["one", "empty", "datetime", "bytes", "decimal", "containers", "nonfinite", "timedelta", "numpy"],
)
def test_values_that_print_alike_hash_apart(values: list[Any]) -> None:
    digests = [hash_value(v) for v in values]
    assert len(set(digests)) == len(values), [(v, d) for v, d in zip(values, digests, strict=True)]


def test_what_is_the_same_value_hashes_the_same() -> None:
    assert hash_value({"a": 1, "b": [None, 2.5]}) == hash_value({"b": [None, 2.5], "a": 1}), "key order"
    assert hash_value({2: "x", "2": "y"}) == hash_value({"2": "y", 2: "x"}), "keys of mixed types"
    assert hash_value(math.nan) == hash_value(-math.nan) == hash_value(float("nan")), "every NaN is one value"
    big = np.arange(12, dtype="<i8").reshape(3, 4)
    assert hash_value(big) == hash_value(big.astype(">i8")) == hash_value(np.asfortranarray(big)), "byte order, layout"
    assert hash_value(b"xy") == hash_value(bytearray(b"xy")) == hash_value(memoryview(b"xy")), "bytes-like"
    assert hash_value("a", "b") != hash_value("ab") and hash_value("a", "b") != hash_value(["a", "b"])
    assert len(hash_value("x")) == KEY_LENGTH and len(hash_value("x", length=None)) == 64


def test_the_encoding_is_what_the_docstring_says() -> None:
    """Spelled out by hand: a tag byte, an 8-byte big-endian length or count, the payload."""

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    n = (2).to_bytes(8, "big")
    assert hash_value("ab", length=None) == sha(b"s" + n + b"ab")
    assert hash_value(None, True, False, length=None) == sha(b"NTF")
    assert hash_value(-12, length=None) == sha(b"i" + (3).to_bytes(8, "big") + b"-12")
    assert hash_value(["a", 1.5], length=None) == sha(
        b"l" + n + b"s" + (1).to_bytes(8, "big") + b"a" + b"f" + bytes.fromhex("3ff8000000000000")  # IEEE 754 1.5
    )


def test_what_cannot_be_hashed_by_type_is_refused_by_name() -> None:
    hasher = Hasher().update("before")
    expected = hasher.hexdigest()
    for value in ({1, 2}, object(), Path("x"), [1, {"deep": frozenset()}]):
        with pytest.raises(TypeError, match=r"cannot hash a (set|object|pathlib\.\w*Path|frozenset) value .*Fix: "):
            hasher.update(value)
    assert hasher.hexdigest() == expected, "a refused value adds nothing"
    with pytest.raises(ValueError, match="1 to 64 hex characters, got 65"):
        hasher.hexdigest(65)


def test_cache_keys_are_the_sha256_of_the_canonical_json_as_before() -> None:
    request = storegen.request()
    text = json.dumps(
        {"schema_version": SCHEMA_VERSION, "request": request.to_dict()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    assert cache_key(request) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


VALUE = {"text": "Er hat den Scheck eingereicht.", "when": WHEN, "price": decimal.Decimal("2.50"), "ids": [1, 2]}


def test_digests_are_stable_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 3}) + "\n" for i in range(6)))
    code = (
        "import sys, datetime as dt, decimal, numpy as np\n"
        "from cache.keys import hash_value\n"
        "from pipeline.datasets import load_examples, resolve_dataset\n"
        f"when = dt.datetime{WHEN.timetuple()[:6]}\n"
        "value = {'ids': [1, 2], 'price': decimal.Decimal('2.50'), 'when': when, "
        "'text': 'Er hat den Scheck eingereicht.'}\n"
        "print(hash_value(value, np.arange(5, dtype=np.float32), length=None))\n"
        f"print(load_examples(resolve_dataset({str(data)!r}), None).content_hash)\n"
    )
    outs = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed, "HF_DATASETS_CACHE": str(tmp_path / seed)}
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outs.add(done.stdout)
    here = hash_value(VALUE, np.arange(5, dtype=np.float32), length=None)
    rows = load_examples(resolve_dataset(str(data)), tmp_path / "arrow").content_hash
    assert outs == {f"{here}\n{rows}\n"}


def _parquet(path: Path, meta: Any) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["the bank", "die Bank"], "meta": meta}), path)
    return path


@pytest.mark.parametrize(
    ("typed", "spelled"),
    [
        ([WHEN, WHEN.replace(hour=10)], [str(WHEN), str(WHEN.replace(hour=10))]),
        ([decimal.Decimal("1.10"), decimal.Decimal("2.00")], ["1.10", "2.00"]),
        ([b"\x00\x01", b"ab"], [str(b"\x00\x01"), str(b"ab")]),
    ],
    ids=["datetime", "decimal", "bytes"],
)
def test_datasets_whose_metadata_differ_only_in_type_get_different_hashes(
    tmp_path: Path, typed: list[Any], spelled: list[str]
) -> None:
    """A column of values and a column of their str() spellings are different datasets, with different keys."""
    a = load_examples(resolve_dataset(str(_parquet(tmp_path / "typed.parquet", typed))), tmp_path / "arrow")
    b = load_examples(resolve_dataset(str(_parquet(tmp_path / "spelled.parquet", spelled))), tmp_path / "arrow")
    assert a.texts.equals(b.texts), "the same texts"
    assert [str(v) for v in a.metadata["meta"].to_pylist()] == b.metadata["meta"].to_pylist(), "they print alike"
    assert a.content_hash != b.content_hash
    again = load_examples(resolve_dataset(str(_parquet(tmp_path / "copy.parquet", typed))), tmp_path / "arrow")
    assert again.content_hash == a.content_hash, "the same rows in another file are the same dataset"


def test_a_jsonl_number_and_its_string_are_different_datasets(tmp_path: Path) -> None:
    files = {}
    for name, meta in (("number", 1), ("string", "1"), ("float", 1.0), ("bool", True)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(json.dumps({"text": "the bank", "meta": meta}) + "\n")
    hashes = {n: load_examples(resolve_dataset(str(f)), tmp_path / "arrow").content_hash for n, f in files.items()}
    assert len(set(hashes.values())) == len(files), hashes


def _column_digest(column: Any) -> str:
    return Hasher().update_column(column).hexdigest()


def test_an_arrow_column_hashes_by_its_values_not_its_buffers() -> None:
    """The ways one column's values come out of a .jsonl, .csv or .parquet hash alike; other values do not."""
    import pyarrow as pa

    text = pa.array(["the bank", None, "", "die Bank", "银行"])
    alike = [
        text,
        pa.chunked_array([text[:2], text[2:]]),
        pa.array(["x", *text.to_pylist()]).slice(1),  # a slice: its offsets start mid-buffer
        pa.array(["x", *text.to_pylist()], pa.large_string()).slice(1),
        text.cast(pa.large_string()),
        text.cast(pa.string_view()),
        text.dictionary_encode(),
    ]
    assert len({_column_digest(c) for c in alike}) == 1
    ints = pa.array([1, None, 3])
    assert _column_digest(ints) == _column_digest(ints.cast(pa.int32())) == _column_digest(pa.chunked_array([ints]))
    assert _column_digest(pa.nulls(3)) == _column_digest(pa.nulls(3, pa.string())), "nulls only: .jsonl vs .parquet"
    floats = pa.array([1.5, float("nan"), None])
    assert _column_digest(floats) == _column_digest(pa.array([1.5, -float("nan"), None], pa.float32()))
    apart = [
        text,
        pa.array(["the bank", "", "", "die Bank", "银行"]),  # a null is not an empty text
        pa.array(["the bank", None, "", "die Bank", "银"]),  # one character less in one row
        pa.array(["the ban", None, "k", "die Bank", "银行"]),  # the same bytes and nulls, cut elsewhere
        pa.array([b"the bank", None, b"", b"die Bank", "银行".encode()]),  # bytes are not text
        pa.array(["the bank", None, "", "die Bank"]),
        ints,
        pa.array(["1", None, "3"]),
        pa.array([1.0, None, 3.0]),
        pa.array([True, None, True]),
        pa.array([1, 0, 3]),  # 0 is not a null
        pa.array([WHEN, None, WHEN]),  # timestamps: value by value, as `update` would
        pa.array([str(WHEN), None, str(WHEN)]),
        pa.nulls(3),
    ]
    digests = [_column_digest(c) for c in apart]
    assert len(set(digests)) == len(apart), digests


def test_a_changed_row_column_or_pairing_changes_the_dataset_hash(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "other": f"more {i}", "label": i % 3} for i in range(50)]

    def digest(rows: list[dict[str, Any]], name: str, **options: Any) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_examples(resolve_dataset(str(path), **options), tmp_path / "arrow").content_hash

    base = digest(rows, "base")
    assert digest(rows, "copy") == base, "the same rows under another name"
    changed = [dict(r) for r in rows]
    changed[37]["text"] = "row 37!"
    relabelled = [dict(r) for r in rows]
    relabelled[3]["label"] = 4
    others = {
        digest(changed, "changed"),
        digest(relabelled, "relabelled"),
        digest(rows[:-1], "shorter"),
        digest(rows, "two", text_columns=("text", "other")),
        digest(rows, "swapped", text_columns=("other", "text")),
        digest(rows, "pair", text_columns=("text", "other"), pair=True),
        digest(rows, "limited", limit=10),
    }
    assert base not in others and len(others) == 7
