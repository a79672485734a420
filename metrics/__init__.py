"""Metrics jobs over cached activations: cross-lingual retrieval, linear CKA and linear probes per layer.

A consumer of stores on the floor above `cache`: it imports `cache` and `schemas`, never
`pipeline`, so a metrics job runs where torch and transformers are not imported.

>>> from metrics import MetricsConfig, run_metrics
>>> run_metrics(MetricsConfig(store="minilm-l6__sample", out="metrics-out"))   # doctest: +SKIP

Each metric also takes plain arrays (anything with `.shape` and row slices):
`linear_cka(x, y)`, `cka_matrix(xs, ys)`, `retrieval_p1(vectors, Alignment.of(langs, keys))`,
`probe_accuracy(features, labels)`.
"""

from metrics.cka import cka_matrix, linear_cka
from metrics.job import MetricsConfig, MetricsResult, run_metrics
from metrics.probes import ProbeResult, probe_accuracy
from metrics.retrieval import Alignment, retrieval_p1
from metrics.rows import StoreRows

__all__ = [
    "Alignment",
    "MetricsConfig",
    "MetricsResult",
    "ProbeResult",
    "StoreRows",
    "cka_matrix",
    "linear_cka",
    "probe_accuracy",
    "retrieval_p1",
    "run_metrics",
]
