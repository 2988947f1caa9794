"""Shared by the per-kind rules: turning a Shaper's findings into an Outcome."""

from __future__ import annotations

import json
from typing import Any

from webhooks.names import CHANGES_ANNOTATION
from webhooks.outcome import Context, Outcome
from webhooks.policy import MUTATE, STRICT, Shaper


def copy_tree(value: Any) -> Any:
    """A copy of a JSON tree (what an admission request's object is): several times
    faster than copy.deepcopy, which must handle any Python object graph."""
    if isinstance(value, dict):
        return {key: copy_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_tree(item) for item in value]
    return value


def shaper_for(ctx: Context, how: str | None = None) -> Shaper:
    return Shaper(ctx.settings.policy, how or (MUTATE if ctx.mutating else STRICT), ctx.subject)


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


def container_path(prefix: str, index: int, container: dict) -> str:
    """``spec.containers[stunner-daemon]``: containers are keyed by name in Kubernetes."""
    name = container.get("name")
    return f"{prefix}[{name if isinstance(name, str) and name else index}]"
