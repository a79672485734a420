"""Resident pages of memory-mapped Arrow data handed back once read, so a run's RSS does not grow with the dataset.

The examples' and the tokenized Arrow files are memory-mapped; every page a run reads stays
in the process's resident set until the mapping goes, so a 10-million-row dataset would end a
run with all of its files resident (~230 MB per million short texts, measured). Dropping this
process's pages of a read-only file mapping (`madvise(MADV_DONTNEED)`) loses nothing: a later
read faults the same bytes in again from the page cache or the file. Only mappings that are
file-backed and not writable are ever advised (on anonymous or written memory the same call
would zero data), and only of `.arrow` files. Linux; elsewhere nothing is done.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["MappedRanges", "libc"]

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


class MappedRanges:
    """Read-only mappings of .arrow files that hold some tables' buffers; `release()` drops their pages.

    Each mapping is kept with its identity (device, inode, offset) and advised only while
    /proc/self/maps still shows that same read-only mapping there: an address whose mapping went
    (a table dropped, a copy unpickled elsewhere) is never advised again, whatever now sits there.
    """

    def __init__(self, tables: Iterable[Any]) -> None:
        addresses = sorted(_buffer_addresses(tables))
        self.mappings = [m for m in _arrow_mappings() if _holds(addresses, m[0], m[1])]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(start, stop) for start, stop, _ in self.mappings]

    @property
    def nbytes(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def release(self) -> None:
        """Drop this process's resident pages of the mappings (a hint: a failure changes nothing)."""
        c = libc()
        if c is None or not hasattr(c, "madvise") or not self.mappings:
            return
        still = set(_arrow_mappings())
        for start, stop, identity in self.mappings:
            if (start, stop, identity) in still:
                c.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED)


def _buffer_addresses(tables: Iterable[Any]) -> set[int]:
    found: set[int] = set()
    for table in tables:
        for column in table.columns:
            for chunk in column.chunks:
                found.update(buf.address for buf in chunk.buffers() if buf is not None and buf.size)
    return found


def _holds(addresses: list[int], start: int, stop: int) -> bool:
    """Whether any of the sorted `addresses` is in [start, stop)."""
    i = bisect.bisect_left(addresses, start)
    return i < len(addresses) and addresses[i] < stop


def _arrow_mappings() -> list[tuple[int, int, str]]:
    """(start, stop, identity) of this process's read-only mappings of .arrow files (Linux /proc/self/maps);
    identity is the mapping's device, inode, offset and path."""
    if not sys.platform.startswith("linux"):
        return []
    found = []
    with contextlib.suppress(OSError), open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)
            # address perms offset dev inode path. Arrow files only: a library's read-only pages
            # may differ from its file (relocated, then write-protected), an Arrow file's never do.
            if len(fields) < 6 or "w" in fields[1] or fields[4] == "0" or not fields[5].endswith(".arrow"):
                continue
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, stop, " ".join((fields[2], fields[3], fields[4], fields[5]))))
    return found


@functools.cache
def libc() -> Any:
    """The C library (for madvise, malloc_trim), or None where it cannot be loaded."""
    try:
        found = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if hasattr(found, "madvise"):
        found.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return found
