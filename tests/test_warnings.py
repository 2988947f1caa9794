"""Admission warnings say what changed in words that fit 120 characters; the changes
annotation keeps the whole reason. review.encode's cut is a last resort for hostile input."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import replace

import pytest

from tests.conftest import (
    ADMISSION,
    DRAIN_HOST,
    STUNNER,
    context,
    load_json,
    load_yaml_docs,
    stunnerd_pod,
)
from tests.test_hpa import Lookup, autoscaler, cpu
from tests.test_hpa import deployment as hpa_target
from tests.test_policy import (
    ARGV_CASES,
    RESOURCE_CASES,
    THREAD_CASES,
    dataplane,
    deployment,
    run,
)
from webhooks.admission import dispatch, review
from webhooks.admission.review import MAX_WARNING_CHARS
from webhooks.admission.rules import hpa
from webhooks.names import CHANGES_ANNOTATION
from webhooks.settings import Policy, Settings

# The longest names Kubernetes allows: a container name and a namespace are DNS labels.
LONG_CONTAINER = "stunnerd-" + "a" * 54
LONG_NAMESPACE = "media-" + "n" * 57
assert len(LONG_CONTAINER) == len(LONG_NAMESPACE) == 63


def _objects() -> list:
    """Every stunnerd object the tests know: the shipped manifests, the captured reviews,
    and the policy tables' pods, Deployments and Dataplanes."""
    found = [
        pytest.param(doc, id=f"{path.stem}:{doc['kind']}")
        for path in sorted(STUNNER.glob("*.yaml"))
        if not path.name.startswith(("crd_", "helm_"))
        for doc in load_yaml_docs(path)
        if dispatch.handler_for(*doc["apiVersion"].rpartition("/")[::2], doc["kind"], "CREATE")
    ]
    found += [
        pytest.param(load_json(path)["request"]["object"], id=path.stem[:30])
        for path in sorted((ADMISSION / "apiserver-v1.36" / "stunner").glob("*.json"))
    ]
    pods = [stunnerd_pod(resources=case.values[0]) for case in RESOURCE_CASES]
    pods += [
        stunnerd_pod(args=case.values[1], resources={"limits": {"cpu": case.values[0]}})
        for case in THREAD_CASES
    ]
    pods += [stunnerd_pod(command=case.values[0], args=case.values[1]) for case in ARGV_CASES]
    pods += [
        stunnerd_pod(command=["sh", "-c", "stunnerd -u 4"]),
        stunnerd_pod(command=None, args=None),
        stunnerd_pod(lifecycle={"preStop": {"exec": {"command": ["true"]}}}),
        stunnerd_pod(resources={"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {}}),
    ]
    for i, pod in enumerate(pods):
        pod["spec"]["terminationGracePeriodSeconds"] = (30, 60, 20000, None)[i % 4]
        found.append(pytest.param(pod, id=f"pod-{i}"))
    found += [
        pytest.param(
            deployment(owned=owned, resources={"requests": {"cpu": "4"}}), id=f"dep-{owned}"
        )
        for owned in (True, False)
    ]
    found += [
        pytest.param(dataplane(replicas=3, terminationGracePeriodSeconds=30), id="dataplane"),
        pytest.param(dataplane(command=["sh", "-c", "stunnerd"]), id="dataplane-shell"),
    ]
    return found


def _renamed(obj: dict, name: str) -> dict:
    obj = copy.deepcopy(obj)
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if obj["kind"] == "Deployment":
        spec = spec.get("template", {}).get("spec", {})
    for container in spec.get("containers", []):
        container["name"] = name
    return obj


def _policy(mode: str) -> Settings:
    policy = Policy()
    rules = {name: replace(getattr(policy, name), mode=mode) for name in vars(policy)}
    return Settings(policy=replace(policy, **rules), drainHost=DRAIN_HOST)


@pytest.mark.parametrize("obj", _objects())
def test_every_realistic_warning_fits_without_being_cut(obj):
    for name, namespace, mode, webhook in itertools.product(
        ("stunner-daemon", LONG_CONTAINER),
        ("media", LONG_NAMESPACE),
        ("enforce", "warn"),
        ("mutate", "validate"),
    ):
        target = _renamed(obj, name)
        if target["kind"] != "Dataplane":  # cluster-scoped
            target["metadata"]["namespace"] = namespace
        verdict, _ = run(target, webhook, _policy(mode), namespace=namespace)
        for warning in verdict.warnings:
            assert len(warning) <= MAX_WARNING_CHARS, warning
            assert review._fit(warning) == warning


def test_a_long_container_name_is_named_by_index_and_the_annotation_keeps_the_reason():
    pod = stunnerd_pod(name=LONG_CONTAINER, resources={"requests": {"cpu": "4"}})
    verdict, mutated = run(pod)
    assert (
        "stunner-guard set spec.containers[0].resources.requests.cpu=1, was 4 (requestsMinimal)"
        in verdict.warnings
    )
    changes = json.loads(mutated["metadata"]["annotations"][CHANGES_ANNOTATION])
    assert (
        f"spec.containers[{LONG_CONTAINER}].resources.requests.cpu: 4 -> 1 "
        "(requestsMinimal: above the 1 maximum; scale out, not up)"
    ) in changes


def test_a_short_name_keeps_the_full_path():
    verdict, _ = run(stunnerd_pod(resources={"requests": {"cpu": "4"}}))
    assert (
        "stunner-guard set spec.containers[stunner-daemon].resources.requests.cpu=1, was 4 "
        "(requestsMinimal)"
    ) in verdict.warnings


def test_a_warn_mode_warning_keeps_its_reason_by_naming_the_container_by_index():
    pod = stunnerd_pod(name=LONG_CONTAINER, resources={"requests": {"cpu": "4"}})
    verdict, _ = run(pod, "validate", _policy("warn"))
    assert (
        "spec.containers[0].resources.requests.cpu is 4: above the 1 maximum; "
        "scale out, not up, want 1 (requestsMinimal)"
    ) in verdict.warnings


def test_where_even_the_index_leaves_no_room_the_reason_goes_first():
    obj = deployment(owned=False, resources={"requests": {"cpu": "4"}})
    verdict, _ = run(_renamed(obj, LONG_CONTAINER), "validate", _policy("warn"))
    assert (
        "spec.template.spec.containers[0].resources.requests.cpu is 4, want 1 (requestsMinimal)"
        in verdict.warnings
    )


def test_an_unreachable_api_warning_fits_with_a_long_namespace():
    error = (
        "API unreachable: MaxRetryError: HTTPSConnectionPool(host='10.96.0.1', port=443): "
        "Max retries exceeded with url: /apis/apps/v1/namespaces/media/deployments/udp-gateway"
    )
    lookup = Lookup([hpa_target({"requests": {"cpu": "500m"}})], error=error)
    ctx = context(None, "validate", kube=lookup, namespace=LONG_NAMESPACE)
    outcome = hpa.review(autoscaler(cpu(300)), ctx)
    (warning,) = outcome.warnings
    # The HPA's own namespace is the Deployment's: its name alone is enough.
    assert (
        warning
        == "stunner-guard could not read Deployment udp-gateway (API unreachable); not checked"
    )


@pytest.mark.parametrize(
    "warning",
    [
        "spec.containers[x].args is " + "y" * 200 + " (listenerThreads)",
        "stunner-guard set spec.containers[0].resources.requests.cpu="
        + " ".join(["1"] * 100)
        + " (requestsMinimal)",
        "word " * 60,
    ],
)
def test_a_hostile_warning_is_cut_at_a_word_boundary_with_an_ellipsis(warning):
    fitted = review._fit(warning)
    assert len(fitted) <= MAX_WARNING_CHARS and fitted.endswith("...")
    kept = fitted.removesuffix("...")
    normalized = " ".join(warning.split())
    assert normalized.startswith(kept)
    if " " in normalized[MAX_WARNING_CHARS // 2 : MAX_WARNING_CHARS]:
        # A word is never cut in two when there is a boundary to cut at.
        assert normalized[len(kept)] == " "
