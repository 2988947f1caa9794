"""What one running stunner-guard process holds: settings, API access, metrics, and the
lifecycle half's loops: the drainer (pod watch, drain loop, metrics reader) and the
census (leader election, census loop).

Start and stop belong to the process owner: ``start()`` from gunicorn's post_worker_init
(gunicorn.conf.py), ``stop_census()`` at SIGTERM, ``close()`` when the worker exits.
Without ``start()`` (tests, ``create_app`` alone) the drainer starts on its first call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from webhooks.kube import Kube
from webhooks.lifecycle.census import Census
from webhooks.lifecycle.drain import Drainer
from webhooks.metrics import Metrics
from webhooks.settings import Settings

# Bytes of request bodies being decoded and decided at once. A body's parsed objects take
# up to about 30 times its size (measured: a hostile 3 MiB review became 88 MiB), so this
# bounds what concurrent reviews can add to the worker (with the default 3 MiB limit, about
# 120 MiB); real reviews are a few KiB, so dozens still go at once.
DECODING_BYTES = 4 * 1024 * 1024
# How long a review waits for room before it is answered 503 (the apiserver's webhook
# timeout is a few seconds).
DECODING_WAIT_SECONDS = 2.0


class ByteBudget:
    """At most ``limit`` bytes taken at once; one request larger than the limit still gets
    it alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._cond = threading.Condition()

    def take(self, size: int, wait: float) -> bool:
        with self._cond:
            room = lambda: self.taken == 0 or self.taken + size <= self.limit  # noqa: E731
            if not self._cond.wait_for(room, wait):
                return False
            self.taken += size
            return True

    def give(self, size: int) -> None:
        with self._cond:
            self.taken -= size
            self._cond.notify_all()


@dataclass
class Service:
    settings: Settings
    kube: Kube | None
    metrics: Metrics = field(default_factory=Metrics)
    drainer: Drainer = field(init=False)
    census: Census = field(init=False)
    # SIGTERM reached the worker: /readyz fails, everything else goes on.
    stopping: bool = field(default=False, init=False)
    decoding: ByteBudget = field(default_factory=lambda: ByteBudget(DECODING_BYTES), init=False)

    def __post_init__(self) -> None:
        self.drainer = Drainer(self.settings, self.kube, self.metrics)
        self.census = Census(self.settings, self.kube, self.metrics, self.drainer)
        self.metrics.ready.set_function(lambda: 0.0 if self.not_ready_reason() else 1.0)
        self.metrics.certificates.watch(serving=self.settings.certFile, ca=self.settings.caFile)

    def start(self) -> None:
        """Start the background loops at worker start: the pod watch and the drain loop
        (so the first drain call finds the watch in sync), and the census when
        ``census.mode`` is not off. Nothing without an API."""
        if self.kube is None:
            return
        self.drainer.start()
        self.census.start()

    def begin_shutdown(self) -> None:
        """SIGTERM reached the worker (webhooks/serving.py): report not ready at once, so
        the Service stops sending new calls here, and keep serving what still arrives.
        Held drains go on until they end normally. The census stops writing and releases
        its Lease (an API call: on its own thread, never the worker's main loop), so
        another replica takes over at once."""
        self.stopping = True
        threading.Thread(target=self.stop_census, name="census-stop", daemon=True).start()

    def stop_census(self) -> None:
        """Stop writing pod-deletion-costs and release the census Lease; drains go on."""
        self.census.stop()

    def stop_drains(self) -> None:
        """The worker's hard limit is near: answer the drains still held (``stopped``)."""
        self.drainer.close()

    def close(self) -> None:
        """Stop the census (releasing its Lease), the drainer's threads (answering drains
        still held) and the API client."""
        self.census.stop()
        self.drainer.close()
        if self.kube is not None:
            self.kube.close()

    def not_ready_reason(self) -> str | None:
        """Why the service must not receive traffic yet, or None when ready."""
        if self.stopping:
            return "shutting down: held drains and requests in flight are still served"
        s = self.settings
        if s.serviceName and s.policy.drainHook.on and not s.drainHost:
            # In a cluster the preStop hook needs the Service ClusterIP; Kubernetes injects
            # it as <SERVICE>_SERVICE_HOST into pods created after the Service.
            return (
                f"drain host unknown: neither STUNNER_GUARD_DRAIN_HOST nor the injected "
                f"{s.serviceName.upper().replace('-', '_')}_SERVICE_HOST is set"
            )
        return None
