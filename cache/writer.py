"""`StoreWriter`: open (or create) a store, write its shards under their claims, commit their markers, finalize.

Commit protocol: a shard's arrays are written first (zarr writes every chunk file
atomically), then its chunk files are checksummed and its marker is written atomically.
A shard with a marker is done; without one it is pending, whatever chunk files exist.
Any number of processes may write one store: a shard is written only under its claim
(an flock the kernel releases when the holder dies, so a dead writer's claim is taken
over by the next process that asks).

On an object store (no flock, no rename) every object is written by one PUT, whole or not
at all, and the marker is the shard's last object. One run at a time writes: its client
holds the store's lease object (`cache.objectlease`), its Dask workers check it names their
run, and within the run the scheduler hands each shard to one task (claims are this
process's own).
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.bfloat16 import to_bits
from cache.catalog import add_alias, read_manifest
from cache.chunkio import ChunkFiles, ChunkPool, WrittenFiles
from cache.claims import claim_path, held, utcnow
from cache.creation import create_store, created
from cache.faults import crash_point
from cache.files import PARTIAL_SUFFIX, flocked, lock_path, read_json, write_json
from cache.integrity import CHECKSUM, committed, marker_path, read_marker, stored_checksums
from cache.keys import cache_key
from cache.lease import writer_lease, writers_path
from cache.objectlease import require_run
from cache.paths import is_local, store_path
from cache.zattrs import EVERY_CHUNK, ExampleColumns, root_attributes, set_complete, zarr_group
from schemas import LayoutMismatchError, ShardClaimedError, StoreCorruptError, StoreNotFoundError
from schemas.arrays import ArraySpec, commit_array, index_arrays
from schemas.geometry import Geometry, ShardRange
from schemas.manifest import Manifest
from schemas.request import ExtractionRequest
from schemas.store import (
    MANIFEST_FILE,
    OFFSETS,
    SHARD_COMMITTED,
    TOKEN_START,
    TOKEN_STOP,
    chunk_key,
)

__all__ = ["StoreWriter"]


class StoreWriter:
    """Writes one store. Get one with `StoreWriter.open_or_create`."""

    def __init__(self, path: Path, manifest: Manifest, run: str | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.run = run  # on an object store: the run whose lease object this writer writes under
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._files: dict[str, ChunkFiles | None] = {}
        self._pool = ChunkPool()
        self._written = WrittenFiles()  # chunk files to drop from the page cache once on the disk
        self._lease = contextlib.ExitStack()  # the writer lease, held until `close`
        self._partials: dict[Path, list[Path]] | None = None  # crash leftovers by the file they stood in for

    def close(self) -> None:
        """Release the writer lease: `actcache rm` and `extract --force` may remove the store again."""
        self._pool.close()
        self._written.close()
        self._lease.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def open_or_create(
        cls,
        root: Path,
        request: ExtractionRequest,
        *,
        geometry: Geometry,
        arrays: Sequence[ArraySpec],
        layers: Sequence[int],
        n_states: int,
        stacks: Sequence[str],
        examples: ExampleColumns | None = None,
        provenance: Mapping[str, Any] | None = None,
        aliases: Sequence[str] = (),
    ) -> StoreWriter:
        """The writer of `request`'s store: opened when it exists (its geometry wins), else created.

        The writer holds the store's writer lease (see `cache.lease`) until `close()` (or the
        end of a `with` block), so the store is not removed under it. Creation builds the whole
        skeleton (group, empty arrays, manifest, example table) in a sibling temp directory and
        renames it into place, so a store directory is never half made.
        """
        key = cache_key(request)
        path = store_path(root, key)
        if is_local(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        lease, run = cls._lease_of(path)
        try:
            with flocked(lock_path(path)):
                if not created(path):
                    own = {spec.name for spec in (*index_arrays(), commit_array())}
                    all_arrays = (*index_arrays(), *(a for a in arrays if a.name not in own), commit_array())
                    manifest = Manifest(
                        key=key,
                        request=request.to_dict(),
                        geometry=geometry,
                        arrays=tuple(all_arrays),
                        layers=tuple(layers),
                        n_states=n_states,
                        stacks=tuple(stacks),
                        provenance=dict(provenance or {}),
                        aliases=tuple(aliases),
                        created_at=utcnow(),
                    )
                    create_store(path, manifest, examples)
                writer = cls(path, cls._read_manifest(path), run)
                if writer.manifest.geometry.n_tokens != geometry.n_tokens or (
                    writer.manifest.geometry.n_examples != geometry.n_examples
                ):
                    raise LayoutMismatchError(
                        f"store {key} holds {writer.manifest.geometry.n_examples} examples / "
                        f"{writer.manifest.geometry.n_tokens} tokens, but this run has {geometry.n_examples} / "
                        f"{geometry.n_tokens}. The key should have differed: remove the store "
                        f"(actcache rm {key}) and run again."
                    )
        except BaseException:
            lease.close()
            raise
        writer._hold(lease)
        for alias in aliases:
            add_alias(root, alias, key)
        return writer

    @classmethod
    def open(cls, path: Path, run: str | None = None) -> StoreWriter:
        """The writer of the existing store at `path` (another process created it), holding its writer lease.

        On an object store, where one run holds the lease, `run` is that run's id (`StoreWriter.run`
        of its client's writer): checked, not taken.
        """
        if is_local(path):
            lease, _ = cls._lease_of(path)
        else:
            lease = contextlib.ExitStack()
            require_run(path, writers_path(path), run or "")
        try:
            if not created(path):
                raise StoreNotFoundError(
                    f"store {str(path)!r} is gone (removed while its shards ran). Fix: rerun the extract to create it."
                )
            writer = cls(path, read_manifest(path), run)
        except BaseException:
            lease.close()
            raise
        writer._hold(lease)
        return writer

    @staticmethod
    def _lease_of(path: Path) -> tuple[contextlib.ExitStack, str | None]:
        """The store's writer lease, taken before anything else is looked at: rm waits for no one, so go first.

        With it, the id of the run that holds it alone (an object store's), else None.
        """
        lease = contextlib.ExitStack()
        held = lease.enter_context(writer_lease(path))
        return lease, None if held is None else held.run

    def _hold(self, lease: contextlib.ExitStack) -> None:
        self._lease = lease
        weakref.finalize(self, lease.close)  # a writer dropped without `close()` still lets go

    @staticmethod
    def _read_manifest(path: Path) -> Manifest:
        return Manifest.from_dict(read_json(path / MANIFEST_FILE, "manifest"))

    # -- shards ----------------------------------------------------------------------------

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def geometry(self) -> Geometry:
        return self.manifest.geometry

    def done_shards(self) -> set[int]:
        """Indices of the shards whose marker is committed."""
        return {s.index for s in committed(self.path, self.geometry.shards)}

    def pending_shards(self) -> list[ShardRange]:
        done = self.done_shards()
        return [s for s in self.geometry.shards if s.index not in done]

    @contextlib.contextmanager
    def claim(self, index: int) -> Iterator[ShardRange]:
        """Hold shard `index` for writing; `ShardClaimedError` if a live process holds it."""
        shard = self.geometry.shards[index]
        if is_local(self.path) and claim_path(self.path, index).exists():
            self._partials = None  # a claim file outlives only a dead holder: list what it left behind
        with held(self.path, self.key, index):
            self._clean_leftovers(shard)
            yield shard

    def try_claim(self, shard: ShardRange) -> contextlib.ExitStack | None:
        """Claim `shard` if it is still pending and no live process holds it; close the stack to release.

        The returned stack may be closed from another thread (a background writer does).
        """
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.claim(shard.index))
        except ShardClaimedError:
            return None
        if marker_path(self.path, shard.index).is_file():  # committed by another process meanwhile
            stack.close()
            return None
        return stack

    def claim_pending(
        self, wait: Callable[[list[ShardRange]], None] | None = None, only: Collection[int] | None = None
    ) -> Iterator[tuple[ShardRange, contextlib.ExitStack]]:
        """Claim pending shards one at a time, skipping those live processes hold; close a stack to release.

        With `wait`, go on until no shard is pending: when what is left is all held elsewhere,
        `wait(held)` is called (it sleeps, or raises to give up) and the shards are looked at
        again, so a dead holder's shard is taken over. Without, one pass. `only` limits it to
        those shard indices (a Dask task's one shard).
        """
        while pending := [s for s in self.pending_shards() if only is None or s.index in only]:
            held = []
            for shard in pending:
                claim = self.try_claim(shard)
                if claim is None:
                    held.append(shard)
                else:
                    yield shard, claim
            if wait is None:
                return
            if len(held) == len(pending):
                wait(held)

    def _clean_leftovers(self, shard: ShardRange) -> None:
        """Remove temp files a crashed writer of this shard left (zarr's and ours; an object store has none)."""
        marker = marker_path(self.path, shard.index)
        if is_local(self.path):
            left = self._leftovers()
            for spec in self.manifest.arrays:
                for key in spec.shard_chunks(shard, self.geometry):
                    for leftover in left.pop(self.path / spec.name / key, ()):
                        leftover.unlink(missing_ok=True)
            for leftover in left.pop(marker, ()):
                leftover.unlink(missing_ok=True)
        if not marker.is_file():  # pending (we hold its claim, so no one commits it meanwhile)
            # A crash between the flag and the marker leaves the flag set on a pending shard: while the
            # shard is written again, zarr-only readers must not take it for done.
            (self.path / SHARD_COMMITTED / chunk_key((shard.index,))).unlink(missing_ok=True)

    def _leftovers(self) -> dict[Path, list[Path]]:
        """The store's temp files (`<name>.<random>.partial`) by the path they were to become, listed once
        per writer and again after a dead holder's claim: a glob per chunk would list a directory of
        every shard's chunks for each shard (quadratic in shards)."""
        if self._partials is None:
            self._partials = {}
            for partial in self.path.rglob(f"*{PARTIAL_SUFFIX}"):
                target = partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[0])
                self._partials.setdefault(target, []).append(partial)
        return self._partials

    def write_shard(
        self,
        shard: ShardRange,
        arrays: Mapping[str, np.ndarray],
        lengths: Sequence[int],
        stats: Mapping[str, Any] | None = None,
    ) -> None:
        """Write every array of `shard` (logical, unpadded along its split axis), then commit it.

        `lengths` are the token counts of the shard's examples (they give the offsets);
        `stats` are counters summed into the manifest at `finalize`. Call inside `claim`.
        """
        counts = np.asarray(lengths, dtype=np.int64)
        if counts.shape != (shard.n_examples,) or int(counts.sum()) != shard.n_tokens:
            raise LayoutMismatchError(
                f"shard {shard.index} has {shard.n_examples} examples / {shard.n_tokens} tokens; "
                f"got {counts.size} lengths summing to {int(counts.sum())}"
            )
        values = dict(arrays)
        edges = np.concatenate([[0], np.cumsum(counts)])
        offsets = shard.tok_start + edges
        values[OFFSETS] = offsets if shard.ex_stop == self.geometry.n_examples else offsets[:-1]
        values[TOKEN_START] = shard.phys_start + edges[:-1]
        values[TOKEN_STOP] = shard.phys_start + edges[1:]
        values[SHARD_COMMITTED] = np.ones(1, dtype=np.uint8)  # last in the manifest: after all the data
        missing = {spec.name for spec in self.manifest.arrays} - set(values)
        if missing:
            raise LayoutMismatchError(f"shard {shard.index}: no data for arrays {sorted(missing)}")
        checksums = {}
        for spec in self.manifest.arrays:
            start, stop = shard.axis_range(spec.axis, self.geometry)
            block = self._fit(spec, shard, values[spec.name], stop - start)
            checksums[spec.name] = self._write_block(spec, shard, start, block)
            crash_point("mid-write")
        crash_point("before-marker")
        marker = {
            "range": shard.to_dict(),
            "checksum": CHECKSUM,
            "checksums": checksums,
            "stats": dict(stats or {}),
            "written_at": utcnow(),
            "writer": f"pid {os.getpid()} on {socket.gethostname()}",
        }
        write_json(marker_path(self.path, shard.index), marker)
        crash_point("after-marker")
        self._written.shard_done()

    def _fit(self, spec: ArraySpec, shard: ShardRange, data: np.ndarray, span: int) -> np.ndarray:
        """Check a shard's block against the layout and cast it to the stored dtype."""
        data = np.asarray(data)
        logical = shard.n_tokens if spec.axis == "token" else span
        expected = (*spec.leading, logical, *spec.trailing)
        if data.shape != expected:
            raise LayoutMismatchError(
                f"shard {shard.index}, array {spec.name!r}: expected shape {expected} "
                f"({', '.join(spec.dims)}), got {data.shape}"
            )
        if spec.dtype == "bfloat16" and data.dtype != np.uint16:
            data = to_bits(data)
        return data.astype(spec.physical_dtype, copy=False)

    def _write_block(self, spec: ArraySpec, shard: ShardRange, start: int, block: np.ndarray) -> dict[str, str | None]:
        """Write a shard's block from `start` on the split axis; returns its chunk files' checksums.

        The shard owns those whole chunks: the unused tail of a token block's last chunk is
        written as the fill value (never read), so every chunk is written whole and none is
        read back. On a local disk the chunk files are written by hand (`ChunkFiles.write_rows`,
        byte for byte what zarr writes); on an object store through zarr, one PUT a chunk.
        """
        stop = shard.axis_range(spec.axis, self.geometry)[1]
        files = self._chunk_files(spec)
        if files is not None:
            return dict(files.write_rows(block, start, stop))
        lead = tuple(slice(None) for _ in spec.leading)
        n = block.shape[len(lead)]
        whole = n if n == stop - start else n // spec.axis_chunk(self.geometry) * spec.axis_chunk(self.geometry)
        if whole:
            self._array(spec)[(*lead, slice(start, start + whole))] = block[(*lead, slice(0, whole))]
        if whole < stop - start:  # the last chunk, short: padded with the fill (one chunk copied, not the block)
            last = np.full((*spec.leading, stop - start - whole, *spec.trailing), spec.fill_value, block.dtype)
            last[(*lead, slice(0, n - whole))] = block[(*lead, slice(whole, n))]
            self._array(spec)[(*lead, slice(start + whole, stop))] = last
        checksums = stored_checksums(self.path, spec, shard, self.geometry)
        absent = sorted(key for key, value in checksums.items() if value is None)
        if absent:
            raise StoreCorruptError(
                f"shard {shard.index}, array {spec.name!r}: chunk files {absent[:3]} are absent right after "
                "zarr wrote them: is something else writing or cleaning this store? Run the extract again."
            )
        return checksums

    def _chunk_files(self, spec: ArraySpec) -> ChunkFiles | None:
        """The hand-written chunk files of `spec` on a local disk; None where zarr writes (an object store)."""
        if spec.name not in self._files:
            self._files[spec.name] = (
                ChunkFiles.of(
                    self._zarr_group()[spec.name], self.path / spec.name, len(spec.leading), self._pool, self._written
                )
                if is_local(self.path)
                else None
            )
        return self._files[spec.name]

    def _array(self, spec: ArraySpec) -> Any:
        """`spec`'s zarr array, writing every chunk, even one that holds only the fill value (so none is missing)."""
        if spec.name not in self._arrays:
            self._arrays[spec.name] = self._zarr_group()[spec.name].with_config(EVERY_CHUNK)
        return self._arrays[spec.name]

    def bytes_for(self, shards: Sequence[ShardRange]) -> int:
        """Uncompressed bytes the arrays of `shards` take: an upper bound for the space they need."""
        total = 0
        for spec in self.manifest.arrays:
            for shard in shards:
                start, stop = shard.axis_range(spec.axis, self.geometry)
                total += spec.row_bytes * (stop - start)
        return total

    def _zarr_group(self) -> Any:
        if self._group is None:
            self._group = zarr_group(self.path, mode="r+")
        return self._group

    # -- completion ------------------------------------------------------------------------

    def finalize(self, stats: Mapping[str, Any] | None = None) -> Manifest:
        """Mark the store complete once every shard is committed; shard stats are summed.

        Returns the manifest as written (complete or not).
        """
        with flocked(lock_path(self.path)):
            manifest = self._read_manifest(self.path)
            done = committed(self.path, manifest.geometry.shards)
            if len(done) < len(manifest.geometry.shards) or manifest.complete:
                if manifest.complete and not root_attributes(zarr_group(self.path)).get("complete"):
                    set_complete(self.path, True)  # a crash between the manifest and the root attribute
                self.manifest = manifest
                return manifest
            totals: dict[str, Any] = {}
            for shard in manifest.geometry.shards:
                marker = read_marker(self.path, shard)
                if marker is None:
                    raise StoreCorruptError(f"marker of shard {shard.index} vanished during finalize")
                _add_counts(totals, marker.get("stats", {}))
            manifest = manifest.with_(complete=True, completed_at=utcnow(), stats={**totals, **dict(stats or {})})
            crash_point("finalize")
            write_json(self.path / MANIFEST_FILE, manifest.to_dict())
            set_complete(self.path, True)
            self.manifest = manifest
            return manifest


def _add_counts(totals: dict[str, Any], counts: Mapping[str, Any]) -> None:
    """Sum counters: numbers add, equal-length lists add elementwise, dicts recurse."""
    for name, value in counts.items():
        if isinstance(value, Mapping):
            _add_counts(totals.setdefault(name, {}), value)
        elif isinstance(value, list):
            current = totals.get(name) or [0] * len(value)
            totals[name] = [a + b for a, b in zip(current, value, strict=True)]
        else:
            totals[name] = totals.get(name, 0) + value
