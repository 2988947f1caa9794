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
    no Kubernetes API (none configured, unreachable to confirm, or    503 api_unavailable
      the fresh-read rate limit spent)
    drain.maxConcurrent calls already held                            503 over_capacity
    allocations not observable (refused, no pod IP, metric absent,    502 unobservable
      or drain.maxFailedReads failed reads in a row)
    stunner_allocations_active read 0                                 200 drained
    deadline = deletionTimestamp - drain.marginSeconds reached        200 deadline
    pod deleted while held                                            410 pod_deleted
    stunner-guard shutting down while held                            503 stopped

Only a real, observable termination blocks (drained, deadline, pod_deleted, stopped, and
unobservable after failed reads); everything else answers at once, or, for a pod the watch
knows but does not show terminating, once drain.confirmSeconds have passed and a fresh
API read agrees (Drainer._terminating_pod). Per process: one pod
watch (label selector on the drain token label) instead of API calls per request, one
waiter per pod however many duplicate calls arrive, at most one metrics read per pod per
poll interval, and one drain loop thread that schedules every read, the census's too
(``read_for_census``: one reader key and kept connection per pod for both). The reads themselves
run in a child process (webhooks/lifecycle/scrape.py), off the GIL that admission needs; it passes
zeros and failed reads on within 20 ms and other counts in batches of at most 64 within
0.1 s. A thousand held drains cost a thousand idle request threads, a tenth of a core in
the reader (at a lower CPU priority than the worker), 3% of a core here (the drain loop,
measured with no admission load), and one kept-alive connection per pod.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import re
import selectors
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from webhooks import logs, names
from webhooks.kube import Kube, KubeUnavailable
from webhooks.lifecycle.events import EventRecorder
from webhooks.lifecycle.podwatch import DrainPod, PodWatcher, rfc3339
from webhooks.lifecycle.scrape import READ_RESULTS, Reader, Reading, ReadSpec
from webhooks.metrics import Metrics
from webhooks.settings import Settings

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

# Outcomes of a call that held a terminating pod's hook (the others answer at once).
HELD_OUTCOMES = frozenset({DRAINED, DEADLINE, UNOBSERVABLE, POD_DELETED, STOPPED})

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

# What the path may carry: a namespace is a DNS-1123 label, the token a label value. Used
# with fullmatch: "$" would also match before a final newline (/drain/media/tok%0A).
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")

# Reads fall due on a grid of this step, so that one pass of the drain loop starts (and
# one select() collects) many pods' reads instead of one: a thousand pods cost fewer loop
# passes. It delays a read by this much at most.
READ_SLOT_SECONDS = 0.02
# A drain call for a token the pod watch (open, in sync) has not seen waits this long for
# its ADDED event, then answers 404 without asking the API: every stunnerd pod carries its
# token from its CREATE, long before kubelet can run its preStop, so an unseen token is
# one the guard never stamped (a typo, a probe, or a caller trying to make the guard hammer
# the apiserver with a LIST per call).
UNSEEN_TOKEN_WAIT_SECONDS = 0.25
# Fresh API reads (the watch is down, or it has not shown a known pod's deletionTimestamp
# within drain.confirmSeconds): at most this many per second after a burst, and calls for
# the same token share one read. A call that finds no read left within its
# confirmSeconds answers 503 at once, as when the API is unreachable.
FRESH_READS_PER_SECOND = 5.0
FRESH_READ_BURST = 10
# The reader ends a read at drain.scrapeTimeoutSeconds (and its result may wait up to
# scrape.RESULTS_EVERY_SECONDS to go out with others); one not answered this much later is
# stuck (or still starting), and the read counts as failed.
READER_SLACK_SECONDS = 2.0


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


# --------------------------------------------------------------------------- fresh reads


class ReadsExhausted(KubeUnavailable):
    """No fresh read could be made in time: the rate limit's reads were all taken."""


@dataclass(eq=False)
class _Flight:
    """One fresh read of the pods carrying a token, shared by the calls waiting on it."""

    started: float  # monotonic
    done: bool = False
    items: list[dict] = field(default_factory=list)
    error: KubeUnavailable | None = None


class FreshReads:
    """Pod reads that bypass the watch, for the drain calls it cannot answer: one read per
    (namespace, token) at a time, shared by every call that arrived before it started (it
    then shows the pod as it was when they arrived, or later), and at most
    FRESH_READS_PER_SECOND after a burst of FRESH_READ_BURST overall. A read is kept for
    ``keep_seconds`` (a call's longest wait) for calls still waiting to share it, then
    forgotten: random tokens cannot grow it without bound."""

    def __init__(self, kube: Kube, keep_seconds: float) -> None:
        self.kube = kube
        self.keep_seconds = keep_seconds
        self._cond = threading.Condition()
        # In the order they started: the oldest are forgotten first.
        self._flights: OrderedDict[tuple[str, str], _Flight] = OrderedDict()
        self._tokens = float(FRESH_READ_BURST)
        self._refilled = time.monotonic()

    def pods(self, namespace: str, token: str, arrived: float, deadline: float) -> list[dict]:
        """The pods carrying ``token``, read after ``arrived`` (monotonic); KubeUnavailable
        when the API did not answer, ReadsExhausted when no read could start by
        ``deadline``."""
        key = (namespace, token)
        with self._cond:
            while True:
                flight = self._flights.get(key)
                if flight is not None and flight.started >= arrived:
                    mine = False  # it began after this call arrived: its answer will do
                    break
                if flight is not None and not flight.done:
                    # It may predate the delete: wait for it to end, then read anew.
                    left = deadline - time.monotonic()
                    if not self._cond.wait_for(lambda f=flight: f.done, left):
                        raise ReadsExhausted(f"no fresh read of drain token {token} in time")
                    continue
                if not self._take(deadline):
                    raise ReadsExhausted(
                        f"more than {FRESH_READS_PER_SECOND:g} fresh API reads a second "
                        "asked for: cannot confirm this call"
                    )
                shared = self._flights.get(key)
                if shared is not None and shared.started >= arrived:
                    # Another call started one while this one waited for the bucket.
                    self._tokens += 1
                    continue
                self._forget_old()
                flight = self._flights[key] = _Flight(time.monotonic())
                self._flights.move_to_end(key)
                mine = True
                break
            if not mine:
                self._cond.wait_for(lambda: flight.done)
        if mine:
            try:
                selector = f"{names.DRAIN_TOKEN_LABEL}={token}"
                flight.items, _ = self.kube.list_pods(selector, namespace)
            except KubeUnavailable as err:
                flight.error = err
            finally:
                with self._cond:
                    flight.done = True
                    self._cond.notify_all()
        if flight.error is not None:
            raise flight.error
        return flight.items

    def _forget_old(self) -> None:
        """Drop the reads no call can still share. Lock held."""
        too_old = time.monotonic() - self.keep_seconds
        while self._flights:
            key, flight = next(iter(self._flights.items()))
            if not (flight.done and flight.started < too_old):
                break
            del self._flights[key]

    def _take(self, deadline: float) -> bool:
        """One read from the bucket, waiting for one up to ``deadline``. Lock held."""
        while True:
            now = time.monotonic()
            self._tokens = min(
                FRESH_READ_BURST, self._tokens + (now - self._refilled) * FRESH_READS_PER_SECOND
            )
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            wait = (1 - self._tokens) / FRESH_READS_PER_SECOND
            if now + wait > deadline:
                return False
            self._cond.wait(wait)


# --------------------------------------------------------------------------- the drainer


@dataclass(slots=True)
class PodKey:
    """The reader's key for one pod, and whether the reader has been sent it (and so may
    keep a connection to the pod)."""

    uid: str
    key: int
    sent: bool = False


@dataclass(eq=False)
class CensusReads:
    """One census round's reads in flight: reader key -> pod, and the readings so far."""

    pods: dict[int, tuple[str, str]] = field(default_factory=dict)
    readings: dict[int, Reading] = field(default_factory=dict)


@dataclass(eq=False)
class Waiter:
    """The one shared wait for one terminating pod; every call for the pod joins it."""

    pod: DrainPod
    started: float  # monotonic
    started_at: float  # epoch seconds, for /drains
    deadline: float  # monotonic
    deadline_at: float  # epoch seconds
    key: int = 0  # the reader process's name for this pod (shared with the census)
    allocations: int | None = None
    failed_reads: int = 0
    reading_until: float | None = None  # monotonic; set while a read is in flight
    asked: bool = False  # this drain has asked the reader for a read
    next_scrape: float = 0.0  # monotonic
    plan: int = 0  # the drain loop's schedule entry that is current for this waiter
    answer: Answer | None = None
    done: threading.Event = field(default_factory=threading.Event)


# Calls answered at once (no such pod, not terminating, no API, over capacity) are logged
# at most this many a second: anyone who reaches the endpoint can make them. A drain that
# was held is always logged.
_quick_answers_logged = logs.Throttle(per_second=10)


def _log_answer(namespace: str, token: str, answer: Answer) -> None:
    """One line per drain: pod, outcome, allocations left, seconds held."""
    fields = {
        "pod": answer.pod or f"{namespace}/{token}",
        "outcome": answer.outcome,
        "allocations": answer.allocations,
        "seconds": round(answer.seconds, 3),
    }
    if answer.outcome in HELD_OUTCOMES:
        level = logging.WARNING if answer.outcome in (DEADLINE, STOPPED) else logging.INFO
        log.log(
            level,
            "drain of %s: %s: %s",
            fields["pod"],
            answer.outcome,
            answer.message,
            extra=fields,
        )
        return
    level = logging.WARNING if answer.outcome == OVER_CAPACITY else logging.INFO
    _quick_answers_logged.log(
        log,
        level,
        "drain call for %s: %s: %s",
        fields["pod"],
        answer.outcome,
        answer.message,
        **fields,
    )


class Drainer:
    """Answers drain calls; owns the pod watch, the drain loop (one thread: every waiter's
    schedule, the census's reads, and the metrics reader process it hands the reads to)
    and the event recorder, all started by ``start()`` (Service.start at worker start) or
    else on the first call (``create_app`` stays fast)."""

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
        self._fresh = FreshReads(kube, self.drain_settings.confirmSeconds) if kube else None
        self._keys = itertools.count(1)
        # The reader's key for each pod it reads (drain and census alike), so that both
        # share one kept-alive connection and one read in flight per pod.
        self._pod_keys: dict[tuple[str, str], PodKey] = {}
        self._reading: dict[int, Waiter] = {}  # drain reads in flight, by key
        self._census_reading: dict[int, CensusReads] = {}  # census reads in flight, by key
        # Each pod's last census read (monotonic end, reading): a drain that starts
        # within a poll interval of it starts from it instead of reading the pod again.
        self._census_read: dict[int, tuple[float, Reading]] = {}
        self._outbox: list[list] = []  # commands for the reader, sent by the drain loop
        # The drain loop's own: only its thread touches the selector and the reader.
        self._selector: selectors.BaseSelector | None = None
        self._wake_up: tuple[socket.socket, socket.socket] | None = None
        self._loop_ident: int | None = None
        self._reader = Reader(ReadSpec.of(self.drain_settings))
        self._scrape_results = {r: metrics.metric_scrapes.labels(r) for r in READ_RESULTS}
        # Every outcome's series from the start: increase() cannot count a series' first
        # sample, so an alert on the first deadline drain would otherwise miss it.
        for outcome in STATUS:
            metrics.drain_outcomes.labels(outcome)
        metrics.drain_capacity.set(self.drain_settings.maxConcurrent)
        metrics.drain_calls_held.set_function(lambda: self.held)
        metrics.pod_watch_connected.set_function(
            lambda: float(self.watcher.connected) if self._started and self.watcher else None
        )

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
        answer = replace(answer, seconds=time.monotonic() - begun)
        self.metrics.drain_outcomes.labels(answer.outcome).inc()
        _log_answer(namespace, token, answer)
        return answer

    @property
    def held(self) -> int:
        """Drain calls held now (a repeated delivery counts again)."""
        return self._held

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
            self._wake()
        if self.watcher:
            self.watcher.stop()
        if self.events:
            self.events.close()

    # ---------------------------------------------------------------- before holding

    def _refusal(self, namespace: str, token: str) -> Answer | None:
        """An answer that needs no pod: bad path, unwatched namespace, no cluster."""
        if not (_NAMESPACE.fullmatch(namespace) and _LABEL_VALUE.fullmatch(token)):
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
        """Start the pod watch and the drain loop (Service.start, else the first call)."""
        with self._lock:
            if self._started or self.kube is None:
                return
            self._started = True
            self._selector = selectors.DefaultSelector()
            self._wake_up = socket.socketpair()
            for end in self._wake_up:
                end.setblocking(False)
            self._selector.register(self._wake_up[0], selectors.EVENT_READ, None)
            loop = threading.Thread(target=self._run_loop, name="drain-loop", daemon=True)
            loop.start()
            self._loop_ident = loop.ident
        self.watcher.start()

    def _terminating_pod(self, namespace: str, token: str) -> DrainPod | Answer:
        """The terminating pod with this token, or the answer saying why there is none.

        kubelet calls 50-120 ms after the delete. The pod watch (open and in sync) answers
        almost every call: it has known the pod since its CREATE, and shows the
        deletionTimestamp as soon as the apiserver sends it. A token it has not seen is no
        pod the guard stamped: 404 without an API read. A known pod not (yet) terminating
        waits up to drain.confirmSeconds for the watch to say so, and only then, or while
        the watch is down, is a fresh API read made (shared and rate-limited:
        FreshReads), so that drain calls cannot be made to hammer the apiserver."""
        arrived = time.monotonic()
        deadline = arrived + self.drain_settings.confirmSeconds
        watcher = self.watcher
        pod = watcher.lookup(namespace, token, wait=deadline - arrived)
        if pod is None and watcher.in_sync:
            wait = min(UNSEEN_TOKEN_WAIT_SECONDS, deadline - time.monotonic())
            pod = watcher.wait_seen(namespace, token, wait=wait)
            if pod is None and watcher.in_sync:
                return Answer(
                    NOT_FOUND,
                    f"no pod in namespace {namespace} carries drain token {token} "
                    "(the pod watch is in sync)",
                )
        if pod is not None and not pod.terminating and watcher.in_sync:
            pod = watcher.wait_terminating(namespace, token, wait=deadline - time.monotonic())
        if pod is not None and pod.terminating:
            return pod
        try:
            items = self._fresh.pods(namespace, token, arrived, deadline)
        except KubeUnavailable as err:
            pod = watcher.wait_terminating(namespace, token, wait=deadline - time.monotonic())
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
        # The drain loop ends every wait at its deadline; this bound only guards against a
        # loop that died, so that the hook is never held past the deadline for long.
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
                key=self._key_for(pod),
                started=now,
                started_at=wall,
                deadline=now + (deadline_at - wall),
                deadline_at=deadline_at,
                next_scrape=now,
            )
            self._waiters[pod.key] = waiter
            self.metrics.drains_in_progress.inc()
            recent = self._census_read.get(waiter.key)
            if not pod.ip:
                self._finish(waiter, UNOBSERVABLE, "the pod has no IP: allocations not observable")
            elif now >= waiter.deadline:
                self._finish_at_deadline(waiter)
            elif recent and recent[0] > now - d.pollIntervalSeconds and recent[1].allocations:
                # The census read it within a poll interval: that read is this drain's
                # first, and the next one waits its interval (one read per pod per
                # interval, however the census and the drain meet).
                ended, reading = recent
                due = ended + d.pollIntervalSeconds
                waiter.next_scrape = math.ceil(due / READ_SLOT_SECONDS) * READ_SLOT_SECONDS
                self._take_reading(waiter, reading)
            else:
                self._plan(waiter)
            return waiter

    def _key_for(self, pod: DrainPod) -> int:
        """The reader's key for this pod (a new one for a new pod of the same name, whose
        predecessor's connection is forgotten). Lock held."""
        entry = self._pod_keys.get(pod.key)
        if entry is not None and entry.uid == pod.uid:
            return entry.key
        if entry is not None:
            self._forget_key(pod.key)
        entry = self._pod_keys[pod.key] = PodKey(pod.uid, next(self._keys))
        return entry.key

    def _forget_key(self, pod_key: tuple[str, str]) -> None:
        """The reader closes the pod's connection. Lock held."""
        entry = self._pod_keys.pop(pod_key, None)
        if entry is None:
            return
        self._census_read.pop(entry.key, None)
        if (batch := self._census_reading.pop(entry.key, None)) is not None:
            batch.readings[entry.key] = Reading(problem="the pod left the census")
            if len(batch.readings) == len(batch.pods):
                self._lock.notify_all()
        if entry.sent:
            self._outbox.append([entry.key, None])
            self._wake()

    # ---------------------------------------------------------------- census reads

    def read_for_census(
        self, pods: list[DrainPod], timeout: float
    ) -> dict[tuple[str, str], Reading]:
        """One read of each pod's allocations, through the drain's reader process and its
        kept connections, for the census (lifecycle/census.py); blocks up to ``timeout``.
        A pod being drained is left out (it is terminating: the census skips it, and its
        drain reads it once per poll interval already); a pod with no answer in time has
        a failed Reading. Pods that were read before and are not in ``pods`` any more
        (deleted, terminating) have their connections closed."""
        batch = CensusReads()
        wanted: set[tuple[str, str]] = set()
        with self._lock:
            if self._closed or not self._started:
                return {}
            for pod in pods:
                if pod.key in self._waiters or not pod.ip:
                    continue
                wanted.add(pod.key)
                key = self._key_for(pod)
                batch.pods[key] = pod.key
                self._census_reading[key] = batch  # a stuck earlier read is replaced
                self._outbox.append([key, pod.ip])
                self._pod_keys[pod.key].sent = True
            for pod_key in list(self._pod_keys):
                if pod_key not in wanted and pod_key not in self._waiters:
                    self._forget_key(pod_key)
            self._wake()
        with self._lock:
            self._lock.wait_for(lambda: len(batch.readings) == len(batch.pods), timeout)
            for key in batch.pods:
                if self._census_reading.get(key) is batch:
                    del self._census_reading[key]
            readings = dict(batch.readings)
        missing = Reading(problem=f"the metrics reader did not answer within {timeout:g} s")
        return {pod_key: readings.get(key, missing) for key, pod_key in batch.pods.items()}

    # ---------------------------------------------------------------- the drain loop

    def _plan(self, waiter: Waiter) -> None:
        """Schedule the waiter's next step: its next read, or, while a read is in flight,
        the time by which the reader must have answered; never later than the drain's
        deadline. Lock held."""
        wake = waiter.next_scrape if waiter.reading_until is None else waiter.reading_until
        waiter.plan = next(self._sequence)
        heapq.heappush(self._schedule, (min(wake, waiter.deadline), waiter.plan, waiter))
        if threading.get_ident() != self._loop_ident:
            self._wake()

    def _wake(self) -> None:
        if self._wake_up is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is already pending
                self._wake_up[1].send(b"\0")

    def _run_loop(self) -> None:
        """Every waiter's schedule; the reads go to the reader process and come back."""
        selector = self._selector
        while True:
            with self._lock:
                if self._closed:
                    break
                now = time.monotonic()
                while self._schedule and self._schedule[0][0] <= now:
                    _, plan, waiter = heapq.heappop(self._schedule)
                    if waiter.answer is None and plan == waiter.plan:
                        self._step(waiter, now)
                timeout = max(0.0, self._schedule[0][0] - now) if self._schedule else None
                outbox, self._outbox = self._outbox, []
            if outbox:
                self._send(outbox)
            for key, _ in selector.select(timeout):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        key.fileobj.recv(4096)
                    continue
                results = self._reader.receive()
                if results is None:
                    self._reader_exited()
                    continue
                with self._lock:
                    for key, allocations, problem, fatal, ended in results:
                        reading = Reading(allocations, problem, fatal)
                        waiter = self._reading.pop(key, None)
                        if waiter is not None:
                            self._end_read(waiter, reading, ended)
                        if (batch := self._census_reading.pop(key, None)) is not None:
                            self._end_census_read(batch, key, reading, ended)
        if self._reader.running:
            selector.unregister(self._reader.process.stdout)
            self._reader.stop()
        selector.close()
        for end in self._wake_up:
            end.close()

    def _send(self, commands: list[list]) -> None:
        """To the reader, started if it is not running. Drain loop thread."""
        if not self._reader.running:
            try:
                results = self._reader.start()
            except OSError as err:  # no process can be made now: fail these reads
                log.error("cannot start the metrics reader: %s", err)
                self._fail_reads(f"cannot start the metrics reader: {err}")
                return
            self._selector.register(results, selectors.EVENT_READ, "reader")
        if not self._reader.send(commands):
            self._reader_exited()

    def _reader_exited(self) -> None:
        """The reader died: its reads in flight failed; the next read starts another."""
        self._selector.unregister(self._reader.process.stdout)
        code = self._reader.stop()
        log.error("the metrics reader exited with code %s; restarting it", code)
        self._fail_reads(f"the metrics reader exited with code {code}")

    def _fail_reads(self, problem: str) -> None:
        """Every read in flight failed (a failed read, not a fatal one)."""
        with self._lock:
            reading, self._reading = self._reading, {}
            for waiter in reading.values():
                self._end_read(waiter, Reading(problem=problem))
            census, self._census_reading = self._census_reading, {}
            for key, batch in census.items():
                self._end_census_read(batch, key, Reading(problem=problem), time.monotonic())
        self._wake()  # this loop pass's select() would sleep past their next reads

    def _step(self, waiter: Waiter, now: float) -> None:
        """Whatever is due for this waiter. Lock held, drain loop thread."""
        if now >= waiter.deadline:
            self._finish_at_deadline(waiter)
        elif waiter.reading_until is not None and now >= waiter.reading_until:
            # The reader ends every read at its own deadline: this one is stuck.
            self._reading.pop(waiter.key, None)
            self._end_read(waiter, Reading(problem="the metrics reader did not answer"))
        elif waiter.reading_until is None and now >= waiter.next_scrape:
            self._begin_read(waiter, now)
        else:
            self._plan(waiter)

    def _begin_read(self, waiter: Waiter, now: float) -> None:
        waiter.reading_until = now + self.drain_settings.scrapeTimeoutSeconds + READER_SLACK_SECONDS
        waiter.asked = True
        self._reading[waiter.key] = waiter
        # A census read of the pod in flight answers this one too: one read, not two.
        if waiter.key not in self._census_reading:
            self._outbox.append([waiter.key, waiter.pod.ip])
            if (entry := self._pod_keys.get(waiter.pod.key)) is not None:
                entry.sent = True
        self._plan(waiter)

    def _end_census_read(
        self, batch: CensusReads, key: int, reading: Reading, ended: float | None
    ) -> None:
        """A census read is over. Lock held."""
        self._census_read[key] = (ended or time.monotonic(), reading)
        batch.readings[key] = reading
        if len(batch.readings) == len(batch.pods):
            self._lock.notify_all()

    def _end_read(self, waiter: Waiter, reading: Reading, ended: float | None = None) -> None:
        """A read is over (``ended``: when, by the reader's clock, if not now). Lock held."""
        waiter.reading_until = None
        # The next read one interval after this one ended: at most one read reaches the pod
        # per poll interval, however many calls wait on it and however late this one was.
        due = (ended or time.monotonic()) + self.drain_settings.pollIntervalSeconds
        waiter.next_scrape = math.ceil(due / READ_SLOT_SECONDS) * READ_SLOT_SECONDS
        self._scrape_results[reading.result].inc()
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
        self._reading.pop(waiter.key, None)
        waiter.reading_until = None
        entry = self._pod_keys.get(waiter.pod.key)
        if entry is not None and entry.key == waiter.key:
            self._forget_key(waiter.pod.key)  # the reader closes the pod's connection
        seconds = time.monotonic() - waiter.started
        waiter.answer = Answer(outcome, message, waiter.pod.ref, waiter.allocations, seconds)
        if self._waiters.get(waiter.pod.key) is waiter:
            del self._waiters[waiter.pod.key]
            self.metrics.drains_in_progress.dec()
        self.metrics.drain_duration.labels(outcome).observe(seconds)
        if outcome == DEADLINE and waiter.allocations is not None:
            self.metrics.drain_allocations_left.observe(waiter.allocations)
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
