"""The lazy reader: `open_activations(...)` -> `Activations`, Dask arrays over a store.

Opening reads the manifest and the shard markers' names, nothing else; every array is a
Dask graph over the Zarr chunks until `.compute()`. Token-level arrays are shown on the
logical token axis (no gaps between shards, no padding anywhere): example i is tokens
``offsets[i]:offsets[i+1]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from cache.catalog import find_store, read_manifest
from cache.chunkio import ChunkFiles
from cache.integrity import committed
from cache.paths import alias_name, cache_root
from cache.views import StoreView
from cache.zattrs import root_attributes
from schemas import ConfigError, IncompleteStoreError, StoreCorruptError
from schemas.arrays import ArraySpec
from schemas.store import (
    LOGITS_ENTROPY,
    LOGITS_FULL,
    LOGITS_TARGET_LOGPROB,
    LOGITS_TOPK_IDS,
    LOGITS_TOPK_VALUES,
    OFFSETS,
    SPECIAL_MASK,
    TOKEN_IDS,
    TOKEN_START,
    TOKEN_STOP,
    hidden_name,
    pooled_name,
)

__all__ = ["Activations", "Example", "open_activations"]


def open_activations(
    ref: str | os.PathLike[str] | None = None,
    *,
    model: str | None = None,
    data: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_partial: bool = False,
) -> Activations:
    """Open a store by key, alias or path, or by `model=` and `data=` names.

    >>> acts = open_activations(model="labse", data="xnli")      # doctest: +SKIP
    >>> acts.pooled(layer=6)                                      # (n_examples, hidden), lazy
    >>> acts.hidden(layer=-1)[acts.offsets[3].compute():acts.offsets[4].compute()]

    An incomplete store is an error naming the missing shards, unless `allow_partial`,
    which shows the committed shards only (their examples, in dataset order).
    """
    root = cache_root(cache_dir)
    if ref is None:
        if model is None or data is None:
            raise ConfigError("open_activations needs a key, alias or path, or both model= and data=")
        ref = alias_name(model, data)
    path = find_store(ref, root, complete_only=True)
    manifest = read_manifest(path)
    shards = manifest.geometry.shards
    if not manifest.complete:
        done = tuple(committed(path, shards))
        if not allow_partial:
            missing = [s.index for s in shards if s not in done]
            raise IncompleteStoreError(
                f"store {manifest.key} is incomplete: {len(done)}/{len(shards)} shards done, missing "
                f"shards {missing[:20]}{' ...' if len(missing) > 20 else ''}. Fix: rerun the same "
                "extract command to finish it, or pass allow_partial=True to read the done shards."
            )
        shards = done
    return Activations(path, manifest, tuple(shards))


# Values read before a text column may be judged mostly distinct from what was read so far (else: from
# all of it): a column of unique ids then skips the vocabulary after its first chunk.
_EVIDENCE = 16_384


def _text_column(chunks: Iterable[np.ndarray], n: int) -> Any:
    """A text column read chunk by chunk. Where values repeat (language, field, an id shared by
    translations) it is a pandas Categorical with sorted categories: one string object per distinct
    value, not one per example, and one chunk's strings decoded at a time (the table of a million
    examples is then tens of MB, not hundreds). Mostly distinct values stay an object array of
    Python str (pandas 3 keeps them as its `str` dtype)."""
    import pandas as pd

    vocabulary: dict[str, int] = {}
    codes = np.empty(n, dtype=np.int32)
    distinct: list[np.ndarray] = []  # the chunks as read, once most values have proved distinct
    start = 0
    for values in chunks:
        if distinct or len(vocabulary) > (n if start < _EVIDENCE else start) // 2:
            distinct.append(values)
            continue
        local, uniques = pd.factorize(values)  # hashing, in C
        lookup = np.array([vocabulary.setdefault(str(u), len(vocabulary)) for u in uniques], dtype=np.int32)
        codes[start : start + len(values)] = lookup[local]
        start += len(values)
    names = np.array(list(vocabulary), dtype=object)
    if distinct or len(vocabulary) > n // 2:
        return np.concatenate([names[codes[:start]], *distinct])
    order = np.argsort(names)
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return pd.Categorical.from_codes(rank[codes], categories=names[order].tolist())


@dataclass(frozen=True)
class Example:
    """One example's ragged slice: its tokens and, per stack, (layer, n_tokens, hidden) states."""

    index: int
    token_ids: np.ndarray
    special_mask: np.ndarray
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class Activations(StoreView):
    """Lazy view of one store (or of its committed shards, for a partial read).

    Dimensions: `hidden` (token, hidden); `pooled` (example, hidden); `token_ids`,
    `special_mask` (token,); `offsets` (example + 1,); `logits_topk()` values/ids
    (token, k), target_logprob/entropy (token,). Layers index the model's hidden-states
    tuple (0 = embeddings); negative ones count from the last.
    """

    def __repr__(self) -> str:
        state = "complete" if self.manifest.complete else f"partial: {len(self.shards)} shards"
        return (
            f"<Activations {self.key} {self.n_examples} examples, {self.n_tokens} tokens, "
            f"layers {list(self.layers)}, stacks {list(self.stacks)} ({state})>"
        )

    @property
    def layers(self) -> tuple[int, ...]:
        """Stored hidden-state indices (0 = embeddings)."""
        return self.manifest.layers

    @property
    def stacks(self) -> tuple[str, ...]:
        return self.manifest.stacks

    def _layer_position(self, layer: int) -> int:
        n = self.manifest.n_states
        if not -n <= layer < n:
            raise ConfigError(
                f"layer {layer} is out of range for a model with {n} hidden states "
                f"(0 = embeddings ... {n - 1}; negative counts from the last)"
            )
        try:
            return self.layers.index(layer % n)
        except ValueError:
            raise ConfigError(
                f"layer {layer} was not stored; store {self.key} holds layers {list(self.layers)}. "
                "Fix: pick one of those, or extract again with --layers including it."
            ) from None

    def _stack(self, stack: str | None) -> str:
        if stack is None:
            return self.stacks[-1] if len(self.stacks) == 1 else "encoder"
        if stack not in self.stacks:
            raise ConfigError(f"store {self.key} has no {stack!r} stack; it has {list(self.stacks)}")
        return stack

    # -- public arrays ---------------------------------------------------------------------

    def hidden(self, layer: int, stack: str | None = None, *, lazy: bool = True) -> Any:
        """Token-level hidden states of `layer`: dask (n_tokens, hidden), ragged via `offsets`.

        `lazy=False` returns numpy, read at once near disk speed (Dask's `.compute()` adds a copy).
        """
        return self._logical(hidden_name(self._stack(stack)), self._layer_position(layer), lazy=lazy)

    def pooled(self, layer: int, how: str = "mean", stack: str | None = None, *, lazy: bool = True) -> Any:
        """Per-example pooled states of `layer`: dask (n_examples, hidden). `how`: mean, first, last.

        `lazy=False` returns numpy, read at once.
        """
        return self._logical(self._pooled_name(how, stack), self._layer_position(layer), lazy=lazy)

    def pooled_rows(self, layer: int, start: int, stop: int, how: str = "mean", stack: str | None = None) -> np.ndarray:
        """Examples [start, stop) of `pooled(layer, how, stack)`, read now: a block of an out-of-core job.

        Reads only the chunks those rows lie in (a slice of the lazy array would decode
        its whole Dask block, ~64 MiB, for each slice).
        """
        name = self._pooled_name(how, stack)
        if not 0 <= start <= stop <= self.n_examples:
            raise IndexError(f"rows [{start}, {stop}) out of range: this view has {self.n_examples} examples")
        spec, position = self._spec(name), self._layer_position(layer)
        files = self._files(spec)
        if files is not None:
            return self._read(spec, files, (position,), start, stop)
        return np.asarray(self._logical(name, position)[start:stop].compute())

    @property
    def example_chunk(self) -> int:
        """Examples per chunk of the per-example arrays: blocks of a multiple of it read no chunk twice."""
        return self.manifest.geometry.example_chunk

    def _pooled_name(self, how: str, stack: str | None) -> str:
        name = pooled_name(self._stack(stack), how)
        if not self.manifest.has_array(name):
            held = sorted(
                a.name.rsplit("_", 1)[1]
                for a in self.manifest.arrays
                if a.name.startswith(pooled_name(self._stack(stack), ""))
            )
            raise ConfigError(f"store {self.key} has no {how!r} pooling for that stack; it has {held}")
        return name

    @property
    def token_ids(self) -> Any:
        """Every stored token id: dask (n_tokens,)."""
        return self._logical(TOKEN_IDS)

    @property
    def special_mask(self) -> Any:
        """1 where a token is special ([CLS], </s>, ...): dask (n_tokens,), for pooling otherwise."""
        return self._logical(SPECIAL_MASK)

    @property
    def offsets(self) -> Any:
        """dask (n_examples + 1,): example i is tokens offsets[i]:offsets[i+1] of this view."""
        import dask.array as da

        spec = self._spec(OFFSETS)
        files = self._files(spec)

        def stored(start: int, stop: int) -> np.ndarray:  # read now: n + 1 integers, checked like any chunk
            if files is not None:
                return self._rows(spec, files, (), start, stop)
            return np.asarray(self._group[OFFSETS][start:stop])  # type: ignore[index]

        if self.manifest.complete or len(self.shards) == len(self.manifest.geometry.shards):
            return da.from_array(stored(0, self.n_examples + 1))
        parts, base = [], 0
        for s in self.shards:
            parts.append(stored(s.ex_start, s.ex_stop) - s.tok_start + base)
            base += s.n_tokens
        return da.from_array(np.concatenate([*parts, [base]]).astype(np.int64))

    def logits_topk(self) -> dict[str, Any]:
        """Top-k logits: values and ids (n_tokens, k), target_logprob and entropy (n_tokens,)."""
        names = {
            "values": LOGITS_TOPK_VALUES,
            "ids": LOGITS_TOPK_IDS,
            "target_logprob": LOGITS_TARGET_LOGPROB,
            "entropy": LOGITS_ENTROPY,
        }
        return {field: self._logical(name) for field, name in names.items()}

    def logits_full(self) -> Any:
        """Full logits (n_tokens, vocab), for stores extracted with --logits full."""
        return self._logical(LOGITS_FULL)

    @cached_property
    def _examples_table(self) -> Any:
        import pandas as pd

        columns: dict[str, str] = root_attributes(self._group).get("metadata_columns", {})
        table = pd.DataFrame(
            {column: self._metadata_column(name) for column, name in columns.items()},
            index=range(self.manifest.geometry.n_examples),
            copy=False,
        )
        if len(self.shards) == len(self.manifest.geometry.shards):  # every example: no copy of the table
            table.index.name = "example"
            return table
        rows = np.concatenate([np.arange(s.ex_start, s.ex_stop) for s in self.shards] or [np.zeros(0, int)])
        view = table.iloc[rows]
        view.index = pd.RangeIndex(len(view), name="example")
        return view

    def _metadata_column(self, name: str) -> Any:
        """A metadata column, whole: written once at creation, so a lost chunk file is corruption, not fill."""
        array: Any = self._group[name]
        fix = "Fix: remove the store (actcache rm) and extract again; its metadata is written only at creation."
        if array.nchunks_initialized < array.nchunks:
            raise StoreCorruptError(f"store {self.key}, metadata array {name!r} has lost chunk files. {fix}")
        try:
            if array.dtype.kind not in "OTU":  # numbers, already compact
                return np.asarray(array[:])
            step, n = int(array.chunks[0]), int(array.shape[0])
            files = ChunkFiles.of(array, self.path / name, 0, self._pool)
            if files is None:
                chunks = (np.asarray(array[i : i + step], dtype=object) for i in range(0, n, step))
            else:  # Python str straight from each chunk file, not through zarr's StringDType copy
                chunks = (files.read_rows((), i, min(i + step, n)) for i in range(0, n, step))
            return _text_column(chunks, n)
        except StoreCorruptError as exc:  # chunkio's: its fix (`actcache verify`) is for shards, not metadata
            start, stop = getattr(exc, "rows", (0, n))
            raise StoreCorruptError(
                f"store {self.key}, metadata array {name!r}: the chunk file of rows {start}-{stop - 1} is missing "
                f"or fails its checksum. {fix}"
            ) from None
        except ValueError as exc:  # what zarr's crc32c codec raises on a corrupt chunk
            raise StoreCorruptError(f"store {self.key}, metadata array {name!r} fails its checksum. {fix}") from exc

    @property
    def examples(self) -> Any:
        """Example metadata (id, language, label, ...) as a pandas DataFrame, one row per example."""
        return self._examples_table

    def example(self, i: int) -> Example:
        """Example `i` of this view, computed: its tokens and every stored layer of each stack."""
        if not -self.n_examples <= i < self.n_examples:
            raise IndexError(f"example {i} out of range: this view has {self.n_examples} examples")
        i %= self.n_examples
        start, stop = (int(v) for v in self.offsets[i : i + 2].compute())
        hidden = {
            stack: np.asarray(self._logical(hidden_name(stack))[:, start:stop].compute())
            for stack in self.stacks
            if self.manifest.has_array(hidden_name(stack))
        }
        return Example(
            index=i,
            token_ids=np.asarray(self.token_ids[start:stop].compute()),
            special_mask=np.asarray(self.special_mask[start:stop].compute()),
            hidden=hidden,
            metadata=self.examples.iloc[i].to_dict(),
        )

    def to_xarray(self) -> Any:
        """An `xarray.Dataset` over the same lazy arrays, dims named (layer, token, example, hidden)."""
        import xarray as xr

        variables = {}
        for spec in self.manifest.arrays:
            variables[spec.name] = (spec.dims, self._logical_edges(spec))
        coords: dict[str, Any] = {"layer": list(self.layers)}
        for column in self.examples.columns:
            coords[str(column)] = ("example", self.examples[column].to_numpy())
        return xr.Dataset(variables, coords=coords, attrs={"key": self.key, "n_states": self.manifest.n_states})

    def _logical_edges(self, spec: ArraySpec) -> Any:
        """An array as this view shows it: row maps refer to its gap-free token axis."""
        if spec.name in (OFFSETS, TOKEN_START, TOKEN_STOP):
            offsets = self.offsets
            return {OFFSETS: offsets, TOKEN_START: offsets[:-1], TOKEN_STOP: offsets[1:]}[spec.name]
        return self._logical(spec.name)
