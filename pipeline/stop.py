"""How a run is asked to stop: a flag that the CLI's signal handlers set and the run reads between batches.

The library installs no handler: `actcache`'s entry point does (`handled_signals`, called
only by `pipeline.cli.main`), so a notebook or a metrics job keeps its own Ctrl-C. A run
given a `StopFlag` stops after the batch in hand once the flag is set, commits what is
finished and raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["RESUME_HINT", "STOP_SIGNALS", "StopFlag", "Terminated", "handled_signals", "signal_name"]

# What SLURM, Kubernetes and systemd send before a kill is handled like Ctrl-C.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "rerun the same command to continue from there."


def signal_name(signum: int) -> str:
    """How a stop signal is named to the user: Ctrl-C for SIGINT, else the signal's name."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopFlag:
    """Set once by a stop signal; `listening` while a run can stop gracefully (between batches)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.listening = False

    @property
    def stop(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def listen(self) -> Iterator[None]:
        """While the block runs, a stop request is honoured after the batch in hand."""
        self.listening = True
        try:
            yield
        finally:
            self.listening = False


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a run: unwind like Ctrl-C (files closed, claims released), exit 143."""


@contextlib.contextmanager
def handled_signals(flag: StopFlag) -> Iterator[None]:
    """The CLI's signal set-up (never the library's), undone on exit.

    Ctrl-C and SIGTERM (what SLURM, Kubernetes and systemd send before a kill) set `flag`
    while a run listens, so it stops after the batch in hand; outside a run they unwind like
    Ctrl-C; a second one acts as if we were absent. A file-size limit fails the write (SIGXFSZ
    ignored) instead of killing the process.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous: dict[int, Any] = {}

    def on_stop(signum: int, frame: Any) -> None:
        if flag.stop:  # the second signal
            handler = previous[signum]
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set from C
            signal.raise_signal(signum)
        elif flag.listening:
            flag.request(signum)
        else:
            flag.request(signum)
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    handlers: dict[int, Any] = dict.fromkeys(STOP_SIGNALS, on_stop)
    if hasattr(signal, "SIGXFSZ"):  # without this the kernel kills the process instead of failing the write
        handlers[signal.SIGXFSZ] = signal.SIG_IGN
    previous.update({signum: signal.signal(signum, handler) for signum, handler in handlers.items()})
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
