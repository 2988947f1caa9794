"""The census: keep ``controller.kubernetes.io/pod-deletion-cost`` on every running stunnerd
pod in step with its TURN allocations, so that an HPA scale-down removes the emptiest pods
(DESIGN.md "The census").

On scale-down the ReplicaSet controller deletes, among running ready pods, the ones with
the lowest pod-deletion-cost first (``ActivePodsWithRanks`` in k8s.io/kubernetes
pkg/controller/controller_utils.go); without it the choice is blind to calls, a busy pod
goes, and its calls hold it (and its node) for up to an hour while an idle pod runs on.

Every ``census.intervalSeconds`` one round:

1. takes every running, non-terminating pod the pod watch knows (the drain token label:
   the guard stamped it) and reads its ``stunner_allocations_active`` through the drain's
   one metrics reader process (``Drainer.read_for_census``: the same kept connections, and
   no second read of a pod a drain is reading);
2. works out each pod's cost: its allocation count's level, ``n.bit_length()`` (0 for an
   empty pod, 1 for 1, 2 for 2-3, 3 for 4-7, ... at most 31), so the ReplicaSet's order
   follows the counts within a factor of two;
3. writes the pods whose cost changed, fewest first when the write budget is short.

Writes are rare by design. The Kubernetes documentation warns against updating this
annotation from a metric on every change: each write is an apiserver update sent to every
pod watcher. So:

- hysteresis: a pod's written level stays while its count is within the level's range
  widened by half a level (a factor of sqrt 2) each side: level 3 (4-7) holds for 3-11,
  so a count wandering across a boundary writes nothing; empty <-> non-empty is always
  written at once (it decides which pods go first);
- at most one write per pod per ``census.minPatchSeconds``, and fleet-wide at most
  ``census.maxWritesPerSecond`` after a burst of ``census.writeBurst`` (a token bucket);
  empty <-> non-empty changes go first, then the largest level jumps;
- a pod whose allocations cannot be read keeps its annotation as it is (unknown is never
  written as empty); a terminating pod is never written: the merge patch carries the
  resourceVersion the decision was made on, so a pod deleted meanwhile is refused by the
  apiserver (409) instead of written;
- an absent annotation counts as 0, as the ReplicaSet controller reads it: a new pod that
  is empty needs no write at all.

One replica writes: the holder of a Lease (lifecycle/leader.py); the others read nothing.
A replica that has just become leader does not rewrite a pod's existing annotation for
``minPatchSeconds`` (the previous leader may just have written it). In ``warn`` mode every
replica computes the costs and shows them (``GET /census``, metrics) and writes nothing.
A Kubernetes Event goes on a pod only when a write crosses empty <-> non-empty.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from webhooks import names
from webhooks.kube import Conflict, Kube, KubeUnavailable
from webhooks.lifecycle.drain import READER_SLACK_SECONDS, Drainer
from webhooks.lifecycle.leader import LeaseElector
from webhooks.lifecycle.podwatch import DrainPod, rfc3339
from webhooks.metrics import Metrics
from webhooks.settings import MODES, Settings

log = logging.getLogger(__name__)

# Counts of 2^30 and more are one level: the cost stays a small int32, and the metric
# label that shows it comes from a closed set.
MAX_LEVEL = 31
COST_LEVELS = tuple(str(level) for level in range(MAX_LEVEL + 1))
# Reasons a wanted write was not made (the skipped-writes counter's label).
SKIP_BUDGET, SKIP_MIN_INTERVAL, SKIP_WARN = SKIP_REASONS = ("budget", "min_interval", "warn")
WRITE_OK, WRITE_CONFLICT, WRITE_FAILED = WRITE_RESULTS = ("ok", "conflict", "failed")


# --------------------------------------------------------------------------- the cost


def level(allocations: int) -> int:
    """The cost of a pod with this many allocations: 0 empty, 1, 2 for 2-3, 3 for 4-7..."""
    return min(MAX_LEVEL, allocations.bit_length())


def wanted_cost(written: int | None, allocations: int) -> int:
    """The cost to write for a pod whose cost is ``written`` now (None: not one the census
    could have written) and which has ``allocations``: its level, unless the count is
    still within the written level's range widened by half a level each side."""
    natural = level(allocations)
    if written is None or natural == written:
        return natural
    if allocations == 0 or written <= 0 or written > MAX_LEVEL:
        return natural  # empty <-> non-empty at once; a value not written by the census
    if 2 ** (written - 1.5) <= allocations < 2 ** (written + 0.5):
        return written
    return natural


# kube-apiserver's GetDeletionCostFromPodAnnotations: "-" or a digit that is not a leading
# zero first, then Go's ParseInt(value, 10, 32).
_COST = re.compile(r"0|-[0-9]+|[1-9][0-9]*")


def parse_cost(value: str | None) -> int | None:
    """The cost as the ReplicaSet controller reads it (absent: 0); None when the value is
    not one the apiserver accepts."""
    if value is None:
        return 0
    if not _COST.fullmatch(value):
        return None
    cost = int(value)
    return cost if -(2**31) <= cost < 2**31 else None


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class PodCensus:
    """What the census knows of one pod (for ``GET /census``)."""

    namespace: str
    name: str
    uid: str
    allocations: int | None = None
    problem: str = ""
    wanted: int | None = None
    read_at: float | None = None  # epoch seconds of the last good read
    written: int | None = None  # the cost this replica last wrote
    written_at: float | None = None  # epoch seconds
    written_mono: float = float("-inf")  # monotonic, for minPatchSeconds

    def view(self, cost: str | None) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "allocations": self.allocations,
            "cost": cost,
            "wanted": self.wanted,
            "lastRead": rfc3339(self.read_at) if self.read_at else None,
            "lastWrite": rfc3339(self.written_at) if self.written_at else None,
            "problem": self.problem or None,
        }


class WriteBudget:
    """The fleet-wide write cap: a token bucket of ``rate`` writes a second, ``burst``
    deep."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.refilled = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def identity() -> str:
    """The Lease holder: the pod name (the hostname in a pod), then a per-process suffix,
    as kube-controller-manager does, so that a restarted worker, or a second process in the
    same pod, is never taken for the one that held the Lease."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- the census


class Census:
    """Owns the census loop (one thread) and the leader election; ``start()`` and
    ``stop()`` are its owner's (Service). The HTTP layer only asks ``snapshot()``."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube | None,
        metrics: Metrics,
        drainer: Drainer,
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.census = settings.census
        self.kube = kube
        self.metrics = metrics
        self.drainer = drainer
        self.identity = holder or identity()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pods: dict[str, PodCensus] = {}  # by uid
        self._round: dict[str, Any] = {}
        self._budget = WriteBudget(self.census.maxWritesPerSecond, self.census.writeBurst)
        self._leading_since: float | None = None  # monotonic
        self.elector: LeaseElector | None = None
        if self.active and self.census.writes:
            c = self.census
            self.elector = LeaseElector(
                kube,
                settings.namespace,
                c.leaseName,
                self.identity,
                c.leaseDurationSeconds,
                c.renewDeadlineSeconds,
                c.retryPeriodSeconds,
                on_change=self._leadership,
            )
        m = metrics
        self._reads = {r: m.census_reads.labels(r) for r in ("ok", "failed", "unobservable")}
        self._writes = {r: m.census_writes.labels(r) for r in WRITE_RESULTS}
        self._skipped = {r: m.census_writes_skipped.labels(r) for r in SKIP_REASONS}
        self._by_cost = {c: m.census_pods_by_cost.labels(c) for c in COST_LEVELS}
        for mode in MODES:
            m.census_mode.labels(mode).set(1 if mode == self.census.mode else 0)

    @property
    def active(self) -> bool:
        """Whether this process runs a census at all (a mode other than off, and an API)."""
        return self.census.on and self.kube is not None and self.drainer.watcher is not None

    # ---------------------------------------------------------------- owner's API

    def start(self) -> None:
        """Start the pod watch and the drain loop (if not yet), the election and the
        census loop. Nothing when the census is off or there is no API."""
        if not self.active:
            return
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="census", daemon=True)
        self.drainer.start()
        if self.elector is not None:
            self.elector.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop writing at once, then stop the loop and release the Lease so that another
        replica takes over without waiting out the lease (SIGTERM: the guard keeps serving
        and holding drains while it stops; the census is not needed for that)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A write in flight ends within the API timeout (two tries at most).
            timeout = 2 * self.kube.timeout + self.drainer.drain_settings.scrapeTimeoutSeconds
            thread.join(timeout + READER_SLACK_SECONDS)
        if self.elector is not None:
            self.elector.stop(release=True)

    release = stop  # the name the shutdown path reads best with

    def leading(self) -> bool:
        return self.elector is not None and self.elector.is_leader()

    def snapshot(self) -> dict[str, Any]:
        """``GET /census``: the mode, who writes, the last round, and every pod."""
        watcher = self.drainer.watcher
        with self._lock:
            pods = sorted(self._pods.values(), key=lambda p: (p.namespace, p.name))
            views = []
            for state in pods:
                pod = watcher.pod(state.namespace, state.name) if watcher else None
                views.append(state.view(pod.cost if pod and pod.uid == state.uid else None))
            round_ = dict(self._round)
        return {
            "mode": self.census.mode,
            "identity": self.identity if self.elector else None,
            "leader": self.leading(),
            "holder": self.elector.holder if self.elector else None,
            "intervalSeconds": self.census.intervalSeconds,
            "round": round_ or None,
            "pods": views,
        }

    # ---------------------------------------------------------------- the loop

    def _leadership(self, leading: bool) -> None:
        self.metrics.census_leader.set(1 if leading else 0)
        with self._lock:
            self._leading_since = time.monotonic() if leading else None
            if not leading:
                # A follower reads nothing: what it showed as leader is stale now, on
                # /census and on /metrics (the dashboard takes the fleet's maximum).
                self._pods.clear()
                self._round = {}
                self._publish(0, dict.fromkeys(COST_LEVELS, 0))
        self._wake.set()

    def _publish(self, pods: int, by_cost: dict[str, int]) -> None:
        """The pod gauges of a round (lock held, so that a round ending after this
        replica lost the Lease cannot put back what ``_leadership`` cleared)."""
        self.metrics.census_pods.set(pods)
        for cost, n in by_cost.items():
            self._by_cost[cost].set(n)

    def _run(self) -> None:
        interval = self.census.intervalSeconds
        while not self._stop.is_set():
            started = time.monotonic()
            # A round on a pod index that is not in sync (just started, or the API down)
            # would read a partial fleet and write from stale resourceVersions.
            if not self.drainer.watcher.wait_in_sync(min(interval, 1.0)):
                self._stop.wait(0.1)  # a stopped watch answers at once: no busy loop
                continue
            if self.elector is None or self.elector.is_leader():
                try:
                    self.run_round()
                except Exception:  # a bug must not end the census for the process's life
                    log.exception("census round failed")
                wait = max(0.0, started + interval - time.monotonic())
            else:
                wait = interval  # until leadership comes (the elector wakes this loop)
            self._wake.wait(wait)
            self._wake.clear()

    def run_round(self) -> dict[str, Any]:
        """One census round (the loop's; tests call it directly); its summary."""
        started, cpu = time.monotonic(), time.thread_time()
        watcher = self.drainer.watcher
        pods = [p for p in watcher.pods() if p.running and not p.terminating]
        d = self.drainer.drain_settings
        readings = self.drainer.read_for_census(pods, d.scrapeTimeoutSeconds + READER_SLACK_SECONDS)
        now = time.time()
        counts = dict.fromkeys(self._reads, 0)
        planned: list[tuple[tuple, DrainPod, PodCensus, int, int]] = []
        with self._lock:
            current = {}
            for pod in pods:
                state = self._pods.get(pod.uid) or PodCensus(pod.namespace, pod.name, pod.uid)
                current[pod.uid] = state
                reading = readings.get(pod.key)
                if reading is None:
                    state.problem = "no pod IP" if not pod.ip else "being drained"
                    continue
                counts[reading.result] += 1
                if reading.allocations is None:
                    # Unknown is never written as empty: the annotation stays as it is.
                    state.allocations, state.problem, state.wanted = None, reading.problem, None
                    continue
                state.allocations, state.problem, state.read_at = reading.allocations, "", now
                written = parse_cost(pod.cost)
                state.wanted = wanted_cost(written, reading.allocations)
                if state.wanted != written:
                    crossing = (written or 0) == 0 or state.wanted == 0
                    jump = abs(state.wanted - (written or 0))
                    planned.append(((not crossing, -jump, pod.ref), pod, state, written, jump))
            self._pods = current
        for result, n in counts.items():
            self._reads[result].inc(n)
        writes = self._write(sorted(planned, key=lambda item: item[0]))
        by_cost = dict.fromkeys(COST_LEVELS, 0)
        for state in current.values():
            if state.wanted is not None:
                by_cost[str(state.wanted)] += 1
        seconds = time.monotonic() - started
        summary = {
            "at": rfc3339(now),
            "seconds": round(seconds, 3),
            "cpuSeconds": round(time.thread_time() - cpu, 4),
            "pods": len(pods),
            "read": counts["ok"],
            "readsFailed": counts["failed"] + counts["unobservable"],
            "wanted": len(planned),
            "written": writes,
        }
        with self._lock:
            # Leadership lost mid-round: _leadership has cleared what this round would show.
            if self.elector is None or self.elector.is_leader():
                self._round = summary
                self._publish(len(pods), by_cost)
        self.metrics.census_round_duration.observe(seconds)
        return summary

    # ---------------------------------------------------------------- writes

    def _write(self, planned: list) -> int:
        """Make the wanted writes the rules allow, most urgent first; how many went
        through."""
        written = 0
        warn = not self.census.writes
        for _, pod, state, was, _ in planned:
            if self._stop.is_set():
                break
            if warn:
                self._skipped[SKIP_WARN].inc()
                continue
            if not self.elector.is_leader():
                break  # leadership lapsed mid-round: another replica may write now
            mono = time.monotonic()
            recent = mono - state.written_mono < self.census.minPatchSeconds
            with self._lock:
                since = self._leading_since
            # A new leader leaves existing annotations alone for a while: the previous
            # leader may just have written them.
            fresh_leader = (
                pod.cost is not None
                and since is not None
                and mono - since < self.census.minPatchSeconds
            )
            if recent or fresh_leader:
                self._skipped[SKIP_MIN_INTERVAL].inc()
                continue
            if not self._budget.take():
                self._skipped[SKIP_BUDGET].inc()
                continue
            if self._patch(pod, state, was):
                written += 1
        return written

    def _patch(self, pod: DrainPod, state: PodCensus, was: int | None) -> bool:
        # The pod as the watch has it now: the write's precondition is this version.
        latest = self.drainer.watcher.pod(pod.namespace, pod.name)
        if latest is None or latest.uid != pod.uid or latest.terminating or not latest.running:
            return False
        cost = str(state.wanted)
        try:
            self.kube.patch_pod_annotation(
                pod.namespace,
                pod.name,
                names.POD_DELETION_COST_ANNOTATION,
                cost,
                latest.version,
            )
        except Conflict as err:
            # Changed since the watch saw it (maybe a deletionTimestamp): next round.
            self._writes[WRITE_CONFLICT].inc()
            log.info("census: %s not written: %s", pod.ref, err)
            return False
        except KubeUnavailable as err:
            self._writes[WRITE_FAILED].inc()
            log.warning("census: %s not written: %s", pod.ref, err)
            return False
        self._writes[WRITE_OK].inc()
        with self._lock:
            state.written, state.written_at = state.wanted, time.time()
            state.written_mono = time.monotonic()
        before = was or 0
        if (before == 0) != (state.wanted == 0):
            self._event(pod, state, before)
        return True

    def _event(self, pod: DrainPod, state: PodCensus, before: int) -> None:
        events = self.drainer.events
        if events is None:
            return
        if state.wanted == 0:
            events.record(
                pod,
                "DeletionCostEmpty",
                "0 TURN allocations: pod-deletion-cost 0, a scale-down removes this pod "
                "before pods with calls",
            )
        else:
            events.record(
                pod,
                "DeletionCostInUse",
                f"{state.allocations} TURN allocations: pod-deletion-cost {state.wanted} "
                f"(was {before}), a scale-down removes emptier pods first",
            )
