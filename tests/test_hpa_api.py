"""The HPA rule through the webhook, with the real kubernetes client speaking HTTP to a
stand-in API server (no client method is patched)."""

from __future__ import annotations

import json

import pytest

from app import create_app
from tests.conftest import ADMISSION, load_json
from tests.standin_apiserver import StandinAPIServer
from webhooks import kube as kube_module
from webhooks.settings import Settings

HPA_REVIEW = (
    ADMISSION
    / "apiserver-v1.36/stunner/017-mutate-HorizontalPodAutoscaler-v2-CREATE-media-udp-gateway.json"
)
DEPLOYMENT_REVIEW = (
    ADMISSION / "apiserver-v1.36/stunner/007-mutate-Deployment-v1-CREATE-media-udp-gateway.json"
)


@pytest.fixture
def api():
    with StandinAPIServer() as server:
        # The operator-rendered Deployment the HPA fixture targets (500m request, 2 limit).
        server.put(load_json(DEPLOYMENT_REVIEW)["request"]["object"])
        yield server


@pytest.fixture
def client(api, tmp_path, monkeypatch):
    # Through the kubeconfig, as a developer running locally would.
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    kube = kube_module.connect(timeout=1.0)
    assert kube is not None
    yield create_app(Settings(), kube=kube).test_client()
    kube.close()


def hpa_review(utilization: int) -> dict:
    body = load_json(HPA_REVIEW)
    body["request"]["object"]["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] = (
        utilization
    )
    return body


def validate(client, body) -> dict:
    response = client.post("/validate", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    return response.get_json()["response"]


def test_the_captured_hpa_at_300_percent_is_allowed_after_reading_its_target(client, api):
    response = validate(client, hpa_review(300))
    assert response == {"uid": load_json(HPA_REVIEW)["request"]["uid"], "allowed": True}
    assert api.count("get", "/apis/apps/v1/namespaces/media/deployments/udp-gateway") == 1


def test_an_hpa_that_can_never_fire_is_denied(client):
    response = validate(client, hpa_review(500))
    assert response["allowed"] is False
    message = response["status"]["message"]
    assert message.startswith(
        "HorizontalPodAutoscaler media/udp-gateway: "
        "spec.metrics[0].resource.target.averageUtilization is 500"
    )
    assert "of Deployment media/udp-gateway" in message


def test_dataplane_replicas_are_read_for_an_operator_owned_target(client, api):
    api.put(
        {
            "apiVersion": "stunner.l7mp.io/v1",
            "kind": "Dataplane",
            "metadata": {"name": "default"},
            "spec": {"replicas": 4},
        }
    )
    response = validate(client, hpa_review(300))
    assert response["allowed"] is True
    assert response["warnings"] == ["Dataplane default spec.replicas=4 fights this HPA"]


def test_a_missing_target_is_allowed_with_a_warning(client, api):
    api.delete("Deployment", "media", "udp-gateway")
    response = validate(client, hpa_review(900))
    assert response["allowed"] is True
    assert response["warnings"] == [
        "Deployment media/udp-gateway not found; HPA feasibility not checked"
    ]


def test_an_unreachable_api_allows_with_a_warning_instead_of_failing(client, api):
    api.stop()
    response = validate(client, hpa_review(900))
    assert response["allowed"] is True
    (warning,) = response["warnings"]
    assert warning.startswith("stunner-guard could not read Deployment media/udp-gateway")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "stunner_guard_kube_unreachable_total 1.0" in metrics


def test_no_kubeconfig_and_no_cluster_means_no_api(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert kube_module.connect() is None


def test_the_environments_proxy_is_resolved_once_not_per_request(api, tmp_path, monkeypatch):
    """The config loaders assign the host again before every request, and the client then
    walks the whole environment for proxy variables: seven per Service in a pod's
    namespace, a millisecond a request at fifty Services. The guard resolves it once."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy-at-start.example:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the stand-in is reached directly
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    kube = kube_module.connect(timeout=1.0)
    try:
        monkeypatch.setenv("HTTP_PROXY", "http://proxy-set-later.example:3128")
        assert kube.read_deployment("media", "udp-gateway") is not None
        assert kube.api.configuration.proxy == "http://proxy-at-start.example:3128"
    finally:
        kube.close()
