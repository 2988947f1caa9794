"""The one module that talks to the Kubernetes API.

Everything here returns plain dicts shaped exactly as the API serves them (camelCase, the
same shape admission requests carry), so policy code never sees client model classes.

Configuration: in-cluster service account when running in a pod, else the kubeconfig
(``KUBECONFIG`` or ``~/.kube/config``) when running locally, else no cluster at all
(``connect()`` returns None): admission then works without it and the HPA rule allows
with a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

DATAPLANE_GROUP = "stunner.l7mp.io"
DATAPLANE_VERSION = "v1"
DATAPLANE_PLURAL = "dataplanes"


class KubeUnavailable(Exception):
    """The API could not answer (unreachable, timed out, forbidden, 5xx)."""


class Kube:
    """A thin, dict-in/dict-out facade over the official client."""

    def __init__(self, configuration: client.Configuration, timeout: float = 2.0) -> None:
        # One quick retry at most: admission runs inside the apiserver's own webhook timeout.
        configuration.retries = 1
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

    def _get(self, path: str, query: list[tuple[str, Any]] | None = None) -> dict | None:
        """GET a path; the object as a dict, None on 404, KubeUnavailable otherwise."""
        try:
            response = self.api.call_api(
                path,
                "GET",
                query_params=query or [],
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=self.timeout,
            )[0]
        except ApiException as err:
            if err.status == 404:
                return None
            raise KubeUnavailable(f"API answered {err.status} {err.reason}") from err
        except Exception as err:  # urllib3 connection/timeout errors, TLS errors
            raise KubeUnavailable(f"API unreachable: {type(err).__name__}: {err}") from err
        try:
            return json.loads(response.data)
        except ValueError as err:
            raise KubeUnavailable("API answered with a body that is not JSON") from err

    # ----------------------------------------------------------------- reads

    def read_deployment(self, namespace: str, name: str) -> dict | None:
        return self._get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")

    def read_dataplane(self, name: str) -> dict | None:
        return self._get(f"/apis/{DATAPLANE_GROUP}/{DATAPLANE_VERSION}/{DATAPLANE_PLURAL}/{name}")


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
