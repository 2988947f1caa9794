"""What rules receive (Context) and return (Outcome): plain data, no HTTP, no Flask."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from webhooks.settings import Settings


@dataclass(frozen=True)
class Context:
    settings: Settings
    webhook: str  # "mutate" or "validate"
    operation: str
    namespace: str
    api_version: str  # of the object as the apiserver sent it, e.g. stunner.l7mp.io/v1alpha1
    subject: str  # "Kind namespace/name" for messages
    dry_run: bool = False
    kube: Any = None  # webhooks.kube.Kube or None (no cluster)
    on_kube_unreachable: Callable[[], None] = lambda: None

    @property
    def mutating(self) -> bool:
        return self.webhook == "mutate"


@dataclass
class Outcome:
    """``desired`` is the object the mutating webhook wants (None: no change intended);
    the framework diffs it against the request's object. Any denial denies."""

    desired: dict | None = None
    warnings: list[str] = field(default_factory=list)
    denials: list[str] = field(default_factory=list)
