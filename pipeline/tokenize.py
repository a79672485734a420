"""Stage 2, tokenize: examples -> token ids, special-token masks and lengths, before any forward pass.

Runs as a batched `datasets` map whose result is cached under the actcache root by the
hash of (rows, tokenizer, kwargs), so a rerun or a resume reuses it instead of
tokenizing again. Both hashes are `cache.keys.Hasher` digests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.keys import hash_value
from pipeline.dataset_tables import quiet_datasets
from pipeline.datasets import Examples

__all__ = ["Tokenized", "tokenize_examples", "tokenizer_hash"]

_TOKEN_COLUMNS = ("input_ids", "special_tokens_mask", "token_type_ids")
_VERSION = 2  # of the tokenized columns: a change here must never reuse an older cache file


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

    def flat(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The token columns of examples [start, stop), examples back to back (one Arrow read)."""
        table = self.dataset.with_format("arrow")[start:stop]
        return {
            name: table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            for name in _TOKEN_COLUMNS
            if name in table.column_names
        }


def tokenize_examples(
    examples: Examples, tokenizer: Any, *, max_length: int, cache_dir: Path, tok_hash: str
) -> Tokenized:
    """Tokenize every example, truncating at `max_length` and recording which were truncated."""
    import datasets

    pair = examples.spec.pair
    columns = (
        {"a": [t[0] for t in examples.texts], "b": [t[1] for t in examples.texts]} if pair else {"a": examples.texts}
    )
    fingerprint = hash_value(examples.content_hash, tok_hash, max_length, pair, _VERSION, length=32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    specials = tokenizer.num_special_tokens_to_add(pair=pair)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        args = (batch["a"], batch["b"]) if pair else (batch["a"],)
        out = tokenizer(*args, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        result = {k: out[k] for k in _TOKEN_COLUMNS if k in out}
        result["length"] = [len(ids) for ids in out["input_ids"]]
        # Only an example cut to exactly max_length can have been truncated: count the whole
        # text of those few again instead of tokenizing every text twice.
        truncated = [False] * len(result["length"])
        maybe = [i for i, n in enumerate(result["length"]) if n >= max_length]
        if maybe:
            again = [[col[i] for i in maybe] for col in args]
            raw = [tokenizer(col, add_special_tokens=False)["input_ids"] for col in again]
            for j, i in enumerate(maybe):
                truncated[i] = sum(len(col[j]) for col in raw) + specials > max_length
        result["truncated"] = truncated
        return result

    with quiet_datasets():  # no "Map:" progress bar; the user's setting is back on return
        dataset = datasets.Dataset.from_dict(columns)
        tokenized = dataset.map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=list(columns),
            cache_file_name=str(cache_dir / f"{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            load_from_cache_file=True,
        )
    if not len(tokenized):
        return Tokenized(tokenized, np.zeros(0, np.int64), max_length, 0)
    table = tokenized.with_format("arrow")[:]
    lengths = table.column("length").to_numpy().astype(np.int64)
    n_truncated = int(np.count_nonzero(table.column("truncated").to_numpy(zero_copy_only=False)))
    return Tokenized(tokenized, lengths, max_length, n_truncated)
