"""The lifecycle half's one pod watch: a list + watch of every pod carrying the drain token
label, kept as a small index (DESIGN.md "The lifecycle half": client-go's informer, one per
process, that every reader consults instead of calling the API).
"""

from __future__ import annotations

import datetime
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webhooks import names
from webhooks.kube import Kube, KubeUnavailable, PodWatch, WatchExpired
from webhooks.settings import Settings

log = logging.getLogger(__name__)

# The watch: the apiserver ends each watch after a random 5-10 minutes (like client-go's
# reflector), and reconnects back off from 0.5 s to 30 s while the API is unreachable.
WATCH_SECONDS = (300, 600)
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# A watch that lived this long was healthy: the next reconnect is immediate.
HEALTHY_WATCH_SECONDS = 10.0


# --------------------------------------------------------------------------- pods


def _timestamp(value: Any) -> float | None:
    """metav1.Time (RFC 3339, whole seconds from a real apiserver) as epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def rfc3339(moment: float) -> str:
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


# The longest pod-deletion-cost value kept: an int32 is 11 characters at most ("-2147483648"),
# so a longer value cut to this length still reads as invalid, and a hostile annotation
# costs the watch no more than this per pod.
COST_CHARS_KEPT = 12


@dataclass(frozen=True, slots=True)
class DrainPod:
    """The few fields of a stunnerd Pod the drain and the census need (the watch keeps
    only these: a thousand pods are a thousand of these)."""

    namespace: str
    name: str
    uid: str
    token: str
    ip: str | None
    deletion: float | None  # deletionTimestamp, epoch seconds
    running: bool = False  # status.phase Running: the census reads only these
    cost: str | None = None  # controller.kubernetes.io/pod-deletion-cost as it is now
    version: str = ""  # metadata.resourceVersion: a census write's precondition

    @classmethod
    def from_object(cls, obj: Any) -> DrainPod | None:
        """None for anything that is not a pod carrying a drain token."""
        if not isinstance(obj, dict):
            return None
        meta = obj.get("metadata") or {}
        token = (meta.get("labels") or {}).get(names.DRAIN_TOKEN_LABEL)
        if not (token and meta.get("name") and meta.get("namespace")):
            return None
        status = obj.get("status") or {}
        cost = (meta.get("annotations") or {}).get(names.POD_DELETION_COST_ANNOTATION)
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid") or "",
            token=token,
            ip=status.get("podIP") or None,
            deletion=_timestamp(meta.get("deletionTimestamp")),
            running=status.get("phase") == "Running",
            cost=cost[:COST_CHARS_KEPT] if isinstance(cost, str) else None,
            version=str(meta.get("resourceVersion") or ""),
        )

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminating(self) -> bool:
        return self.deletion is not None


# --------------------------------------------------------------------------- the pod watch


def _backoff(failures: int) -> float:
    delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (failures - 1))
    return delay * random.uniform(0.8, 1.2)


class PodWatcher:
    """The one pod watch of this process: list + watch of every pod carrying the drain
    token label, kept as a small index by (namespace, token). Reconnects with backoff when
    the watch drops, relists when its resourceVersion expired, and tells ``on_change``
    about every pod it sees change or vanish (``"DELETED"`` or ``"MODIFIED"``)."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        on_change: Callable[[str, DrainPod], None],
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.on_change = on_change
        self._cond = threading.Condition()
        self._by_token: dict[tuple[str, str], DrainPod] = {}
        self._by_name: dict[tuple[str, str], DrainPod] = {}
        self._resource_version = ""
        self._attempted = False  # the first list finished, well or not
        self._connected = False  # a watch is open now
        # The index is current: listed, and watched since (or about to be, from the list's
        # resourceVersion). Only a broken watch or list clears it, not a watch the
        # apiserver ended on time (the next one starts at once from where it ended).
        self._synced = False
        self._stop = threading.Event()
        self._stream: PodWatch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            stream = self._stream
            self._cond.notify_all()
        if stream is not None:
            stream.close()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    @property
    def in_sync(self) -> bool:
        """Whether the index shows every pod carrying a token as the API has it, but for
        events on their way."""
        with self._cond:
            return self._synced

    def wait_in_sync(self, wait: float) -> bool:
        """Whether the watch is in sync, waiting up to ``wait`` seconds for it."""
        with self._cond:
            return self._cond.wait_for(lambda: self._synced or self._stop.is_set(), wait) and (
                self._synced
            )

    def pods(self) -> list[DrainPod]:
        """Every pod the watch knows now (the census's round starts from this)."""
        with self._cond:
            return list(self._by_name.values())

    def pod(self, namespace: str, name: str) -> DrainPod | None:
        with self._cond:
            return self._by_name.get((namespace, name))

    def lookup(self, namespace: str, token: str, wait: float) -> DrainPod | None:
        """The pod with this token as the watch knows it; waits up to ``wait`` seconds for
        the first list when the watch is just starting."""
        with self._cond:
            self._cond.wait_for(lambda: self._attempted or self._stop.is_set(), wait)
            return self._by_token.get((namespace, token))

    def wait_seen(self, namespace: str, token: str, wait: float) -> DrainPod | None:
        """The pod with this token once the watch knows it, waiting up to ``wait`` seconds
        (its ADDED may still be on the way); None at once when the watch is not in sync."""
        with self._cond:
            if not self._synced:
                return None
            key = (namespace, token)
            self._cond.wait_for(lambda: key in self._by_token or not self._synced, wait)
            return self._by_token.get(key)

    def wait_terminating(self, namespace: str, token: str, wait: float) -> DrainPod | None:
        """The pod once the watch shows it terminating, waiting up to ``wait`` seconds; None
        at once when the watch is not in sync (nothing could arrive)."""

        def seen() -> DrainPod | None:
            pod = self._by_token.get((namespace, token))
            return pod if pod and pod.terminating else None

        with self._cond:
            if not self._synced:
                return None
            self._cond.wait_for(lambda: seen() or not self._synced, wait)
            return seen()

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            opened = time.monotonic()
            try:
                if not self._resource_version:
                    self._relist()
                self._watch()
            except WatchExpired:
                self._resource_version = ""  # compacted: list again
                self._out_of_sync()
            except KubeUnavailable as err:
                self._out_of_sync()
                if not self._stop.is_set():
                    log.warning("pod watch: %s", err)
            finally:
                with self._cond:
                    self._attempted = True
                    self._connected = False
                    self._stream = None
                    self._cond.notify_all()
            failures = 0 if time.monotonic() - opened >= HEALTHY_WATCH_SECONDS else failures + 1
            if failures:
                self._stop.wait(_backoff(failures))

    def _out_of_sync(self) -> None:
        with self._cond:
            self._synced = False
            self._cond.notify_all()

    def _relist(self) -> None:
        items, version = self.kube.list_pods(names.DRAIN_TOKEN_LABEL)
        pods = [p for p in map(DrainPod.from_object, items) if p and self._watched(p)]
        current = {p.key for p in pods}
        with self._cond:
            vanished = [p for key, p in self._by_name.items() if key not in current]
            self._by_name = {p.key: p for p in pods}
            self._by_token = {(p.namespace, p.token): p for p in pods}
            self._resource_version = version
            self._attempted = True
            self._synced = True
            self._cond.notify_all()
        # Pods deleted while the watch was down, then the current state of the rest.
        for pod in vanished:
            self.on_change("DELETED", pod)
        for pod in pods:
            self.on_change("MODIFIED", pod)

    def _watch(self) -> None:
        timeout = random.randint(*WATCH_SECONDS)
        stream = self.kube.watch_pods(names.DRAIN_TOKEN_LABEL, self._resource_version, timeout)
        with self._cond:
            if self._stop.is_set():
                stream.close()
                return
            self._stream = stream
            self._connected = True
            self._synced = True
            self._cond.notify_all()
        for kind, obj in stream:
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self._resource_version = str(version)
            pod = DrainPod.from_object(obj)
            if kind in ("ADDED", "MODIFIED", "DELETED") and pod and self._watched(pod):
                self._apply(kind, pod)

    def _watched(self, pod: DrainPod) -> bool:
        return self.settings.watches(pod.namespace)

    def _apply(self, kind: str, pod: DrainPod) -> None:
        with self._cond:
            old = self._by_name.pop(pod.key, None)
            if old is not None and self._by_token.get((old.namespace, old.token)) == old:
                del self._by_token[(old.namespace, old.token)]
            if kind != "DELETED":
                self._by_name[pod.key] = pod
                self._by_token[(pod.namespace, pod.token)] = pod
            self._cond.notify_all()
        self.on_change("DELETED" if kind == "DELETED" else "MODIFIED", pod)
