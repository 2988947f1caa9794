"""Pod CREATE with a stunnerd container: the final safety net (same rules as the Dataplane,
since the operator never touches Pods) plus the drain hook.

The drain hook: kubelet runs an httpGet preStop from the node, resolves ``host`` there (so
it must be the guard Service's ClusterIP), expands no variables in the path, and a
ReplicaSet pod has no name at admission time. So the pod gets a random token label and
the hook path carries namespace and token (DESIGN.md "The drain (preStop) protocol").
"""

from __future__ import annotations

import secrets

from webhooks.admission import stunnerd
from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.policy import Shaper, container_path, get_in
from webhooks.admission.rules.common import (
    copy_containers_for_edit,
    copy_for_edit,
    finish,
    metadata_map,
    shaper_for,
)
from webhooks.names import DRAIN_ANNOTATION, DRAIN_TOKEN_LABEL, drain_path

# pion/turn's default TURN allocation lifetime (RFC 5766): an idle allocation expires
# after this long, so a drain shorter than this may cut calls.
ALLOCATION_LIFETIME_SECONDS = 600
# What the Pod rules edit besides the spec's containers and grace period.
EDITABLE = (("metadata", "labels"), ("metadata", "annotations"))


def review(obj: dict, ctx: Context) -> Outcome:
    if not stunnerd.stunnerd_containers(obj.get("spec")):
        return Outcome()
    desired = copy_for_edit(obj, *EDITABLE)
    spec = desired["spec"] = dict(obj["spec"])
    copy_containers_for_edit(spec)
    shaper = shaper_for(ctx)
    for index, container in stunnerd.stunnerd_containers(spec):
        shaper.container(container, container_path("spec.containers", index, container))
    grace = shaper.grace(spec, "spec")
    if ctx.mutating:
        inject_drain_hook(desired, ctx, shaper)
    else:
        check_drain_budget(desired, grace, ctx, shaper)
    return finish(desired, shaper, ctx)


def is_drain_hook(pre_stop: object, namespace: str) -> bool:
    path = get_in(pre_stop, "httpGet", "path")
    return isinstance(path, str) and path.startswith(drain_path(namespace, ""))


def inject_drain_hook(pod: dict, ctx: Context, shaper: Shaper) -> None:
    rule = ctx.settings.policy.drainHook
    if not rule.on:
        return
    needing = []
    for index, container in stunnerd.stunnerd_containers(pod["spec"]):
        where = container_path("spec.containers", index, container) + ".lifecycle.preStop"
        pre_stop = get_in(container, "lifecycle", "preStop")
        if pre_stop is None:
            needing.append((where, container))
        elif not is_drain_hook(pre_stop, ctx.namespace):
            # The user's hook wins; drain then relies on stunnerd's own SIGTERM drain.
            shaper.say(
                where, lambda at: f"{at}: your preStop is kept, so stunner-guard drain is off"
            )
            metadata_map(pod, "annotations")[DRAIN_ANNOTATION] = f"off: {where} is the user's own"
    if not needing:
        return
    host, port = ctx.settings.drainHost, ctx.settings.drainPort
    if not host:
        shaper.warnings.append(
            "stunner-guard drain host unknown (STUNNER_GUARD_DRAIN_HOST): no preStop injected"
        )
        return
    token = get_in(pod, "metadata", "labels", DRAIN_TOKEN_LABEL)
    if not isinstance(token, str) or not token:
        token = secrets.token_hex(8)
    path = drain_path(ctx.namespace, token)
    hook = {"httpGet": {"scheme": "HTTPS", "host": host, "port": port, "path": path}}
    applied = False
    for where, container in needing:
        if shaper.propose(
            "drainHook",
            rule,
            where,
            None,
            f"GET {path}",
            "hold SIGTERM until TURN allocations drain",
        ):
            if not isinstance(container.get("lifecycle"), dict):
                container["lifecycle"] = {}
            container["lifecycle"]["preStop"] = hook
            applied = True
    if applied:
        metadata_map(pod, "labels")[DRAIN_TOKEN_LABEL] = token


def check_drain_budget(pod: dict, grace: int | None, ctx: Context, shaper: Shaper) -> None:
    """Warn when the drain cannot outlast an idle TURN allocation before kubelet's kill."""
    containers = [c for _, c in stunnerd.stunnerd_containers(pod["spec"])]
    hooks = [get_in(c, "lifecycle", "preStop") for c in containers]
    if not any(is_drain_hook(h, ctx.namespace) for h in hooks):
        if None in hooks and ctx.settings.policy.drainHook.on and ctx.settings.drainHost:
            shaper.warnings.append("no stunner-guard drain preStop: calls may drop on scale-down")
        return
    if grace is None:
        return
    budget = grace - ctx.settings.drain.marginSeconds
    if budget < ALLOCATION_LIFETIME_SECONDS:
        shaper.warnings.append(
            f"spec.terminationGracePeriodSeconds={grace}: drain can hold {budget:g}s, less than "
            f"the {ALLOCATION_LIFETIME_SECONDS}s TURN allocation lifetime"
        )
