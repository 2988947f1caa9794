"""The census (webhooks/lifecycle/census.py, leader.py): the real kubernetes client against
the stand-in API server over HTTP, fake stunnerd metrics endpoints over HTTP on loopback
addresses, short intervals so each case takes a second or two."""

from __future__ import annotations

import pytest

from tests.standin_apiserver import StandinAPIServer, stunnerd_pod
from webhooks import names
from webhooks.kube import Conflict, Kube, KubeUnavailable

NS = "media"
COST = names.POD_DELETION_COST_ANNOTATION


@pytest.fixture
def api():
    with StandinAPIServer() as server:
        yield server


@pytest.fixture
def kube(api):
    kube = Kube.for_host(api.url, timeout=1.0)
    yield kube
    kube.close()


# --------------------------------------------------------------------------- the API calls


def test_a_cost_patch_changes_that_annotation_and_nothing_else(api, kube):
    stored = api.put(stunnerd_pod("p", NS, token="t"))
    version = stored["metadata"]["resourceVersion"]
    patched = kube.patch_pod_annotation(NS, "p", COST, "3", version)
    assert patched["metadata"]["annotations"] == {COST: "3"}
    assert patched["metadata"]["resourceVersion"] != version
    after = api.get("Pod", NS, "p")
    assert (
        after["spec"] == stored["spec"]
        and after["metadata"]["labels"] == stored["metadata"]["labels"]
    )
    assert api.count("patch", f"/api/v1/namespaces/{NS}/pods/p") == 1


def test_a_cost_patch_on_a_pod_changed_since_is_a_conflict(api, kube):
    version = api.put(stunnerd_pod("p", NS, token="t"))["metadata"]["resourceVersion"]
    api.terminate(NS, "p")  # the deletionTimestamp: a new resourceVersion
    with pytest.raises(Conflict, match="the object has been modified"):
        kube.patch_pod_annotation(NS, "p", COST, "3", version)
    assert COST not in (api.get("Pod", NS, "p")["metadata"].get("annotations") or {})


@pytest.mark.parametrize("value", ["abc", "007", "+5", "2147483648", "1.5"])
def test_a_cost_that_is_no_int32_is_refused_as_the_apiserver_refuses_it(api, kube, value):
    version = api.put(stunnerd_pod("p", NS, token="t"))["metadata"]["resourceVersion"]
    with pytest.raises(KubeUnavailable, match="422.*must be a 32bit integer") as refused:
        kube.patch_pod_annotation(NS, "p", COST, value, version)
    assert not isinstance(refused.value, Conflict)


def test_a_cost_patch_on_a_missing_pod_fails(api, kube):
    with pytest.raises(KubeUnavailable, match="404"):
        kube.patch_pod_annotation(NS, "gone", COST, "1", "1")


def _lease(name: str, holder: str) -> dict:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-01T10:00:00.000000Z",
            "renewTime": "2026-12-01T10:00:00.000000Z",
        },
    }


def test_leases_are_created_once_and_replaced_only_from_their_current_version(api, kube):
    assert kube.read_lease("guard", "census") is None
    created = kube.create_lease("guard", _lease("census", "a"))
    with pytest.raises(Conflict, match="already exists"):
        kube.create_lease("guard", _lease("census", "b"))
    mine = kube.read_lease("guard", "census")
    assert mine == created
    mine["spec"]["holderIdentity"] = "a2"
    replaced = kube.replace_lease("guard", mine)
    assert replaced["spec"]["holderIdentity"] == "a2"
    stale = dict(created, spec=dict(created["spec"], holderIdentity="b"))
    with pytest.raises(Conflict, match="the object has been modified"):
        kube.replace_lease("guard", stale)
    assert kube.read_lease("guard", "census")["spec"]["holderIdentity"] == "a2"
