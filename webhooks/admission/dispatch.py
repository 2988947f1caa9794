"""Dispatch an AdmissionReview request to the rules for its kind; turn outcomes into verdicts.

Dispatch is on ``request.kind`` (the kind the apiserver converted to for this webhook),
never on ``object.kind``. Anything the guard does not handle (other kinds, DELETE and
CONNECT, subresources such as ``pods/status`` or ``deployments/scale``) is allowed
untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webhooks.admission import review
from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.rules import dataplane, deployment, hpa, pod
from webhooks.service import Service

MUTATE = "mutate"
VALIDATE = "validate"

Handler = Callable[[Any, Context], Outcome]

# (group, kind) -> (versions, operations, handler)
HANDLERS: dict[tuple[str, str], tuple[frozenset[str], frozenset[str], Handler]] = {
    ("stunner.l7mp.io", "Dataplane"): (
        frozenset({"v1", "v1alpha1"}),
        frozenset({"CREATE", "UPDATE"}),
        dataplane.review,
    ),
    ("", "Pod"): (frozenset({"v1"}), frozenset({"CREATE"}), pod.review),
    ("apps", "Deployment"): (frozenset({"v1"}), frozenset({"CREATE", "UPDATE"}), deployment.review),
    ("autoscaling", "HorizontalPodAutoscaler"): (
        frozenset({"v2"}),
        frozenset({"CREATE", "UPDATE"}),
        hpa.review,
    ),
}


def handler_for(group: str, version: str, kind: str, operation: str, sub_resource: str = ""):
    """The handler for this kind and operation, or None when the guard does not act."""
    entry = HANDLERS.get((group, kind))
    if entry is None or sub_resource:
        return None
    versions, operations, handler = entry
    if version not in versions or operation not in operations:
        return None
    return handler


def decide(req: review.Request, webhook: str, service: Service) -> review.Verdict:
    handler = handler_for(req.group, req.version, req.kind, req.operation, req.sub_resource)
    if handler is None:
        return review.allowed()
    if not isinstance(req.object, dict):
        # CREATE/UPDATE always carry the object; without it there is nothing to judge.
        return review.allowed([f"stunner-guard: {req.describe()} has no object; not checked"])
    ctx = Context(
        settings=service.settings,
        webhook=webhook,
        operation=req.operation,
        namespace=req.namespace,
        api_version=req.api_version,
        subject=req.describe(),
        dry_run=req.dry_run,
        kube=service.kube,
        on_kube_unreachable=service.metrics.kube_unreachable.inc,
    )
    return verdict(req.object, handler(req.object, ctx), ctx)


def verdict(original: Any, outcome: Outcome, ctx: Context) -> review.Verdict:
    """Denials win; otherwise the mutating webhook returns the diff to the desired object."""
    if outcome.denials:
        return review.denied("; ".join(outcome.denials), outcome.warnings)
    if ctx.webhook == MUTATE and outcome.desired is not None:
        return review.patched(original, outcome.desired, outcome.warnings)
    return review.allowed(outcome.warnings)
