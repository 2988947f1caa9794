"""Prometheus metrics, one registry per app so tests and benchmarks stay independent.

gunicorn runs one worker process (see gunicorn.conf.py): the drain needs one pod watch and
one waiter per pod per process, so a per-process registry is the whole picture.

Every label value comes from a closed set written here or in the code, never from a
request: each distinct value is a new series kept for the life of the process, and 30,000
reviews with made-up kinds once grew this page to 107 MB. Values the guard does not know
count as ``other``.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DRAIN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)

OTHER = "other"
# admission.k8s.io/v1 Operation: what a real apiserver sends. A missing or made-up
# operation (only a client that is not the apiserver sends one) counts as OTHER.
OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})


def closed(value: str, known: Collection[str]) -> str:
    """``value`` as a label value: itself when it is one of ``known``, else ``other``."""
    return value if value in known else OTHER


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.admission_requests = Counter(
            "stunner_guard_admission_requests",
            "AdmissionReview requests by webhook, kind (the kinds the guard handles, else "
            "other), operation (CREATE, UPDATE, DELETE, CONNECT, else other) and verdict.",
            ["webhook", "kind", "operation", "verdict"],
            registry=r,
        )
        self.admission_latency = Histogram(
            "stunner_guard_admission_duration_seconds",
            "Time to decide an AdmissionReview, by webhook.",
            ["webhook"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bad_requests = Counter(
            "stunner_guard_admission_bad_requests",
            "Bodies rejected before any policy ran (HTTP 400/413), by webhook and status.",
            ["webhook", "status"],
            registry=r,
        )
        self.kube_unreachable = Counter(
            "stunner_guard_kube_unreachable",
            "Admission decisions taken without the Kubernetes API (allowed with a warning).",
            registry=r,
        )
        self.drains_in_progress = Gauge(
            "stunner_guard_drains_in_progress",
            "Drains currently holding a terminating stunnerd pod's preStop hook.",
            registry=r,
        )
        self.drain_duration = Histogram(
            "stunner_guard_drain_duration_seconds",
            "How long drains held the preStop hook, by outcome.",
            ["outcome"],
            buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.drain_outcomes = Counter(
            "stunner_guard_drain_outcomes",
            "Drain endpoint answers by outcome (drained, deadline, unobservable, pod_deleted, "
            "not_found, not_terminating, api_unavailable, over_capacity, stopped).",
            ["outcome"],
            registry=r,
        )
        self.metric_scrapes = Counter(
            "stunner_guard_drain_scrapes",
            "Reads of stunner_allocations_active from stunnerd pods, by result.",
            ["result"],
            registry=r,
        )
