"""Stage 2, tokenize: examples -> token ids, special-token masks and lengths, before any forward pass.

Texts go from the examples' Arrow column to the tokenizer's Rust backend a batch at a time,
and the ids into an Arrow file cached under the actcache root by the hash of (rows,
tokenizer, kwargs), so a rerun or a resume reuses it instead of tokenizing again (both
hashes are `cache.keys.Hasher` digests). The file is what a `datasets` map would write,
opened as a memory-mapped `datasets.Dataset`.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.keys import hash_value
from pipeline.dataset_tables import quiet_datasets
from pipeline.datasets import Examples
from pipeline.residency import MappedRanges

__all__ = ["Tokenized", "tokenize_examples", "tokenizer_hash"]

_TOKEN_COLUMNS = ("input_ids", "special_tokens_mask", "token_type_ids")
_VERSION = 3  # of the tokenized columns: a change here must never reuse an older cache file


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of a tokenizer: its full tokenizers-library definition, not a file path."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # Without a fast backend, the vocabulary itself (sorted pairs) stands for the definition.
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map, "side": tokenizer.padding_side}
    return hash_value(definition, extra, length=None)


@dataclass(frozen=True)
class Tokenized:
    """Token ids per example (dataset order), in an Arrow-backed `datasets.Dataset`.

    Columns: ``input_ids``, ``special_tokens_mask``, ``length``, ``truncated`` and
    ``token_type_ids`` where the tokenizer makes them.
    """

    dataset: Any
    lengths: np.ndarray
    max_length: int
    n_truncated: int
    mapped: MappedRanges | None = None  # the file's mapping, whose read pages `flat` hands back

    @classmethod
    def open(cls, path: Path, max_length: int) -> Tokenized:
        """A tokenized file as `tokenize_examples` wrote it, memory-mapped, with its lengths and truncation count."""
        import datasets

        with quiet_datasets():
            dataset = datasets.Dataset.from_file(str(path))
        table = dataset.with_format("arrow")[:]
        lengths = table.column("length").to_numpy().astype(np.int64)
        n_truncated = int(np.count_nonzero(table.column("truncated").to_numpy(zero_copy_only=False)))
        return cls(dataset, lengths, max_length, n_truncated, MappedRanges([table]))

    def flat(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The token columns of examples [start, stop), examples back to back (one Arrow read).

        The file's pages that earlier calls read are handed back first: a run reads each shard's
        once, and the views returned before still read right (their pages fault in again)."""
        if self.mapped is not None:
            self.mapped.release()
        table = self.dataset.with_format("arrow")[start:stop]
        return {
            name: table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            for name in _TOKEN_COLUMNS
            if name in table.column_names
        }


def tokenize_examples(
    examples: Examples,
    tokenizer: Any,
    *,
    max_length: int,
    cache_dir: Path,
    tok_hash: str,
    progress: Callable[[int], object] | None = None,
) -> Tokenized:
    """Tokenize every example, truncating at `max_length` and recording which were truncated.

    Equal to `tokenizer(texts, truncation=True, max_length=max_length,
    return_special_tokens_mask=True)`; `progress` is called with each batch's count of examples.
    """
    pair = examples.spec.pair
    fingerprint = hash_value(examples.content_hash, tok_hash, max_length, pair, _VERSION, length=32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{fingerprint}.arrow"
    if not path.is_file():
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            _write_tokens(partial, examples, tokenizer, max_length, progress)
            os.replace(partial, path)  # whole or not at all: a crash leaves no half file to reuse
        finally:
            partial.unlink(missing_ok=True)
    elif progress is not None:
        progress(len(examples))
    return Tokenized.open(path, max_length)


_BATCH = 4096  # examples per tokenizer call: the Python strings and lists in memory at once


def _write_tokens(
    path: Path, examples: Examples, tokenizer: Any, max_length: int, progress: Callable[[int], object] | None
) -> None:
    """The tokenized columns of `examples`, written batch by batch as an Arrow stream (what `datasets` reads)."""
    import pyarrow as pa

    encode = _encoder(tokenizer, max_length, examples.spec.pair)
    names = examples.texts.column_names  # "text", and "text_pair" with --pair
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for start in range(0, max(1, len(examples)), _BATCH):
            texts = [examples.texts.column(c).slice(start, _BATCH).to_pylist() for c in names]
            batch = _record_batch(encode(texts))
            if writer is None:
                writer = pa.ipc.new_stream(sink, batch.schema)
            writer.write_batch(batch)
            if progress is not None:
                progress(batch.num_rows)
        assert writer is not None
        writer.close()


Encoded = dict[str, Any]  # column -> one list per example (`truncated`: one bool each)


def _encoder(tokenizer: Any, max_length: int, pair: bool, *, fast: bool = True) -> Callable[[list[list[str]]], Encoded]:
    """A function of one batch of texts (one list per text column) -> its token columns and `truncated`:
    through the tokenizer's Rust backend where it has one (and `fast`), else through its own call."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None) if fast else None
    want_types = "token_type_ids" in tokenizer.model_input_names
    specials = tokenizer.num_special_tokens_to_add(pair=pair)

    def truncated(columns: list[list[str]], lengths: list[int]) -> list[bool]:
        # Only an example cut to exactly max_length can have been truncated: count the whole
        # text of those few again instead of tokenizing every text twice.
        flags = [False] * len(lengths)
        maybe = [i for i, n in enumerate(lengths) if n >= max_length]
        if maybe:
            again = [[col[i] for i in maybe] for col in columns]
            # verbose=False: untruncated on purpose, so transformers' "longer than the specified
            # maximum ... will result in indexing errors" would be false (what is stored is cut).
            raw = [tokenizer(col, add_special_tokens=False, verbose=False)["input_ids"] for col in again]
            for j, i in enumerate(maybe):
                flags[i] = sum(len(col[j]) for col in raw) + specials > max_length
        return flags

    if backend is not None:
        # A copy set as tokenizer(..., truncation=True, max_length=...) sets its own backend before it
        # encodes: the caller's tokenizer is left as it was.
        rust = type(backend).from_str(backend.to_str())
        rust.no_padding()
        rust.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
        rust.encode_special_tokens = bool(tokenizer.split_special_tokens)

    def through_backend(columns: list[list[str]]) -> Encoded:
        # encode_batch_fast: the same encodings without character offsets, which nothing here reads.
        encodings = rust.encode_batch_fast(list(zip(*columns, strict=True)) if pair else columns[0])
        out: Encoded = {
            "input_ids": [e.ids for e in encodings],
            "special_tokens_mask": [e.special_tokens_mask for e in encodings],
        }
        if want_types:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        out["truncated"] = truncated(columns, [len(ids) for ids in out["input_ids"]])
        return out

    def through_call(columns: list[list[str]]) -> Encoded:  # a tokenizer without a Rust backend
        done = tokenizer(*columns, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        out: Encoded = {k: done[k] for k in _TOKEN_COLUMNS if k in done}
        out["truncated"] = truncated(columns, [len(ids) for ids in out["input_ids"]])
        return out

    return through_backend if backend is not None else through_call


_TYPES = {"input_ids": "int32", "special_tokens_mask": "int8", "token_type_ids": "int8"}  # as `datasets` stores them


def _record_batch(encoded: Encoded) -> Any:
    """Token lists -> Arrow list columns (one flat numpy copy each), plus `length` and `truncated`."""
    import pyarrow as pa

    ids = encoded["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = {}
    for name in _TOKEN_COLUMNS:
        if name in encoded:
            flat = np.fromiter(
                itertools.chain.from_iterable(encoded[name]), dtype=_TYPES[name], count=int(lengths.sum())
            )
            columns[name] = pa.ListArray.from_arrays(offsets, pa.array(flat))
    columns["length"] = pa.array(lengths)
    columns["truncated"] = pa.array(encoded["truncated"], pa.bool_())
    return pa.record_batch(columns)
