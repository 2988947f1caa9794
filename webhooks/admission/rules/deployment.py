"""Deployment with a stunnerd container.

Operator-owned Deployments (label stunner.l7mp.io/owned-by=stunner) are validate-only: the
operator owns the pod template and would fight any edit, each fight a rollout whose old
pods drain for up to an hour (l7mp/stunner#163). Their pods are shaped at Pod CREATE, so
fixable findings are warnings; only what a Pod would be denied for is denied here, so the
mistake shows at apply time instead of as silent ReplicaSet FailedCreate events.
Other stunnerd Deployments get the same rules on their pod template.
"""

from __future__ import annotations

from webhooks.admission import stunnerd
from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.policy import ADVISE, container_path, get_in
from webhooks.admission.rules.common import copy_for_edit, finish, shaper_for
from webhooks.names import OPERATOR_OWNED_LABEL, OPERATOR_OWNED_VALUE

TEMPLATE = "spec.template.spec"


def operator_owned(obj: dict) -> bool:
    return get_in(obj, "metadata", "labels", OPERATOR_OWNED_LABEL) == OPERATOR_OWNED_VALUE


def template_spec(obj: dict) -> dict | None:
    spec = get_in(obj, "spec", "template", "spec")
    return spec if isinstance(spec, dict) else None


def review(obj: dict, ctx: Context) -> Outcome:
    spec = template_spec(obj)
    if spec is None or not stunnerd.stunnerd_containers(spec):
        return Outcome()
    owned = operator_owned(obj)
    if owned and ctx.mutating:
        return Outcome()
    desired = copy_for_edit(obj, ("metadata", "annotations"), ("spec", "template", "spec"))
    spec = template_spec(desired)
    shaper = shaper_for(ctx, ADVISE if owned else None)
    for index, container in stunnerd.stunnerd_containers(spec):
        shaper.container(container, container_path(f"{TEMPLATE}.containers", index, container))
    shaper.grace(spec, TEMPLATE)
    if owned and shaper.warnings:
        shaper.warnings.append(
            "the STUNner operator owns this Deployment: set these in the Dataplane instead"
        )
    return finish(desired, shaper, ctx)
