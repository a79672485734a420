"""`BackgroundWriter`: a thread that writes and commits one finished shard while the model computes the next."""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
import time
from typing import Any

from cache import StoreWriter
from schemas import StoreFullError

__all__ = ["BackgroundWriter"]

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class BackgroundWriter:
    """Writes shards handed over with `put`, one at a time; its errors are re-raised on the caller's thread.

    `on_start` runs first on the thread (the CLI lowers the thread's priority there).
    """

    def __init__(self, writer: StoreWriter, on_start: Any = None) -> None:
        self.writer = writer
        self.queue: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self.busy = 0.0
        self._on_start = on_start
        self.thread = threading.Thread(target=self._loop, name="actcache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while (item := self.queue.get()) is not None:
            claim, shard, arrays, lengths, stats = item
            del item  # no reference to the buffers outlives the write
            started = time.perf_counter()
            try:
                if self.error is None:
                    self.writer.write_shard(shard, arrays, lengths, stats)
            except BaseException as exc:  # handed to the main thread, which raises it
                self.error = exc
            finally:
                del arrays
                claim.close()
                self.busy += time.perf_counter() - started
                self.queue.task_done()

    def put(self, item: Any) -> None:
        """Hand a shard over once the previous one is written (so its buffers can be reused)."""
        self.queue.join()
        self.check()
        self.queue.put(item)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the shard in hand to be committed; False if there was none."""
        with self.queue.all_tasks_done:
            if not self.queue.unfinished_tasks:
                return False
            self.queue.all_tasks_done.wait(timeout)
            return True

    def check(self) -> None:
        """Raise the writer's error, if it had one (a full disk as `StoreFullError` naming the space needed)."""
        if self.error is None:
            return
        if isinstance(self.error, OSError) and self.error.errno in _NO_SPACE:
            pending = self.writer.pending_shards()
            need = self.writer.bytes_for(pending)
            raise StoreFullError(
                f"out of space writing to {str(self.writer.path.parent.parent)!r} "
                f"({self.error.strerror or self.error}): {len(pending)} shard(s) still to write need up to "
                f"{need / 2**20:.0f} MiB more. Fix: free that much space there (or pass --cache-dir on a "
                "larger disk) and rerun the same command; committed shards are kept."
            ) from self.error
        raise self.error

    def close(self) -> None:
        """Finish the shard in hand, end the thread, raise its error if any."""
        with contextlib.suppress(Exception):
            self.queue.put(None)
        self.thread.join()
        self.check()
