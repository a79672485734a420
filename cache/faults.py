"""Test-only fault injection: named crash points, armed by the CLI from the environment, else free.

The chaos and interrupt tests kill `actcache` at exact moments (mid-write, between a shard's
chunks and its marker, mid-finalize, in the middle of batch N). Library code marks those
moments with `crash_point(NAME)`; nothing happens unless `arm_from_environment` armed a
point, which only the CLI's entry point does, so a notebook or a metrics job that imports
actcache is never killed by a stray variable, and an unarmed point costs one global lookup.

    ACTCACHE_CRASH_AT=NAME[:N]   SIGKILL this process the N-th time it passes NAME (N = 1)
    ACTCACHE_CRASH_SIGNAL=SIG    send SIG (SIGTERM, SIGINT) instead, once: a graceful stop, tested exactly
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["arm_from_environment", "crash_point", "disarm"]


@dataclass
class _Armed:
    name: str
    count: int
    signum: int
    passes: int = 0


_armed: _Armed | None = None


def arm_from_environment(env: Mapping[str, str] = os.environ) -> None:
    """Arm the crash point `ACTCACHE_CRASH_AT` names (if any); the CLI calls this once at start."""
    global _armed
    wanted = env.get("ACTCACHE_CRASH_AT")
    if not wanted:
        _armed = None
        return
    name, _, count = wanted.partition(":")
    _armed = _Armed(name, int(count or 1), getattr(signal, env.get("ACTCACHE_CRASH_SIGNAL") or "SIGKILL"))


def disarm() -> None:
    """Forget the armed point (the CLI does on exit, so the process is as it found it)."""
    global _armed
    _armed = None


def crash_point(name: str) -> None:
    """Send the armed signal to this process the N-th time it passes the armed point `name`."""
    armed = _armed
    if armed is None or armed.name != name:
        return
    armed.passes += 1
    if armed.passes == armed.count:
        os.kill(os.getpid(), armed.signum)
