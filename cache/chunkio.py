"""Whole chunks of a store array, encoded and decoded straight to and from their files.

Zarr's own path costs ~1 ms a chunk in event-loop hops and copies; a shard's hidden
states are hundreds of chunks, and reading a layer was 10x slower than the disk. For
arrays whose codecs are plain bytes + Blosc (what `StoreWriter` makes), the chunk file is
exactly one Blosc frame of the chunk's little-endian bytes, so this module writes and
reads those frames itself with the same codec, into and out of the caller's buffers.
Any other codec chain gets `None` from `ChunkFiles.of` and callers go through zarr.
The files are byte-for-byte what zarr writes and reads (tests read them back with zarr).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.files import atomic_write_bytes
from cache.integrity import checksum_bytes
from schemas import StoreCorruptError
from schemas.store import chunk_key

__all__ = ["ChunkFiles"]

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclass(frozen=True)
class ChunkFiles:
    """The chunk files of one array: their directory, chunk shape, dtype, fill and codec."""

    directory: Path
    chunks: tuple[int, ...]  # (1, ..., 1, split-axis chunk, *trailing)
    lead: int  # leading axes, chunked by 1 (layers); the split axis follows
    dtype: np.dtype
    fill: Any
    codec: Any  # numcodecs.Blosc

    @classmethod
    def of(cls, array: Any, directory: Path, lead: int) -> ChunkFiles | None:
        """For a zarr v3 array stored at `directory`; None when its codecs are not bytes + Blosc."""
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, BytesCodec

        meta = array.metadata
        codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
        if (
            sys.byteorder != "little"
            or len(codecs) != 2
            or not isinstance(codecs[0], BytesCodec)
            or not isinstance(codecs[1], BloscCodec)
            or (codecs[0].endian is not None and codecs[0].endian.value != "little")
            or getattr(meta.chunk_key_encoding, "separator", None) != "/"
        ):
            return None
        blosc = codecs[1]
        codec = Blosc(
            cname=blosc.cname.value,
            clevel=blosc.clevel,
            shuffle=_SHUFFLE[blosc.shuffle.value],
            blocksize=blosc.blocksize,
            typesize=blosc.typesize,
        )
        dtype = np.dtype(array.dtype)
        return cls(directory, tuple(array.chunks), lead, dtype, dtype.type(meta.fill_value), codec)

    def path(self, coords: tuple[int, ...]) -> Path:
        return self.directory / chunk_key(coords)

    def write(self, coords: tuple[int, ...], data: np.ndarray) -> str:
        """Encode chunk `coords` from `data` (padded with the fill value if short), write it atomically.

        Returns the file's checksum, taken from the bytes written (no read back).
        """
        shape = self.chunks[self.lead :]  # `data` comes without the leading axes (chunked by 1)
        if data.shape != shape:
            full = np.full(shape, self.fill, dtype=self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        frame = self.codec.encode(np.ascontiguousarray(data, dtype=self.dtype))
        path = self.path(coords)
        path.parent.mkdir(parents=True, exist_ok=True)
        # No fsync, as zarr: the shard's marker is written after and holds every chunk's
        # checksum, so a chunk a power cut lost is found by `verify`.
        atomic_write_bytes(path, bytes(frame), durable=False, crash_at="mid-chunk")
        return checksum_bytes(frame)

    def read_rows(self, index: tuple[int, ...], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the split axis at leading `index`, decoded into `out` (or a new array).

        Whole chunks decode straight into `out`, several at a time on a shared thread pool
        (Blosc releases the GIL); only partial chunks at either end are copied.
        """
        step = self.chunks[self.lead]
        trailing = self.chunks[self.lead + 1 :]
        if out is None:
            out = np.empty((stop - start, *trailing), dtype=self.dtype)

        def one(c: int) -> None:
            lo, hi = max(start, c * step), min(stop, (c + 1) * step)
            target = out[lo - start : hi - start]
            frame = self._frame((*index, c, *(0 for _ in trailing)))
            if hi - lo == step and target.flags.c_contiguous:
                self.codec.decode(frame, out=target)
            else:
                whole = np.frombuffer(self.codec.decode(frame), dtype=self.dtype).reshape(step, *trailing)
                target[...] = whole[lo - c * step : hi - c * step]

        along = range(start // step, -(-stop // step))
        if len(along) > 1:
            list(_pool().map(one, along))
        elif along:
            one(along[0])
        return out

    def _frame(self, coords: tuple[int, ...]) -> memoryview:
        """The chunk file's bytes, read into this thread's reused buffer (no fresh pages per chunk)."""
        path = self.path(coords)
        try:
            with open(path, "rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                buffer = getattr(_local, "buffer", None)
                if buffer is None or len(buffer) < size:
                    buffer = _local.buffer = bytearray(max(size, 1 << 20))
                view = memoryview(buffer)[:size]
                got = fh.readinto(view)
        except FileNotFoundError:
            raise StoreCorruptError(
                f"chunk file {path} of a committed shard is missing. "
                "Fix: run `actcache verify` on the store (it resets the shard), then rerun the extract."
            ) from None
        if got != size:
            raise StoreCorruptError(f"chunk file {path} changed while it was read; run `actcache verify` on the store")
        return view


_local = threading.local()


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="actcache-read")
