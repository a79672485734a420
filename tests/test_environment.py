"""The environment is the lock: every installed package at its locked version, nothing else."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock line {line!r} is not NAME==VERSION"
            pins[_normal(name)] = version
    return pins


def test_installed_versions_equal_the_lock() -> None:
    installed = {_normal(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("actcache", None)  # the project itself, installed editable from this checkout
    locked = _locked()
    assert {n: v for n, v in installed.items() if locked.get(n) != v} == {}, "installed but not as locked"
    assert {n: v for n, v in locked.items() if installed.get(n) != v} == {}, "locked but not installed"


def test_the_lock_pins_the_cpu_torch_and_no_cuda_packages() -> None:
    locked = _locked()
    assert locked["torch"] == "2.13.0+cpu"
    assert not [n for n in locked if n.startswith("nvidia-") or n == "triton"]
