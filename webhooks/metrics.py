"""Prometheus metrics, one registry per app so tests and benchmarks stay independent.

gunicorn runs one worker process (see gunicorn.conf.py): the drain needs one pod watch and
one waiter per pod per process, so a per-process registry is the whole picture.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CENSUS_ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DRAIN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.admission_requests = Counter(
            "stunner_guard_admission_requests",
            "AdmissionReview requests by webhook, kind, operation and verdict.",
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
        # The census (lifecycle/census.py). Labels from closed sets only: no pod names.
        self.census_round_duration = Histogram(
            "stunner_guard_census_round_duration_seconds",
            "Time a census round took: reading every running stunnerd pod, then writing.",
            buckets=CENSUS_ROUND_BUCKETS,
            registry=r,
        )
        self.census_reads = Counter(
            "stunner_guard_census_reads",
            "Census reads of stunner_allocations_active, by result (ok, failed, unobservable).",
            ["result"],
            registry=r,
        )
        self.census_writes = Counter(
            "stunner_guard_census_writes",
            "pod-deletion-cost writes, by result (ok, conflict, failed).",
            ["result"],
            registry=r,
        )
        self.census_writes_skipped = Counter(
            "stunner_guard_census_writes_skipped",
            "Wanted pod-deletion-cost writes not made, by reason (budget: the fleet-wide "
            "write cap; min_interval: the pod was written less than minPatchSeconds ago; "
            "warn: census.mode is warn).",
            ["reason"],
            registry=r,
        )
        self.census_pods = Gauge(
            "stunner_guard_census_pods",
            "Running stunnerd pods in the last census round of this replica.",
            registry=r,
        )
        self.census_leader = Gauge(
            "stunner_guard_census_leader",
            "1 when this replica holds the census Lease (the one that writes).",
            registry=r,
        )
        self.census_pods_by_cost = Gauge(
            "stunner_guard_census_pods_by_cost",
            "Pods by the pod-deletion-cost the census wants for them (0: empty).",
            ["cost"],
            registry=r,
        )
