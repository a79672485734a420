"""Linear probes per layer: logistic regression, stratified k-fold accuracy, out of core when it must.

Features are standardized on each training fold (hidden states' scales differ by orders of
magnitude between dimensions), then a multinomial logistic regression is fitted. Where the
features fit `memory` they are read once and scikit-learn's `LogisticRegression` (lbfgs)
is fitted on them; beyond it, one `SGDClassifier` (log loss) per fold learns from row blocks
with `partial_fit`, every fold in lockstep, so each epoch is one read of the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metrics.rows import DEFAULT_BLOCK_ROWS, Rows, align_of, blocks, read

__all__ = ["DEFAULT_PROBE_MEMORY", "ProbeResult", "fold_ids", "probe_accuracy"]

DEFAULT_PROBE_MEMORY = 512 << 20  # bytes of float32 features read into memory for an lbfgs fit
SGD_EPOCHS = 5


@dataclass(frozen=True)
class ProbeResult:
    """Mean accuracy over the folds, each fold's, the majority class's share (chance), and how it was fitted.

    `fold` and `correct` are each row's test fold and whether the probe trained without it
    predicted it right: what `accuracy_of` resamples for a bootstrap interval.
    """

    accuracy: float
    folds: tuple[float, ...]
    chance: float
    method: str  # "lbfgs" (in memory) or "sgd" (row blocks)
    fold: np.ndarray = field(compare=False, repr=False)  # (n,) each row's test fold
    correct: np.ndarray = field(compare=False, repr=False)  # (n,) bool: right, by the probe not trained on it

    def accuracy_of(self, weights: np.ndarray) -> float:
        """The mean fold accuracy with row i counted `weights[i]` times (a bootstrap resample's multiplicities)."""
        k = len(self.folds)
        right = np.bincount(self.fold, weights=weights * self.correct, minlength=k)
        total = np.bincount(self.fold, weights=weights, minlength=k)
        shown = total > 0  # a resample may leave a fold without rows: it has no accuracy to average
        return float(np.mean(right[shown] / total[shown]))


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's test fold under scikit-learn's `StratifiedKFold(folds, shuffle=True, random_state=seed)`."""
    from sklearn.model_selection import StratifiedKFold

    ids = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros((len(labels), 1)), labels)):
        ids[test] = k
    return ids


def probe_accuracy(
    features: Rows,
    labels: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    memory: int = DEFAULT_PROBE_MEMORY,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> ProbeResult:
    """Stratified `folds`-fold accuracy of a linear probe from `features` (n, d) to `labels` (n,)."""
    n, d = (int(v) for v in features.shape)
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} rows")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes; all {n} rows are {classes.tolist()}")
    if counts.min() < folds:
        raise ValueError(
            f"class {classes[counts.argmin()]!r} has {counts.min()} rows, fewer than the {folds} folds; "
            "use fewer folds or more examples"
        )
    ids = fold_ids(labels, folds, seed)
    chance = float(counts.max() / n)
    if n * d * 4 <= memory:
        x = read(features, 0, n, np.float32)
        if progress is not None:
            progress(n)
        correct = np.zeros(n, dtype=bool)
        for k in range(folds):
            _fit_in_memory(x, labels, ids, k, seed, correct)
        method = "lbfgs"
    else:
        correct = _fit_streamed(features, labels, ids, folds, classes, seed, block_rows, progress)
        method = "sgd"
    scores = np.bincount(ids, weights=correct, minlength=folds) / np.bincount(ids, minlength=folds)
    return ProbeResult(float(np.mean(scores)), tuple(float(v) for v in scores), chance, method, ids, correct)


def in_memory_probe(seed: int) -> Any:
    """The estimator the in-memory path fits on each fold (standardize, then lbfgs logistic regression)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))


def streamed_probe(seed: int) -> Any:
    """The estimator of one fold of the streamed path (fed standardized blocks by `partial_fit`)."""
    from sklearn.linear_model import SGDClassifier

    return SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed)


def _fit_in_memory(x: np.ndarray, labels: np.ndarray, ids: np.ndarray, k: int, seed: int, correct: np.ndarray) -> None:
    """Fit fold `k`'s probe and mark which of its test rows it predicts right in `correct`."""
    train, test = ids != k, ids == k
    model = in_memory_probe(seed).fit(x[train], labels[train])
    correct[test] = model.predict(x[test]) == labels[test]


def _fit_streamed(
    features: Rows,
    labels: np.ndarray,
    ids: np.ndarray,
    folds: int,
    classes: np.ndarray,
    seed: int,
    block_rows: int,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    """Each row's out-of-fold correctness, from one SGD probe per fold learning over row blocks."""
    from sklearn.preprocessing import StandardScaler

    n = len(labels)
    spans = list(blocks(n, block_rows, align_of(features)))
    scalers = [StandardScaler() for _ in range(folds)]
    for start, stop in spans:  # one read: each fold's mean and variance over its training rows
        x = read(features, start, stop, np.float32)
        for k, scaler in enumerate(scalers):
            train = ids[start:stop] != k
            if train.any():
                scaler.partial_fit(x[train])
        if progress is not None:
            progress(stop - start)
    models = [streamed_probe(seed) for _ in range(folds)]
    for _ in range(SGD_EPOCHS):  # each epoch one read, every fold learning from its training rows
        for start, stop in spans:
            x = read(features, start, stop, np.float32)
            for k, model in enumerate(models):
                train = ids[start:stop] != k
                if train.any():
                    model.partial_fit(scalers[k].transform(x[train]), labels[start:stop][train], classes=classes)
            if progress is not None:
                progress(stop - start)
    correct = np.zeros(n, dtype=bool)
    for start, stop in spans:
        x = read(features, start, stop, np.float32)
        for k, model in enumerate(models):
            test = ids[start:stop] == k
            if test.any():
                predicted = model.predict(scalers[k].transform(x[test]))
                correct[start:stop][test] = predicted == labels[start:stop][test]
        if progress is not None:
            progress(stop - start)
    return correct
