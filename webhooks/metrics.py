"""Prometheus metrics, one registry per app so tests and benchmarks stay independent.

gunicorn runs one worker process (see gunicorn.conf.py): the drain needs one pod watch and
one waiter per pod per process, so a per-process registry is the whole picture.

The alert rules and the Grafana dashboard (charts/stunner-guard/files/) use these names as
exposed: a Counter ``x`` is ``x_total``, a Histogram ``x`` is ``x_bucket``/``x_sum``/``x_count``.

Every label value comes from a closed set written here or in the code, never from a
request: each distinct value is a new series kept for the life of the process, and 30,000
reviews with made-up kinds once grew this page to 107 MB. Values the guard does not know
count as ``other``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from webhooks import certs

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CENSUS_ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DRAIN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)
# TURN allocations a stunnerd pod still had when its drain reached the deadline.
ALLOCATION_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# A certificate file larger than this is not read (a Secret holds at most 1 MiB).
MAX_CERTIFICATE_BYTES = 1 << 20

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
        self.ready = Gauge(
            "stunner_guard_ready",
            "1 while /readyz answers ready, else 0 (e.g. the drain host is unknown).",
            registry=r,
        )
        self.drains_in_progress = Gauge(
            "stunner_guard_drains_in_progress",
            "Drains currently holding a terminating stunnerd pod's preStop hook.",
            registry=r,
        )
        self.drain_calls_held = Gauge(
            "stunner_guard_drain_calls_held",
            "Drain calls held now, each on a gunicorn thread (a repeated delivery for the "
            "same pod counts again); at stunner_guard_drain_capacity more get 503.",
            registry=r,
        )
        self.drain_capacity = Gauge(
            "stunner_guard_drain_capacity",
            "drain.maxConcurrent: drain calls this process holds at most.",
            registry=r,
        )
        self.drain_duration = Histogram(
            "stunner_guard_drain_duration_seconds",
            "How long drains held the preStop hook, by outcome.",
            ["outcome"],
            buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.drain_allocations_left = Histogram(
            "stunner_guard_drain_allocations_left",
            "TURN allocations a pod still had when its drain ended at the deadline (last "
            "read; not observed when no read succeeded).",
            buckets=ALLOCATION_BUCKETS,
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
        self.census_mode = Gauge(
            "stunner_guard_census_mode",
            "1 for this replica's census.mode (enforce, warn, off), 0 for the other two: "
            "the alert that wants one census leader asks only of fleets in enforce mode.",
            ["mode"],
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
        self.pod_watch_connected = OptionalGauge(
            "stunner_guard_pod_watch_connected",
            "1 while the pod watch is open, 0 while it reconnects; absent until the first "
            "drain call starts it.",
            registry=r,
        )
        self.certificates = CertificateExpiry(registry=r)


class OptionalGauge:
    """A gauge read from a function at scrape time that may have no value yet (None):
    then the page has its HELP and TYPE and no sample, rather than a made-up 0."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._read: Callable[[], float | None] = lambda: None
        registry.register(self)

    def set_function(self, read: Callable[[], float | None]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation)
        value = self._read()
        if value is not None:
            family.add_metric([], float(value))
        return [family]


# --------------------------------------------------------------------------- certificates

EXPIRY = "stunner_guard_certificate_expiry_timestamp_seconds"
READABLE = "stunner_guard_certificate_readable"


class _CertificateFile:
    """One PEM file, parsed again only when stat() shows another file: kubelet updates a
    mounted Secret by swapping the ``..data`` symlink to a new directory, so the path keeps
    its name and (following the symlink) gets a new inode, size or mtime."""

    def __init__(self, path: str, pick: Callable[[list[float]], float]) -> None:
        self.path = path
        self.pick = pick
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._expiry: float | None = None

    def state(self) -> tuple[float | None, bool]:
        """(notAfter as Unix time, or None; whether the file was read and parsed)."""
        value = self.expiry()
        return value, value is not None

    def expiry(self) -> float | None:
        """notAfter as Unix time, or None when the file cannot be read or parsed."""
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError as err:
            with self._lock:
                if self._seen != (0, 0, 0):
                    log.warning("certificate %s cannot be read: %s", self.path, err.strerror)
                self._seen, self._expiry = (0, 0, 0), None
            return None
        with self._lock:
            if seen != self._seen:
                self._seen, self._expiry = seen, self._read()
            return self._expiry

    def _read(self) -> float | None:
        try:
            with open(self.path, "rb") as f:
                pem = f.read(MAX_CERTIFICATE_BYTES + 1)
            if len(pem) > MAX_CERTIFICATE_BYTES:
                raise ValueError(f"larger than {MAX_CERTIFICATE_BYTES} bytes")
            return self.pick(certs.expiry_timestamps(pem))
        except OSError as err:
            log.warning("certificate %s cannot be read: %s", self.path, err.strerror)
        except ValueError as err:
            log.warning("certificate %s cannot be parsed: %s", self.path, err)
        return None


class _ServedCertificate:
    """The serving certificate as the TLS server loaded it (webhooks/serving.py): the expiry
    of what clients get, and not readable while the files hold a pair that does not load
    (the server keeps serving the last good one, whose expiry still counts)."""

    def __init__(self, served: Callable[[], tuple[bytes, bool]]) -> None:
        self.served = served
        self._pem = b""
        self._expiry: float | None = None

    def state(self) -> tuple[float | None, bool]:
        pem, stale = self.served()
        if pem is not self._pem:
            self._pem = pem
            try:
                self._expiry = certs.expiry_timestamps(pem)[0]
            except ValueError:
                self._expiry = None
        return self._expiry, self._expiry is not None and not stale


class CertificateExpiry:
    """notAfter of the serving certificate in use (the first certificate of its file: the
    leaf) and of its CA (the earliest of the CA file's certificates: during a CA rotation
    the bundle holds the old and the new CA, and the old one's end is the first thing that
    can break a webhook call). A file that cannot be read or parsed has no expiry sample
    and ``stunner_guard_certificate_readable`` 0 for it; the scrape goes on."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._files: dict[str, _CertificateFile | _ServedCertificate] = {}
        registry.register(self)

    def watch(self, serving: str, ca: str) -> None:
        self._files = {
            "serving": _CertificateFile(serving, lambda found: found[0]),
            "ca": _CertificateFile(ca, min),
        }

    def serve_from(self, served: Callable[[], tuple[bytes, bool]]) -> None:
        """The serving certificate from the TLS server itself: (PEM in use, whether the
        files now hold a pair that did not load)."""
        self._files["serving"] = _ServedCertificate(served)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                EXPIRY,
                "notAfter of the certificate in use, as Unix time: certificate=serving (the "
                "leaf gunicorn serves) or ca (the earliest in the CA file).",
                labels=["certificate"],
            ),
            GaugeMetricFamily(
                READABLE,
                "1 when the certificate file was read and parsed (for serving: and loaded with "
                "its key), 0 when it cannot be.",
                labels=["certificate"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        expiry, readable = self._families()
        for name, source in self._files.items():
            value, ok = source.state()
            readable.add_metric([name], 1.0 if ok else 0.0)
            if value is not None:
                expiry.add_metric([name], value)
        return [expiry, readable]
