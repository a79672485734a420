"""Fault injection for extraction: SIGKILL at many moments, rerun, and check nothing was lost.

    python -m tests.chaos [--points 24] [--seed 0]      (make chaos)

Each kill point starts `actcache extract` on a tiny model in a fresh cache, kills it with
SIGKILL (at a named crash point, see `cache.faults`, or after a random delay),
reruns the same command to completion, verifies the store and compares every array with
an uninterrupted run's. It prints a markdown table and exits non-zero if any value was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NAMED = [
    "after-tokenize", "mid-batch", "mid-batch:5", "mid-write", "mid-write:7", "mid-write:40", "before-marker",
    "before-marker:2", "mid-commit", "mid-commit:3", "after-marker", "after-marker:2", "finalize",
]  # fmt: skip


@dataclass
class Outcome:
    point: str
    phase: str
    done_before: int
    redone: int
    shards: int
    verified: bool
    lost: int


def _args(model: Path, data: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "extract", "--model", str(model), "--data", str(data), "--cache-dir",
        str(cache), "--shard-tokens", "48", "--batch-size", "3", "--quiet", "--logits", "topk:3",
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def _arrays(store: Path) -> dict[str, np.ndarray]:
    from cache import open_activations

    acts = open_activations(str(store))
    arrays = {a.name: np.asarray(acts._logical(a.name).compute()) for a in acts.manifest.arrays}
    arrays["offsets"] = np.asarray(acts.offsets.compute())
    return arrays


def _lost(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> int:
    lost = 0
    for name, expected in want.items():
        actual = got.get(name)
        if actual is None or actual.shape != expected.shape:
            lost += expected.size
        else:
            lost += int(np.sum(~((actual == expected) | (np.isnan(actual) & np.isnan(expected)))))
    return lost


def _phase(cache: Path) -> tuple[str, int, int]:
    stores = list(cache.glob("stores/*.zarr"))
    if not stores:
        return "before the store existed", 0, 0
    manifest = json.loads((stores[0] / "manifest.json").read_text())
    done = len(list(stores[0].glob("shards/*.json")))
    total = len(manifest["geometry"]["shards"])
    if manifest["complete"]:
        return "after finalize", done, total
    return ("shards written, before finalize" if done == total else f"mid-run ({done}/{total} shards)"), done, total


def _wait_for_store(cache: Path, proc: subprocess.Popen[bytes]) -> float:
    """Block until the run's store has a manifest (or the run ended); the seconds waited."""
    started = time.monotonic()
    while proc.poll() is None and not list(cache.glob("stores/*.zarr/manifest.json")):
        time.sleep(0.01)
    return time.monotonic() - started


def kill_once(point: str, model: Path, data: Path, cache: Path, delay: float | None) -> Outcome:
    from cache import verify

    args = _args(model, data, cache)
    if delay is None:
        subprocess.run(args, cwd=REPO, env=_env(ACTCACHE_CRASH_AT=point), capture_output=True)
    else:
        proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_store(cache, proc)  # the clock starts when the store exists: imports are not interesting
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    phase, done_before, _ = _phase(cache)
    rerun = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True)
    if rerun.returncode != 0:
        raise RuntimeError(f"rerun after kill at {point} failed: {rerun.stderr}")
    store = Path(rerun.stdout.strip().splitlines()[-1])
    _, _, total = _phase(cache)
    report = verify(str(store))
    return Outcome(point, phase, done_before, total - done_before, total, report.ok, -1)


def run(points: int, seed: int, workdir: Path) -> list[Outcome]:
    from tests.factory import save_tiny
    from tests.texts import SENTENCES

    model = save_tiny("llama", workdir / "model")
    data = workdir / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SENTENCES * 3), encoding="utf-8"
    )
    proc = subprocess.Popen(_args(model, data, workdir / "clean"), cwd=REPO, env=_env(), stdout=subprocess.PIPE)
    _wait_for_store(workdir / "clean", proc)
    started = time.monotonic()
    out, _ = proc.communicate()
    duration = time.monotonic() - started  # from the store's creation to the end of the run
    if proc.returncode != 0:
        raise RuntimeError("the uninterrupted run failed")
    reference = _arrays(Path(out.decode().strip().splitlines()[-1]))
    rng = random.Random(seed)
    plan: list[tuple[str, float | None]] = [(name, None) for name in NAMED[:points]]
    delays = sorted(rng.uniform(0.0, duration) for _ in range(points - len(plan)))
    plan += [(f"random, {d:.2f} s after the store appeared", d) for d in delays]
    outcomes = []
    for i, (point, delay) in enumerate(plan):
        cache = workdir / f"kill-{i}"
        outcome = kill_once(point.split(" ")[0] if delay is None else point, model, data, cache, delay)
        store = next(cache.glob("stores/*.zarr"))
        outcome.lost = _lost(_arrays(store), reference)
        outcomes.append(outcome)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| # | kill point | state when killed | shards done before | shards redone | verify | values lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, o in enumerate(outcomes, 1):
        verdict = "ok" if o.verified else "FAILED"
        lines.append(
            f"| {i} | {o.point} | {o.phase} | {o.done_before}/{o.shards} | {o.redone} | {verdict} | {o.lost} |"
        )
    survived = sum(o.verified and o.lost == 0 for o in outcomes)
    lines.append("")
    lines.append(
        f"kills injected: {len(outcomes)}, survived: {survived}, values lost: {sum(o.lost for o in outcomes)}, "
        f"shards redone: {sum(o.redone for o in outcomes)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=24, help="kill points (the named ones first, then random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="actcache-chaos-") as tmp:
        outcomes = run(args.points, args.seed, Path(tmp))
    print(table(outcomes))
    return 0 if all(o.verified and o.lost == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
