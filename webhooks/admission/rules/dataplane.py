"""Dataplane (stunner.l7mp.io v1 and v1alpha1, cluster-scoped): the source the STUNner
operator renders stunnerd Deployments from, so the right place to shape them
(DESIGN.md "Where to act")."""

from __future__ import annotations

from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.rules.common import copy_for_edit, finish, shaper_for

# enableMetricsEndpoint exists in v1 only; the v1alpha1 schema would prune it.
METRICS_VERSIONS = frozenset({"stunner.l7mp.io/v1"})


def review(obj: dict, ctx: Context) -> Outcome:
    desired = copy_for_edit(obj, ("metadata", "annotations"), ("spec",))
    spec = desired.get("spec") if isinstance(desired.get("spec"), dict) else {}
    shaper = shaper_for(ctx)
    policy = ctx.settings.policy
    # With spec.command/args unset the operator renders its own defaults: that is what runs.
    shaper.container(spec, "spec", operator_defaults=True)
    # A CRD: no apiserver defaulting, so a 30 here is the user's own.
    shaper.grace(spec, "spec", pod_spec=False)
    if ctx.api_version in METRICS_VERSIONS and spec.get("enableMetricsEndpoint") is not True:
        if shaper.propose(
            "metricsEndpoint",
            policy.metricsEndpoint,
            "spec.enableMetricsEndpoint",
            spec.get("enableMetricsEndpoint"),
            True,
            "the drain reads stunner_allocations_active",
        ):
            spec["enableMetricsEndpoint"] = True
    replicas = spec.get("replicas")
    if replicas is not None and replicas != 1:
        if shaper.propose(
            "hpaReplicas",
            policy.hpaReplicas,
            "spec.replicas",
            replicas,
            1,
            "the operator would overwrite the HPA's replica count",
        ):
            spec["replicas"] = 1
    if spec:
        desired["spec"] = spec
    return finish(desired, shaper, ctx)
