"""A stand-in Kubernetes API server for tests and the benchmark: real HTTP, real JSON.

The real ``kubernetes`` client talks to it exactly as to an apiserver, so no client method
is ever monkeypatched. It serves what stunner-guard uses:

    GET  /api/v1/pods                      list / watch (labelSelector, resourceVersion,
    GET  /api/v1/namespaces/{ns}/pods        timeoutSeconds), all namespaces or one
    GET  /api/v1/namespaces/{ns}/pods/{name}
    POST /api/v1/namespaces/{ns}/events    recorded in ``events``
    GET  /apis/apps/v1/namespaces/{ns}/deployments/{name}
    GET  /apis/stunner.l7mp.io/v1/dataplanes/{name}
    PATCH /api/v1/namespaces/{ns}/pods/{name}     merge, strategic-merge (as merge: fine
                                                   for metadata) or JSON patch
    GET|PUT /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}
    POST /apis/coordination.k8s.io/v1/namespaces/{ns}/leases

(list/watch/get work for every kind below). A missing object is a proper 404 ``Status``;
a watch from a compacted resourceVersion gets the apiserver's ERROR event with code 410.
Writes answer as the apiserver does: 409 ``Conflict`` when a resourceVersion in the body
is not the stored one, 409 ``AlreadyExists`` on a create, 422 ``Invalid`` for a
pod-deletion-cost annotation that is not a 32-bit integer (kube-apiserver's
ValidatePodSpecificAnnotations: no sign, no leading zero), 404 for a missing object, 415
for a patch type it does not know.

Use it as a context manager::

    with StandinAPIServer() as api:
        api.put(stunnerd_pod("udp-gateway-abc", token="t1", ip="127.0.0.2"))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")   # for KUBECONFIG
        kube = Kube.for_host(api.url)                                # or directly
        api.terminate("media", "udp-gateway-abc", grace_seconds=30)  # MODIFIED event
        api.drop_watches(); api.stop(); api.start()                  # failures
        api.watch_status = 503; api.hold_watch_events()              # a watch down, lagging
        api.count("watch", "/api/v1/pods"); api.events_for("media", "udp-gateway-abc")
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import datetime
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonpatch
import jsonpointer
import yaml

# kind -> (API prefix, plural, namespaced)
RESOURCES = {
    "Pod": ("/api/v1", "pods", True),
    "Event": ("/api/v1", "events", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "Dataplane": ("/apis/stunner.l7mp.io/v1", "dataplanes", False),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases", True),
}
# The group.resource the apiserver names in write errors.
_QUALIFIED = {"Pod": "pods", "Lease": "leases.coordination.k8s.io"}
POD_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
_BY_PLURAL = {(prefix, plural): kind for kind, (prefix, plural, _) in RESOURCES.items()}
_PATH = re.compile(
    r"^(?P<prefix>/api/v1|/apis/[^/]+/[^/]+)"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)
# A watch without timeoutSeconds ends after this long, like the apiserver's default range.
DEFAULT_WATCH_SECONDS = 1800


def rfc3339(moment: float) -> str:
    """metav1.Time as the apiserver writes it: UTC, whole seconds."""
    stamp = datetime.datetime.fromtimestamp(int(moment), datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def stunnerd_pod(
    name: str,
    namespace: str = "media",
    token: str | None = None,
    ip: str | None = "127.0.0.1",
    gateway: str = "udp-gateway",
    grace_seconds: int = 3600,
) -> dict:
    """A running stunnerd Pod as the STUNner operator's ReplicaSet creates it, with the
    drain token label stunner-guard stamps at CREATE (when ``token`` is given)."""
    labels = {
        "app": "stunner",
        "pod-template-hash": "8547c954bb",
        "stunner.l7mp.io/related-gateway-name": gateway,
        "stunner.l7mp.io/related-gateway-namespace": namespace,
    }
    if token is not None:
        labels["stunner-guard.l7mp.io/drain-token"] = token
    status: dict = {"phase": "Running", "qosClass": "Burstable"}
    if ip:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": f"{gateway}-8547c954bb-",
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            "containers": [
                {
                    "name": "stunner-daemon",
                    "image": "docker.io/l7mp/stunnerd:1.2.0",
                    "command": ["stunnerd"],
                    "args": ["-w", "--udp-thread-num=16"],
                    "ports": [{"name": "metrics-port", "containerPort": 8080, "protocol": "TCP"}],
                }
            ],
            "terminationGracePeriodSeconds": grace_seconds,
        },
        "status": status,
    }


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def deletion_cost_valid(value: str) -> bool:
    """kube-apiserver's GetDeletionCostFromPodAnnotations: a first character that is "-",
    or a digit with no leading zero, then Go's ParseInt(value, 10, 32)."""
    if not _DELETION_COST.fullmatch(value):
        return False
    return -(2**31) <= int(value) < 2**31


_DELETION_COST = re.compile(r"0|-[0-9]+|[1-9][0-9]*")


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: objects merge key by key, null deletes, anything else
    replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _conflict(kind: str, name: str) -> dict:
    body = _status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_QUALIFIED.get(kind, kind)} "{name}": the object '
        "has been modified; please apply your changes to the latest version and try again",
    )
    body["details"] = {"name": name, "kind": RESOURCES[kind][1]}
    return body


_REQUIREMENT = re.compile(r"^(?P<neg>!)?(?P<key>[^=!\s]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>\S*))?$")


def parse_selector(selector: str) -> Callable[[dict], bool]:
    """Equality- and existence-based label selectors (``a``, ``!a``, ``a=b``, ``a==b``,
    ``a!=b``, comma-separated); ValueError for anything else."""
    tests = []
    for part in filter(None, (p.strip() for p in selector.split(","))):
        m = _REQUIREMENT.match(part)
        if not m or (m["neg"] and m["op"]):
            raise ValueError(f"unsupported label selector requirement {part!r}")
        key, op, value = m["key"], m["op"], m["value"]
        if m["neg"]:
            tests.append(lambda labels, k=key: k not in labels)
        elif op is None:
            tests.append(lambda labels, k=key: k in labels)
        elif op == "!=":
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        else:
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
    return lambda labels: all(test(labels) for test in tests)


class StandinAPIServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._history: list[tuple[int, str, str, dict]] = []  # (rv, type, kind, object)
        self._history_rvs: list[int] = []
        self._rv = 1000
        self._compacted_rv = 0
        self._watch_generation = 0
        self._open_watches = 0
        self._requests: Counter[tuple[str, str]] = Counter()
        self.events: list[dict] = []
        # Every pod patch the server took: {"namespace", "name", "patch", "at" (monotonic)}.
        self.patches: list[dict] = []
        # When set, event creation is answered with this HTTP status (e.g. 403: no RBAC).
        self.event_status: int | None = None
        # When set, every watch request is answered with this HTTP status (e.g. 503, as an
        # overloaded apiserver answers): lists and gets still work, no watch stays open.
        self.watch_status: int | None = None
        self._watch_events_held = False
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> StandinAPIServer:
        """Listen (again, on the same port after ``stop()``)."""
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.standin = self
        self.port = server.server_address[1]
        self._server = server
        # A short poll interval: stop() returns within it.
        threading.Thread(
            target=server.serve_forever, args=(0.05,), name="standin-apiserver", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: the API is unreachable until
        ``start()`` (connections are refused)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self.drop_watches()
        for conn in list(self._connections):
            _cut(conn)

    def __enter__(self) -> StandinAPIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path | str) -> Path:
        """A kubeconfig pointing at this server, for ``KUBECONFIG``."""
        path = Path(path)
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "standin", "user": {"token": "standin-token"}}],
                    "contexts": [
                        {"name": "standin", "context": {"cluster": "standin", "user": "standin"}}
                    ],
                    "current-context": "standin",
                }
            )
        )
        return path

    # ------------------------------------------------------------ objects

    def put(self, obj: dict) -> dict:
        """Create or replace an object (ADDED / MODIFIED to watchers); the stored copy."""
        obj = copy.deepcopy(obj)
        kind = obj["kind"]
        meta = obj.setdefault("metadata", {})
        if RESOURCES[kind][2]:
            meta.setdefault("namespace", "default")
        key = (kind, meta.get("namespace", ""), meta["name"])
        with self._cond:
            previous = self._objects.get(key)
            old_uid = (previous or {}).get("metadata", {}).get("uid")
            meta.setdefault("uid", old_uid or str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", rfc3339(time.time()))
            self._record("MODIFIED" if previous else "ADDED", key, obj)
            return copy.deepcopy(obj)

    def put_all(self, objs: list[dict]) -> None:
        for obj in objs:
            self.put(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._cond:
            obj = self._objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def update(self, kind: str, namespace: str, name: str, change: Callable[[dict], None]) -> dict:
        """Apply ``change`` to a copy of the object and store it (MODIFIED)."""
        with self._cond:
            obj = copy.deepcopy(self._objects[(kind, namespace, name)])
            change(obj)
            self._record("MODIFIED", (kind, namespace, name), obj)
            return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Remove the object (DELETED to watchers)."""
        with self._cond:
            obj = self._objects[(kind, namespace, name)]
            self._record("DELETED", (kind, namespace, name), copy.deepcopy(obj))

    def terminate(self, namespace: str, name: str, grace_seconds: int = 30) -> dict:
        """What ``kubectl delete pod`` does first: set deletionTimestamp = now + grace (whole
        seconds) and deletionGracePeriodSeconds, and tell watchers (MODIFIED)."""

        def mark(pod: dict) -> None:
            meta = pod["metadata"]
            meta["deletionTimestamp"] = rfc3339(time.time() + grace_seconds)
            meta["deletionGracePeriodSeconds"] = grace_seconds

        return self.update("Pod", namespace, name, mark)

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no final chunk), as a restarting
        apiserver or a load balancer would."""
        with self._cond:
            self._watch_generation += 1
            self._cond.notify_all()

    def hold_watch_events(self, held: bool = True) -> None:
        """While held, open watches stay open but deliver nothing (a watch lagging behind
        the apiserver); released, they catch up in order."""
        with self._cond:
            self._watch_events_held = held
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the change history: a watch from an older resourceVersion gets 410."""
        with self._cond:
            self._compacted_rv = self._rv
            self._history.clear()
            self._history_rvs.clear()

    def _record(self, kind_of_change: str, key: tuple[str, str, str], obj: dict) -> None:
        # Caller holds the lock.
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if kind_of_change == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = obj
        self._history.append((self._rv, kind_of_change, key[0], obj))
        self._history_rvs.append(self._rv)
        self._cond.notify_all()

    # ------------------------------------------------------------ observing

    def count(self, verb: str | None = None, path: str | None = None) -> int:
        """Requests served so far by verb (list, watch, get, create) and/or URL path."""
        with self._cond:
            return sum(
                n
                for (v, p), n in self._requests.items()
                if (verb is None or v == verb) and (path is None or p == path)
            )

    def requests(self) -> dict[tuple[str, str], int]:
        with self._cond:
            return dict(self._requests)

    @property
    def open_watches(self) -> int:
        with self._cond:
            return self._open_watches

    def events_for(self, namespace: str, name: str) -> list[dict]:
        with self._cond:
            return [
                e
                for e in self.events
                if e["involvedObject"].get("namespace") == namespace
                and e["involvedObject"].get("name") == name
            ]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate()`` holds; it is re-checked on every request and every
        change, so tests await events instead of sleeping."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    # ------------------------------------------------------------ serving (handler side)

    def _count(self, verb: str, path: str) -> None:
        with self._cond:
            self._requests[(verb, path)] += 1
            self._cond.notify_all()

    def _list(self, kind: str, namespace: str | None, selector) -> dict:
        with self._cond:
            items = [
                copy.deepcopy(obj)
                for (k, ns, _), obj in sorted(self._objects.items())
                if k == kind and _matches(obj, namespace, selector)
            ]
            rv = str(self._rv)
        return {
            "kind": f"{kind}List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    def _create_event(self, namespace: str, event: dict) -> tuple[int, dict]:
        if self.event_status is not None:
            code = self.event_status
            return code, _status(code, "Forbidden" if code == 403 else "InternalError", "refused")
        if not isinstance(event, dict) or not (event.get("involvedObject") and event.get("reason")):
            return 422, _status(422, "Invalid", "event needs involvedObject and reason")
        event = copy.deepcopy(event)
        meta = event.setdefault("metadata", {})
        meta["namespace"] = namespace
        if not meta.get("name"):
            meta["name"] = f"{meta.get('generateName', 'event.')}{uuid.uuid4().hex[:10]}"
        with self._cond:
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            meta.setdefault("uid", str(uuid.uuid4()))
            self.events.append(event)
            self._cond.notify_all()
        return 201, event

    # ------------------------------------------------------------ writes (handler side)

    def _patch(self, kind: str, namespace: str, name: str, content_type: str, patch) -> tuple:
        """PATCH (an UPDATE to admission and validation); (status, body)."""
        if kind != "Pod":
            return 405, _status(405, "MethodNotAllowed", f"PATCH {kind} not served")
        with self._cond:
            stored = self._objects.get((kind, namespace, name))
            if stored is None:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            try:
                if content_type in (
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                ):
                    if not isinstance(patch, dict):
                        raise ValueError("a merge patch is a JSON object")
                    updated = merge_patch(stored, patch)
                elif content_type == "application/json-patch+json":
                    updated = jsonpatch.apply_patch(stored, patch)
                else:
                    return 415, _status(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an "
                        "unknown format - accepted media types include: "
                        "application/json-patch+json, application/merge-patch+json, "
                        "application/apply-patch+yaml, application/strategic-merge-patch+json",
                    )
            except (
                ValueError,
                jsonpatch.JsonPatchException,
                jsonpointer.JsonPointerException,
            ) as err:
                return 422, _status(422, "Invalid", f"the patch cannot be applied: {err}")
            meta = updated.setdefault("metadata", {})
            if meta.get("resourceVersion") != stored["metadata"]["resourceVersion"]:
                return 409, _conflict(kind, name)
            invalid = self._invalid_pod(updated, stored)
            if invalid:
                return 422, invalid
            self._record("MODIFIED", (kind, namespace, name), updated)
            self.patches.append(
                {"namespace": namespace, "name": name, "patch": patch, "at": time.monotonic()}
            )
            return 200, copy.deepcopy(updated)

    @staticmethod
    def _invalid_pod(pod: dict, old: dict) -> dict | None:
        """The apiserver's checks that a guard's pod patch could trip."""
        meta, old_meta = pod["metadata"], old["metadata"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"):
            if meta.get(field) != old_meta.get(field):
                return _status(422, "Invalid", f"metadata.{field}: field is immutable")
        cost = (meta.get("annotations") or {}).get(POD_DELETION_COST)
        old_cost = (old_meta.get("annotations") or {}).get(POD_DELETION_COST)
        # An update is validated only if the stored value was valid (AllowInvalidPodDeletionCost).
        if cost is not None and not deletion_cost_valid(cost):
            if old_cost is None or deletion_cost_valid(old_cost):
                where = f"metadata.annotations[{POD_DELETION_COST}]"
                why = f'Invalid value: "{cost}": must be a 32bit integer'
                body = _status(422, "Invalid", f'Pod "{meta["name"]}" is invalid: {where}: {why}')
                body["details"] = {
                    "name": meta["name"],
                    "kind": "Pod",
                    "causes": [{"reason": "FieldValueInvalid", "message": why, "field": where}],
                }
                return body
        return None

    def _create(self, kind: str, namespace: str, obj) -> tuple:
        """POST of a Lease; (status, body)."""
        if kind != "Lease":
            return 405, _status(405, "MethodNotAllowed", f"POST {kind} not served")
        if not isinstance(obj, dict) or not (obj.get("metadata") or {}).get("name"):
            return 422, _status(422, "Invalid", "metadata.name: Required value")
        if invalid := _invalid_lease(obj):
            return 422, invalid
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["namespace"] = namespace
        meta.pop("resourceVersion", None)
        key = (kind, namespace, meta["name"])
        with self._cond:
            if key in self._objects:
                body = _status(
                    409, "AlreadyExists", f'{_QUALIFIED[kind]} "{meta["name"]}" already exists'
                )
                body["details"] = {"name": meta["name"], "kind": RESOURCES[kind][1]}
                return 409, body
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = rfc3339(time.time())
            self._record("ADDED", key, obj)
            return 201, copy.deepcopy(obj)

    def _replace(self, kind: str, namespace: str, name: str, obj) -> tuple:
        """PUT of a Lease: optimistic concurrency on metadata.resourceVersion when given
        (leases allow unconditional updates); (status, body)."""
        if kind != "Lease":
            return 405, _status(405, "MethodNotAllowed", f"PUT {kind} not served")
        if not isinstance(obj, dict) or (obj.get("metadata") or {}).get("name") != name:
            return 400, _status(400, "BadRequest", "the name of the object does not match")
        if invalid := _invalid_lease(obj):
            return 422, invalid
        obj = copy.deepcopy(obj)
        key = (kind, namespace, name)
        with self._cond:
            stored = self._objects.get(key)
            if stored is None:
                return 404, _status(404, "NotFound", f'{_QUALIFIED[kind]} "{name}" not found')
            version = obj["metadata"].get("resourceVersion")
            if version and version != stored["metadata"]["resourceVersion"]:
                return 409, _conflict(kind, name)
            for field in ("uid", "creationTimestamp"):
                obj["metadata"][field] = stored["metadata"][field]
            obj["metadata"]["namespace"] = namespace
            self._record("MODIFIED", key, obj)
            return 200, copy.deepcopy(obj)


_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def _invalid_lease(lease: dict) -> dict | None:
    """coordination/v1 LeaseSpec as the apiserver decodes and validates it."""
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        return _status(422, "Invalid", "spec.leaseDurationSeconds: must be greater than 0")
    for field in ("acquireTime", "renewTime"):
        value = spec.get(field)
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.match(value)):
            return _status(422, "Invalid", f"spec.{field}: not a MicroTime: {value!r}")
    holder = spec.get("holderIdentity")
    if holder is not None and not isinstance(holder, str):
        return _status(422, "Invalid", "spec.holderIdentity: must be a string")
    return None


def _matches(obj: dict, namespace: str | None, selector) -> bool:
    meta = obj.get("metadata", {})
    if namespace and meta.get("namespace") != namespace:
        return False
    return selector(meta.get("labels") or {})


def _cut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        conn.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    standin: StandinAPIServer

    def process_request(self, request, client_address):
        self.standin._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.standin._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client that hangs up (a closed watch, a stopped test) is not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def send_json(handler: BaseHTTPRequestHandler, code: int, body: dict) -> None:
    """Answer ``handler``'s request with ``body`` as JSON (the chart test's stand-in too)."""
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams
    disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms ACK wait
    server: _Server

    def log_message(self, format, *args) -> None:  # quiet: tests read counters instead
        pass

    # ---------------------------------------------------------------- helpers

    def _route(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        m = _PATH.match(url.path)
        kind = m and _BY_PLURAL.get((m["prefix"], m["plural"]))
        return url.path, query, m, kind

    # ---------------------------------------------------------------- verbs

    def do_GET(self) -> None:
        standin = self.server.standin
        path, query, m, kind = self._route()
        if not kind:
            standin._count("get", path)
            missing = _status(404, "NotFound", f"the server could not find {path}")
            return send_json(self, 404, missing)
        if m["name"]:
            standin._count("get", path)
            obj = standin.get(kind, m["namespace"] or "", m["name"])
            if obj is None:
                plural = RESOURCES[kind][1]
                return send_json(
                    self, 404, _status(404, "NotFound", f'{plural} "{m["name"]}" not found')
                )
            return send_json(self, 200, obj)
        watching = query.get("watch") in ("true", "1")
        standin._count("watch" if watching else "list", path)
        try:
            selector = parse_selector(query.get("labelSelector", ""))
        except ValueError as err:
            return send_json(self, 400, _status(400, "BadRequest", str(err)))
        if not watching:
            return send_json(self, 200, standin._list(kind, m["namespace"], selector))
        if standin.watch_status is not None:
            code = standin.watch_status
            return send_json(self, code, _status(code, "ServiceUnavailable", "watch refused"))
        return self._watch(kind, m["namespace"], selector, query)

    def _body(self):
        """The request's JSON body; None (after answering 400) when it is not JSON."""
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            return json.loads(raw)
        except ValueError:
            send_json(self, 400, _status(400, "BadRequest", "body is not JSON"))
            return None

    def do_POST(self) -> None:
        standin = self.server.standin
        path, _, m, kind = self._route()
        standin._count("create", path)
        body = self._body()
        if body is None:
            return None
        if not kind or m["name"] or not m["namespace"]:
            return send_json(self, 405, _status(405, "MethodNotAllowed", f"cannot POST {path}"))
        if kind == "Event":
            return send_json(self, *standin._create_event(m["namespace"], body))
        send_json(self, *standin._create(kind, m["namespace"], body))

    def do_PUT(self) -> None:
        standin = self.server.standin
        path, _, m, kind = self._route()
        standin._count("update", path)
        body = self._body()
        if body is None:
            return None
        if not kind or not m["name"] or not m["namespace"]:
            return send_json(self, 405, _status(405, "MethodNotAllowed", f"cannot PUT {path}"))
        send_json(self, *standin._replace(kind, m["namespace"], m["name"], body))

    def do_PATCH(self) -> None:
        standin = self.server.standin
        path, _, m, kind = self._route()
        standin._count("patch", path)
        body = self._body()
        if body is None:
            return None
        if not kind or not m["name"] or not m["namespace"]:
            return send_json(self, 405, _status(405, "MethodNotAllowed", f"cannot PATCH {path}"))
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        send_json(self, *standin._patch(kind, m["namespace"], m["name"], content_type, body))

    def _refuse(self) -> None:
        self.server.standin._count(self.command.lower(), self._route()[0])
        send_json(self, 405, _status(405, "MethodNotAllowed", f"{self.command} not served"))

    do_DELETE = _refuse

    # ---------------------------------------------------------------- watch

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, kind_of_change: str, obj: dict) -> None:
        self._chunk(json.dumps({"type": kind_of_change, "object": obj}).encode() + b"\n")

    def _watch(self, kind: str, namespace: str | None, selector, query: dict) -> None:
        standin = self.server.standin
        rv = query.get("resourceVersion") or "0"
        try:
            cursor = int(rv)
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        except ValueError:
            return send_json(self, 400, _status(400, "BadRequest", "bad resourceVersion"))
        deadline = time.monotonic() + timeout
        with standin._cond:
            generation = standin._watch_generation
            expired = cursor != 0 and cursor < standin._compacted_rv
            initial = []
            if cursor == 0:  # "start at most recent": the current state as ADDED events
                initial = [
                    copy.deepcopy(obj)
                    for (k, _, _), obj in sorted(standin._objects.items())
                    if k == kind and _matches(obj, namespace, selector)
                ]
                cursor = standin._rv
            standin._open_watches += 1
            standin._cond.notify_all()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if expired:
                gone = _status(410, "Expired", f"too old resource version: {rv}")
                self._event("ERROR", gone)
                self._chunk(b"")
                return
            for obj in initial:
                self._event("ADDED", obj)
            while True:
                with standin._cond:
                    while True:
                        start = bisect.bisect_right(standin._history_rvs, cursor)
                        pending = [] if standin._watch_events_held else standin._history[start:]
                        dropped = generation != standin._watch_generation
                        remaining = deadline - time.monotonic()
                        if pending or dropped or remaining <= 0:
                            break
                        standin._cond.wait(remaining)
                if dropped:
                    self.close_connection = True
                    _cut(self.connection)
                    return
                for event_rv, kind_of_change, event_kind, obj in pending:
                    cursor = event_rv
                    if event_kind == kind and _matches(obj, namespace, selector):
                        self._event(kind_of_change, obj)
                if not pending and remaining <= 0:
                    self._chunk(b"")  # the apiserver ends the watch at timeoutSeconds
                    return
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            with standin._cond:
                standin._open_watches -= 1
                standin._cond.notify_all()
