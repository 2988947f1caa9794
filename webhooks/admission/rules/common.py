"""Shared by the per-kind rules: turning a Shaper's findings into an Outcome."""

from __future__ import annotations

import json
from typing import Any

import orjson

from webhooks.admission.outcome import Context, Outcome
from webhooks.admission.policy import MUTATE, STRICT, TOLERANT, Shaper
from webhooks.admission.review import MAX_DEPTH, FieldPath, TooDeep
from webhooks.names import (
    CHANGES_ANNOTATION,
    MAX_RECORDED_CHANGE_CHARS,
    MAX_RECORDED_CHANGES,
)


class _Deeper(Exception):
    """Raised down in _copy, turned into TooDeep (with the path) by copy_tree."""


def copy_tree(value: Any, where: FieldPath = ()) -> Any:
    """A copy of a JSON tree (what an admission request's object is): several times
    faster than copy.deepcopy, which must handle any Python object graph.

    ``where`` is the path of ``value`` in the request's object. The copy recurses, so it
    refuses (TooDeep, a 400) a tree that nests more than MAX_DEPTH levels counted from the
    object: orjson reads bodies up to 1024 levels deep, and 500 were enough to exhaust
    Python's stack here."""
    if not isinstance(value, dict | list):
        return value
    try:
        return _copy(value, MAX_DEPTH - len(where))
    except _Deeper:
        raise TooDeep(where, value) from None


def _copy(value: dict | list, levels: int) -> Any:
    if levels <= 0:
        raise _Deeper
    levels -= 1
    if isinstance(value, dict):
        return {
            key: _copy(item, levels) if isinstance(item, dict | list) else item
            for key, item in value.items()
        }
    return [_copy(item, levels) if isinstance(item, dict | list) else item for item in value]


def copy_for_edit(obj: dict, *editable: tuple[str, ...]) -> dict:
    """A copy of ``obj`` to edit in place at the ``editable`` paths: each of them is copied
    whole and every map on the way to it shallowly; everything else is shared with
    ``obj`` and must not be modified. Far cheaper than copying managedFields, volumes,
    env and probes that no rule edits (the tests check no rule modifies its input). The
    walk down each path is as long as the path, whatever the object."""
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
                node[path[-1]] = copy_tree(node[path[-1]], path)
    return result


# The container fields the rules edit; env, probes, ports and mounts are only read.
CONTAINER_EDITABLE = ("resources", "command", "args", "lifecycle")


def copy_containers_for_edit(pod_spec: dict, where: FieldPath = ("spec",)) -> None:
    """Give an (already shallow-copied) pod spec, at ``where`` in the object, its own
    containers list, each container copied shallowly with the fields the rules edit copied
    whole."""
    containers = pod_spec.get("containers")
    if not isinstance(containers, list):
        return
    pod_spec["containers"] = [
        {
            **c,
            **{
                k: copy_tree(c[k], (*where, "containers", i, k))
                for k in CONTAINER_EDITABLE
                if k in c
            },
        }
        if isinstance(c, dict)
        else c
        for i, c in enumerate(containers)
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


def recorded_changes(annotation: Any) -> list[str] | None:
    """The changes listed in the annotation's value, or None when it is not a JSON list of
    strings. Anyone may write an annotation: 1,000 ``[`` (a legal 2 KB value) exhausted
    Python's json module; orjson refuses more than 1024 levels with an error instead, and
    a list of anything but strings is refused without walking into it."""
    try:
        earlier = orjson.loads(annotation)
    except (TypeError, orjson.JSONDecodeError):
        return None
    if not isinstance(earlier, list) or not all(isinstance(c, str) for c in earlier):
        return None
    return earlier


def record_changes(obj: dict, changes: list[str]) -> bool:
    """Merge ``changes`` into the object's changes annotation: what the guard changed stays
    listed across reinvocations and re-applies, the newest MAX_RECORDED_CHANGES of it, each
    cut to MAX_RECORDED_CHANGE_CHARS (names.py). An annotation that is not a JSON list of
    strings is replaced by a new list; False then, so the caller can say so."""
    annotations = metadata_map(obj, "annotations")
    earlier = recorded_changes(annotations.get(CHANGES_ANNOTATION, "[]"))
    latest = dict.fromkeys(_cut_change(c) for c in changes)
    kept = dict.fromkeys(_cut_change(c) for c in earlier or [])
    merged = [c for c in kept if c not in latest] + list(latest)
    # ensure_ascii off: a character then takes at most 6 bytes (a control character
    # escaped), not 12 (an escaped surrogate pair).
    annotations[CHANGES_ANNOTATION] = json.dumps(merged[-MAX_RECORDED_CHANGES:], ensure_ascii=False)
    return earlier is not None


def _cut_change(change: str) -> str:
    if len(change) <= MAX_RECORDED_CHANGE_CHARS:
        return change
    return change[: MAX_RECORDED_CHANGE_CHARS - 3] + "..."


def finish(desired: dict, shaper: Shaper, ctx: Context) -> Outcome:
    """The mutating webhook returns the desired object (annotated when it changed)."""
    if ctx.mutating and shaper.changes and not record_changes(desired, shaper.changes):
        shaper.warnings.append(
            f"stunner-guard replaced metadata.annotations[{CHANGES_ANNOTATION}]: "
            "not a JSON list of strings"
        )
    return Outcome(
        desired=desired if ctx.mutating else None,
        warnings=shaper.warnings,
        denials=shaper.denials,
    )
