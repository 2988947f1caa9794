"""Shared test fixtures: real AdmissionReview bodies, an app per settings, dev TLS certs."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from app import create_app
from webhooks import certs
from webhooks.admission.outcome import Context
from webhooks.settings import Policy, Settings

# Copied from ../shared/fixtures (real material, origin in each file name).
FIXTURES = Path(__file__).parent / "fixtures"
ADMISSION = FIXTURES / "admission"
STUNNER = FIXTURES / "stunner"
POD_REVIEW = (
    ADMISSION
    / "apiserver-v1.36/stunner/009-mutate-Pod-v1-CREATE-media-udp-gateway-8547c954bb-.json"
)
DRAIN_HOST = "10.96.0.10"


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def envelope(request: dict) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def create_review(obj: dict, operation: str = "CREATE", uid: str = "test-uid") -> dict:
    """Wrap a manifest as the apiserver would send it on CREATE."""
    api_version = obj["apiVersion"]
    group, _, version = api_version.rpartition("/")
    meta = obj.get("metadata", {})
    request = {
        "uid": uid,
        "kind": {"group": group, "version": version, "kind": obj["kind"]},
        "operation": operation,
        "namespace": "" if obj["kind"] == "Dataplane" else meta.get("namespace", "default"),
        "name": meta.get("name", ""),
        "object": obj,
        "oldObject": None,
        "dryRun": False,
    }
    return envelope(request)


def stunnerd_pod(**container_fields) -> dict:
    """A minimal operator-shaped stunnerd pod; container fields override."""
    container = {
        "name": "stunner-daemon",
        "image": "docker.io/l7mp/stunnerd:1.2.0",
        "command": ["stunnerd"],
        "args": ["-w", "--udp-thread-num=16"],
    }
    container.update(container_fields)
    container = {k: v for k, v in container.items() if v is not None}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "udp-gateway-",
            "namespace": "media",
            "labels": {"app": "stunner"},
        },
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 3600},
    }


def context(
    settings: Settings | None = None,
    webhook: str = "mutate",
    kube=None,
    api_version: str = "v1",
    namespace: str = "media",
) -> Context:
    return Context(
        settings=settings or Settings(drainHost=DRAIN_HOST),
        webhook=webhook,
        operation="CREATE",
        namespace=namespace,
        api_version=api_version,
        subject="Test media/x",
        kube=kube,
    )


def with_rules(**rules) -> Settings:
    """Settings with some rules replaced: with_rules(gracePeriod=GracePeriod("warn"))."""
    from dataclasses import replace

    return Settings(policy=replace(Policy(), **rules), drainHost=DRAIN_HOST)


@pytest.fixture
def settings() -> Settings:
    return Settings(drainHost=DRAIN_HOST)


@pytest.fixture
def app(settings):
    return create_app(settings, kube=None)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def pod_review() -> dict:
    return copy.deepcopy(load_json(POD_REVIEW))


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory) -> Path:
    """A dev CA and serving cert, made by the same code as `make certs`."""
    directory = tmp_path_factory.mktemp("certs")
    certs.write(directory, certs.generate())
    return directory


def _prometheus_tool(name: str) -> str:
    """Prometheus' own binaries (Debian package ``prometheus``; ``.ci/run`` installs it).
    Tests that need them fail without them: they are never skipped."""
    path = os.environ.get(name.upper()) or shutil.which(name)
    if not path:
        pytest.fail(
            f"{name} not found: install Debian's prometheus package "
            f"(apt-get install --no-install-recommends prometheus) or set {name.upper()}"
        )
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _prometheus_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _prometheus_tool("prometheus")
