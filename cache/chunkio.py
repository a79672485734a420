"""Whole chunks of a store array straight to and from their files: read checksum checked into the
caller's buffer, written encoded as zarr encodes them.

Hand-written because it pays: a layer of MiniLM hidden states (74,728 x 384 float16, 37
chunks) reads at 4.7-6.9 GB/s here against zarr's own 0.4-2.9 GB/s (per-chunk event-loop
hops and copies), 2-4x, measured side by side in one run (`make bench` keeps the ratio).
Local writes skip zarr's per-chunk machinery (a mkdir, a temp file, a rename and a random
name per chunk, one encode at a time) and read no checksum back: see `write_rows`.
Object stores are read the same way, one GET a chunk, so a missing or corrupt chunk is the
same error there; they are written through zarr (one PUT a chunk). For the codec chains the
store uses (bytes + Blosc + crc32c; bytes + crc32c too) a chunk file is the chunk's
little-endian bytes, Blosc-framed or not, followed by the CRC32C of those bytes (4 bytes,
little-endian); for text (vlen-utf8 + crc32c, the metadata columns) it is numcodecs'
VLenUTF8 frame followed by the same CRC32C, decoded to Python str without zarr's copy into
a numpy StringDType array (the examples table of a million rows: 0.92-1.02 -> 0.61-0.62 s,
alternating; text decodes hold the GIL, so they gain nothing from the pool). Any other chain gets `None` from
`ChunkFiles.of` and callers go through zarr. Tests compare this path with zarr's reads
for every chain and dtype the store writes, and its chunk files with zarr's, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache.paths import is_local
from schemas import StoreCorruptError
from schemas.store import chunk_key

__all__ = ["ChunkFiles", "ChunkPool", "WrittenFiles"]

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclass(frozen=True)
class ChunkFiles:
    """The chunk files of one array: their directory, chunk shape, dtype, fill and codec (None: raw bytes)."""

    directory: Path
    chunks: tuple[int, ...]  # (1, ..., 1, split-axis chunk, *trailing)
    lead: int  # leading axes, chunked by 1 (layers); the split axis follows
    dtype: np.dtype
    fill: Any
    codec: Any  # numcodecs.Blosc or VLenUTF8 (text: dtype object), or None for uncompressed chunks
    local: bool = True  # False: `directory` is an fsspec path (an object store), read through fsspec
    # Decodes or encodes several chunks at once; None: one by one.
    pool: ChunkPool | None = field(default=None, compare=False)
    # The files written, to drop from the page cache once they are on the disk; None: left to the kernel.
    written: WrittenFiles | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls, array: Any, directory: Path, lead: int, pool: ChunkPool | None = None, written: WrittenFiles | None = None
    ) -> ChunkFiles | None:
        """For a zarr v3 array stored at `directory`; None unless its codecs are bytes [+ Blosc] + crc32c or
        vlen-utf8 + crc32c."""
        from numcodecs import Blosc, VLenUTF8
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, VLenUTF8Codec

        meta = array.metadata
        codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
        middle = codecs[1:-1]
        if (
            getattr(meta.chunk_key_encoding, "separator", None) != "/"
            or len(codecs) not in (2, 3)
            or not isinstance(codecs[-1], Crc32cCodec)
        ):
            return None
        if len(codecs) == 2 and isinstance(codecs[0], VLenUTF8Codec):  # text: zarr's own codec, as Python str
            text = np.dtype(object)
            return cls(
                directory,
                tuple(array.chunks),
                lead,
                text,
                meta.fill_value,
                VLenUTF8(),
                is_local(directory),
                pool,
                written,
            )
        if (
            sys.byteorder != "little"
            or not isinstance(codecs[0], BytesCodec)
            or not all(isinstance(c, BloscCodec) for c in middle)
            or (codecs[0].endian is not None and codecs[0].endian.value != "little")
        ):
            return None
        codec = None
        if middle:
            blosc = middle[0]
            codec = Blosc(
                cname=blosc.cname.value,
                clevel=blosc.clevel,
                shuffle=_SHUFFLE[blosc.shuffle.value],
                blocksize=blosc.blocksize,
                typesize=blosc.typesize,
            )
        dtype = np.dtype(array.dtype)
        fill = dtype.type(meta.fill_value)
        return cls(directory, tuple(array.chunks), lead, dtype, fill, codec, is_local(directory), pool, written)

    def path(self, coords: tuple[int, ...]) -> Path:
        return self.directory / chunk_key(coords)

    def read_rows(self, index: tuple[int, ...], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the split axis at leading `index`, decoded into `out` (or a new array).

        Whole chunks decode straight into `out`, several at a time on the `pool`'s threads
        (Blosc releases the GIL); only partial chunks at either end are copied.
        """
        step = self.chunks[self.lead]
        trailing = self.chunks[self.lead + 1 :]
        if out is None:
            out = np.empty((stop - start, *trailing), dtype=self.dtype)

        def one(c: int) -> None:
            lo, hi = max(start, c * step), min(stop, (c + 1) * step)
            target = out[lo - start : hi - start]
            try:
                frame = self._frame((*index, c, *(0 for _ in trailing)))
            except StoreCorruptError as exc:
                exc.rows = (c * step, (c + 1) * step)  # type: ignore[attr-defined]  # the reader names the shard
                raise
            if self.codec is None:
                whole = np.frombuffer(frame, dtype=self.dtype).reshape(step, *trailing)
                target[...] = whole[lo - c * step : hi - c * step]
            elif hi - lo == step and target.flags.c_contiguous:
                self.codec.decode(frame, out=target)
            else:
                whole = self._decoded(frame).reshape(step, *trailing)
                target[...] = whole[lo - c * step : hi - c * step]

        self._each(one, range(start // step, -(-stop // step)))
        return out

    def write_rows(self, block: np.ndarray, start: int, stop: int) -> dict[str, str]:
        """Write the chunks covering rows [start, stop) of the split axis, at every leading index, from `block`
        (all leading indices; its rows from `start`, as many as it has); rows past its end are the fill.

        Each chunk is encoded as zarr encodes it (its bytes, Blosc, CRC32C) and written in
        place, several at a time on the pool's threads (Blosc and writes release the GIL).
        In place, not through a temp file: a shard's chunks count only once its marker is
        written after them, so a torn one is never read. Returns each chunk key's CRC32C as
        stored (the file's last 4 bytes, hex), so nothing is read back.
        """
        step = self.chunks[self.lead]
        trailing = self.chunks[self.lead + 1 :]
        rows = block.shape[self.lead]
        tail = (0,) * len(trailing)
        jobs = [
            (index, c)
            for index in np.ndindex(*block.shape[: self.lead])
            for c in range(start // step, -(-stop // step))
        ]
        sums: dict[str, str] = {}

        def one(job: tuple[tuple[int, ...], int]) -> None:
            index, c = job
            lo, hi = c * step - start, min((c + 1) * step - start, rows)
            chunk = block[index][max(lo, 0) : max(hi, 0)]
            if len(chunk) < step or not chunk.flags.c_contiguous:
                whole = np.full((step, *trailing), self.fill, dtype=self.dtype)
                whole[: len(chunk)] = chunk
                chunk = whole
            raw = chunk if self.text else chunk.astype(self.dtype, copy=False).view(np.uint8).reshape(-1)
            body = self.codec.encode(raw) if self.codec is not None else raw
            crc = _crc32c(np.frombuffer(body, dtype=np.uint8)).to_bytes(4, "little")  # text's frame is a bytearray
            coords = (*index, c, *tail)
            path = self.path(coords)
            try:
                fh = open(path, "wb")
            except FileNotFoundError:  # a new chunk's directory: made once, not tried before every write
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(path, "wb")
            with fh:
                fh.write(body)
                fh.write(crc)
                fh.flush()
                _dont_need(fh.fileno())
            if self.written is not None:
                self.written.add(path)
            sums[chunk_key(coords)] = crc.hex()

        self._each(one, jobs)
        return sums

    @property
    def text(self) -> bool:
        """Chunks of Python str (zarr's vlen-utf8), not fixed-size numbers."""
        return self.dtype.hasobject

    def _decoded(self, frame: memoryview) -> np.ndarray:
        decoded = self.codec.decode(frame)
        return decoded if self.text else np.frombuffer(decoded, dtype=self.dtype)

    def _each(self, task: Callable[[Any], None], items: Sequence[Any]) -> None:
        """`task(item)` for every item: on the pool's threads when there are several, else here."""
        if len(items) > 1 and self.pool is not None:
            self.pool.run(task, items)
        else:
            for item in items:
                task(item)

    def _frame(self, coords: tuple[int, ...]) -> memoryview:
        """The chunk file's bytes, read into this thread's reused buffer (no fresh pages per chunk)."""
        path = self.path(coords)
        try:
            if self.local:
                with open(path, "rb", buffering=0) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    buffer = getattr(_local, "buffer", None)
                    if self.text:  # read once per table, and a text chunk may be far larger: not kept
                        buffer = bytearray(size)
                    elif buffer is None or len(buffer) < size:
                        buffer = _local.buffer = bytearray(max(size, 1 << 20))
                    view = memoryview(buffer)[:size]
                    got = fh.readinto(view)
            else:  # one GET; a missing object is FileNotFoundError too
                view = memoryview(path.fs.cat_file(path.path))  # type: ignore[attr-defined]  # a UPath
                size = got = len(view)
        except FileNotFoundError:
            raise StoreCorruptError(
                f"chunk file {path} of a committed shard is missing. "
                "Fix: run `actcache verify` on the store (it resets the shard), then rerun the extract."
            ) from None
        if got != size:
            raise StoreCorruptError(f"chunk file {path} changed while it was read; run `actcache verify` on the store")
        _check(view, path)
        return view[:-4]


def _check(frame: memoryview, path: Path) -> None:
    """`StoreCorruptError` unless `frame` ends in the CRC32C of the bytes before it (`make bench` times this)."""
    body = np.frombuffer(frame, dtype=np.uint8)
    if body.size < 4 or _crc32c(body[:-4]) != int.from_bytes(frame[-4:], "little"):
        raise StoreCorruptError(
            f"chunk file {path} fails its CRC32C checksum: a flipped byte or a torn write. "
            "Fix: run `actcache verify` on the store (it resets the shard), then rerun the same extract."
        )


_local = threading.local()


def _dont_need(fd: int) -> None:
    """Tell the kernel `fd`'s pages are not needed (a hint: never an error): written now, dropped once clean.

    On Linux, POSIX_FADV_DONTNEED submits the file's dirty pages for writing (WB_SYNC_NONE:
    the call does not wait for them, though submitting can block on a full device queue) and
    then drops from the page cache only pages already clean. Called as a chunk file is written,
    the store reaches the disk while later shards compute, not all at once when the kernel's
    dirty-page limits or an fsync force it, and its dirty pages do not pile up in memory;
    called again a shard later (`WrittenFiles`), the now clean pages leave the cache. Other
    systems may treat the advice differently or not have it.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # advice the filesystem refuses loses nothing: the bytes are written
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class WrittenFiles:
    """The chunk files a writer wrote, dropped from the page cache one shard later, once on the disk.

    A store is written once and read later, mostly after the run: cached, its pages would
    only push out what the machine does use (the model, the dataset, other programs' files),
    and a run whose page cache grows by every byte it writes pays for each new page. On a VM
    that is most of the writing's cost: 3 GB written in 1 MB files took 27 s of kernel time
    growing the cache into memory the guest had not used, 0.7 s when each file was dropped
    64 files later and its pages reused (measured here). `_dont_need` already sent each
    file to the disk as it was written, so a shard later its pages are clean and dropping
    them loses nothing; pages still being written stay (the advice skips them).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: list[Path] = []  # written since the last `shard_done`
        self._previous: list[Path] = []  # the shard before: dropped at the next `shard_done`

    def add(self, path: Path) -> None:
        with self._lock:
            self._current.append(path)

    def shard_done(self) -> None:
        """A shard's files are all written: drop the shard before's from the page cache."""
        with self._lock:
            drop, self._previous, self._current = self._previous, self._current, []
        _drop_pages(drop)

    def close(self) -> None:
        """Drop every file still listed (the last shard's pages not yet written are skipped)."""
        with self._lock:
            drop, self._previous, self._current = self._previous + self._current, [], []
        _drop_pages(drop)


def _drop_pages(paths: Iterable[Path]) -> None:
    """`_dont_need` on each file: its clean pages leave the page cache."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile (`actcache rm`): nothing to drop
            continue
        try:
            _dont_need(fd)
        finally:
            os.close(fd)


def _crc32c(data: Any) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


class ChunkPool:
    """Threads that decode or encode chunks side by side: started on first use, ended by `close()` (or when collected).

    Owned by a reader (`Activations`) or a writer, never process-wide, so a metrics job that
    is done with a store leaves no threads behind. After `close()` a later read starts them again.
    """

    def __init__(self, local: bool = True) -> None:
        cores = os.cpu_count() or 1
        # An object store's reads wait on the network, not on a core: more of them at once.
        self.workers = cores if local else max(16, cores)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None

    def run(self, task: Callable[[Any], None], items: Iterable[Any]) -> None:
        """`task(item)` for every item, on the pool's threads; the first error is raised."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="actcache-chunks")
                self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False)
            executor = self._executor
        for _ in executor.map(task, items):
            pass

    def close(self) -> None:
        """End the threads (waiting for reads in flight)."""
        with self._lock:
            executor, self._executor = self._executor, None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if executor is not None:
            executor.shutdown(wait=True)
