"""`StoreView`: a store's committed shards as arrays on the gap-free logical axis, lazy or read at once.

Physical rows of committed shards (each shard's tokens start on a chunk boundary, so there
are gaps between shards) are shown back to back: numpy read straight from the chunk files
(`cache.chunkio`), or Dask arrays whose blocks decode them; arrays whose codecs the chunk
path does not implement go through zarr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import numpy as np

from cache.bfloat16 import shown
from cache.chunkio import ChunkFiles, ChunkPool
from cache.paths import is_local
from schemas import ConfigError, StoreCorruptError
from schemas.arrays import ArraySpec
from schemas.geometry import ShardRange
from schemas.manifest import Manifest

__all__ = ["StoreView"]

_BLOCK_BYTES = 64 << 20  # per Dask block of a lazy array: few tasks per layer, bounded memory


class StoreView:
    """The committed shards `shards` of the store at `path`; `close()` ends its reading threads."""

    def __init__(self, path: Path, manifest: Manifest, shards: tuple[ShardRange, ...]) -> None:
        import zarr

        self.path = path
        self.manifest = manifest
        self.shards = shards
        self._group = zarr.open_group(str(path), mode="r")  # a URL goes through fsspec
        self._chunk_files: dict[str, ChunkFiles | None] = {}
        self._pool = ChunkPool(local=is_local(path))
        self.n_examples = sum(s.n_examples for s in shards)
        self.n_tokens = sum(s.n_tokens for s in shards)

    @property
    def key(self) -> str:
        return self.manifest.key

    def close(self) -> None:
        """End the reading threads (a later read starts them again); `with open_activations(...) as acts:` does."""
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dask(self, name: str) -> Any:
        import dask.array as da

        spec = self._spec(name)
        array = da.from_zarr(self._group[name])
        if spec.dtype == "bfloat16":
            array = array.map_blocks(shown, spec.dtype, dtype=np.float32)
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
                self._group[spec.name], self.path / spec.name, len(spec.leading), self._pool
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
        return shown(out, spec.dtype)

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
