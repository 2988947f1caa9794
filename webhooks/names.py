"""Label and annotation keys, and the drain path: the names stunner-guard writes or reads."""

from __future__ import annotations

# Set by the STUNner gateway operator on the Deployments it renders from a Dataplane.
OPERATOR_OWNED_LABEL = "stunner.l7mp.io/owned-by"
OPERATOR_OWNED_VALUE = "stunner"

# Stamped on each stunnerd Pod at CREATE; the preStop path carries it, because a
# ReplicaSet pod has no name yet at admission time.
DRAIN_TOKEN_LABEL = "stunner-guard.l7mp.io/drain-token"

# JSON list of what the guard changed on the object, one "field: before -> after (rule)"
# string per change, oldest first; merged on reinvocation and re-apply (a change made again
# moves to the end). It keeps the newest MAX_RECORDED_CHANGES, each cut to
# MAX_RECORDED_CHANGE_CHARS: under 100 KB even of hostile text (6 bytes a character at
# most, a JSON-escaped control character), about 10 KB in practice, so re-applies never
# bring an object near the apiserver's 256 KiB limit on all its annotations together.
CHANGES_ANNOTATION = "stunner-guard.l7mp.io/changes"
MAX_RECORDED_CHANGES = 50
MAX_RECORDED_CHANGE_CHARS = 300

# Why drain is off for a pod (a user preStop was kept).
DRAIN_ANNOTATION = "stunner-guard.l7mp.io/drain"

# The ReplicaSet controller deletes pods with a lower value first on scale-down (after
# unscheduled, pending and not-ready ones); int32 as a decimal string, absent means 0. The
# census keeps it on running stunnerd pods in step with their TURN allocations.
POD_DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"

DRAIN_PATH_PREFIX = "/drain"


def drain_path(namespace: str, token: str) -> str:
    """The path the injected preStop hook GETs: static, since kubelet expands nothing."""
    return f"{DRAIN_PATH_PREFIX}/{namespace}/{token}"
