"""The AdmissionReview contract over HTTP, on every real fixture body."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import jsonpatch
import pytest
import yaml

from app import create_app
from tests.conftest import ADMISSION, STUNNER, create_review, envelope, load_json, load_yaml_docs
from webhooks.names import DRAIN_TOKEN_LABEL
from webhooks.service import ByteBudget
from webhooks.settings import Settings

V136 = sorted((ADMISSION / "apiserver-v1.36").rglob("*.json"))
BARE = sorted((ADMISSION / "requests").glob("bare-request_*.json"))
V1_ENVELOPES = sorted((ADMISSION / "requests").glob("v1_*.json"))
V1BETA1 = sorted((ADMISSION / "requests").glob("v1beta1_*.json"))
STUNNER_OBJECTS = [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}:{doc['metadata']['name']}")
    for path in sorted(STUNNER.glob("*.yaml"))
    if not path.name.startswith(("crd_", "helm_"))
    for doc in load_yaml_docs(path)
]


def post(client, webhook: str, body) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(f"/{webhook}", data=data, content_type="application/json")
    if response.mimetype == "application/json":
        return response.status_code, response.get_json()
    return response.status_code, response.get_data(as_text=True)


def assert_apiserver_accepts(answer: dict, request: dict, webhook: str) -> dict:
    """What k8s.io/apiserver checks on a webhook response, plus our own contract."""
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == request["uid"]
    assert isinstance(response["allowed"], bool)
    assert ("patch" in response) == ("patchType" in response)
    if "patch" in response:
        assert webhook == "mutate" and response["allowed"]
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        assert ops, "an empty patch is sent as no patch"
        jsonpatch.apply_patch(request["object"], ops)
    for warning in response.get("warnings", []):
        assert isinstance(warning, str) and len(warning) <= 120
    if not response["allowed"]:
        assert response["status"]["code"] == 403
        assert response["status"]["message"]
    return response


def patched_object(response: dict, request: dict) -> dict:
    if "patch" not in response:
        return request["object"]
    return jsonpatch.apply_patch(request["object"], json.loads(base64.b64decode(response["patch"])))


@pytest.mark.parametrize("webhook", ["mutate", "validate"])
@pytest.mark.parametrize("path", V136, ids=lambda p: p.name)
def test_every_request_captured_from_a_real_apiserver_gets_a_valid_answer(client, path, webhook):
    body = load_json(path)
    status, answer = post(client, webhook, body)
    assert status == 200
    assert_apiserver_accepts(answer, body["request"], webhook)


def test_real_operator_pod_gets_the_drain_hook_and_keeps_its_shape(client, pod_review):
    _, answer = post(client, "mutate", pod_review)
    response = assert_apiserver_accepts(answer, pod_review["request"], "mutate")
    pod = patched_object(response, pod_review["request"])
    token = pod["metadata"]["labels"][DRAIN_TOKEN_LABEL]
    hook = pod["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"]
    assert hook["path"] == f"/drain/media/{token}"  # request.namespace: the pod has no name yet
    # Already compliant resources, threads and grace period: nothing else changed.
    original = pod_review["request"]["object"]
    assert (
        pod["spec"]["containers"][0]["resources"] == original["spec"]["containers"][0]["resources"]
    )
    assert pod["spec"]["containers"][0]["args"] == original["spec"]["containers"][0]["args"]


def test_real_dataplane_update_over_the_cpu_maximum_is_capped(client):
    body = load_json(
        ADMISSION / "apiserver-v1.36/stunner/003-mutate-Dataplane-v1-UPDATE-cluster-default.json"
    )
    _, answer = post(client, "mutate", body)
    dataplane = patched_object(answer["response"], body["request"])
    assert body["request"]["object"]["spec"]["resources"]["limits"]["cpu"] == "3"
    assert dataplane["spec"]["resources"]["limits"]["cpu"] == "2"
    assert any("limits.cpu=2" in w for w in answer["response"]["warnings"])


def test_the_validating_webhook_denies_an_unfixed_dataplane_with_a_precise_message():
    # fixableFindings=deny: what the chart sets with the mutating failurePolicy Fail.
    client = create_app(Settings(fixableFindings="deny"), kube=None).test_client()
    body = load_json(
        ADMISSION / "apiserver-v1.36/stunner/003-mutate-Dataplane-v1-UPDATE-cluster-default.json"
    )
    _, answer = post(client, "validate", body)
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["message"].startswith(
        "Dataplane default: spec.resources.limits.cpu is 3: above the 2 maximum, expected 2 "
        "(rule limitsSane, mode enforce)"
    )


def test_dry_run_gets_the_same_verdict(client, pod_review):
    dry = copy.deepcopy(pod_review)
    dry["request"]["dryRun"] = True
    mask = re.compile(r"[0-9a-f]{16}")  # the random drain token
    answers = []
    for body in (pod_review, dry):
        _, answer = post(client, "mutate", body)
        response = answer["response"]
        pod = patched_object(response, body["request"])
        answers.append((response["allowed"], mask.sub("T", json.dumps(pod, sort_keys=True))))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("webhook", ["mutate", "validate"])
@pytest.mark.parametrize("path", BARE, ids=lambda p: p.name)
def test_requests_from_other_projects_are_answered_untouched(client, path, webhook):
    request = load_json(path)
    status, answer = post(client, webhook, envelope(request))
    assert status == 200
    response = assert_apiserver_accepts(answer, request, webhook)
    # None of them is a stunnerd workload, a DELETE, or a subresource: nothing to do.
    assert response == {"uid": request["uid"], "allowed": True}


def answers_from_both_webhooks(client, body: dict) -> dict:
    """Post to both webhooks; both answer 200 acceptably. The mutating response."""
    answers = {}
    for webhook in ("mutate", "validate"):
        status, answer = post(client, webhook, body)
        assert status == 200
        answers[webhook] = assert_apiserver_accepts(answer, body["request"], webhook)
    return answers["mutate"]


@pytest.mark.parametrize("path", V1_ENVELOPES, ids=lambda p: p.name)
def test_v1_envelopes_from_other_projects_are_answered(client, path):
    answers_from_both_webhooks(client, load_json(path))


def test_a_scale_subresource_update_is_allowed_untouched(client):
    text = (
        ADMISSION / "requests/v1_deployments-scale_subresource_update.k8s-docs.annotated.yaml"
    ).read_text()
    body = yaml.safe_load(text)
    status, answer = post(client, "mutate", body)
    assert status == 200
    assert answer["response"] == {"uid": body["request"]["uid"], "allowed": True}


@pytest.mark.parametrize("path", V1BETA1, ids=lambda p: p.name)
def test_v1beta1_envelopes_are_refused_with_the_reason(client, path):
    status, text = post(client, "mutate", load_json(path))
    assert status == 400
    assert "apiVersion 'admission.k8s.io/v1beta1' is not supported" in text


@pytest.mark.parametrize("obj", STUNNER_OBJECTS)
def test_stunner_manifests_as_create_requests_are_admitted_after_mutation(client, obj):
    body = create_review(obj)
    mutation = answers_from_both_webhooks(client, body)
    mutated = patched_object(mutation, body["request"])
    _, verdict = post(client, "validate", create_review(mutated))
    assert verdict["response"]["allowed"], verdict["response"].get("status")


def stunnerd_pod_review(cpu_limit: str, namespace: str = "media") -> dict:
    pod = {
        "name": "stunnerd",
        "image": "l7mp/stunnerd",
        "resources": {"limits": {"cpu": cpu_limit}},
    }
    return create_review(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": namespace},
            "spec": {"containers": [pod]},
        }
    )


def test_a_denial_is_http_200_with_status_403(client):
    body = stunnerd_pod_review("two")
    status, answer = post(client, "mutate", body)
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"] == {
        "code": 403,
        "reason": "Forbidden",
        "message": "Pod media/p: spec.containers[stunnerd].resources.limits.cpu is 'two': "
        "not a non-negative Kubernetes quantity (rule quantity syntax)",
    }


def test_warnings_are_never_longer_than_120_characters(client):
    long_name = "stunnerd-" + "x" * 200
    body = create_review(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "media"},
            "spec": {
                "containers": [
                    {"name": long_name, "image": "l7mp/stunnerd", "command": ["stunnerd"]}
                ]
            },
        }
    )
    _, answer = post(client, "mutate", body)
    assert answer["response"]["warnings"]
    assert all(len(w) <= 120 for w in answer["response"]["warnings"])


def test_health_readiness_and_metrics(client, pod_review):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    post(client, "mutate", pod_review)
    post(client, "mutate", b"not json")
    text = client.get("/metrics").get_data(as_text=True)
    assert (
        'stunner_guard_admission_requests_total{kind="Pod",operation="CREATE",verdict="patched",webhook="mutate"} 1.0'
        in text
    )
    assert 'stunner_guard_admission_bad_requests_total{status="400",webhook="mutate"} 1.0' in text
    assert "stunner_guard_admission_duration_seconds_bucket" in text


def test_unknown_paths_and_methods_get_plain_answers(client):
    response = client.get("/mutate")
    assert response.status_code == 405
    # The method is refused at routing, before any view: the app-wide handler answers.
    assert response.get_data(as_text=True) == "GET is not allowed on /mutate\n"
    response = client.get("/nope")
    assert response.status_code == 404 and "no endpoint at /nope" in response.get_data(as_text=True)


def test_fixture_paths_exist():
    assert V136 and BARE and V1BETA1 and STUNNER_OBJECTS
    assert all(isinstance(p, Path) for p in V136)


def test_nan_and_infinity_are_not_json(client, pod_review):
    body = json.dumps(pod_review).replace(
        '"terminationGracePeriodSeconds":3600', '"terminationGracePeriodSeconds":NaN'
    )
    body = body.replace(
        '"terminationGracePeriodSeconds": 3600', '"terminationGracePeriodSeconds": NaN'
    )
    assert "NaN" in body
    status, text = post(client, "mutate", body.encode())
    # The reason points at the NaN.
    assert status == 400 and text.startswith("body is not JSON")
    assert f"(char {body.index('NaN')})" in text


def test_a_huge_hostile_value_does_not_make_a_huge_denial(client):
    body = stunnerd_pod_review("x" * 100_000)
    _, answer = post(client, "mutate", body)
    assert answer["response"]["allowed"] is False
    assert len(answer["response"]["status"]["message"]) < 400


def test_reviews_decoded_at_once_stay_within_the_byte_budget():
    budget = ByteBudget(100)
    assert budget.take(60, wait=0) and not budget.take(60, wait=0.05)
    assert budget.take(40, wait=0)  # fits beside the first
    budget.give(60)
    budget.give(40)
    assert budget.take(500, wait=0)  # larger than the budget: alone, but never refused
    assert not budget.take(1, wait=0.05)
    budget.give(500)
    assert budget.taken == 0


def test_a_review_that_finds_no_room_to_decode_gets_503_with_the_reason(
    app, client, pod_review, monkeypatch
):
    monkeypatch.setattr("webhooks.http.DECODING_WAIT_SECONDS", 0.05)
    service = app.extensions["stunner_guard"]
    assert service.decoding.take(service.decoding.limit, wait=0)
    try:
        status, answer = post(client, "mutate", pod_review)
    finally:
        service.decoding.give(service.decoding.limit)
    assert status == 503 and "busy" in answer
    assert post(client, "mutate", pod_review)[0] == 200
