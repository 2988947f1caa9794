"""The census (webhooks/lifecycle/census.py, leader.py): the real kubernetes client against
the stand-in API server over HTTP, fake stunnerd metrics endpoints over HTTP on loopback
addresses, short intervals so each case takes a second or two."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.standin_apiserver import StandinAPIServer, stunnerd_pod
from webhooks import names
from webhooks.kube import Conflict, Kube, KubeUnavailable
from webhooks.lifecycle.leader import LeaseElector

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


# --------------------------------------------------------------------------- leader election

LEASE_SECONDS, RENEW_SECONDS, RETRY_SECONDS = 1, 0.6, 0.15


class Forwarder:
    """A TCP forwarder between one guard replica and the API server: ``cut()`` is that
    replica losing the API (a network partition) while the others keep it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the API itself is down
                client.close()
                continue
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.cut_off = True
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        self.listener.close()
        for s in self.sockets:
            s.close()


@dataclass
class Replica:
    """One guard replica's elector, with the times it started and stopped leading."""

    elector: LeaseElector
    kube: Kube
    forwarder: Forwarder
    spans: list[list[float]] = field(default_factory=list)  # [started, stopped] leading

    def changed(self, leading: bool) -> None:
        if leading:
            self.spans.append([time.monotonic(), float("inf")])
        else:
            self.spans[-1][1] = time.monotonic()


@pytest.fixture
def replicas(api):
    made: list[Replica] = []

    def make(name: str) -> Replica:
        forwarder = Forwarder((api.host, api.port))
        kube = Kube.for_host(forwarder.url, timeout=0.3)
        replica = Replica(None, kube, forwarder)
        replica.elector = LeaseElector(
            kube,
            "guard",
            "census",
            name,
            LEASE_SECONDS,
            RENEW_SECONDS,
            RETRY_SECONDS,
            on_change=replica.changed,
        )
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.elector.stop(release=False)
        replica.forwarder.close()
        replica.kube.close()


def leader_of(api: StandinAPIServer) -> str | None:
    lease = api.get("Lease", "guard", "census")
    return lease and lease["spec"].get("holderIdentity")


def never_together(*replicas: Replica) -> bool:
    spans = sorted(span for r in replicas for span in r.spans)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_of_two_replicas_exactly_one_leads(api, replicas):
    a, b = replicas("guard-a"), replicas("guard-b")
    a.elector.start()
    b.elector.start()
    assert api.wait_until(lambda: leader_of(api) in ("guard-a", "guard-b"))
    deadline = time.monotonic() + 3 * LEASE_SECONDS
    while time.monotonic() < deadline:  # many renewals: never both, never neither for long
        assert not (a.elector.is_leader() and b.elector.is_leader())
        time.sleep(0.01)
    leader = a if leader_of(api) == "guard-a" else b
    assert leader.elector.is_leader() and len(leader.spans) == 1
    assert never_together(a, b)


def test_a_stopping_leader_releases_the_lease_and_the_other_takes_over_at_once(api, replicas):
    a, b = replicas("guard-a"), replicas("guard-b")
    a.elector.start()
    assert api.wait_until(a.elector.is_leader)
    b.elector.start()
    time.sleep(2 * RETRY_SECONDS)
    assert not b.elector.is_leader()
    stopped = time.monotonic()
    a.elector.stop()  # what SIGTERM does (Census.stop)
    assert not a.elector.is_leader()
    assert api.wait_until(b.elector.is_leader, timeout=LEASE_SECONDS)
    assert time.monotonic() - stopped < RETRY_SECONDS * 1.2 + 0.3  # not a lease duration
    assert never_together(a, b)


def test_a_leader_cut_off_from_the_api_stops_leading_before_another_takes_over(api, replicas):
    a, b = replicas("guard-a"), replicas("guard-b")
    a.elector.start()
    assert api.wait_until(a.elector.is_leader)
    b.elector.start()
    cut = time.monotonic()
    a.forwarder.cut()  # a keeps running, but its renewals fail
    assert api.wait_until(b.elector.is_leader, timeout=LEASE_SECONDS + 4 * RETRY_SECONDS + 1)
    took_over = time.monotonic() - cut
    assert a.spans[0][1] - cut <= RENEW_SECONDS + 0.1  # a stopped at its renew deadline
    assert took_over <= LEASE_SECONDS + 3 * RETRY_SECONDS + 0.3
    assert never_together(a, b)
    assert leader_of(api) == "guard-b"


def test_an_api_unreachable_at_start_only_delays_the_election(api, replicas):
    a = replicas("guard-a")
    api.stop()
    a.elector.start()
    time.sleep(3 * RETRY_SECONDS)  # the official client's election thread dies here
    assert not a.elector.is_leader()
    api.start()
    assert api.wait_until(a.elector.is_leader, timeout=2)


def test_leader_election_refuses_timings_that_could_let_two_lead():
    with pytest.raises(ValueError, match="leaseDurationSeconds > renewDeadlineSeconds"):
        LeaseElector(None, "guard", "census", "a", 10, 10, 2)
