"""One writer among the guard's replicas: leader election on a ``coordination.k8s.io/v1``
Lease in the guard's own namespace, with client-go's semantics (``tools/leaderelection``).

Why not the official client's ``kubernetes.leaderelection`` (v37.0.2, which has a
LeaseLock): its ``LeaderElection.run()`` cannot be stopped (``acquire()`` loops forever)
and never releases the Lease, so a successor waits a whole lease duration after every
guard rollout; any error that is not an ``ApiException`` (an apiserver unreachable for a
moment: urllib3's MaxRetryError) ends the election thread for good (measured against a
closed port); its ``Config`` calls ``sys.exit`` on a bad value, which in a gunicorn worker
kills every held drain; and its lock builds its own ``CoordinationV1Api`` on the client's
global default configuration, outside webhooks/kube.py, with no request timeout, so one
hung renewal keeps a leader leading past its deadline. This loop is client-go's in a page.

The rules (client-go's):
- A Lease held by another identity is free once its record has not changed for
  ``leaseDurationSeconds``, timed on this process's own monotonic clock from when it
  last saw the record change (never by comparing wall clocks across machines). An empty
  holder (a released Lease) is free at once.
- Every write is an update from the resourceVersion just read: of two replicas racing
  for the same Lease, the apiserver lets one through (409 for the other).
- The leader renews every ``retryPeriodSeconds``; it counts as leader only until
  ``renewDeadlineSeconds`` after the start of its last successful renewal. The deadline
  is shorter than the lease, so a leader cut off from the API has stopped writing before
  any other replica can take over (``is_leader`` is checked before each write).
- ``stop()`` releases a held Lease (holder cleared, duration 1 s, as client-go's
  ReleaseOnCancel): a successor takes over within one retry period.
"""

from __future__ import annotations

import datetime
import logging
import random
import threading
import time
from collections.abc import Callable

from webhooks.kube import Kube, KubeUnavailable

log = logging.getLogger(__name__)

# client-go's JitterFactor: followers retry at a random 1-1.2 retry periods, so replicas
# started together do not keep colliding.
JITTER = 1.2


def micro_time(moment: float) -> str:
    """metav1.MicroTime as the apiserver writes it."""
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Campaigns for one Lease from its own thread; ``is_leader()`` may be asked from any
    thread. ``on_change(leading)`` is called (from the election thread) whenever this
    process starts or stops leading."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int,
        renew_deadline_seconds: float,
        retry_seconds: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not lease_seconds > renew_deadline_seconds > JITTER * retry_seconds > 0:
            raise ValueError(
                "leader election needs leaseDurationSeconds > renewDeadlineSeconds > "
                f"{JITTER} x retryPeriodSeconds > 0"
            )
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline_seconds
        self.retry = retry_seconds
        self.on_change = on_change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading_until = 0.0  # monotonic; leader while now is before it
        self._leading = False  # what on_change was last told
        self._observed: dict | None = None  # the Lease spec as last seen
        self._observed_at = 0.0  # monotonic: when it last changed
        self.holder = ""  # the holder identity as last seen

    # ---------------------------------------------------------------- owner's API

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="census-lease", daemon=True)
                self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop campaigning; with ``release``, hand a held Lease back so that another
        replica takes over at once instead of after a lease duration."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A renewal in flight ends within the API timeout (two tries at most).
            thread.join(2 * self.kube.timeout + 1)
        held = self.is_leader()
        with self._lock:
            self._leading_until = 0.0
        self._tell(False)
        if release and held:
            self._release()

    def is_leader(self) -> bool:
        with self._lock:
            return time.monotonic() < self._leading_until

    # ---------------------------------------------------------------- the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._try_acquire_or_renew()
            except KubeUnavailable as err:
                log.info("census lease %s/%s: %s", self.namespace, self.name, err)
            except Exception as err:  # a Lease not as expected: a failed try, not the end
                log.warning(
                    "census lease %s/%s: %s: %s", self.namespace, self.name, type(err).__name__, err
                )
            leading = self.is_leader()
            self._tell(leading)
            # The leader renews every retry period; followers retry with jitter.
            pause = self.retry if leading else self.retry * random.uniform(1.0, JITTER)
            self._stop.wait(pause)

    def _tell(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        log.info(
            "census lease %s/%s: %s",
            self.namespace,
            self.name,
            f"{self.identity} leads" if leading else f"{self.identity} does not lead",
        )
        if self.on_change is not None:
            self.on_change(leading)

    def _try_acquire_or_renew(self) -> None:
        started = time.monotonic()
        now = time.time()
        lease = self.kube.read_lease(self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._record(now, now, 0),
            }
            self._won(self.kube.create_lease(self.namespace, body), started)
            return
        spec = lease.get("spec") or {}
        if spec != self._observed:
            self._observed, self._observed_at = spec, started
        holder = spec.get("holderIdentity") or ""
        self.holder = holder
        duration = spec.get("leaseDurationSeconds") or self.lease_seconds
        if holder and holder != self.identity:
            with self._lock:
                self._leading_until = 0.0  # another replica holds it: this one does not lead
            if started < self._observed_at + duration:
                return  # and renewed it within its duration, as seen from here
        transitions = spec.get("leaseTransitions") or 0
        if holder == self.identity:
            acquired = spec.get("acquireTime") or micro_time(now)
            record = self._record(now, now, transitions) | {"acquireTime": acquired}
        else:
            record = self._record(now, now, transitions + 1)
        lease["spec"] = record
        self._won(self.kube.replace_lease(self.namespace, lease), started)

    def _record(self, acquired: float, renewed: float, transitions: int) -> dict:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": micro_time(acquired),
            "renewTime": micro_time(renewed),
            "leaseTransitions": transitions,
        }

    def _won(self, lease: dict, started: float) -> None:
        """The write went through: leader until the renew deadline, counted from before
        the write was sent (the Lease may have been stored at any moment after)."""
        self._observed, self._observed_at = lease.get("spec") or {}, started
        self.holder = self.identity
        with self._lock:
            if not self._stop.is_set():
                self._leading_until = started + self.renew_deadline

    def _release(self) -> None:
        try:
            lease = self.kube.read_lease(self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = micro_time(time.time())
            spec = lease["spec"]
            lease["spec"] = {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": spec.get("leaseTransitions") or 0,
            }
            self.kube.replace_lease(self.namespace, lease)
            self.holder = ""
            log.info("census lease %s/%s released by %s", self.namespace, self.name, self.identity)
        except KubeUnavailable as err:
            # The successor then waits out the lease duration: slower, never unsafe.
            log.warning("census lease %s/%s not released: %s", self.namespace, self.name, err)
