"""What one running stunner-guard process holds: settings, API access, metrics, and the
lifecycle half's loops: the drainer (pod watch, drain loop, metrics reader) and the
census (leader election, census loop).

Start and stop belong to the process owner: ``start()`` from gunicorn's post_worker_init
(gunicorn.conf.py), ``stop_census()`` at SIGTERM, ``close()`` when the worker exits.
Without ``start()`` (tests, ``create_app`` alone) the drainer starts on its first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from webhooks.kube import Kube
from webhooks.lifecycle.census import Census
from webhooks.lifecycle.drain import Drainer
from webhooks.metrics import Metrics
from webhooks.settings import Settings


@dataclass
class Service:
    settings: Settings
    kube: Kube | None
    metrics: Metrics = field(default_factory=Metrics)
    drainer: Drainer = field(init=False)
    census: Census = field(init=False)

    def __post_init__(self) -> None:
        self.drainer = Drainer(self.settings, self.kube, self.metrics)
        self.census = Census(self.settings, self.kube, self.metrics, self.drainer)

    def start(self) -> None:
        """Start the background loops at worker start: the pod watch and the drain loop
        (so the first drain call finds the watch in sync), and the census when
        ``census.mode`` is not off. Nothing without an API."""
        if self.kube is None:
            return
        self.drainer.start()
        self.census.start()

    def stop_census(self) -> None:
        """Stop writing pod-deletion-costs and release the census Lease, so another
        replica takes over at once; drains go on (SIGTERM)."""
        self.census.stop()

    def close(self) -> None:
        """Stop the census (releasing its Lease), the drainer's threads (answering drains
        still held) and the API client."""
        self.census.stop()
        self.drainer.close()
        if self.kube is not None:
            self.kube.close()

    def not_ready_reason(self) -> str | None:
        """Why the service must not receive traffic yet, or None when ready."""
        s = self.settings
        if s.serviceName and s.policy.drainHook.on and not s.drainHost:
            # In a cluster the preStop hook needs the Service ClusterIP; Kubernetes injects
            # it as <SERVICE>_SERVICE_HOST into pods created after the Service.
            return (
                f"drain host unknown: neither STUNNER_GUARD_DRAIN_HOST nor the injected "
                f"{s.serviceName.upper().replace('-', '_')}_SERVICE_HOST is set"
            )
        return None
