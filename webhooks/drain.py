"""The drain endpoint's logic, without HTTP: hold a terminating stunnerd pod's preStop hook
until its TURN allocations are gone or its grace budget is spent (DESIGN.md "The drain
(preStop) protocol").

kubelet runs the injected ``httpGet`` preStop as a plain GET with no timeout of its own,
ignores the status code (any answer means "hook done, send SIGTERM") and may deliver it
more than once. Only the *timing* of the answer matters to it; the code and the JSON body
are for people and logs:

    GET /drain/<namespace>/<token>                                    answer
    ----------------------------------------------------------------  -------------------
    malformed namespace/token, namespace not watched, no such pod     404 not_found
    pod not terminating (no deletionTimestamp)                        409 not_terminating
    no Kubernetes API (none configured, or unreachable to confirm)    503 api_unavailable
    drain.maxConcurrent calls already held                            503 over_capacity
    allocations not observable (refused, no pod IP, metric absent,    502 unobservable
      or drain.maxFailedReads failed reads in a row)
    stunner_allocations_active read 0                                 200 drained
    deadline = deletionTimestamp - drain.marginSeconds reached        200 deadline
    pod deleted while held                                            410 pod_deleted
    stunner-guard shutting down while held                            503 stopped

Everything but the last three rows answers at once; only a real, observable termination
blocks. Per process: one pod watch (label selector on the drain token label) instead of
API calls per request, one waiter per pod however many duplicate calls arrive, at most one
metrics read per pod per poll interval (a scheduler thread and a small pool of readers, so
a thousand held drains cost a thousand idle request threads and nothing more).
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import http.client
import itertools
import logging
import math
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from webhooks import names
from webhooks.kube import Kube, KubeUnavailable, PodWatch, WatchExpired
from webhooks.metrics import Metrics
from webhooks.settings import DrainSettings, Settings

log = logging.getLogger(__name__)

DRAINED = "drained"
DEADLINE = "deadline"
UNOBSERVABLE = "unobservable"
POD_DELETED = "pod_deleted"
NOT_FOUND = "not_found"
NOT_TERMINATING = "not_terminating"
API_UNAVAILABLE = "api_unavailable"
OVER_CAPACITY = "over_capacity"
STOPPED = "stopped"

STATUS = {
    DRAINED: 200,
    DEADLINE: 200,
    UNOBSERVABLE: 502,
    POD_DELETED: 410,
    NOT_FOUND: 404,
    NOT_TERMINATING: 409,
    API_UNAVAILABLE: 503,
    OVER_CAPACITY: 503,
    STOPPED: 503,
}

ALLOCATIONS_METRIC = "stunner_allocations_active"

# What the path may carry: a namespace is a DNS-1123 label, the token a label value.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

# The watch: the apiserver ends each watch after a random 5-10 minutes (like client-go's
# reflector), and reconnects back off from 0.5 s to 30 s while the API is unreachable.
WATCH_SECONDS = (300, 600)
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# A watch that lived this long was healthy: the next reconnect is immediate.
HEALTHY_WATCH_SECONDS = 10.0

# Events are best-effort and sent from their own thread; past this many waiting, new
# ones are dropped (logged) rather than queued without bound while the API is down.
EVENT_QUEUE_SIZE = 10_000
EVENT_SOURCE = "stunner-guard"


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    """What one drain call answers; ``seconds`` is how long that call was held."""

    outcome: str
    message: str
    pod: str | None = None  # namespace/name
    allocations: int | None = None
    seconds: float = 0.0

    @property
    def status(self) -> int:
        return STATUS[self.outcome]

    def body(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "pod": self.pod,
            "allocations": self.allocations,
            "seconds": round(self.seconds, 3),
            "message": self.message,
        }


# --------------------------------------------------------------------------- pods


def _timestamp(value: Any) -> float | None:
    """metav1.Time (RFC 3339, whole seconds from a real apiserver) as epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def rfc3339(moment: float) -> str:
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class DrainPod:
    """The few fields of a stunnerd Pod the drain needs (the watch keeps only these)."""

    namespace: str
    name: str
    uid: str
    token: str
    ip: str | None
    deletion: float | None  # deletionTimestamp, epoch seconds

    @classmethod
    def from_object(cls, obj: Any) -> DrainPod | None:
        """None for anything that is not a pod carrying a drain token."""
        if not isinstance(obj, dict):
            return None
        meta = obj.get("metadata") or {}
        token = (meta.get("labels") or {}).get(names.DRAIN_TOKEN_LABEL)
        if not (token and meta.get("name") and meta.get("namespace")):
            return None
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid") or "",
            token=token,
            ip=(obj.get("status") or {}).get("podIP") or None,
            deletion=_timestamp(meta.get("deletionTimestamp")),
        )

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminating(self) -> bool:
        return self.deletion is not None


# --------------------------------------------------------------------------- metrics reads


@dataclass(frozen=True)
class Reading:
    """One read of a pod's metrics: a count, or a problem. A ``fatal`` problem means the
    allocations cannot be observed at all (answer at once); any other is a failed read."""

    allocations: int | None = None
    problem: str = ""
    fatal: bool = False

    @property
    def result(self) -> str:
        """Label for the scrape counter."""
        if self.allocations is not None:
            return "ok"
        return "unobservable" if self.fatal else "failed"


class MetricAbsent(Exception):
    """The page is Prometheus text but has no stunner_allocations_active sample."""


# Only the lines of the one family go through the parser: stunnerd's page also carries the
# go_*/process_*/target_info families, and parsing all of them for a thousand pods every
# second would cost more CPU than serving admission.
_ALLOCATION_LINES = (
    f"{ALLOCATIONS_METRIC} ",
    f"{ALLOCATIONS_METRIC}{{",
    f"# HELP {ALLOCATIONS_METRIC} ",
    f"# TYPE {ALLOCATIONS_METRIC} ",
)


def _family_sum(text: str) -> float | None:
    # Without a TYPE line the parser yields each untyped sample as a family of its own.
    samples = [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == ALLOCATIONS_METRIC
        for sample in family.samples
    ]
    return sum(samples) if samples else None


def allocations_from_text(text: str) -> int:
    """Sum of the ``stunner_allocations_active`` samples (the OpenTelemetry exporter may
    split or label them, e.g. ``otel_scope_name``). ValueError when the page is not
    Prometheus text or the value is not a count; MetricAbsent when the gauge is missing
    (metrics of a stunnerd without allocation telemetry, or another server)."""
    lines = [line for line in text.splitlines() if line.startswith(_ALLOCATION_LINES)]
    total = _family_sum("\n".join(lines) + "\n") if lines else None
    if total is None:
        # Tell "valid page without the gauge" from "not Prometheus text at all".
        for _ in text_string_to_metric_families(text):
            pass
        raise MetricAbsent(f"{ALLOCATIONS_METRIC} is not on the page")
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"{ALLOCATIONS_METRIC} is {total}")
    return round(total)


class _TooLarge(Exception):
    pass


def _read_body(sock: socket.socket, response, deadline: float, limit: int) -> bytes:
    """The body, read under one total deadline (a per-recv timeout would let an endpoint
    that trickles a byte at a time hold the read forever) and at most ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"more than {limit} bytes")  # stop reading: never buffer it all
        chunks.append(chunk)


def read_allocations(ip: str, drain: DrainSettings) -> Reading:
    """Read ``stunner_allocations_active`` from ``http://<ip>:<metricsPort><metricsPath>``.
    Refused or absent metrics cannot be observed at all; a slow, oversized, failing or
    garbled endpoint is a failed read."""
    where = f"{ip}:{drain.metricsPort}{drain.metricsPath}"
    timeout = drain.scrapeTimeoutSeconds
    deadline = time.monotonic() + timeout
    connection = http.client.HTTPConnection(ip, drain.metricsPort, timeout=timeout)
    try:
        connection.connect()
        # The connection forgets its socket once a "Connection: close" response arrives;
        # the body is still read from it.
        sock = connection.sock
        connection.request(
            "GET",
            drain.metricsPath,
            headers={"Accept": "text/plain;version=0.0.4", "User-Agent": "stunner-guard"},
        )
        response = connection.getresponse()
        if response.status != 200:
            return Reading(problem=f"{where} answered HTTP {response.status}")
        body = _read_body(sock, response, deadline, drain.maxMetricsBytes)
        return Reading(allocations=allocations_from_text(body.decode("utf-8")))
    except ConnectionRefusedError:
        return Reading(problem=f"connection refused by {where} (metrics endpoint off?)", fatal=True)
    except MetricAbsent as err:
        return Reading(problem=f"{where}: {err} (metrics endpoint off?)", fatal=True)
    except TimeoutError:
        return Reading(problem=f"{where} did not answer within {timeout:g} s")
    except _TooLarge as err:
        return Reading(problem=f"{where} sent {err}, over the {drain.maxMetricsBytes}-byte limit")
    except ValueError as err:  # UnicodeDecodeError included
        return Reading(problem=f"{where} is not Prometheus text: {str(err)[:120]}")
    except (OSError, http.client.HTTPException) as err:
        return Reading(problem=f"{where}: {type(err).__name__}: {err}")
    finally:
        connection.close()


# --------------------------------------------------------------------------- the pod watch


def _backoff(failures: int) -> float:
    delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (failures - 1))
    return delay * random.uniform(0.8, 1.2)


class PodWatcher:
    """The one pod watch of this process: list + watch of every pod carrying the drain
    token label, kept as a small index by (namespace, token). Reconnects with backoff when
    the watch drops, relists when its resourceVersion expired, and tells ``on_change``
    about every pod it sees change or vanish (``"DELETED"`` or ``"MODIFIED"``)."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        on_change: Callable[[str, DrainPod], None],
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.on_change = on_change
        self._cond = threading.Condition()
        self._by_token: dict[tuple[str, str], DrainPod] = {}
        self._by_name: dict[tuple[str, str], DrainPod] = {}
        self._resource_version = ""
        self._attempted = False  # the first list finished, well or not
        self._connected = False  # a watch is open now
        self._stop = threading.Event()
        self._stream: PodWatch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            stream = self._stream
            self._cond.notify_all()
        if stream is not None:
            stream.close()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def lookup(self, namespace: str, token: str, wait: float) -> DrainPod | None:
        """The pod with this token as the watch knows it; waits up to ``wait`` seconds for
        the first list when the watch is just starting."""
        with self._cond:
            self._cond.wait_for(lambda: self._attempted or self._stop.is_set(), wait)
            return self._by_token.get((namespace, token))

    def wait_terminating(self, namespace: str, token: str, wait: float) -> DrainPod | None:
        """The pod once the watch shows it terminating, waiting up to ``wait`` seconds; None
        at once when no watch is open (nothing could arrive)."""

        def seen() -> DrainPod | None:
            pod = self._by_token.get((namespace, token))
            return pod if pod and pod.terminating else None

        with self._cond:
            if not self._connected:
                return None
            self._cond.wait_for(lambda: seen() or not self._connected, wait)
            return seen()

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            opened = time.monotonic()
            try:
                if not self._resource_version:
                    self._relist()
                self._watch()
            except WatchExpired:
                self._resource_version = ""  # compacted: list again
            except KubeUnavailable as err:
                if not self._stop.is_set():
                    log.warning("pod watch: %s", err)
            finally:
                with self._cond:
                    self._attempted = True
                    self._connected = False
                    self._stream = None
                    self._cond.notify_all()
            failures = 0 if time.monotonic() - opened >= HEALTHY_WATCH_SECONDS else failures + 1
            if failures:
                self._stop.wait(_backoff(failures))

    def _relist(self) -> None:
        items, version = self.kube.list_pods(names.DRAIN_TOKEN_LABEL)
        pods = [p for p in map(DrainPod.from_object, items) if p and self._watched(p)]
        current = {p.key for p in pods}
        with self._cond:
            vanished = [p for key, p in self._by_name.items() if key not in current]
            self._by_name = {p.key: p for p in pods}
            self._by_token = {(p.namespace, p.token): p for p in pods}
            self._resource_version = version
            self._attempted = True
            self._cond.notify_all()
        # Pods deleted while the watch was down, then the current state of the rest.
        for pod in vanished:
            self.on_change("DELETED", pod)
        for pod in pods:
            self.on_change("MODIFIED", pod)

    def _watch(self) -> None:
        timeout = random.randint(*WATCH_SECONDS)
        stream = self.kube.watch_pods(names.DRAIN_TOKEN_LABEL, self._resource_version, timeout)
        with self._cond:
            if self._stop.is_set():
                stream.close()
                return
            self._stream = stream
            self._connected = True
            self._cond.notify_all()
        for kind, obj in stream:
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self._resource_version = str(version)
            pod = DrainPod.from_object(obj)
            if kind in ("ADDED", "MODIFIED", "DELETED") and pod and self._watched(pod):
                self._apply(kind, pod)

    def _watched(self, pod: DrainPod) -> bool:
        return self.settings.watches(pod.namespace)

    def _apply(self, kind: str, pod: DrainPod) -> None:
        with self._cond:
            old = self._by_name.pop(pod.key, None)
            if old is not None and self._by_token.get((old.namespace, old.token)) == old:
                del self._by_token[(old.namespace, old.token)]
            if kind != "DELETED":
                self._by_name[pod.key] = pod
                self._by_token[(pod.namespace, pod.token)] = pod
            self._cond.notify_all()
        self.on_change("DELETED" if kind == "DELETED" else "MODIFIED", pod)


# --------------------------------------------------------------------------- events


class EventRecorder:
    """Kubernetes Events on the drained pod, best-effort: sent from one thread, a failure
    is logged and never touches the drain's answer."""

    def __init__(self, kube: Kube, instance: str) -> None:
        self.kube = kube
        self.instance = instance
        self._queue: queue.Queue[dict | None] = queue.Queue(EVENT_QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(self, pod: DrainPod, reason: str, message: str, warning: bool = False) -> None:
        now = rfc3339(time.time())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{pod.name}.{time.time_ns():x}",
                "namespace": pod.namespace,
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": pod.namespace,
                "name": pod.name,
                "uid": pod.uid,
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="drain-events", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("event dropped (queue full): %s %s: %s", reason, pod.ref, message)

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            try:
                self.kube.create_event(event["metadata"]["namespace"], event)
            except KubeUnavailable as err:
                log.info("event %s not recorded: %s", event["reason"], err)


# --------------------------------------------------------------------------- the drainer


@dataclass(eq=False)
class Waiter:
    """The one shared wait for one terminating pod; every call for the pod joins it."""

    pod: DrainPod
    started: float  # monotonic
    started_at: float  # epoch seconds, for /drains
    deadline: float  # monotonic
    deadline_at: float  # epoch seconds
    allocations: int | None = None
    failed_reads: int = 0
    scraping: bool = False
    next_scrape: float = 0.0  # monotonic
    plan: int = 0  # the scheduler entry that is current for this waiter
    answer: Answer | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Drainer:
    """Answers drain calls; owns the pod watch, the scheduler, the metric readers and the
    event recorder, all started on the first call (``create_app`` stays fast)."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube | None,
        metrics: Metrics,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.drain_settings = settings.drain
        self.kube = kube
        self.metrics = metrics
        self.instance = instance or socket.gethostname()
        self._lock = threading.Condition()
        self._waiters: dict[tuple[str, str], Waiter] = {}
        self._held = 0
        self._schedule: list[tuple[float, int, Waiter]] = []
        self._sequence = itertools.count()
        self._started = False
        self._closed = False
        self.watcher = PodWatcher(kube, settings, self._pod_changed) if kube else None
        self.events = EventRecorder(kube, self.instance) if kube else None
        self._readers: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- the call

    def drain(self, namespace: str, token: str) -> Answer:
        """Answer one drain call; blocks only while a real termination is observable."""
        begun = time.monotonic()
        answer = self._refusal(namespace, token)
        if answer is None:
            if self._take_slot():
                try:
                    answer = self._hold(namespace, token)
                finally:
                    self._free_slot()
            else:
                limit = self.drain_settings.maxConcurrent
                answer = Answer(
                    OVER_CAPACITY,
                    f"{limit} drains already held (drain.maxConcurrent); not holding this "
                    "pod: stunnerd drains on SIGTERM by itself",
                )
                log.warning("drain %s/%s refused: %s", namespace, token, answer.message)
        answer = replace(answer, seconds=time.monotonic() - begun)
        self.metrics.drain_outcomes.labels(answer.outcome).inc()
        log.info("drain %s/%s: %s", namespace, token, answer.message)
        return answer

    def in_progress(self) -> list[dict[str, Any]]:
        """The drains being held now, oldest first (``GET /drains``)."""
        with self._lock:
            waiters = sorted(self._waiters.values(), key=lambda w: w.started)
            return [
                {
                    "namespace": w.pod.namespace,
                    "pod": w.pod.name,
                    "allocations": w.allocations,
                    "started": rfc3339(w.started_at),
                    "deadline": rfc3339(w.deadline_at),
                }
                for w in waiters
            ]

    def close(self) -> None:
        """Stop every thread; drains still held are answered (``stopped``)."""
        with self._lock:
            self._closed = True
            for waiter in list(self._waiters.values()):
                self._finish(waiter, STOPPED, "stunner-guard is shutting down")
            self._lock.notify_all()
        if self.watcher:
            self.watcher.stop()
        if self.events:
            self.events.close()
        if self._readers:
            self._readers.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- before holding

    def _refusal(self, namespace: str, token: str) -> Answer | None:
        """An answer that needs no pod: bad path, unwatched namespace, no cluster."""
        if not (_NAMESPACE.match(namespace) and _LABEL_VALUE.match(token)):
            return Answer(NOT_FOUND, f"{namespace!r}/{token!r} is not a namespace and drain token")
        if not self.settings.watches(namespace):
            return Answer(NOT_FOUND, f"namespace {namespace} is not watched by stunner-guard")
        if self.kube is None:
            return Answer(
                API_UNAVAILABLE, "no Kubernetes API configured: cannot find the pod to drain"
            )
        if self._closed:
            return Answer(STOPPED, "stunner-guard is shutting down")
        return None

    def _take_slot(self) -> bool:
        # Held drain calls occupy gunicorn threads: the cap keeps threads for admission.
        with self._lock:
            if self._held >= self.drain_settings.maxConcurrent:
                return False
            self._held += 1
            return True

    def _free_slot(self) -> None:
        with self._lock:
            self._held -= 1

    def start(self) -> None:
        """Start the pod watch, the scheduler and the readers (the first call does it)."""
        with self._lock:
            if self._started or self.kube is None:
                return
            self._started = True
            self._readers = ThreadPoolExecutor(
                self.drain_settings.scrapeConcurrency, thread_name_prefix="drain-read"
            )
            threading.Thread(target=self._run_schedule, name="drain-schedule", daemon=True).start()
        self.watcher.start()

    def _terminating_pod(self, namespace: str, token: str) -> DrainPod | Answer:
        """The terminating pod with this token, or the answer saying why there is none.
        kubelet calls 50-120 ms after the delete, possibly before the watch delivered the
        deletionTimestamp: anything short of "terminating" is confirmed by a fresh read."""
        confirm = self.drain_settings.confirmSeconds
        pod = self.watcher.lookup(namespace, token, wait=confirm)
        if pod and pod.terminating:
            return pod
        selector = f"{names.DRAIN_TOKEN_LABEL}={token}"
        try:
            items, _ = self.kube.list_pods(selector, namespace)
        except KubeUnavailable as err:
            pod = self.watcher.wait_terminating(namespace, token, wait=confirm)
            if pod:
                return pod
            return Answer(
                API_UNAVAILABLE, f"cannot confirm the pod with drain token {token}: {err}"
            )
        pods = [p for p in map(DrainPod.from_object, items) if p]
        for pod in pods:
            if pod.terminating:
                return pod
        if pods:
            return Answer(
                NOT_TERMINATING,
                f"pod {pods[0].ref} is not terminating (no deletionTimestamp): nothing to drain",
                pod=pods[0].ref,
            )
        return Answer(NOT_FOUND, f"no pod in namespace {namespace} carries drain token {token}")

    # ---------------------------------------------------------------- holding

    def _hold(self, namespace: str, token: str) -> Answer:
        self.start()
        pod = self._terminating_pod(namespace, token)
        if isinstance(pod, Answer):
            return pod
        waiter = self._join(pod)
        # The scheduler ends every wait at its deadline; this bound only guards against a
        # scheduler that died, so that the hook is never held past the deadline for long.
        d = self.drain_settings
        slack = d.pollIntervalSeconds + d.scrapeTimeoutSeconds + 1.0
        if not waiter.done.wait(max(0.0, waiter.deadline - time.monotonic()) + slack):
            with self._lock:
                self._finish_at_deadline(waiter)
        return waiter.answer

    def _join(self, pod: DrainPod) -> Waiter:
        d = self.drain_settings
        with self._lock:
            waiter = self._waiters.get(pod.key)
            if waiter is not None and waiter.pod.uid == pod.uid:
                return waiter  # a duplicate delivery shares the wait
            if waiter is not None:  # a new pod reusing the name: the old one is gone
                self._finish(waiter, POD_DELETED, f"pod {pod.ref} was replaced")
            now, wall = time.monotonic(), time.time()
            deadline_at = pod.deletion - d.marginSeconds
            waiter = Waiter(
                pod=pod,
                started=now,
                started_at=wall,
                deadline=now + (deadline_at - wall),
                deadline_at=deadline_at,
                next_scrape=now,
            )
            self._waiters[pod.key] = waiter
            self.metrics.drains_in_progress.inc()
            if not pod.ip:
                self._finish(waiter, UNOBSERVABLE, "the pod has no IP: allocations not observable")
            elif now >= waiter.deadline:
                self._finish_at_deadline(waiter)
            else:
                self._plan(waiter)
            return waiter

    # ---------------------------------------------------------------- the scheduler

    def _plan(self, waiter: Waiter) -> None:
        """Schedule the waiter's next step: its next read, or its deadline while a read is
        in flight. Lock held."""
        wake = waiter.deadline if waiter.scraping else min(waiter.next_scrape, waiter.deadline)
        waiter.plan = next(self._sequence)
        heapq.heappush(self._schedule, (wake, waiter.plan, waiter))
        self._lock.notify_all()

    def _run_schedule(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                while self._schedule and self._schedule[0][0] <= now:
                    _, plan, waiter = heapq.heappop(self._schedule)
                    if waiter.answer is None and plan == waiter.plan:
                        self._step(waiter, now)
                delay = self._schedule[0][0] - now if self._schedule else None
                self._lock.wait(delay)

    def _step(self, waiter: Waiter, now: float) -> None:
        if now >= waiter.deadline:
            self._finish_at_deadline(waiter)
            return
        if not waiter.scraping and now >= waiter.next_scrape:
            # At most one read per pod per poll interval, however many calls wait on it.
            waiter.scraping = True
            waiter.next_scrape = now + self.drain_settings.pollIntervalSeconds
            self._readers.submit(self._read, waiter, waiter.pod.ip)
        self._plan(waiter)

    def _read(self, waiter: Waiter, ip: str) -> None:
        try:
            reading = read_allocations(ip, self.drain_settings)
        except Exception as err:  # a bug here must not leave the waiter without reads
            log.exception("reading allocations of %s", waiter.pod.ref)
            reading = Reading(problem=f"{type(err).__name__}: {err}")
        self.metrics.metric_scrapes.labels(reading.result).inc()
        with self._lock:
            waiter.scraping = False
            if waiter.answer is None:
                self._take_reading(waiter, reading)

    def _take_reading(self, waiter: Waiter, reading: Reading) -> None:
        pod = waiter.pod
        if reading.allocations is not None:
            first = waiter.allocations is None
            waiter.allocations, waiter.failed_reads = reading.allocations, 0
            if reading.allocations == 0:
                self._finish(waiter, DRAINED, "0 TURN allocations left")
                return
            if first:
                self._event(
                    pod,
                    "DrainStarted",
                    f"holding preStop until {reading.allocations} TURN allocations end "
                    f"or until {rfc3339(waiter.deadline_at)} "
                    f"(deletionTimestamp - {self.drain_settings.marginSeconds:g} s)",
                )
        elif reading.fatal:
            self._finish(waiter, UNOBSERVABLE, f"allocations not observable: {reading.problem}")
            return
        else:
            waiter.failed_reads += 1
            if waiter.failed_reads >= self.drain_settings.maxFailedReads:
                self._finish(
                    waiter,
                    UNOBSERVABLE,
                    f"{waiter.failed_reads} failed reads in a row, last: {reading.problem}",
                )
                return
        self._plan(waiter)

    # ---------------------------------------------------------------- the watch's news

    def _pod_changed(self, kind: str, pod: DrainPod) -> None:
        with self._lock:
            waiter = self._waiters.get(pod.key)
            if waiter is None or waiter.answer is not None or waiter.pod.uid != pod.uid:
                return
            if kind == "DELETED":
                self._finish(waiter, POD_DELETED, "the pod was deleted while its drain was held")
                return
            if not pod.ip:
                self._finish(
                    waiter, UNOBSERVABLE, "the pod lost its IP: allocations not observable"
                )
                return
            if pod.deletion is not None and pod.deletion != waiter.pod.deletion:
                # A shorter grace on a repeated delete (e.g. --grace-period) moves the
                # deadline: kubelet will not wait past the new one.
                waiter.deadline_at = pod.deletion - self.drain_settings.marginSeconds
                waiter.deadline = time.monotonic() + (waiter.deadline_at - time.time())
            waiter.pod = pod
            self._plan(waiter)

    # ---------------------------------------------------------------- answering

    def _finish_at_deadline(self, waiter: Waiter) -> None:
        left = waiter.allocations
        left_text = "an unknown number of" if left is None else str(left)
        self._finish(
            waiter,
            DEADLINE,
            f"deadline reached with {left_text} TURN allocations left; "
            "releasing preStop so stunnerd still gets SIGTERM time",
        )

    def _finish(self, waiter: Waiter, outcome: str, message: str) -> None:
        """Answer every call waiting on this pod (once). Lock held."""
        if waiter.answer is not None:
            return
        seconds = time.monotonic() - waiter.started
        waiter.answer = Answer(outcome, message, waiter.pod.ref, waiter.allocations, seconds)
        if self._waiters.get(waiter.pod.key) is waiter:
            del self._waiters[waiter.pod.key]
            self.metrics.drains_in_progress.dec()
        self.metrics.drain_duration.labels(outcome).observe(seconds)
        waiter.done.set()
        if outcome == DRAINED:
            self._event(waiter.pod, "Drained", f"0 TURN allocations after {seconds:.1f} s")
        elif outcome == DEADLINE:
            self._event(waiter.pod, "DrainDeadline", f"after {seconds:.1f} s: {message}", True)
        elif outcome == UNOBSERVABLE:
            self._event(waiter.pod, "DrainNotObservable", f"{message}; released at once", True)

    def _event(self, pod: DrainPod, reason: str, message: str, warning: bool = False) -> None:
        if self.events:
            self.events.record(pod, reason, message, warning)
