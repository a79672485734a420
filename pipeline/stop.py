"""How a run is asked to stop: a flag that the CLI's signal handlers set and the run reads between batches.

The library installs no handler: `actcache`'s entry point does (see `pipeline.cli`), so a
notebook or a metrics job keeps its own Ctrl-C. A run given a `StopFlag` stops after the
batch in hand once the flag is set, commits what is finished and raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

__all__ = ["RESUME_HINT", "STOP_SIGNALS", "StopFlag", "signal_name"]

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
