"""Shared by the per-kind rules: turning a Shaper's findings into an Outcome."""

from __future__ import annotations

import json
from typing import Any

from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.policy import MUTATE, STRICT, TOLERANT, Shaper
from webhooks.names import CHANGES_ANNOTATION


def copy_tree(value: Any) -> Any:
    """A copy of a JSON tree (what an admission request's object is): several times
    faster than copy.deepcopy, which must handle any Python object graph."""
    if isinstance(value, dict):
        return {
            key: copy_tree(item) if isinstance(item, dict | list) else item
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [copy_tree(item) if isinstance(item, dict | list) else item for item in value]
    return value


def copy_for_edit(obj: dict, *editable: tuple[str, ...]) -> dict:
    """A copy of ``obj`` to edit in place at the ``editable`` paths: each of them is copied
    whole and every map on the way to it shallowly; everything else is shared with
    ``obj`` and must not be modified. Far cheaper than copying managedFields, volumes,
    env and probes that no rule edits (the tests check no rule modifies its input)."""
    result = dict(obj)
    for path in editable:
        node, source = result, obj
        for key in path[:-1]:
            source = source.get(key) if isinstance(source, dict) else None
            if not isinstance(source, dict):
                break
            if node.get(key) is source:
                node[key] = dict(source)
            node = node[key]
        else:
            if path[-1] in node:
                node[path[-1]] = copy_tree(node[path[-1]])
    return result


# The container fields the rules edit; env, probes, ports and mounts are only read.
CONTAINER_EDITABLE = ("resources", "command", "args", "lifecycle")


def copy_containers_for_edit(pod_spec: dict) -> None:
    """Give an (already shallow-copied) pod spec its own containers list, each container
    copied shallowly with the fields the rules edit copied whole."""
    containers = pod_spec.get("containers")
    if not isinstance(containers, list):
        return
    pod_spec["containers"] = [
        {**c, **{k: copy_tree(c[k]) for k in CONTAINER_EDITABLE if k in c}}
        if isinstance(c, dict)
        else c
        for c in containers
    ]


def shaper_for(ctx: Context, how: str | None = None) -> Shaper:
    if how is None:
        strict = ctx.settings.fixableFindings == "deny"
        how = MUTATE if ctx.mutating else STRICT if strict else TOLERANT
    return Shaper(ctx.settings.policy, how, ctx.subject)


def metadata_map(obj: dict, key: str) -> dict:
    """``metadata.labels`` or ``metadata.annotations`` of ``obj``, created when absent."""
    if not isinstance(obj.get("metadata"), dict):
        obj["metadata"] = {}
    if not isinstance(obj["metadata"].get(key), dict):
        obj["metadata"][key] = {}
    return obj["metadata"][key]


def record_changes(obj: dict, changes: list[str]) -> None:
    """Merge ``changes`` into the object's changes annotation: what the guard changed stays
    listed across reinvocations and re-applies."""
    annotations = metadata_map(obj, "annotations")
    try:
        earlier = json.loads(annotations.get(CHANGES_ANNOTATION, "[]"))
    except (TypeError, ValueError):
        earlier = []
    if not isinstance(earlier, list):
        earlier = []
    merged = list(dict.fromkeys([str(c) for c in earlier] + changes))
    annotations[CHANGES_ANNOTATION] = json.dumps(merged)


def finish(desired: dict, shaper: Shaper, ctx: Context) -> Outcome:
    """The mutating webhook returns the desired object (annotated when it changed)."""
    if ctx.mutating and shaper.changes:
        record_changes(desired, shaper.changes)
    return Outcome(
        desired=desired if ctx.mutating else None,
        warnings=shaper.warnings,
        denials=shaper.denials,
    )
