"""The one module that talks to the Kubernetes API.

Everything here returns plain dicts shaped exactly as the API serves them (camelCase, the
same shape admission requests carry), so policy code never sees client model classes.

Configuration: in-cluster service account when running in a pod, else the kubeconfig
(``KUBECONFIG`` or ``~/.kube/config``) when running locally, else no cluster at all
(``connect()`` returns None): admission then works without it and the HPA rule allows
with a warning, and the drain endpoint answers at once that it cannot see pods.

RBAC this module needs: ``get`` deployments (apps), ``get`` dataplanes
(stunner.l7mp.io), ``list``/``watch`` pods (cluster-wide: the drain's one pod watch),
``create`` events; with the census in enforce mode also ``patch`` pods (only the
pod-deletion-cost annotation: the chart's ValidatingAdmissionPolicy refuses anything else)
and ``get``/``create``/``update`` leases in the guard's own namespace (its leader election).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from webhooks import logs

DATAPLANE_GROUP = "stunner.l7mp.io"
DATAPLANE_VERSION = "v1"
DATAPLANE_PLURAL = "dataplanes"

# Slack on top of a watch's server-side timeoutSeconds before the client gives up reading:
# the apiserver ends the watch itself at timeoutSeconds, so the read timeout only fires
# when the connection went silent (a dead peer or a half-open TCP connection).
WATCH_READ_SLACK_SECONDS = 30.0

log = logging.getLogger(__name__)


class KubeUnavailable(Exception):
    """The API could not answer (unreachable, timed out, forbidden, 5xx)."""


class WatchExpired(KubeUnavailable):
    """The watch's resourceVersion is too old (410 Gone): list again, then watch."""


class Conflict(KubeUnavailable):
    """A write refused with 409: the object changed since it was read (resourceVersion
    precondition), or, on create, it exists already."""


class Kube:
    """A thin, dict-in/dict-out facade over the official client."""

    def __init__(self, configuration: client.Configuration, timeout: float = 2.0) -> None:
        # One quick retry at most: admission runs inside the apiserver's own webhook timeout.
        configuration.retries = 1
        # The config loaders' token refresh hook assigns ``host`` again before every
        # request, and the client (v37) then resolves the proxy from the environment anew:
        # a walk over every environment variable, and a pod has seven per Service in its
        # namespace. Measured per event: 0.8 ms with 37 variables, 1.8 ms with 387. Pinning
        # the proxy resolved at load time (what Go's ProxyFromEnvironment caches) ends it.
        configuration.proxy = configuration.proxy
        self.api = client.ApiClient(configuration)
        self.timeout = timeout

    @classmethod
    def for_host(cls, host: str, timeout: float = 2.0, token: str | None = None) -> Kube:
        """A client for an API server at ``host`` (tests point it at a local stand-in)."""
        configuration = client.Configuration()
        configuration.host = host
        configuration.verify_ssl = False
        if token:
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return cls(configuration, timeout)

    def close(self) -> None:
        self.api.close()

    # ----------------------------------------------------------------- plumbing

    def _send(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None = None,
        body: dict | None = None,
        timeout: float | tuple[float, float] | None = None,
        content_type: str = "application/json",
    ):
        """One request through the client's serializer (auth, token refresh, query
        encoding); the unread urllib3 response, KubeUnavailable when nothing came back."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self.api.call_api(*request, _request_timeout=timeout or self.timeout).response
        except Exception as err:  # urllib3 connection/timeout errors, TLS errors
            failure = KubeUnavailable(f"API unreachable: {type(err).__name__}: {err}")
            _log_failure(method, path, failure)
            raise failure from err

    @staticmethod
    def _json(response) -> dict:
        try:
            return json.loads(response.data)
        except Exception as err:  # a body cut off mid-read, or not JSON
            raise KubeUnavailable(f"API answered with a body that is not JSON: {err}") from err

    @staticmethod
    def _failure(response, method: str, path: str) -> KubeUnavailable:
        """The error for an answer outside 2xx, with the apiserver's Status message (read
        from the body, which is then drained)."""
        message = ""
        with contextlib.suppress(Exception):
            status = json.loads(response.data)
            message = str(status.get("message") or "")[:300]
        kind = Conflict if response.status == 409 else KubeUnavailable
        text = f"API answered {response.status} {response.reason}"
        failure = kind(f"{text}: {message}" if message else text)
        _log_failure(method, path, failure)
        return failure

    def _write(
        self, method: str, path: str, body: dict, content_type: str = "application/json"
    ) -> dict:
        """A write; the object as the API stored it, Conflict on 409, KubeUnavailable
        otherwise (422 included, with the apiserver's reason)."""
        response = self._send(method, path, body=body, content_type=content_type)
        if not 200 <= response.status <= 299:
            raise self._failure(response, method, path)
        return self._json(response)

    def _get(self, path: str, query: list[tuple[str, Any]] | None = None) -> dict | None:
        """GET a path; the object as a dict, None on 404, KubeUnavailable otherwise."""
        response = self._send("GET", path, query)
        if response.status == 404:
            response.drain_conn()
            return None
        if not 200 <= response.status <= 299:
            response.drain_conn()
            raise self._failure(response, "GET", path)
        return self._json(response)

    # ----------------------------------------------------------------- reads

    def read_deployment(self, namespace: str, name: str) -> dict | None:
        return self._get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")

    def read_dataplane(self, name: str) -> dict | None:
        return self._get(f"/apis/{DATAPLANE_GROUP}/{DATAPLANE_VERSION}/{DATAPLANE_PLURAL}/{name}")

    # ----------------------------------------------------------------- pods (the drain)

    @staticmethod
    def _pods_path(namespace: str | None) -> str:
        return f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"

    def list_pods(
        self, label_selector: str, namespace: str | None = None
    ) -> tuple[list[dict], str]:
        """A fresh (quorum) read of the pods matching ``label_selector``, in one namespace
        or all; the pods and the list's resourceVersion to start a watch from."""
        listing = self._get(self._pods_path(namespace), [("labelSelector", label_selector)])
        if listing is None:
            raise KubeUnavailable("API answered 404 for the pod list")
        items = listing.get("items") or []
        return items, str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def watch_pods(
        self,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
        namespace: str | None = None,
    ) -> PodWatch:
        """Open a watch on the matching pods from ``resource_version``; the apiserver ends
        it after ``timeout_seconds``. WatchExpired when that version is compacted away."""
        query = [
            ("labelSelector", label_selector),
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout_seconds),
        ]
        read_timeout = timeout_seconds + WATCH_READ_SLACK_SECONDS
        response = self._send(
            "GET", self._pods_path(namespace), query, timeout=(self.timeout, read_timeout)
        )
        if response.status == 410:
            response.drain_conn()
            raise WatchExpired(f"resourceVersion {resource_version} is too old")
        if not 200 <= response.status <= 299:
            response.drain_conn()
            raise self._failure(response, "GET", self._pods_path(namespace) + " (watch)")
        return PodWatch(response)

    def patch_pod_annotation(
        self, namespace: str, name: str, key: str, value: str, resource_version: str
    ) -> dict:
        """Set one annotation on a pod with a JSON merge patch (RFC 7386) that carries
        nothing else but the resourceVersion it was decided on: the apiserver refuses it
        with 409 (Conflict) when the pod changed since, e.g. got its deletionTimestamp.
        The pod as stored."""
        patch = {"metadata": {"resourceVersion": resource_version, "annotations": {key: value}}}
        return self._write(
            "PATCH",
            f"{self._pods_path(namespace)}/{name}",
            patch,
            content_type="application/merge-patch+json",
        )

    # ----------------------------------------------------------------- leases (census)

    @staticmethod
    def _leases_path(namespace: str) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def read_lease(self, namespace: str, name: str) -> dict | None:
        return self._get(f"{self._leases_path(namespace)}/{name}")

    def create_lease(self, namespace: str, lease: dict) -> dict:
        """Conflict when it exists already (another replica created it first)."""
        return self._write("POST", self._leases_path(namespace), lease)

    def replace_lease(self, namespace: str, lease: dict) -> dict:
        """PUT with the resourceVersion the lease carries: Conflict when another replica
        wrote it since."""
        name = lease["metadata"]["name"]
        return self._write("PUT", f"{self._leases_path(namespace)}/{name}", lease)

    # ----------------------------------------------------------------- events

    def create_event(self, namespace: str, event: dict) -> None:
        """POST a core/v1 Event; KubeUnavailable when the API did not take it."""
        path = f"/api/v1/namespaces/{namespace}/events"
        response = self._send("POST", path, body=event)
        if not 200 <= response.status <= 299:
            raise self._failure(response, "POST", path)
        response.drain_conn()


# API failures are logged as they happen, at most this many a second (an outage fails
# every admission read and every drain lookup at once); the count left out goes with the next.
_failures_logged = logs.Throttle(per_second=10)


def _log_failure(method: str, path: str, failure: KubeUnavailable) -> None:
    """One line per API failure: what was asked and what went wrong. A 409 is the
    optimistic-concurrency answer the callers expect (a Lease or pod changed meanwhile)."""
    level = logging.INFO if isinstance(failure, Conflict) else logging.WARNING
    _failures_logged.log(
        log, level, "Kubernetes API %s %s: %s", method, path, failure, api_path=path
    )


class PodWatch:
    """An open watch: iterate for ``(type, object)`` events (ADDED, MODIFIED, DELETED,
    BOOKMARK); the iteration ends when the apiserver closes the watch cleanly and raises
    KubeUnavailable when the connection breaks. ``close()`` may be called from another
    thread to end a blocked read."""

    def __init__(self, response) -> None:
        self.response = response

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        try:
            for line in iter_resp_lines(self.response):
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    # The apiserver reports an expired resourceVersion as an ERROR event
                    # carrying a Status with code 410, inside a 200 response.
                    if obj.get("code") == 410:
                        raise WatchExpired(obj.get("message") or "resourceVersion expired")
                    raise KubeUnavailable(f"watch error: {obj.get('message') or obj}")
                yield kind, obj
        except KubeUnavailable:
            self.response.close()
            raise
        except Exception as err:  # connection reset, read timeout, a cut-off chunk
            self.response.close()
            raise KubeUnavailable(f"watch broke: {type(err).__name__}: {err}") from err
        # Read to its end: the connection can serve the next request.
        self.response.release_conn()

    def close(self) -> None:
        """Unblock a reader in another thread: shut the socket's read side."""
        # Already closed, or already back in the pool: nothing left to unblock.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            self.response.shutdown()
        self.response.close()


def connect(timeout: float = 2.0) -> Kube | None:
    """In-cluster config, else the local kubeconfig, else None (no cluster)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        return Kube(configuration, timeout)
    except ConfigException:
        pass
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not Path(kubeconfig.split(os.pathsep)[0]).is_file():
        return None
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (ConfigException, OSError, ValueError):
        return None
    return Kube(configuration, timeout)
