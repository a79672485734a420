"""Stage 2, tokenize: the cached token columns equal the tokenizer's own call, for every family and pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline import tokenize
from pipeline.datasets import load_examples, resolve_dataset
from pipeline.residency import MappedRanges
from pipeline.tokenize import _encoder, tokenize_examples
from tests.mappings import resident_kib
from tests.texts import SENTENCES

pytestmark = pytest.mark.unit

MAX_LENGTH = 24  # short enough that a good share of the sample is cut


@pytest.mark.parametrize("family", ["bert", "xlmr", "mt5", "llama"])
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_token_columns_equal_the_tokenizers_call_and_truncation_is_counted(
    tiny_dir: Any, tmp_path: Path, family: str, pair: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In batches of 64 (the sample's 420 examples or 210 pairs take several): each equal to the call's."""
    monkeypatch.setattr(tokenize, "_BATCH", 64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir(family))
    settings = (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)
    examples = load_examples(resolve_dataset("sample", pair=pair), tmp_path / "arrow")
    seen: list[int] = []
    tokenized = tokenize_examples(
        examples, tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "tok", tok_hash=family, progress=seen.append
    )
    texts = [examples.text(i) for i in range(len(examples))]
    columns = ([a for a, _ in texts], [b for _, b in texts]) if pair else (texts,)
    want = tokenizer(*columns, truncation=True, max_length=MAX_LENGTH, return_special_tokens_mask=True)
    whole = tokenizer(*columns, return_special_tokens_mask=True)["input_ids"]
    table = tokenized.dataset.with_format("arrow")[:]
    for name in ("input_ids", "special_tokens_mask", "token_type_ids"):
        if name in tokenizer.model_input_names or name == "special_tokens_mask":
            assert table.column(name).to_pylist() == want[name], name
        else:
            assert name not in table.column_names
    assert tokenized.lengths.tolist() == [len(ids) for ids in want["input_ids"]]
    cut = [len(ids) > MAX_LENGTH for ids in whole]
    assert table.column("truncated").to_pylist() == cut and tokenized.n_truncated == sum(cut) > 0
    assert sum(seen) == len(examples) and len(seen) == -(-len(examples) // 64)
    assert (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding) == settings, "left as found"
    # Both encoders agree: the Rust backend's batch and the tokenizer's own call.
    through_call = _encoder(tokenizer, MAX_LENGTH, pair, fast=False)([list(c) for c in columns])
    through_backend = _encoder(tokenizer, MAX_LENGTH, pair)([list(c) for c in columns])
    assert {k: through_call[k] for k in through_backend} == through_backend


def test_a_rerun_reads_the_cached_file_and_a_crash_leaves_no_half_file(tiny_dir: Any, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("bert"))
    examples = load_examples(resolve_dataset("sample"), tmp_path / "arrow")

    def boom(n: int) -> None:
        raise KeyboardInterrupt  # stopped after the first batch was written

    with pytest.raises(KeyboardInterrupt):
        tokenize_examples(examples, tokenizer, max_length=32, cache_dir=tmp_path / "tok", tok_hash="t", progress=boom)
    assert list((tmp_path / "tok").iterdir()) == [], "no partial file left, none to be reused"
    first = tokenize_examples(examples, tokenizer, max_length=32, cache_dir=tmp_path / "tok", tok_hash="t")
    (cached,) = (tmp_path / "tok").iterdir()
    stamp = cached.stat().st_mtime_ns
    again = tokenize_examples(examples, tokenizer, max_length=32, cache_dir=tmp_path / "tok", tok_hash="t")
    assert cached.stat().st_mtime_ns == stamp and again.lengths.tolist() == first.lengths.tolist()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_read_pages_of_the_arrow_files_leave_the_resident_set_and_read_right_again(
    tiny_dir: Any, tmp_path: Path
) -> None:
    """A run reads one shard's token columns at a time: the pages of the tokenized file read before
    leave the resident set (else a run ends with the whole file resident, ~150 MB per million short
    texts), and so do the examples' once the store has them; every slice still reads the tokenizer's ids."""
    texts = SENTENCES * 2000  # 32,000 texts: a tokenized file of a few MB
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("bert"))
    examples = load_examples(resolve_dataset(str(data)), tmp_path / "arrow")
    tokenized = tokenize_examples(examples, tokenizer, max_length=64, cache_dir=tmp_path / "tok", tok_hash="bert")
    size = Path(tokenized.dataset.cache_files[0]["filename"]).stat().st_size
    assert tokenized.mapped is not None and tokenized.mapped.nbytes >= size > 2 << 20
    ranges = set(tokenized.mapped.ranges)
    want = tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    step, peak = len(texts) // 16, 0
    for start in [*range(0, len(texts), step), 0]:  # and the first slice again, after its pages went
        got = tokenized.flat(start, start + step)["input_ids"]
        np.testing.assert_array_equal(got, np.concatenate(want[start : start + step]))
        peak = max(peak, resident_kib(lambda a, b, _: (a, b) in ranges) * 1024)
    assert peak < size / 4, f"{peak} bytes of a {size}-byte file resident: earlier slices' pages stayed"

    assert [examples.text(i) for i in range(0, len(texts), 997)] == texts[::997]  # every page of the texts read
    mapped = MappedRanges([examples.texts, examples.metadata])
    examples_ranges = set(mapped.ranges)
    before = resident_kib(lambda a, b, _: (a, b) in examples_ranges)
    assert mapped.ranges and before > 0
    mapped.release()
    assert resident_kib(lambda a, b, _: (a, b) in examples_ranges) < before / 4
    assert examples.texts.column("text").to_pylist() == texts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_only_read_only_mappings_of_arrow_files_are_ever_released(tmp_path: Path) -> None:
    """Pages that may not be the file's (in memory, mapped writable, another kind of file) are never
    advised: there MADV_DONTNEED would zero data instead of reading it again."""
    import pyarrow as pa

    table = pa.table({"x": np.arange(1 << 18, dtype=np.int64)})
    assert MappedRanges([table]).ranges == []
    for name in ("t.arrow", "t.feather"):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)

    def mapped(name: str, mode: str) -> pa.Table:
        return pa.ipc.open_file(pa.memory_map(str(tmp_path / name), mode)).read_all()

    read_only = mapped("t.arrow", "r")
    assert MappedRanges([read_only]).ranges, "the read-only .arrow mapping is found"
    assert MappedRanges([mapped("t.arrow", "r+")]).ranges == []
    assert MappedRanges([mapped("t.feather", "r")]).ranges == []
    assert read_only.column("x").to_numpy().tolist() == table.column("x").to_numpy().tolist()


def test_counting_a_cut_text_whole_warns_nothing(tiny_dir: Any) -> None:
    """Truncation is counted by tokenizing the few texts cut to max_length again, whole; transformers
    would warn that such a sequence "will result in indexing errors", which is false for what is stored
    (a user saw it on every `extract --quiet` of long texts)."""
    import logging

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("bert"))
    tokenizer.model_max_length = MAX_LENGTH  # the texts below run past the model's length
    texts = [" ".join(SENTENCES[:4]), SENTENCES[0]]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    source = logging.getLogger("transformers.tokenization_utils_base")
    level = source.level
    source.addHandler(handler)
    source.setLevel(logging.WARNING)
    try:
        encoded = _encoder(tokenizer, MAX_LENGTH, False)([texts])
        assert encoded["truncated"] == [True, False]
        assert not [r.getMessage() for r in records if "sequence length" in r.getMessage()]
        tokenizer(texts[0])  # the control: the call itself warns (once per tokenizer)
        assert [r for r in records if "sequence length" in r.getMessage()], "the control warned"
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
