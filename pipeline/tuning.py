"""Process tuning of a long extract, for the CLI only: gc, heap trimming and the writer thread's priority.

`actcache extract` is a process of its own, so it may tune that process; the Python API
never does (a notebook or a metrics job keeps its gc, heap and threads as they were).
`ProcessTuning` is entered by the CLI around one command and hands everything back on exit.
(At the process's very end the console script freezes gc once more: `pipeline.cli.console`.)
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from types import TracebackType

from pipeline.residency import libc
from pipeline.run import RunHooks

__all__ = ["ProcessTuning"]

# The writer compresses and writes while the model computes; on few cores it would take turns
# with the forward pass, so it runs niced and fills the gaps (it needs ~5% of a shard's time).
_WRITER_NICENESS = 10
_TRIM_SLACK = 256 << 20  # resident bytes a run may grow past its size after the last trim


class ProcessTuning(RunHooks):
    """What the CLI does to its own process for a run, undone on exit.

    - gc off during set-up: importing torch, transformers and datasets and loading a model
      make hundreds of thousands of long-lived objects that each full collection would walk
      again (~1 s here); at the run's start they are frozen (`gc.freeze`), then gc is back on,
      so the run's collections skip them (~4% of a MiniLM run's CPU time, by perf).
    - the heap's free memory handed back to the OS (glibc `malloc_trim`) after a shard that
      left the process `_TRIM_SLACK` past its size after the last trim: batches of every
      length fragment the heap, and without trimming peak RSS creeps up with the number of
      shards (~20 MB a MiniLM shard, +14% at 4x the data, measured) instead of staying flat.
      Not after every shard: each trim also hands back the 100-170 MB a shard allocates and
      frees, which the next shard faults in again (1.5-2 s of a 17 s MiniLM run on a VM,
      ~70k page faults, measured); with the slack a trim comes every ~5-8 shards.
    - the background writer thread niced (Linux niceness is per thread).
    """

    def __enter__(self) -> ProcessTuning:
        self._gc_was_enabled = gc.isenabled()
        self._frozen = False
        self._trimmed_rss: int | None = None  # resident bytes just after the last trim
        gc.disable()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.run_ended()
        if self._gc_was_enabled:
            gc.enable()

    def run_started(self) -> None:
        gc.freeze()
        self._frozen = True
        if self._gc_was_enabled:
            gc.enable()

    def shard_done(self) -> None:
        c = libc()
        if c is None or not hasattr(c, "malloc_trim"):
            return
        rss = _resident()
        if self._trimmed_rss is None or rss is None or rss > self._trimmed_rss + _TRIM_SLACK:
            c.malloc_trim(0)
            self._trimmed_rss = _resident()

    def writer_started(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICENESS)

    def run_ended(self) -> None:
        if self._frozen:  # only what this run froze: the CLI's process froze nothing before
            gc.unfreeze()
            self._frozen = False


def _resident() -> int | None:
    """The process's resident bytes (Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
