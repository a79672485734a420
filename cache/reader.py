"""The lazy reader: `open_activations(...)` -> `Activations`, Dask arrays over a store.

Opening reads the manifest and the shard markers' names, nothing else; every array is a
Dask graph over the Zarr chunks until `.compute()`. Token-level arrays are shown on the
logical token axis (no gaps between shards, no padding anywhere): example i is tokens
``offsets[i]:offsets[i+1]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cache.catalog import find_store, read_manifest
from cache.chunkio import ChunkFiles
from cache.integrity import committed
from cache.paths import alias_name, cache_root
from cache.zattrs import root_attributes
from schemas import ConfigError, IncompleteStoreError, StoreCorruptError
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
    ArraySpec,
    Manifest,
    ShardRange,
    hidden_name,
    pooled_name,
)

__all__ = ["Activations", "Example", "open_activations"]

_BLOCK_BYTES = 64 << 20  # per Dask block of a lazy array: few tasks per layer, bounded memory


def _from_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as users see them: bfloat16 bit patterns become float32, exactly."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


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


@dataclass(frozen=True)
class Example:
    """One example's ragged slice: its tokens and, per stack, (layer, n_tokens, hidden) states."""

    index: int
    token_ids: np.ndarray
    special_mask: np.ndarray
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class Activations:
    """Lazy view of one store (or of its committed shards, for a partial read).

    Dimensions: `hidden` (token, hidden); `pooled` (example, hidden); `token_ids`,
    `special_mask` (token,); `offsets` (example + 1,); `logits_topk()` values/ids
    (token, k), target_logprob/entropy (token,). Layers index the model's hidden-states
    tuple (0 = embeddings); negative ones count from the last.
    """

    def __init__(self, path: Path, manifest: Manifest, shards: tuple[ShardRange, ...]) -> None:
        import zarr

        self.path = path
        self.manifest = manifest
        self.shards = shards
        self._group = zarr.open_group(str(path), mode="r")  # a URL goes through fsspec
        self._chunk_files: dict[str, ChunkFiles | None] = {}
        self.n_examples = sum(s.n_examples for s in shards)
        self.n_tokens = sum(s.n_tokens for s in shards)

    def __repr__(self) -> str:
        state = "complete" if self.manifest.complete else f"partial: {len(self.shards)} shards"
        return (
            f"<Activations {self.key} {self.n_examples} examples, {self.n_tokens} tokens, "
            f"layers {list(self.layers)}, stacks {list(self.stacks)} ({state})>"
        )

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def layers(self) -> tuple[int, ...]:
        """Stored hidden-state indices (0 = embeddings)."""
        return self.manifest.layers

    @property
    def stacks(self) -> tuple[str, ...]:
        return self.manifest.stacks

    # -- assembling logical views ----------------------------------------------------------

    def _dask(self, name: str) -> Any:
        import dask.array as da

        spec = self._spec(name)
        array = da.from_zarr(self._group[name])
        if spec.dtype == "bfloat16":
            array = array.map_blocks(_from_storage, spec.dtype, dtype=np.float32)
        return array

    def _spec(self, name: str) -> ArraySpec:
        if not self.manifest.has_array(name):
            held = ", ".join(a.name for a in self.manifest.arrays)
            raise ConfigError(f"store {self.key} has no array {name!r}; it holds: {held}")
        return self.manifest.array(name)

    def _pieces(self, spec: ArraySpec) -> list[tuple[int, int]]:
        """Physical [start, stop) runs of the view along the split axis, adjacent ones merged."""
        runs: list[tuple[int, int]] = []
        for s in self.shards:
            start, stop = {
                "token": (s.phys_start, s.phys_start + s.n_tokens),
                "shard": (s.index, s.index + 1),
            }.get(spec.axis, (s.ex_start, s.ex_stop))
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            elif stop > start or not runs:
                runs.append((start, stop))
        return runs

    def _logical(self, name: str, *lead: int, lazy: bool = True) -> Any:
        """Array `name` on the logical axis, with its leading dims indexed by `lead` (if given).

        `lazy=False` reads it into one numpy array at once: straight from the chunk files
        where it can, without Dask's copy of the result.
        """
        import dask.array as da

        spec = self._spec(name)
        files = self._files(spec)
        if files is not None and not lazy and len(lead) == len(spec.leading):
            return self._read(spec, files, lead, 0, self._span(spec))
        if files is not None:
            view = self._direct(spec, files, lead)
        else:
            array = self._dask(name)[lead] if lead else self._dask(name)
            axis = len(spec.leading) - len(lead)
            pieces = [array[(slice(None),) * axis + (slice(a, b),)] for a, b in self._pieces(spec)]
            view = pieces[0] if len(pieces) == 1 else da.concatenate(pieces, axis=axis)
        return view if lazy else view.compute()

    def _files(self, spec: ArraySpec) -> ChunkFiles | None:
        if spec.name not in self._chunk_files:
            self._chunk_files[spec.name] = ChunkFiles.of(
                self._group[spec.name], self.path / spec.name, len(spec.leading)
            )
        return self._chunk_files[spec.name]

    def _span(self, spec: ArraySpec) -> int:
        return sum(b - a for a, b in self._pieces(spec))

    def _read(self, spec: ArraySpec, files: ChunkFiles, index: tuple[int, ...], start: int, stop: int) -> np.ndarray:
        """Logical rows [start, stop) at leading `index`, decoded from the physical runs they cover."""
        out = np.empty((stop - start, *spec.trailing), dtype=files.dtype)
        first = 0
        for phys, phys_stop in self._pieces(spec):
            last = first + phys_stop - phys
            lo, hi = max(start, first), min(stop, last)  # the part of this physical run in [start, stop)
            if lo < hi:
                self._rows(spec, files, index, phys + lo - first, phys + hi - first, out[lo - start : hi - start])
            first = last
        return _from_storage(out, spec.dtype)

    def _rows(
        self, spec: ArraySpec, files: ChunkFiles, index: tuple[int, ...], start: int, stop: int, out: Any = None
    ) -> np.ndarray:
        """Physical rows [start, stop) of committed shards; a missing or corrupt chunk names its shard."""
        try:
            return files.read_rows(index, start, stop, out)
        except StoreCorruptError as exc:
            rows = getattr(exc, "rows", (start, stop))
            raise StoreCorruptError(f"{self._shards_of(spec, *rows)}: {exc}") from exc

    def _shards_of(self, spec: ArraySpec, start: int, stop: int) -> str:
        """'store K, shard(s) ...' for the physical rows [start, stop) of `spec`'s split axis."""
        spans = {s.index: s.axis_range(spec.axis, self.manifest.geometry) for s in self.shards}
        hit = [index for index, (a, b) in spans.items() if max(start, a) < min(stop, b)]
        return f"store {self.key}, array {spec.name!r}, shard(s) {hit}"

    def _direct(self, spec: ArraySpec, files: ChunkFiles, lead: tuple[int, ...]) -> Any:
        """A Dask array whose blocks decode the chunk files straight into place (see `cache.chunkio`).

        Blocks span ~`_BLOCK_BYTES` of whole chunks along the logical axis, so a layer is a
        few tasks, not one per chunk.
        """
        import dask.array as da

        n = self._span(spec)
        row_bytes = int(np.prod(spec.trailing, dtype=np.int64)) * files.dtype.itemsize
        step = files.chunks[len(spec.leading)]
        rows = max(step, _BLOCK_BYTES // max(row_bytes, 1) // step * step)
        blocks = tuple(min(rows, n - a) for a in range(0, n, rows)) or (0,)
        free = spec.leading[len(lead) :]
        chunks = (*((1,) * k for k in free), blocks, *((t,) for t in spec.trailing))

        def read(block_info: dict[Any, Any] | None = None) -> np.ndarray:
            assert block_info is not None
            where = block_info[None]["array-location"]
            index = (*lead, *(a for a, _ in where[: len(free)]))
            block = self._read(spec, files, index, *where[len(free)])
            return block.reshape((1,) * len(free) + block.shape)

        dtype = np.float32 if spec.dtype == "bfloat16" else files.dtype
        return da.map_blocks(read, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype=dtype))

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
        name = pooled_name(self._stack(stack), how)
        if not self.manifest.has_array(name):
            held = sorted(
                a.name.rsplit("_", 1)[1]
                for a in self.manifest.arrays
                if a.name.startswith(pooled_name(self._stack(stack), ""))
            )
            raise ConfigError(f"store {self.key} has no {how!r} pooling for that stack; it has {held}")
        return self._logical(name, self._layer_position(layer), lazy=lazy)

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
        )
        rows = np.concatenate([np.arange(s.ex_start, s.ex_stop) for s in self.shards] or [np.zeros(0, int)])
        view = table.iloc[rows]
        view.index = pd.RangeIndex(len(view), name="example")
        return view

    def _metadata_column(self, name: str) -> np.ndarray:
        """A metadata column, whole: written once at creation, so a lost chunk file is corruption, not fill."""
        array: Any = self._group[name]
        fix = "Fix: remove the store (actcache rm) and extract again; its metadata is written only at creation."
        if array.nchunks_initialized < array.nchunks:
            raise StoreCorruptError(f"store {self.key}, metadata array {name!r} has lost chunk files. {fix}")
        try:
            return np.asarray(array[:])
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
