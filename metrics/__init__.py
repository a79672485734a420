"""Metrics jobs over cached activations, per layer: retrieval, CKA (plain, debiased), mutual k-NN, probes.

A consumer of stores on the floor above `cache`: it imports `cache` and `schemas`, never
`pipeline`, so a metrics job runs where torch and transformers are not imported.

>>> from metrics import MetricsConfig, run_metrics
>>> run_metrics(MetricsConfig(store="minilm-l6__sample", out="metrics-out"))   # doctest: +SKIP

Each metric also takes plain arrays (anything with `.shape` and row slices):
`linear_cka(x, y, debiased=...)`, `cka_matrix(xs, ys)`, `retrieval_p1(vectors, Alignment.of(langs, keys))`,
`retrieval_margin_p1(...)`, `mutual_knn(x, y, k)`, `probe_accuracy(features, labels)`.
"""

from metrics.cka import cka_matrix, linear_cka
from metrics.job import MetricsConfig, MetricsResult, run_metrics
from metrics.neighbours import knn_indices, knn_overlap, mutual_knn
from metrics.probes import ProbeResult, probe_accuracy
from metrics.retrieval import Alignment, Outcomes, retrieval_margin_p1, retrieval_outcomes, retrieval_p1
from metrics.rows import StoreRows

__all__ = [
    "Alignment",
    "MetricsConfig",
    "MetricsResult",
    "Outcomes",
    "ProbeResult",
    "StoreRows",
    "cka_matrix",
    "knn_indices",
    "knn_overlap",
    "linear_cka",
    "mutual_knn",
    "probe_accuracy",
    "retrieval_margin_p1",
    "retrieval_outcomes",
    "retrieval_p1",
    "run_metrics",
]
