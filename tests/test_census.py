"""The census (webhooks/lifecycle/census.py, leader.py): the real kubernetes client against
the stand-in API server over HTTP, fake stunnerd metrics endpoints over HTTP on loopback
addresses, short intervals so each case takes a second or two."""

from __future__ import annotations

import contextlib
import random
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pytest
import yaml

from app import create_app
from tests.fake_stunnerd import FakeStunnerdFleet, Target
from tests.servers import gunicorn
from tests.standin_apiserver import StandinAPIServer, stunnerd_pod
from webhooks import names
from webhooks.kube import Conflict, Kube, KubeUnavailable
from webhooks.lifecycle.census import MAX_LEVEL, level, parse_cost, wanted_cost
from webhooks.lifecycle.leader import LeaseElector
from webhooks.service import Service
from webhooks.settings import (
    CensusSettings,
    DrainSettings,
    PolicyError,
    Settings,
    from_env,
    load_document,
)

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


def test_a_lease_that_cannot_be_read_sensibly_does_not_end_the_election(api, replicas):
    """Something else wrote nonsense into the Lease (a wrong type where a time belongs):
    the elector keeps trying, and leads once the Lease is sane again."""
    api.put(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "census", "namespace": "guard"},
            "spec": {"holderIdentity": "someone", "leaseDurationSeconds": "soon"},
        }
    )
    a = replicas("guard-a")
    a.elector.start()
    time.sleep(3 * RETRY_SECONDS)
    assert not a.elector.is_leader() and a.elector._thread.is_alive()
    api.delete("Lease", "guard", "census")
    assert api.wait_until(a.elector.is_leader, timeout=2)


def test_leader_election_refuses_timings_that_could_let_two_lead():
    with pytest.raises(ValueError, match="leaseDurationSeconds > renewDeadlineSeconds"):
        LeaseElector(None, "guard", "census", "a", 10, 10, 2)


# --------------------------------------------------------------------------- the cost


@pytest.mark.parametrize(
    ("allocations", "cost"),
    [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (15, 4), (16, 5), (1000, 10)],
)
def test_the_cost_orders_pods_by_allocations_in_powers_of_two(allocations, cost):
    assert level(allocations) == cost


def test_the_cost_of_absurd_counts_stays_a_small_int32():
    assert level(2**40) == level(10**300) == MAX_LEVEL == 31


@pytest.mark.parametrize(
    ("written", "allocations", "wanted"),
    [
        pytest.param(None, 5, 3, id="nothing-valid-written"),
        pytest.param(0, 1, 1, id="empty-to-busy-at-once"),
        pytest.param(3, 0, 0, id="busy-to-empty-at-once"),
        pytest.param(3, 3, 3, id="level-3-holds-at-3"),
        pytest.param(3, 11, 3, id="level-3-holds-at-11"),
        pytest.param(3, 12, 4, id="level-3-leaves-at-12"),
        pytest.param(3, 2, 2, id="level-3-leaves-at-2"),
        pytest.param(4, 6, 4, id="level-4-holds-at-6"),
        pytest.param(4, 5, 3, id="level-4-leaves-at-5"),
        pytest.param(1, 2, 1, id="level-1-holds-at-2"),
        pytest.param(1, 3, 2, id="level-1-leaves-at-3"),
        pytest.param(1000, 5, 3, id="not-a-census-value"),
        pytest.param(-7, 5, 3, id="negative-not-a-census-value"),
    ],
)
def test_a_written_level_holds_within_half_a_level_each_side(written, allocations, wanted):
    assert wanted_cost(written, allocations) == wanted


@pytest.mark.parametrize(
    ("value", "cost"),
    [(None, 0), ("0", 0), ("5", 5), ("-3", -3), ("007", None), ("+5", None), ("x", None)],
)
def test_the_cost_on_the_pod_is_read_as_the_replicaset_controller_reads_it(value, cost):
    assert parse_cost(value) == cost


@pytest.mark.parametrize(
    ("census", "error"),
    [
        ({"mode": "loud"}, "census.mode: 'loud' is not one of enforce|warn|off"),
        ({"intervalSeconds": 0}, "census.intervalSeconds: must be greater than 0"),
        ({"writeBurst": 0}, "census.writeBurst: must be at least 1"),
        ({"leaseName": "Census!"}, "census.leaseName: 'Census!' is not a DNS subdomain"),
        ({"renewDeadlineSeconds": 20}, "two replicas could write at once"),
        ({"minPatchSecond": 1}, "census.minPatchSecond: unknown key"),
    ],
)
def test_census_settings_are_checked_when_the_policy_loads(census, error):
    with pytest.raises(PolicyError, match=re.escape(error)):
        load_document({"census": census})


def test_the_census_is_off_unless_configured_and_the_document_sets_it():
    assert Settings().census.mode == "off"
    _, _, census = load_document({"census": {"mode": "warn", "intervalSeconds": 10}})
    assert (census.mode, census.intervalSeconds, census.minPatchSeconds) == ("warn", 10.0, 60.0)


# --------------------------------------------------------------------------- the census

POLL = 0.5
QUICK = CensusSettings(
    mode="enforce",
    intervalSeconds=0.2,
    minPatchSeconds=0.3,
    maxWritesPerSecond=100.0,
    writeBurst=100,
    leaseName="census",
    leaseDurationSeconds=LEASE_SECONDS,
    renewDeadlineSeconds=RENEW_SECONDS,
    retryPeriodSeconds=RETRY_SECONDS,
)


class Fleet:
    """The stand-in API with running stunnerd pods, each with a fake metrics endpoint, and
    guard replicas (a Service each: drainer and census) aimed at both."""

    def __init__(self, api: StandinAPIServer, fake: FakeStunnerdFleet) -> None:
        self.api = api
        self.fake = fake
        self.port = _free_port("127.0.0.2")
        self.targets: dict[str, Target] = {}
        self.services: list[Service] = []
        self._next_ip = 2

    def pod(self, name: str, allocations: int = 0, cost: str | None = None) -> Target:
        ip = f"127.0.{self._next_ip // 250}.{2 + self._next_ip % 250}"
        self._next_ip += 1
        target = self.fake.add(ip, self.port, allocations=allocations)
        pod = stunnerd_pod(name, NS, token=f"tok-{name}", ip=ip)
        if cost is not None:
            pod["metadata"]["annotations"] = {COST: cost}
        self.api.put(pod)
        self.targets[name] = target
        return target

    def service(self, name: str = "guard-a", **census) -> Service:
        settings = Settings(
            drain=replace(
                DrainSettings(),
                metricsPort=self.port,
                pollIntervalSeconds=POLL,
                scrapeTimeoutSeconds=0.2,
                confirmSeconds=0.5,
                marginSeconds=1.0,
            ),
            census=replace(QUICK, **census),
            namespace="guard",
        )
        service = Service(settings, Kube.for_host(self.api.url, timeout=1.0))
        service.census.identity = name
        if service.census.elector is not None:
            service.census.elector.identity = name
        self.services.append(service)
        return service

    def cost(self, name: str) -> str | None:
        return (self.api.get("Pod", NS, name)["metadata"].get("annotations") or {}).get(COST)

    def costs(self) -> dict[str, str | None]:
        return {name: self.cost(name) for name in self.targets}

    def patched(self, name: str) -> list[float]:
        return [p["at"] for p in self.api.patches if p["name"] == name]


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


@pytest.fixture
def fleet(api):
    with FakeStunnerdFleet() as fake:
        f = Fleet(api, fake)
        yield f
        for service in f.services:
            service.close()


def leader_ready(service: Service, api: StandinAPIServer) -> bool:
    """Start the service's watch and election only (rounds are run by the test), and await
    its leadership and a watch in sync."""
    service.drainer.start()
    service.census.elector.start()
    return api.wait_until(
        lambda: service.census.leading() and service.drainer.watcher.in_sync, timeout=5
    )


def value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


def test_costs_follow_counts_and_only_changes_are_written(fleet):
    counts = {"empty": 0, "one": 1, "three": 3, "six": 6, "forty": 40}
    for name, n in counts.items():
        fleet.pod(name, allocations=n)
    service = fleet.service()
    assert leader_ready(service, fleet.api)
    summary = service.census.run_round()
    assert (summary["pods"], summary["read"], summary["written"]) == (5, 5, 4)
    # An empty pod needs no write: absent is 0 to the ReplicaSet controller.
    assert fleet.costs() == {"empty": None, "one": "1", "three": "2", "six": "3", "forty": "6"}
    assert fleet.api.wait_until(lambda: service.drainer.watcher.pod(NS, "forty").cost == "6")
    assert service.census.run_round()["written"] == 0  # nothing changed: nothing written
    fleet.targets["forty"].allocations = 0
    fleet.targets["empty"].allocations = 2
    fleet.targets["six"].allocations = 20
    time.sleep(QUICK.minPatchSeconds)
    assert service.census.run_round()["written"] == 3
    assert (fleet.cost("forty"), fleet.cost("empty"), fleet.cost("six")) == ("0", "2", "5")
    # One event per pod per empty <-> non-empty crossing, not one per write.
    assert fleet.api.wait_until(lambda: len(fleet.api.events) >= 6)
    time.sleep(0.2)
    reasons = {n: [e["reason"] for e in fleet.api.events_for(NS, n)] for n in counts}
    assert reasons == {
        "empty": ["DeletionCostInUse"],
        "one": ["DeletionCostInUse"],
        "three": ["DeletionCostInUse"],
        "six": ["DeletionCostInUse"],
        "forty": ["DeletionCostInUse", "DeletionCostEmpty"],
    }
    registry = service.metrics.registry
    assert value(registry, "stunner_guard_census_writes_total", result="ok") == 7
    assert value(registry, "stunner_guard_census_reads_total", result="ok") == 15
    assert value(registry, "stunner_guard_census_leader") == 1
    assert value(registry, "stunner_guard_census_pods") == 5


def test_a_count_wandering_across_a_level_boundary_writes_nothing(fleet):
    target = fleet.pod("wandering", allocations=6)  # level 3
    service = fleet.service()
    assert leader_ready(service, fleet.api)
    service.census.run_round()
    for n in (8, 5, 9, 4, 11, 3, 10):  # crosses 8 and 4 again and again
        target.allocations = n
        time.sleep(QUICK.minPatchSeconds)
        service.census.run_round()
    assert len(fleet.patched("wandering")) == 1 and fleet.cost("wandering") == "3"
    target.allocations = 12  # out of the band: level 4
    time.sleep(QUICK.minPatchSeconds)
    service.census.run_round()
    assert fleet.cost("wandering") == "4"


@pytest.mark.parametrize("broken", ["refused", "garbage", "absent", "slow"])
def test_a_pod_whose_allocations_cannot_be_read_keeps_its_annotation(fleet, broken):
    target = fleet.pod("unreadable", allocations=0, cost="3")
    fleet.pod("fine", allocations=1)
    if broken == "refused":
        fleet.fake.refuse(target)
    else:
        target.mode = broken
    service = fleet.service()
    assert leader_ready(service, fleet.api)
    time.sleep(QUICK.minPatchSeconds)  # past the new leader's hold-off
    summary = service.census.run_round()
    assert (summary["read"], summary["readsFailed"]) == (1, 1)
    assert fleet.patched("unreadable") == [] and fleet.cost("unreadable") == "3"
    assert fleet.cost("fine") == "1"
    [shown] = [p for p in service.census.snapshot()["pods"] if p["name"] == "unreadable"]
    assert shown["allocations"] is None and shown["cost"] == "3" and shown["problem"]


def test_terminating_pods_are_never_written(fleet):
    fleet.pod("leaving", allocations=5)
    fleet.pod("staying", allocations=5)
    service = fleet.service()
    assert leader_ready(service, fleet.api)
    fleet.api.terminate(NS, "leaving")
    assert fleet.api.wait_until(lambda: service.drainer.watcher.pod(NS, "leaving").terminating)
    summary = service.census.run_round()
    assert summary["pods"] == 1 and fleet.cost("staying") == "3"
    assert fleet.patched("leaving") == []


def test_a_pod_deleted_after_its_read_is_not_written_either(fleet):
    """The watch has not shown the deletionTimestamp yet when the census writes: the patch
    carries the resourceVersion it decided on, and the apiserver refuses it."""
    fleet.pod("leaving", allocations=5)
    service = fleet.service()
    assert leader_ready(service, fleet.api)
    fleet.api.hold_watch_events()
    fleet.api.terminate(NS, "leaving")
    summary = service.census.run_round()
    assert summary["written"] == 0
    assert fleet.cost("leaving") is None and fleet.api.patches == []
    registry = service.metrics.registry
    assert value(registry, "stunner_guard_census_writes_total", result="conflict") == 1
    assert fleet.api.count("patch", f"/api/v1/namespaces/{NS}/pods/leaving") == 1


def test_the_write_budget_holds_while_every_count_changes_every_interval(fleet):
    rate, burst, pods = 10.0, 4, 30
    targets = [fleet.pod(f"churn-{i:02d}", allocations=i % 3) for i in range(pods)]
    service = fleet.service(maxWritesPerSecond=rate, writeBurst=burst, intervalSeconds=0.1)
    rng = random.Random(7)
    started = time.monotonic()
    service.start()  # the census loop itself, as in production
    while time.monotonic() - started < 3.0:
        for target in targets:  # calls start and end: 0 <-> busy, and big jumps
            target.allocations = rng.choice([0, 0, 1, 3, 9, 30, 100])
        time.sleep(0.1)
    service.census.stop()
    at = sorted(p["at"] for p in fleet.api.patches)
    assert len(at) > burst  # it did write, under churn
    for i, first in enumerate(at):  # every window: at most burst + rate x its length
        for j in range(i, len(at)):
            assert j - i + 1 <= burst + rate * (at[j] - first) + 1e-9, (i, j)
    for target_name in (f"churn-{i:02d}" for i in range(pods)):
        times = fleet.patched(target_name)
        assert all(b - a >= QUICK.minPatchSeconds for a, b in zip(times, times[1:], strict=False))
    registry = service.metrics.registry
    assert value(registry, "stunner_guard_census_writes_skipped_total", reason="budget") > 0


def test_warn_mode_computes_and_shows_costs_but_writes_nothing(fleet):
    fleet.pod("busy", allocations=9)
    fleet.pod("idle", allocations=0, cost="4")
    service = fleet.service(mode="warn")
    assert service.census.elector is None  # no Lease: every replica may look
    service.start()
    assert fleet.api.wait_until(lambda: service.census.snapshot()["round"] is not None)
    snapshot = service.census.snapshot()
    assert snapshot["mode"] == "warn" and snapshot["leader"] is False
    wanted = {p["name"]: (p["allocations"], p["cost"], p["wanted"]) for p in snapshot["pods"]}
    assert wanted == {"busy": (9, None, 4), "idle": (0, "4", 0)}
    assert fleet.api.patches == [] and fleet.api.events == []
    assert fleet.api.count("patch") == 0 and fleet.api.get("Lease", "guard", "census") is None
    registry = service.metrics.registry
    assert value(registry, "stunner_guard_census_writes_skipped_total", reason="warn") >= 2
    assert value(registry, "stunner_guard_census_pods_by_cost", cost="4") == 1
    assert value(registry, "stunner_guard_census_pods_by_cost", cost="0") == 1


def test_a_new_leader_takes_over_the_writes_when_the_leader_stops(fleet):
    target = fleet.pod("p", allocations=1)
    a, b = fleet.service("guard-a"), fleet.service("guard-b")
    a.start()
    assert fleet.api.wait_until(lambda: fleet.cost("p") == "1")
    b.start()
    time.sleep(3 * RETRY_SECONDS)
    assert a.census.leading() and not b.census.leading()
    assert b.census.snapshot()["pods"] == []  # a follower reads nothing
    a_gauge = lambda name, **labels: value(a.metrics.registry, name, **labels)  # noqa: E731
    assert fleet.api.wait_until(
        lambda: a_gauge("stunner_guard_census_pods_by_cost", cost="1") == 1, timeout=3
    )
    assert a_gauge("stunner_guard_census_pods") == a_gauge("stunner_guard_census_leader") == 1
    stopped = time.monotonic()
    a.stop_census()  # SIGTERM: stop writing, release the Lease
    # A replica that no longer leads shows no pods: the dashboard takes the fleet's
    # maximum per cost, and a former leader's last round would linger in it.
    assert a_gauge("stunner_guard_census_leader") == a_gauge("stunner_guard_census_pods") == 0
    assert all(
        a_gauge("stunner_guard_census_pods_by_cost", cost=str(cost)) == 0
        for cost in range(MAX_LEVEL + 1)
    )
    a_writes = value(a.metrics.registry, "stunner_guard_census_writes_total", result="ok")
    assert fleet.api.wait_until(b.census.leading, timeout=LEASE_SECONDS)
    target.allocations = 0
    b_writes = lambda: value(b.metrics.registry, "stunner_guard_census_writes_total", result="ok")  # noqa: E731
    assert fleet.api.wait_until(lambda: fleet.cost("p") == "0" and b_writes() == 1, timeout=3)
    assert value(a.metrics.registry, "stunner_guard_census_writes_total", result="ok") == a_writes
    assert min(fleet.patched("p")[1:]) > stopped
    assert fleet.api.get("Lease", "guard", "census")["spec"]["holderIdentity"] == "guard-b"


def test_a_round_that_ends_without_the_lease_shows_nothing(fleet):
    # Leadership can lapse mid-round (the API cut off): what the round read must not put
    # back the pods that losing the Lease cleared.
    fleet.pod("p", allocations=3)
    service = fleet.service()  # enforce mode; its election is never started
    service.drainer.start()
    assert fleet.api.wait_until(lambda: service.drainer.watcher.in_sync, timeout=5)
    summary = service.census.run_round()
    assert (summary["pods"], summary["read"], summary["written"]) == (1, 1, 0)
    registry = service.metrics.registry
    assert value(registry, "stunner_guard_census_pods") == 0
    assert value(registry, "stunner_guard_census_pods_by_cost", cost="2") == 0
    assert service.census.snapshot()["round"] is None
    assert fleet.api.patches == []


def test_the_census_and_a_drain_never_read_one_pod_twice_in_a_poll_interval(fleet):
    target = fleet.pod("p", allocations=2)
    service = fleet.service()
    assert leader_ready(service, fleet.api)
    service.census.run_round()
    fleet.api.terminate(NS, "p", grace_seconds=30)  # kubelet calls right after
    assert fleet.api.wait_until(lambda: service.drainer.watcher.pod(NS, "p").terminating)
    with ThreadPoolExecutor(1) as calls:
        held = calls.submit(service.drainer.drain, NS, "tok-p")
        assert target.wait_for_scrapes(3)
        target.allocations = 0
        assert held.result(timeout=5).outcome == "drained"
    gaps = [b - a for a, b in zip(target.scrapes, target.scrapes[1:], strict=False)]
    assert min(gaps) >= POLL * 0.9, gaps
    assert target.connections == 1  # the drain went on on the census's connection


def test_get_census_shows_every_pod_over_http(fleet):
    fleet.pod("p", allocations=3)
    settings = fleet.service().settings
    fleet.services.pop().close()
    app = create_app(settings, kube=Kube.for_host(fleet.api.url, timeout=1.0))
    fleet.services.append(app.extensions["stunner_guard"])
    app.extensions["stunner_guard"].start()  # what gunicorn's post_worker_init does
    client = app.test_client()

    def written() -> bool:
        pods = client.get("/census").get_json()["pods"]
        return bool(pods and pods[0]["lastWrite"])

    assert fleet.api.wait_until(written, timeout=5)
    answer = client.get("/census")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["mode"] == "enforce" and body["leader"] is True
    [pod] = body["pods"]
    assert {k: pod[k] for k in ("namespace", "name", "allocations", "wanted")} == {
        "namespace": NS,
        "name": "p",
        "allocations": 3,
        "wanted": 2,
    }
    assert pod["lastRead"] and pod["lastWrite"] and fleet.cost("p") == "2"
    assert b"stunner_guard_census_round_duration_seconds_count" in client.get("/metrics").data


@pytest.mark.parametrize("mode", ["enforce", "warn", "off"])
def test_each_replica_exports_its_census_mode(mode):
    # StunnerGuardCensusNoLeader asks for a leader only where some replica is in enforce
    # mode; the mode is exported with or without an API (no API: nobody leads).
    service = Service(Settings(census=replace(QUICK, mode=mode)), kube=None)
    try:
        exported = {
            m: value(service.metrics.registry, "stunner_guard_census_mode", mode=m)
            for m in ("enforce", "warn", "off")
        }
        assert exported == {m: (1.0 if m == mode else 0.0) for m in exported}
    finally:
        service.close()


def test_without_a_cluster_or_with_the_census_off_nothing_runs(fleet):
    off = fleet.service(mode="off")
    off.start()
    assert off.census.elector is None and off.census._thread is None
    assert off.census.snapshot() == {
        "mode": "off",
        "identity": None,
        "leader": False,
        "holder": None,
        "intervalSeconds": QUICK.intervalSeconds,
        "round": None,
        "pods": [],
    }
    alone = Service(Settings(census=QUICK), kube=None)
    alone.start()
    assert alone.census._thread is None and not alone.census.active


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_the_census_runs_from_worker_start_in_the_real_server(api, dev_certs, tmp_path):
    """gunicorn with gunicorn.conf.py: post_worker_init starts the census; no drain call,
    no request at all, is needed for the costs to be written."""
    with FakeStunnerdFleet() as fake:
        port = _free_port("127.0.2.1")
        target = fake.add("127.0.2.1", port, allocations=5)
        api.put(stunnerd_pod("p", NS, token="tok-p", ip="127.0.2.1"))
        policy = tmp_path / "policy.yaml"
        census = {
            "mode": "enforce",
            "intervalSeconds": 0.5,
            "leaseName": "census",
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewDeadlineSeconds": RENEW_SECONDS,
            "retryPeriodSeconds": RETRY_SECONDS,
        }
        policy.write_text(yaml.safe_dump({"drain": {"metricsPort": port}, "census": census}))
        env = {
            "STUNNER_GUARD_POLICY_FILE": str(policy),
            "STUNNER_GUARD_NAMESPACE": "guard",
            # The short test lease must outlast a renewal's two API tries.
            "STUNNER_GUARD_KUBE_TIMEOUT_SECONDS": "0.1",
            "KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        }
        with gunicorn(dev_certs, env, home=tmp_path) as (base, process):
            assert api.wait_until(
                lambda: (
                    (api.get("Pod", NS, "p")["metadata"].get("annotations") or {}).get(COST) == "3"
                ),
                timeout=10,
            )
            assert target.scrapes
            # The holder: the pod name (the hostname in a pod) and a per-process suffix.
            holder = api.get("Lease", "guard", "census")["spec"]["holderIdentity"]
            assert holder.startswith(socket.gethostname() + "_")
            # SIGTERM (the guard's own rollout): the Lease is released at once, so another
            # replica leads without waiting out the lease duration.
            process.send_signal(signal.SIGTERM)
            assert api.wait_until(
                lambda: not api.get("Lease", "guard", "census")["spec"].get("holderIdentity"),
                timeout=LEASE_SECONDS,
            )


def test_a_kube_timeout_that_could_let_two_leaders_write_stops_startup(tmp_path):
    """A patch decided just before the renew deadline lands up to two API tries later."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"census": {"mode": "enforce"}}))
    env = {"STUNNER_GUARD_POLICY_FILE": str(policy)}
    assert from_env(env | {"STUNNER_GUARD_KUBE_TIMEOUT_SECONDS": "2"}).census.mode == "enforce"
    with pytest.raises(PolicyError, match="two replicas could write"):
        from_env(env | {"STUNNER_GUARD_KUBE_TIMEOUT_SECONDS": "2.5"})
