"""Kubernetes Events on stunnerd pods, best-effort and rate-limited."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

from webhooks.kube import Kube, KubeUnavailable
from webhooks.lifecycle.podwatch import DrainPod, rfc3339

log = logging.getLogger(__name__)

# Events are best-effort and sent from their own thread, at most EVENTS_PER_SECOND after a
# burst of EVENT_BURST (kubelet's own --event-qps/--event-burst defaults), so that a
# thousand drains ending at once do not take the CPU their answers need. Past
# EVENT_QUEUE_SIZE waiting, new ones are dropped (logged) rather than queued without bound.
EVENTS_PER_SECOND = 50.0
EVENT_BURST = 100
EVENT_QUEUE_SIZE = 10_000
EVENT_SOURCE = "stunner-guard"


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
        tokens, refilled = float(EVENT_BURST), time.monotonic()
        while (event := self._queue.get()) is not None:
            now = time.monotonic()
            tokens = min(EVENT_BURST, tokens + (now - refilled) * EVENTS_PER_SECOND)
            refilled = now
            if tokens < 1:
                time.sleep((1 - tokens) / EVENTS_PER_SECOND)
            tokens -= 1
            try:
                self.kube.create_event(event["metadata"]["namespace"], event)
            except KubeUnavailable as err:
                log.info("event %s not recorded: %s", event["reason"], err)
