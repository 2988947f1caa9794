"""HorizontalPodAutoscaler (autoscaling/v2) targeting a stunnerd Deployment: validate only.

Feasibility: CPU utilization is usage / request, and a container cannot use more than its
CPU limit. If target utilization x request >= limit, the pods are throttled at the limit
before the average can ever exceed the target: the HPA never scales out. E.g. 300% x 500m
= 1500m < 2 fires; 500% x 500m = 2500m > 2 never does. The request and limit checked are
the ones the pods will actually run with: the target's pod template after the guard's
own Pod rules.

The target (and the Dataplane, for the replicas rule) is read through the one API module;
when the API cannot answer, the HPA is allowed with a warning rather than blocking
kubectl apply on an outage.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from webhooks.admission import stunnerd
from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.policy import (
    MUTATE,
    Shaper,
    container_path,
    first_that_fits,
    format_cores,
    get_in,
    quantity,
)
from webhooks.admission.rules.common import copy_tree
from webhooks.admission.rules.deployment import operator_owned, template_spec
from webhooks.kube import KubeUnavailable

log = logging.getLogger(__name__)


def review(obj: dict, ctx: Context) -> Outcome:
    policy = ctx.settings.policy
    target = get_in(obj, "spec", "scaleTargetRef")
    if (
        ctx.mutating
        or not isinstance(target, dict)
        or target.get("kind") != "Deployment"
        or not isinstance(target.get("name"), str)
        or not (policy.hpaFeasibility.on or policy.hpaReplicas.on)
    ):
        return Outcome()
    name = target["name"]
    outcome = Outcome()
    deployment = _read(
        ctx,
        outcome,
        lambda kube: kube.read_deployment(ctx.namespace, name),
        (f"Deployment {ctx.namespace}/{name}", f"Deployment {name}", "the target Deployment"),
        "HPA feasibility not checked",
    )
    if deployment is None:
        return outcome
    spec = template_spec(deployment)
    if spec is None or not stunnerd.stunnerd_containers(spec):
        return outcome  # not a stunnerd workload
    if policy.hpaFeasibility.on:
        _check_feasibility(obj, ctx, outcome, _effective_pod_spec(spec, ctx), name)
    if policy.hpaReplicas.on and operator_owned(deployment):
        _check_dataplane_replicas(ctx, outcome)
    return outcome


def _read(
    ctx: Context,
    outcome: Outcome,
    read,
    names: tuple[str, ...],
    if_missing: str | None = None,
) -> dict | None:
    """``read(kube)``, or None with a warning. ``names``: the object, from its fullest name
    to its briefest, so that the warning fits however long the names are."""
    if ctx.kube is None:
        outcome.warnings.append(
            first_that_fits(
                [f"stunner-guard has no Kubernetes API access; {n} not checked" for n in names]
            )
        )
        ctx.on_kube_unreachable()
        return None
    try:
        found = read(ctx.kube)
    except KubeUnavailable as err:
        log.warning("could not read %s: %s", names[0], err)
        # "API unreachable: MaxRetryError: ..." is "API unreachable" when it is too long.
        reasons = dict.fromkeys((str(err), str(err).split(":", 1)[0]))
        outcome.warnings.append(
            first_that_fits(
                [
                    f"stunner-guard could not read {n} ({reason}); not checked"
                    for reason in reasons
                    for n in names
                ]
            )
        )
        ctx.on_kube_unreachable()
        return None
    if found is None and if_missing:
        outcome.warnings.append(first_that_fits([f"{n} not found; {if_missing}" for n in names]))
    return found


def _effective_pod_spec(spec: dict, ctx: Context) -> dict:
    """The pod spec the pods will run with: the template after the enforced Pod rules."""
    effective = copy_tree(spec)
    shaper = Shaper(ctx.settings.policy, MUTATE, ctx.subject)
    for index, container in stunnerd.stunnerd_containers(effective):
        shaper.container(container, container_path("containers", index, container))
    return effective


def _cpu(container: Any, kind: str) -> Decimal | None:
    return quantity(get_in(container, "resources", kind, "cpu"))


def _utilization_targets(hpa: dict, containers: list[dict]):
    """(field path, averageUtilization, containers it measures) for each CPU target."""
    names = {c.get("name"): c for c in containers}
    metrics = get_in(hpa, "spec", "metrics")
    for i, metric in enumerate(metrics if isinstance(metrics, list) else []):
        kind = get_in(metric, "type")
        if kind == "Resource":
            source, measured = get_in(metric, "resource"), containers
        elif kind == "ContainerResource":
            source = get_in(metric, "containerResource")
            one = names.get(get_in(source, "container"))
            measured = [one] if one else []
        else:
            continue
        target = get_in(source, "target")
        utilization = get_in(target, "averageUtilization")
        if (
            get_in(source, "name") == "cpu"
            and get_in(target, "type") == "Utilization"
            and isinstance(utilization, int)
            and not isinstance(utilization, bool)
            and measured
        ):
            field = "resource" if kind == "Resource" else "containerResource"
            yield f"spec.metrics[{i}].{field}.target.averageUtilization", utilization, measured


def _check_feasibility(
    hpa: dict, ctx: Context, outcome: Outcome, spec: dict, deployment: str
) -> None:
    rule = ctx.settings.policy.hpaFeasibility
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    for where, utilization, measured in _utilization_targets(hpa, containers):
        requests = [_cpu(c, "requests") for c in measured]
        limits = [_cpu(c, "limits") for c in measured]
        if any(r is None or r == 0 for r in requests):
            problem = (
                f"the pods of Deployment {ctx.namespace}/{deployment} have no CPU request, "
                "so CPU utilization is undefined and the HPA never scales"
            )
        elif any(lim is None for lim in limits):
            continue  # no CPU limit: usage is not capped, the target is reachable
        else:
            request, limit = sum(requests), sum(limits)
            at_target = request * utilization / 100
            if at_target < limit:
                continue
            highest = int(limit / request * 100 - Decimal("0.000001"))
            cores = format_cores
            problem = (
                f"{utilization}% x CPU request {cores(request)} = {cores(at_target)} is not "
                f"below the CPU limit {cores(limit)} of Deployment {ctx.namespace}/{deployment}: "
                f"pods are throttled at the limit before the HPA can fire; use at most "
                f"{highest}% or raise the limit"
            )
        if rule.enforced:
            outcome.denials.append(
                f"{ctx.subject}: {where} is {utilization}: {problem} (rule hpaFeasibility)"
            )
        else:
            outcome.warnings.append(f"{where}={utilization} can never fire (hpaFeasibility)")


def _check_dataplane_replicas(ctx: Context, outcome: Outcome) -> None:
    rule = ctx.settings.policy.hpaReplicas
    name = ctx.settings.dataplaneName
    dataplane = _read(
        ctx, outcome, lambda kube: kube.read_dataplane(name), (f"Dataplane {name}", "the Dataplane")
    )
    replicas = get_in(dataplane, "spec", "replicas")
    if replicas is None or replicas == 1:
        return
    problem = (
        f"Dataplane {name} sets spec.replicas={replicas}: the STUNner operator writes it "
        "into the Deployment and overrides this HPA (rule hpaReplicas)"
    )
    if rule.enforced:
        outcome.denials.append(f"{ctx.subject}: {problem}")
    else:
        outcome.warnings.append(f"Dataplane {name} spec.replicas={replicas} fights this HPA")
