"""Figures of the metrics jobs (issue 14), by hand, not in `make test`: streamed metrics against reading the arrays.

    .venv/bin/python -m bench.metrics [--quick] [--examples 100000] [--scale 4] [--work DIR]

A synthetic store of --examples pooled vectors (7 stored layers x 384, float16, no token-level
arrays, as MiniLM-L6's `--pooling mean`) is written through the real `cache.StoreWriter`, and
one --scale times larger. Its metadata is a parallel corpus: `id` shared by 10 languages
(translations), `field`, `language`, and a 3-class `label`; each vector is a shared part per id,
a language offset, a label direction and layer-dependent noise, so retrieval, CKA and probes
are all far from trivial. On the 1x store, for each metric:

- its wall time through the store (`metrics.StoreRows` into the metric functions) against the
  time to read the arrays it needs with `acts.pooled(layer, lazy=False)` (target <= 1.5x), and
  against that read plus the same computation on the read arrays, written independently with
  numpy / scikit-learn (the cost of streaming itself); also the metric's own code on the
  in-memory arrays. Retrieval (one layer) is O(n^2 d): it runs on prefixes of the store
  (--retrieval-examples), and on all the examples only when the largest prefix says it fits
  --retrieval-budget seconds.
- peak RSS at 1x and --scale x, each metric in a fresh process (`--child METRIC`), read from
  `getrusage(RUSAGE_SELF).ru_maxrss` at its end (and `VmHWM`, which no parent can inflate).
- exact CKA against the peer library's minibatch estimate (`ckatorch.core.cka_batch`, Nguyen
  et al.) for a few layer pairs: seconds per pair and the difference; our value against the
  textbook Gram-matrix formula on a subsample.

Prints the figures as JSON and a markdown table, and writes them to
bench/results/<date>-<host>-metrics[-quick].json. Reads are from the page cache (the stores were
just written). --quick is a smoke run (seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

LANGUAGES = ("ar", "de", "en", "es", "fr", "hi", "ru", "sw", "th", "zh")
HIDDEN = 384
N_STATES = 7  # embeddings + 6 layers, as MiniLM-L6
FIELDS = ("premise", "hypothesis")
SEED = 0
# Per stored layer: noise (retrieval best in the middle layers), language offset and label signal (per dim).
NOISE = (2.4, 2.1, 1.9, 1.75, 1.7, 1.8, 2.0)
LANGUAGE_SCALE = (0.16, 0.13, 0.10, 0.08, 0.07, 0.09, 0.12)
NOISE_CARRY = 0.9
LABEL_SCALE = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08)
CHILDREN = ("open", "read", "cka", "probe", "probe-sgd", "retrieval")
BEYOND = ("cka-debiased", "read-layer", "mknn", "retrieval-margin")  # bench.beyond's children (issue 21)
CKA_PAIRS = ((0, 1), (0, 6), (3, 4))
MAX_WAIT_S = 600.0  # at most this long in all waiting for other work on the machine to finish


# -- the synthetic store --------------------------------------------------------------------


def examples_of(n: int) -> dict[str, list[Any]]:
    """Example metadata: example e is id e // 10 in language e % 10 (so a prefix of 10k rows is whole ids)."""
    ids = np.arange(n) // len(LANGUAGES)
    labels = np.random.default_rng([SEED, 1]).integers(0, 3, int(ids[-1]) + 1)
    return {
        "id": [f"s{i}" for i in ids],
        "language": [LANGUAGES[e % len(LANGUAGES)] for e in range(n)],
        "field": [FIELDS[i % 2] for i in ids],
        "label": [int(labels[i]) for i in ids],
    }


class Generator:
    """Deterministic pooled vectors of every stored layer for any row range."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng([SEED, 2])
        n_ids = -(-n // len(LANGUAGES))
        self.shared = rng.standard_normal((n_ids, HIDDEN), dtype=np.float32)
        self.offsets = rng.standard_normal((len(LANGUAGES), HIDDEN), dtype=np.float32)
        self.directions = rng.standard_normal((3, HIDDEN), dtype=np.float32)
        self.mean = 3 * rng.standard_normal(HIDDEN, dtype=np.float32)  # hidden states have a large common mean
        # Anisotropic per-layer scales: not an orthogonal map, so CKA between layers is below 1.
        self.scales = np.exp(0.3 * rng.standard_normal((N_STATES, HIDDEN))).astype(np.float32)
        self.labels = np.random.default_rng([SEED, 1]).integers(0, 3, n_ids)  # as `examples_of`

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(N_STATES, stop - start, HIDDEN) float32."""
        e = np.arange(start, stop)
        ids, language = e // len(LANGUAGES), e % len(LANGUAGES)
        rng = np.random.default_rng([SEED, 3, start])
        out = np.empty((N_STATES, stop - start, HIDDEN), dtype=np.float32)
        shared = self.shared[ids]
        noise = rng.standard_normal((stop - start, HIDDEN), dtype=np.float32)
        for layer in range(N_STATES):
            if layer:  # noise drifts from layer to layer (AR(1)): neighbouring layers are alike, as in a model
                noise *= NOISE_CARRY
                noise += np.sqrt(1 - NOISE_CARRY**2) * rng.standard_normal((stop - start, HIDDEN), dtype=np.float32)
            v = NOISE[layer] * noise
            v += shared
            v += LANGUAGE_SCALE[layer] * self.offsets[language]
            v += LABEL_SCALE[layer] * self.directions[self.labels[ids]]
            v *= self.scales[layer]
            v += self.mean
            out[layer] = v
        return out


def write_store(root: Path, n: int, shard_tokens: int) -> Path:
    """The synthetic store of `n` examples (1 token each, pooled arrays only) under cache root `root`."""
    from cache import StoreWriter
    from pipeline.plan import plan
    from schemas.arrays import build_arrays
    from schemas.request import ExtractionRequest, OutputSpec
    from schemas.store import SPECIAL_MASK, TOKEN_IDS, pooled_name

    lengths = np.ones(n, dtype=np.int64)
    geometry = plan(lengths, shard_tokens=shard_tokens, hidden=HIDDEN, store_dtype="float16")
    arrays = build_arrays(
        stacks={"encoder": HIDDEN},
        n_layers=N_STATES,
        store_dtype="float16",
        poolings={"encoder": ("mean",)},
        token_level=False,
    )
    request = ExtractionRequest(
        model={"hf_id": "bench/synthetic-minilm-l6", "revision": "0" * 40, "dtype": "fp32"},
        dataset={
            "name": f"synthetic-{n}",
            "content_hash": f"bench-metrics-{n}-{SEED}",
            "split": "test",
            "text_fields": ["text"],
        },
        outputs=OutputSpec(layers=None, logits="none", store_dtype="float16", token_level=False, pooling=("mean",)),
    )
    generator = Generator(n)
    with StoreWriter.open_or_create(
        root,
        request,
        geometry=geometry,
        arrays=arrays,
        layers=tuple(range(N_STATES)),
        n_states=N_STATES,
        stacks=("encoder",),
        examples=examples_of(n),
        provenance={"bench": "bench.metrics"},
        aliases=(f"bench-metrics-{n}",),
    ) as writer:
        for pending in writer.pending_shards():
            with writer.claim(pending.index) as shard:
                values: dict[str, np.ndarray] = {
                    TOKEN_IDS: np.zeros(shard.n_tokens, dtype=np.int32),
                    SPECIAL_MASK: np.zeros(shard.n_tokens, dtype=np.int8),
                    pooled_name("encoder", "mean"): generator.rows(shard.ex_start, shard.ex_stop),
                }
                writer.write_shard(shard, values, [1] * shard.n_examples)
        if not writer.finalize().complete:
            raise RuntimeError(f"store {writer.path} did not complete")
        return Path(writer.path)


# -- helpers shared by the children and the timings ---------------------------------------


@dataclass(frozen=True)
class Prefix:
    """The first `n` rows of a `StoreRows` (retrieval at a smaller size), read in the store's chunks."""

    rows: Any  # metrics.StoreRows
    n: int

    @property
    def acts(self) -> Any:  # `metrics.rows.align_of` aligns blocks to its example chunk
        return self.rows.acts

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, int(self.rows.shape[1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.n)
        return np.asarray(self.rows[start:stop])


def alignment_of(table: Any, n: int) -> Any:
    """Translations share (field, id), as `metrics.job` aligns them; the first `n` rows."""
    from metrics import Alignment

    head = table.iloc[:n]
    keys = list(zip(head["field"].tolist(), head["id"].tolist(), strict=True))
    return Alignment.of([str(v) for v in head["language"]], keys)


def language_labels(table: Any) -> np.ndarray:
    return np.asarray(table["language"].cat.codes.to_numpy())  # a categorical column: integers, no strings


def vm_hwm_kib() -> int:
    """This process's own peak resident set (`VmHWM`): unlike ru_maxrss, not inherited from a parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


# -- in-memory references: what a user would write on the arrays read at once ------------


def numpy_retrieval(x: np.ndarray, language: np.ndarray, group: np.ndarray, n_lang: int) -> np.ndarray:
    """(n_lang, n_lang) P@1 by brute force: all candidates in memory, sorted by language, 1024 queries at a time."""
    u = x.astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    order = np.argsort(language, kind="stable")
    candidates = np.ascontiguousarray(u[order])
    edges = np.searchsorted(language[order], np.arange(n_lang + 1))
    present = np.zeros((int(group.max()) + 1, n_lang), dtype=bool)
    present[group, language] = True
    hits = np.zeros((n_lang, n_lang), dtype=np.int64)
    counted = np.zeros((n_lang, n_lang), dtype=np.int64)
    for q0 in range(0, len(u), 1024):
        q1 = min(q0 + 1024, len(u))
        scores = u[q0:q1] @ candidates.T
        source, mine = language[q0:q1], group[q0:q1]
        for target in range(n_lang):
            best = order[edges[target] + scores[:, edges[target] : edges[target + 1]].argmax(axis=1)]
            asked = (source != target) & present[mine, target]
            counted[:, target] += np.bincount(source[asked], minlength=n_lang)
            hits[:, target] += np.bincount(source[asked & (group[best] == mine)], minlength=n_lang)
    with np.errstate(invalid="ignore"):
        return hits / counted


def numpy_cka(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Linear CKA of every pair, feature-space formula, float64, all layers centred in memory at once."""
    x = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays], axis=1)
    x -= x.mean(axis=0)
    gram = x.T @ x
    del x
    edges = np.cumsum([0, *(a.shape[1] for a in arrays)])
    k = len(arrays)
    hsic = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            block = gram[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            hsic[i, j] = np.einsum("ij,ij->", block, block)
    d = np.sqrt(np.diag(hsic))
    return np.asarray(hsic / np.outer(d, d))


def textbook_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s definition: centred n x n Gram matrices, HSIC ratio (small n only)."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k = h @ (x.astype(np.float64) @ x.T.astype(np.float64)) @ h
    m = h @ (y.astype(np.float64) @ y.T.astype(np.float64)) @ h
    return float(np.sum(k * m) / np.sqrt(np.sum(k * k) * np.sum(m * m)))


def sklearn_probe(x: np.ndarray, labels: np.ndarray, folds: int = 5) -> list[float]:
    """Stratified k-fold accuracy of StandardScaler + lbfgs LogisticRegression, fitted directly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float32)
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=SEED).split(np.zeros((len(x), 1)), labels):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=SEED))
        scores.append(float(model.fit(x[train], labels[train]).score(x[test], labels[test])))
    return scores


# -- children: one metric in a fresh process, for its peak RSS -----------------------------


def child(args: argparse.Namespace) -> int:
    import resource

    from cache import open_activations
    from metrics import StoreRows, cka_matrix, mutual_knn, probe_accuracy, retrieval_outcomes, retrieval_p1
    from metrics.probes import DEFAULT_PROBE_MEMORY

    out: dict[str, Any] = {"metric": args.child}
    started = time.perf_counter()
    if args.child == "write":
        out["path"] = str(write_store(Path(args.cache_dir), args.examples, args.shard_tokens))
    else:
        with open_activations(args.store, cache_dir=args.cache_dir) as acts:
            table = acts.examples
            out["examples"] = acts.n_examples
            if args.child == "read":
                arrays = [acts.pooled(layer, lazy=False) for layer in acts.layers]
                out["bytes"] = sum(a.nbytes for a in arrays)
            elif args.child in ("cka", "cka-debiased"):
                debiased = args.child == "cka-debiased"
                matrix = cka_matrix([StoreRows(acts, layer) for layer in acts.layers], debiased=debiased)
                out["cka_0_6"] = float(matrix[0, -1])
            elif args.child in ("read-layer", "mknn", "retrieval-margin"):
                n = min(args.rows or acts.n_examples, acts.n_examples)
                rows = Prefix(StoreRows(acts, args.layer), n)
                out |= {"layer": args.layer, "rows": n}
                if args.child == "read-layer":
                    out["bytes"] = rows[0:n].nbytes
                elif args.child == "mknn":
                    out["mknn"] = mutual_knn(rows, Prefix(StoreRows(acts, args.layer - 1), n), k=10)
                else:
                    found = retrieval_outcomes(rows, alignment_of(table, n), margin_k=4)
                    out |= {f"p1_{kind}": float(np.mean(list(o.p1().values()))) for kind, o in found.items()}
            elif args.child in ("probe", "probe-sgd"):
                memory = 0 if args.child == "probe-sgd" else DEFAULT_PROBE_MEMORY  # 0: streamed SGD at any size
                result = probe_accuracy(StoreRows(acts, args.layer), language_labels(table), memory=memory)
                out |= {"layer": args.layer, "method": result.method, "accuracy": result.accuracy}
            elif args.child == "retrieval":
                n = min(args.rows or acts.n_examples, acts.n_examples)
                p1 = retrieval_p1(Prefix(StoreRows(acts, args.layer), n), alignment_of(table, n))
                out |= {"layer": args.layer, "rows": n, "p1_mean": float(np.mean(list(p1.values())))}
    out["seconds"] = time.perf_counter() - started
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["vm_hwm_kib"] = vm_hwm_kib()
    print(json.dumps(out))
    return 0


def run_child(name: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.metrics", "--child", name, *extra]
    done = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the parent -------------------------------------------------------------------------


def others_busy(seconds: float = 2.0) -> float:
    """Cores busy while this process sleeps `seconds` (from /proc/stat): other work on the machine.

    Processes of other sessions may be out of sight (another PID namespace) and the 1-minute
    load still carries this bench's own last phase; the CPU counters see them all, and not us.
    """

    def counters() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle, iowait
        return sum(values[:8]) - idle, sum(values[:8])

    busy0, total0 = counters()
    time.sleep(seconds)
    busy1, total1 = counters()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


class Quiet:
    """Waits (at most MAX_WAIT_S in all) while the machine is busy with other work; records what it saw."""

    def __init__(self, quick: bool) -> None:
        self.waited = 0.0
        self.seen: dict[str, dict[str, float]] = {}
        self.quick = quick

    def before(self, phase: str) -> None:
        while True:
            load, busy = os.getloadavg()[0], others_busy()
            # At the start, the 1-minute load; later it still carries this bench's own last phase, so the
            # cores busy elsewhere decide (more than 1.5 of the 2: the figures would mean little).
            if self.quick or self.waited >= MAX_WAIT_S or (load <= 2.5 if phase == "start" else busy <= 1.5):
                break
            print(
                f"[bench.metrics] {phase}: load {load:.1f}, {busy:.1f} cores busy elsewhere; waiting", file=sys.stderr
            )
            time.sleep(20)
            self.waited += 20
        self.seen[phase] = {"load_1m": round(load, 2), "cores_busy_elsewhere": round(busy, 2)}


@contextmanager
def say(what: str) -> Iterator[None]:
    started = time.perf_counter()
    print(f"[bench.metrics] {what} ...", file=sys.stderr, flush=True)
    yield
    print(f"[bench.metrics] {what}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def median_read(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(runs):
        seconds, value = clock(fn)
        times.append(seconds)
    return statistics.median(times), value


def ratios(entry: dict[str, Any]) -> dict[str, Any]:
    entry["metric_over_read"] = entry["metric_s"] / entry["read_s"]
    entry["metric_over_read_plus_numpy"] = entry["metric_s"] / (entry["read_s"] + entry["numpy_s"])
    if entry.get("same_code_in_memory_s") is not None:
        entry["same_code_in_memory_over_numpy"] = entry["same_code_in_memory_s"] / entry["numpy_s"]
    return entry


def time_cka(acts: Any, arrays: list[np.ndarray], read_s: float) -> dict[str, Any]:
    from metrics import StoreRows, cka_matrix

    rows = [StoreRows(acts, layer) for layer in acts.layers]
    metric_s, streamed = clock(lambda: cka_matrix(rows))
    same_s, _ = clock(lambda: cka_matrix(arrays))
    numpy_s, reference = clock(lambda: numpy_cka(arrays))
    return ratios(
        {
            "layers": len(rows),
            "read_s": read_s,
            "metric_s": metric_s,
            "same_code_in_memory_s": same_s,
            "numpy_s": numpy_s,
            "max_abs_diff_vs_numpy": float(np.max(np.abs(streamed - reference))),
            "matrix": np.round(streamed, 4).tolist(),
        }
    )


def time_probes(acts: Any, arrays: list[np.ndarray], read_s: float, layers: Sequence[int]) -> dict[str, Any]:
    from metrics import StoreRows, probe_accuracy

    labels = language_labels(acts.examples)
    metric_s, results = clock(lambda: [probe_accuracy(StoreRows(acts, layer), labels) for layer in layers])
    # The metric's own code on the arrays is not timed: its in-memory path is the sklearn fit below.
    numpy_s, reference = clock(lambda: [sklearn_probe(arrays[layer], labels) for layer in layers])
    return ratios(
        {
            "layers": list(layers),
            "read_s": read_s * len(layers) / len(arrays),  # the layers probed, of the 7 read
            "metric_s": metric_s,
            "same_code_in_memory_s": None,
            "numpy_s": numpy_s,
            "methods": sorted({r.method for r in results}),
            "accuracy": [round(r.accuracy, 4) for r in results],
            "max_abs_diff_vs_sklearn": float(
                max(abs(r.accuracy - float(np.mean(s))) for r, s in zip(results, reference, strict=True))
            ),
        }
    )


def time_retrieval(acts: Any, layer: int, n: int, runs: int, same_code: bool = True) -> dict[str, Any]:
    from metrics import StoreRows, retrieval_p1

    alignment = alignment_of(acts.examples, n)
    if n == acts.n_examples:
        read_s, x = median_read(lambda: acts.pooled(layer, lazy=False), runs)
    else:  # the same chunk reader as lazy=False, for the first n rows only
        read_s, x = median_read(lambda: acts.pooled_rows(layer, 0, n), runs)
    metric_s, streamed = clock(lambda: retrieval_p1(Prefix(StoreRows(acts, layer), n), alignment))
    same_s = clock(lambda: retrieval_p1(x, alignment))[0] if same_code else None
    numpy_s, reference = clock(
        lambda: numpy_retrieval(x, alignment.language, alignment.group, len(alignment.languages))
    )
    names = alignment.languages
    diff = max(abs(v - reference[names.index(a), names.index(b)]) for (a, b), v in streamed.items())
    return ratios(
        {
            "examples": n,
            "layer": layer,
            "read_s": read_s,
            "metric_s": metric_s,
            "same_code_in_memory_s": same_s,
            "numpy_s": numpy_s,
            "p1_mean": float(np.mean(list(streamed.values()))),
            "p1_min": float(min(streamed.values())),
            "p1_max": float(max(streamed.values())),
            "max_abs_diff_vs_numpy": float(diff),
        }
    )


def cka_against_peer(acts: Any, arrays: list[np.ndarray], batch: int, pairs: Sequence[tuple[int, int]]) -> Any:
    import torch
    from ckatorch.core import cka_batch

    from metrics import StoreRows, linear_cka

    torch.set_num_threads(os.cpu_count() or 1)
    n = len(arrays[0])
    n_batches = n // batch
    used = n_batches * batch
    sub = np.random.default_rng([SEED, 4]).choice(n, size=min(n, 2000), replace=False)
    out = []
    for i, j in pairs:
        ours_s, ours = clock(lambda i=i, j=j: linear_cka(StoreRows(acts, i), StoreRows(acts, j)))  # type: ignore[misc]
        ours_used = linear_cka(arrays[i][:used], arrays[j][:used])

        def peer(i: int = i, j: int = j) -> float:
            x = torch.from_numpy(arrays[i][:used].astype(np.float64)).reshape(n_batches, batch, -1)
            y = torch.from_numpy(arrays[j][:used].astype(np.float64)).reshape(n_batches, batch, -1)
            return float(cka_batch(x, y))

        peer_s, theirs = clock(peer)
        x_sub, y_sub = arrays[i][sub], arrays[j][sub]
        out.append(
            {
                "layers": [i, j],
                "ours_exact": ours,
                "ours_s": ours_s,
                "peer_minibatch": theirs,
                "peer_s": peer_s,
                "peer_rows": used,
                "abs_diff_peer_vs_ours": abs(theirs - ours_used),
                "subsample_rows": len(sub),
                "abs_diff_ours_vs_textbook_on_subsample": abs(linear_cka(x_sub, y_sub) - textbook_cka(x_sub, y_sub)),
                "ours_on_subsample": linear_cka(x_sub, y_sub),
            }
        )
    return {"batch": batch, "pairs": out}


def rss_figures(stores: dict[str, str], cache_dir: str, layer: int, retrieval_rows: int, scale: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CHILDREN:
        runs = {}
        for size, path in stores.items():
            extra = ["--store", path, "--cache-dir", cache_dir, "--layer", str(layer)]
            if name == "retrieval":
                extra += ["--rows", str(retrieval_rows * (scale if size == "4x" else 1))]
            with say(f"rss child {name} {size}"):
                runs[size] = run_child(name, *extra)
        small, large = runs["1x"], runs["4x"]
        out[name] = {
            "1x": small,
            "4x": large,
            "ru_maxrss_ratio": large["ru_maxrss_kib"] / small["ru_maxrss_kib"],
            "vm_hwm_ratio": large["vm_hwm_kib"] / small["vm_hwm_kib"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5,000 examples, seconds")
    parser.add_argument("--examples", type=int, default=100_000, help="examples of the 1x store (default 100,000)")
    parser.add_argument("--scale", type=int, default=4, help="the larger store, for peak RSS (default 4x)")
    parser.add_argument("--retrieval-examples", default="20000,40000", help="prefix sizes for retrieval timing")
    parser.add_argument(
        "--retrieval-budget", type=float, default=120.0, help="also on all examples when predicted under this (s)"
    )
    parser.add_argument("--retrieval-layer", type=int, default=4)
    parser.add_argument(
        "--rss-retrieval-rows", type=int, default=10_000, help="retrieval's peak-RSS rows, 1x (x --scale: larger)"
    )
    parser.add_argument("--probe-layers", default="all", help="comma-separated stored layers, or all (default)")
    parser.add_argument("--peer-batch", type=int, default=1024, help="rows per minibatch of ckatorch's estimate")
    parser.add_argument("--shard-tokens", type=int, default=None, help="examples per shard (default: the pipeline's)")
    parser.add_argument("--work", type=Path, default=None, help="keep (and reuse) the stores here, not in a temp dir")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--child", choices=(*CHILDREN, *BEYOND, "write"), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--layer", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shard_tokens is None:
        from pipeline.plan import DEFAULT_SHARD_TOKENS

        args.shard_tokens = 1024 if args.quick else DEFAULT_SHARD_TOKENS
    if args.child:
        return child(args)
    n = 5000 if args.quick else -(-args.examples // len(LANGUAGES)) * len(LANGUAGES)
    prefixes = [1000, 2000] if args.quick else [int(v) for v in args.retrieval_examples.split(",")]
    prefixes = sorted({min(n, -(-p // len(LANGUAGES)) * len(LANGUAGES)) for p in prefixes})
    reads = 1 if args.quick else 3
    quiet = Quiet(args.quick)
    quiet.before("start")
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "host": socket.gethostname(),
        "quick": args.quick,
        "cores": os.cpu_count(),
        "examples": n,
        "scale": args.scale,
        "hidden": HIDDEN,
        "stored_layers": N_STATES,
        "store_dtype": "float16",
        "languages": len(LANGUAGES),
        "command": " ".join([".venv/bin/python -m bench.metrics", *(argv if argv is not None else sys.argv[1:])]),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="actcache-bench-metrics-") as tmp_name:
        root = args.work or Path(tmp_name)
        root.mkdir(parents=True, exist_ok=True)
        cache_dir = str(root / "cache")
        stores, writes = {}, {}
        for size, count in (("1x", n), ("4x", n * args.scale)):
            with say(f"write {size} store ({count} examples)"):
                done = run_child("write", "--cache-dir", cache_dir, "--examples", str(count),
                                 "--shard-tokens", str(args.shard_tokens))  # fmt: skip
            stores[size] = done["path"]
            writes[size] = {"examples": count, "seconds": done["seconds"], "path": done["path"]}
        results["write"] = writes
        # Peak RSS first, while this process is small (a child's ru_maxrss starts at its parent's).
        quiet.before("rss")
        rss_rows = 500 if args.quick else args.rss_retrieval_rows
        results["rss"] = rss_figures(stores, cache_dir, args.retrieval_layer, rss_rows, args.scale)
        results |= timings(args, stores["1x"], cache_dir, prefixes, reads, quiet)
    results["waited_for_others_s"] = quiet.waited
    results["machine"] = quiet.seen
    results["total_s"] = time.perf_counter() - started
    print(json.dumps(results, indent=1))
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{results['date']}-{results['host']}-metrics{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"\nraw figures: {out}")
    return 0


def timings(
    args: argparse.Namespace, store: str, cache_dir: str, prefixes: list[int], reads: int, quiet: Quiet
) -> dict[str, Any]:
    from cache import open_activations

    out: dict[str, Any] = {}
    with open_activations(store, cache_dir=cache_dir) as acts:
        acts.examples  # noqa: B018 -- the metadata table, read once, outside every timing
        quiet.before("cka")
        with say("time cka"):
            read_s, arrays = median_read(lambda: [acts.pooled(layer, lazy=False) for layer in acts.layers], reads)
            out["read_all_layers_s"] = read_s
            out["cka"] = time_cka(acts, arrays, read_s)
        quiet.before("probe")
        with say("time probes"):
            asked = "0,6" if args.quick else args.probe_layers  # --quick: lbfgs on tiny folds is slow to converge
            layers = list(acts.layers) if asked == "all" else [int(v) for v in asked.split(",")]
            out["probe_language"] = time_probes(acts, arrays, read_s, layers)
        quiet.before("retrieval")
        out["retrieval"] = []
        for size in prefixes:
            with say(f"time retrieval {size}"):
                out["retrieval"].append(time_retrieval(acts, args.retrieval_layer, size, reads))
        largest = out["retrieval"][-1]
        predicted = largest["metric_s"] * (acts.n_examples / largest["examples"]) ** 2
        out["retrieval_full_predicted_s"] = predicted
        if largest["examples"] < acts.n_examples and predicted <= args.retrieval_budget:
            with say(f"time retrieval {acts.n_examples}"):
                out["retrieval"].append(time_retrieval(acts, args.retrieval_layer, acts.n_examples, 1, same_code=False))
        elif largest["examples"] < acts.n_examples:
            out["retrieval_note"] = (
                f"retrieval on all {acts.n_examples} examples not run: the {largest['examples']}-row prefix "
                f"predicts {predicted:.0f} s (n^2 scaling), over --retrieval-budget {args.retrieval_budget:g} s"
            )
        quiet.before("peer")
        with say("cka against ckatorch"):
            out["cka_peer"] = cka_against_peer(acts, arrays, args.peer_batch, CKA_PAIRS)
    return out


def table(r: dict[str, Any]) -> str:
    def row(name: str, e: dict[str, Any]) -> str:
        same = "-" if e.get("same_code_in_memory_s") is None else f"{e['same_code_in_memory_s']:.2f}"
        return (
            f"| {name} | {e['metric_s']:.2f} | {e['read_s']:.2f} | {e['metric_over_read']:.1f} | "
            f"{e['numpy_s']:.2f} | {e['metric_over_read_plus_numpy']:.2f} | {same} |"
        )

    lines = [
        f"{r['examples']} examples x {r['stored_layers']} layers x {r['hidden']} ({r['store_dtype']}), "
        f"{r['languages']} languages, {r['cores']} cores; reads from the page cache",
        "",
        "| metric | through store (s) | read lazy=False (s) | / read (target <= 1.5) | numpy in memory (s) "
        "| / (read + numpy) | metric code in memory (s) |",
        "|---|---|---|---|---|---|---|",
        row(f"CKA {r['cka']['layers']}x{r['cka']['layers']} layers", r["cka"]),
        row(
            f"probe language, layers {r['probe_language']['layers']} ({'/'.join(r['probe_language']['methods'])})",
            r["probe_language"],
        ),
        *(row(f"retrieval P@1, layer {e['layer']}, {e['examples']} rows", e) for e in r["retrieval"]),
        "",
        "| peak RSS, own process | 1x (MiB) | 4x (MiB) | ru_maxrss 4x/1x (target <= 1.15) | VmHWM 4x/1x | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in r["rss"].items():
        small, large = e["1x"], e["4x"]
        notes = {
            "open": "imports + open + examples table",
            "read": "pooled(l, lazy=False), all layers",
            "retrieval": f"one layer, {small.get('rows')} / {large.get('rows')} rows",
            "probe": f"one layer: {small.get('method')} / {large.get('method')}",
            "probe-sgd": f"one layer: {small.get('method')} / {large.get('method')} (forced)",
            "cka": "all layers",
        }[name]
        lines.append(
            f"| {name} | {small['ru_maxrss_kib'] / 1024:.0f} | {large['ru_maxrss_kib'] / 1024:.0f} | "
            f"{e['ru_maxrss_ratio']:.2f} | {e['vm_hwm_ratio']:.2f} | {notes} |"
        )
    peer = r["cka_peer"]
    lines += [
        "",
        f"| CKA layers | ours exact (s) | ckatorch cka_batch, batch {peer['batch']} (s) | ours | ckatorch "
        "| abs diff (same rows) | ours vs textbook Gram (subsample) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['layers'][0]} x {p['layers'][1]} | {p['ours_s']:.2f} | {p['peer_s']:.2f} | {p['ours_exact']:.5f} | "
        f"{p['peer_minibatch']:.5f} | {p['abs_diff_peer_vs_ours']:.1e} | "
        f"{p['abs_diff_ours_vs_textbook_on_subsample']:.1e} |"
        for p in peer["pairs"]
    ]
    if "retrieval_note" in r:
        lines += ["", r["retrieval_note"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
