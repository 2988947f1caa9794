"""The drain endpoint in-process: the real kubernetes client against the stand-in API
server over HTTP, and fake stunnerd metrics endpoints over HTTP on loopback addresses.
Small poll intervals and margins keep each case well under two seconds."""

from __future__ import annotations

import datetime
import os
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import orjson
import pytest
from prometheus_client import generate_latest

from app import create_app
from tests.conftest import FIXTURES
from tests.fake_stunnerd import OTEL_LABELS, FakeStunnerdFleet, Target
from tests.standin_apiserver import StandinAPIServer, stunnerd_pod
from webhooks.kube import Kube
from webhooks.lifecycle import scrape
from webhooks.lifecycle.drain import (
    DRAINED,
    FRESH_READ_BURST,
    FRESH_READS_PER_SECOND,
    Drainer,
)
from webhooks.lifecycle.podwatch import DrainPod
from webhooks.lifecycle.scrape import (
    READER_NICENESS,
    RESULTS_BATCH_MAX,
    MetricAbsent,
    Reader,
    ReadSpec,
    allocations_from_text,
    read_allocations,
)
from webhooks.metrics import Metrics
from webhooks.settings import DrainSettings, PolicyError, Settings, load_policy_document

NS = "media"
POLL = 0.05
FAST = DrainSettings(
    pollIntervalSeconds=POLL,
    marginSeconds=1.0,
    scrapeTimeoutSeconds=0.2,
    confirmSeconds=0.5,
    maxFailedReads=3,
)
KUBELET = {"User-Agent": "kube-lifecycle/1.36", "Accept": "*/*", "Accept-Encoding": "gzip"}


# --------------------------------------------------------------------------- fixtures


@dataclass
class Pod:
    name: str
    token: str
    target: Target


class Cluster:
    """The stand-in API, a fleet of fake stunnerd metrics endpoints (one loopback address
    per pod, one shared port, as pods share the metrics port) and drainers aimed at both."""

    def __init__(self, api: StandinAPIServer, fleet: FakeStunnerdFleet) -> None:
        self.api = api
        self.fleet = fleet
        self.port = _free_port("127.0.0.2")
        self.drainers: list[Drainer] = []
        self._next_ip = 2

    def pod(
        self,
        name: str,
        allocations: int = 2,
        mode: str = "ok",
        terminating: bool = True,
        grace: int = 30,
    ) -> Pod:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        target = self.fleet.add(ip, self.port, allocations=allocations, mode=mode)
        token = f"tok-{name}"
        self.api.put(stunnerd_pod(name, NS, token=token, ip=ip))
        if terminating:
            self.api.terminate(NS, name, grace_seconds=grace)
        return Pod(name, token, target)

    def drainer(self, watch: tuple[str, ...] = (), **drain) -> Drainer:
        settings = Settings(
            drain=replace(FAST, metricsPort=self.port, **drain), watchNamespaces=watch
        )
        drainer = Drainer(settings, Kube.for_host(self.api.url, timeout=1.0), Metrics(), "test")
        self.drainers.append(drainer)
        return drainer

    def sees(self, drainer: Drainer, pod: Pod, terminating: bool = True) -> bool:
        """Await the drainer's pod watch showing the pod (terminating or not)."""
        drainer.start()

        def shown() -> bool:
            seen = drainer.watcher.lookup(NS, pod.token, wait=0)
            watching = drainer.watcher.connected
            return watching and seen is not None and seen.terminating == terminating

        return self.api.wait_until(shown)

    def held(self, drainer: Drainer, pod: Pod, allocations: int) -> bool:
        """Await the drainer holding the pod with this many allocations read."""
        wanted = (pod.name, allocations)
        return self.api.wait_until(
            lambda: wanted in [(d["pod"], d["allocations"]) for d in drainer.in_progress()]
        )

    def reasons(self, pod: Pod, count: int) -> list[str]:
        """The reasons of the events recorded on the pod, once there are ``count``."""
        self.api.wait_until(lambda: len(self.api.events_for(NS, pod.name)) >= count)
        return [e["reason"] for e in self.api.events_for(NS, pod.name)]


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


@pytest.fixture
def api():
    with StandinAPIServer() as server:
        yield server


@pytest.fixture
def cluster(api):
    with FakeStunnerdFleet(huge_bytes=2 << 20) as fleet:
        c = Cluster(api, fleet)
        yield c
        for drainer in c.drainers:
            drainer.close()
            drainer.kube.close()


@pytest.fixture
def calls():
    """Drain calls made in the background, as kubelet makes them (each blocks)."""
    with ThreadPoolExecutor(16) as pool:
        yield pool


def deadline_of(api: StandinAPIServer, pod: Pod, margin: float = FAST.marginSeconds) -> float:
    stamp = api.get("Pod", NS, pod.name)["metadata"]["deletionTimestamp"]
    return datetime.datetime.fromisoformat(stamp).timestamp() - margin


# --------------------------------------------------------------------------- reading metrics


STUNNERD_PAGE = (
    "# HELP go_goroutines Number of goroutines that currently exist.\n"
    "# TYPE go_goroutines gauge\n"
    "go_goroutines 61\n"
    "# HELP stunner_allocations_active Number of active allocations.\n"
    "# TYPE stunner_allocations_active gauge\n"
    'stunner_allocations_active{otel_scope_name="stunner-metrics",otel_scope_version=""} 7\n'
    "# HELP stunner_allocations_active_total Not the gauge.\n"
    "# TYPE stunner_allocations_active_total counter\n"
    "stunner_allocations_active_total 99\n"
)


@pytest.mark.parametrize(
    ("page", "count"),
    [
        pytest.param(STUNNERD_PAGE, 7, id="otel-scope-labels-and-a-longer-name-beside-it"),
        pytest.param(
            'stunner_allocations_active{listener="a"} 3\n'
            'stunner_allocations_active{listener="b"} 4\n',
            7,
            id="several-series-are-summed",
        ),
        pytest.param("stunner_allocations_active 2.0\n", 2, id="untyped-float"),
        pytest.param("stunner_allocations_active 0\n", 0, id="zero"),
    ],
)
def test_the_allocation_count_is_the_sum_of_the_gauges_samples(page, count):
    assert allocations_from_text(page) == count


@pytest.mark.parametrize(
    "fixture",
    sorted((FIXTURES / "metrics").glob("*.prom")),
    ids=lambda p: p.name.split("_issue")[0],
)
def test_a_valid_page_without_the_gauge_is_metric_absent(fixture):
    # Real Prometheus pages of another TURN server (coturn), some with empty families; the
    # issue authors cut them with "..." lines, which are not part of any page.
    page = "".join(line for line in fixture.read_text().splitlines(True) if line.strip() != "...")
    with pytest.raises(MetricAbsent):
        allocations_from_text(page)


@pytest.mark.parametrize(
    "page",
    [
        pytest.param("<html><body>502 Bad Gateway</body></html>\n", id="html"),
        pytest.param("stunner_allocations_active lots\n", id="not-a-number"),
        pytest.param("stunner_allocations_active NaN\n", id="nan"),
        pytest.param("stunner_allocations_active -1\n", id="negative"),
    ],
)
def test_a_page_that_is_not_a_count_is_garbage(page):
    with pytest.raises(ValueError):
        allocations_from_text(page)


def test_each_short_family_text_is_parsed_once_and_a_long_one_is_not_kept():
    cache = scrape._cached_family_sum
    page = 'stunner_allocations_active{listener="cache-test"} 41\n'
    kept = cache.cache_info()
    assert allocations_from_text(page) == allocations_from_text(page) == 41
    assert cache.cache_info().currsize == kept.currsize + 1
    assert cache.cache_info().hits == kept.hits + 1
    # A hostile label of 64 KiB is parsed each time, never kept: the cache stays small.
    long_page = f'stunner_allocations_active{{listener="{"x" * 65536}"}} 5\n'
    assert allocations_from_text(long_page) == 5
    assert cache.cache_info().currsize == kept.currsize + 1


@pytest.mark.parametrize(
    ("mode", "fatal", "says"),
    [
        ("slow", False, "did not answer within 0.2 s"),
        ("garbage", False, "is not Prometheus text"),
        ("huge", False, "sent more than the 1048576-byte limit"),
        ("error", False, "answered HTTP 500"),
        ("absent", True, "stunner_allocations_active is not on the page"),
    ],
)
def test_each_broken_metrics_endpoint_is_a_failed_or_impossible_read(cluster, mode, fatal, says):
    target = cluster.fleet.add("127.0.0.2", cluster.port, mode=mode)
    started = time.monotonic()
    reading = read_allocations("127.0.0.2", replace(FAST, metricsPort=cluster.port))
    assert reading.allocations is None
    assert (reading.fatal, says in reading.problem) == (fatal, True), reading.problem
    # The read ends at its own deadline however the endpoint trickles.
    assert time.monotonic() - started < FAST.scrapeTimeoutSeconds + 0.15
    assert len(target.scrapes) == 1


def test_a_refused_connection_cannot_be_observed(cluster):
    reading = read_allocations("127.0.0.2", replace(FAST, metricsPort=cluster.port))
    assert reading.fatal and "connection refused" in reading.problem


def test_the_fake_stunnerd_page_carries_the_exporters_labels(cluster):
    target = cluster.fleet.add("127.0.0.2", cluster.port, allocations=5)
    assert target.labels == OTEL_LABELS
    assert read_allocations("127.0.0.2", replace(FAST, metricsPort=cluster.port)).allocations == 5


# --------------------------------------------------------------------------- answering at once


def test_an_unknown_token_is_404_at_once(cluster):
    drainer = cluster.drainer()
    answer = drainer.drain(NS, "no-such-token")
    assert (answer.status, answer.outcome) == (404, "not_found")
    assert "no pod in namespace media carries drain token no-such-token" in answer.message
    assert answer.seconds < 0.5


NS_PODS = f"/api/v1/namespaces/{NS}/pods"  # where a drain call's fresh read goes


def test_a_pod_that_is_not_terminating_is_409_once_the_watch_and_a_fresh_read_agree(cluster):
    pod = cluster.pod("udp-gateway-abc", terminating=False)
    drainer = cluster.drainer()
    answer = drainer.drain(NS, pod.token)
    assert (answer.status, answer.outcome, answer.pod) == (
        409,
        "not_terminating",
        f"{NS}/{pod.name}",
    )
    # The watch had confirmSeconds to show a deletionTimestamp, then one fresh read.
    assert FAST.confirmSeconds <= answer.seconds < FAST.confirmSeconds + 0.5
    assert cluster.api.count("list", NS_PODS) == 1
    assert pod.target.scrapes == []


def test_a_call_the_moment_kubelet_makes_it_is_held_without_an_api_read(cluster, calls):
    """kubelet calls 50-120 ms after the delete (measured, REFERENCE.md): the watch has the
    pod since its CREATE and shows the deletionTimestamp as soon as it comes."""
    pods = [cluster.pod(f"udp-gateway-{i}", allocations=0, terminating=False) for i in range(5)]
    drainer = cluster.drainer()
    assert all(cluster.sees(drainer, pod, terminating=False) for pod in pods)
    answers = []
    for i, pod in enumerate(pods):
        cluster.api.terminate(NS, pod.name)
        time.sleep(0.05 + 0.07 * i / (len(pods) - 1))
        answers.append(calls.submit(drainer.drain, NS, pod.token))
    assert {a.result(timeout=5).outcome for a in answers} == {DRAINED}
    assert cluster.api.count("list", NS_PODS) == 0


def test_a_call_before_the_watch_shows_the_delete_is_confirmed_by_a_fresh_read(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", terminating=False)
    drainer = cluster.drainer()
    assert cluster.sees(drainer, pod, terminating=False)
    # A watch lagging behind the apiserver: the delete is there, the watch has not said so.
    cluster.api.hold_watch_events()
    cluster.api.terminate(NS, pod.name)
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1), "the drain did not start"
    assert cluster.api.count("list", NS_PODS) == 1
    cluster.api.hold_watch_events(False)
    pod.target.allocations = 0
    assert call.result(timeout=5).outcome == DRAINED


def _random_tokens(count: int) -> list[str]:
    return [f"r{os.urandom(8).hex()}" for _ in range(count)]


def test_unknown_tokens_cost_no_api_read_while_the_watch_is_in_sync(cluster, calls):
    """Drain lookups cannot be used to hammer the apiserver: a token the synced watch has
    never seen belongs to no pod the guard stamped (pods carry it from their CREATE)."""
    pod = cluster.pod("udp-gateway-abc", terminating=False)
    drainer = cluster.drainer()
    assert cluster.sees(drainer, pod, terminating=False)
    answers = [calls.submit(drainer.drain, NS, token) for token in _random_tokens(60)]
    assert {a.result(timeout=10).outcome for a in answers} == {"not_found"}
    assert cluster.api.count("list", NS_PODS) == 0


def test_fresh_reads_are_rate_limited_while_the_watch_is_down(cluster, calls):
    cluster.api.watch_status = 503  # lists work, no watch stays open
    drainer = cluster.drainer()
    drainer.start()
    assert cluster.api.wait_until(lambda: cluster.api.count("list", "/api/v1/pods") >= 1)
    started = time.monotonic()
    answers = [calls.submit(drainer.drain, NS, token) for token in _random_tokens(60)]
    outcomes = [a.result(timeout=10).outcome for a in answers]
    elapsed = time.monotonic() - started
    assert set(outcomes) <= {"not_found", "api_unavailable"}
    reads = cluster.api.count("list", NS_PODS)
    assert reads <= FRESH_READ_BURST + FRESH_READS_PER_SECOND * elapsed, (reads, elapsed)
    assert outcomes.count("not_found") == reads  # each read answered its own call
    # Reads are kept only as long as a call may wait to share one: random tokens cannot
    # make the guard remember them without bound.
    time.sleep(FAST.confirmSeconds + 0.1)
    assert drainer.drain(NS, _random_tokens(1)[0]).outcome == "not_found"
    assert len(drainer._fresh._flights) == 1


def test_calls_for_one_pod_share_one_fresh_read(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", terminating=False)
    drainer = cluster.drainer()
    assert cluster.sees(drainer, pod, terminating=False)
    answers = [calls.submit(drainer.drain, NS, pod.token) for _ in range(16)]
    assert {a.result(timeout=5).outcome for a in answers} == {"not_terminating"}
    assert cluster.api.count("list", NS_PODS) == 1


@pytest.mark.parametrize(
    ("namespace", "token"),
    [
        ("Media", "tok"),
        (NS, "-tok"),
        (NS, "x" * 64),
        ("a" * 64, "tok"),
        (NS, "tok/../x"),
        # "$" in a regex also matches before a final newline: /drain/media/tok%0A.
        (NS, "tok\n"),
        (f"{NS}\n", "tok"),
    ],
)
def test_a_path_that_is_no_namespace_and_token_is_404_without_asking_the_api(
    cluster, namespace, token
):
    drainer = cluster.drainer()
    assert drainer.drain(namespace, token).status == 404
    assert cluster.api.count() == 0


def test_a_pod_in_a_namespace_the_guard_does_not_watch_is_404(cluster):
    pod = cluster.pod("udp-gateway-abc")
    drainer = cluster.drainer(watch=("other",))
    answer = drainer.drain(NS, pod.token)
    assert (answer.status, answer.message) == (
        404,
        "namespace media is not watched by stunner-guard",
    )
    assert cluster.api.count() == 0


def test_without_a_cluster_a_drain_answers_503_at_once():
    drainer = Drainer(Settings(), None, Metrics())
    answer = drainer.drain(NS, "tok")
    assert (answer.status, answer.outcome) == (503, "api_unavailable")
    assert "no Kubernetes API configured" in answer.message


def test_an_api_unreachable_at_start_answers_503_then_drains_once_it_is_back(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=1)
    cluster.api.stop()
    drainer = cluster.drainer()
    answer = drainer.drain(NS, pod.token)
    assert (answer.status, answer.outcome) == (503, "api_unavailable")
    assert "API unreachable" in answer.message
    assert answer.seconds < FAST.confirmSeconds
    cluster.api.start()  # the watch reconnects with backoff
    assert cluster.api.wait_until(lambda: cluster.api.open_watches == 1, timeout=5)
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    pod.target.allocations = 0
    assert call.result(timeout=5).outcome == DRAINED


# --------------------------------------------------------------------------- holding


def test_a_terminating_pod_is_held_until_its_allocations_reach_zero(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(3)
    assert not call.done()
    [held] = drainer.in_progress()
    assert held["namespace"] == NS and held["pod"] == pod.name and held["allocations"] == 3
    assert held["deadline"] == datetime.datetime.fromtimestamp(
        deadline_of(cluster.api, pod), datetime.UTC
    ).strftime("%Y-%m-%dT%H:%M:%SZ")
    zeroed = time.monotonic()
    pod.target.allocations = 0
    answer = call.result(timeout=5)
    assert (answer.status, answer.outcome, answer.allocations) == (200, "drained", 0)
    assert time.monotonic() - zeroed < POLL + 0.5
    assert drainer.in_progress() == []
    assert cluster.reasons(pod, 2) == ["DrainStarted", "Drained"]
    started = cluster.api.events_for(NS, pod.name)[0]
    assert started["message"].startswith("holding preStop until 3 TURN allocations end")
    assert (
        started["involvedObject"]["uid"] == cluster.api.get("Pod", NS, pod.name)["metadata"]["uid"]
    )


def test_the_deadline_releases_the_hook_margin_seconds_before_the_deletion_timestamp(
    cluster, calls
):
    pod = cluster.pod("udp-gateway-abc", allocations=2, grace=3)
    drainer = cluster.drainer()
    answer = drainer.drain(NS, pod.token)
    released = time.time()
    assert (answer.status, answer.outcome, answer.allocations) == (200, "deadline", 2)
    assert "deadline reached with 2 TURN allocations left" in answer.message
    assert deadline_of(cluster.api, pod) - 0.05 <= released <= deadline_of(cluster.api, pod) + 0.5
    assert cluster.reasons(pod, 2) == ["DrainStarted", "DrainDeadline"]


def test_a_shorter_grace_on_a_second_delete_moves_the_deadline(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=2, grace=60)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    cluster.api.terminate(NS, pod.name, grace_seconds=2)  # kubectl delete --grace-period=2
    answer = call.result(timeout=5)
    assert answer.outcome == "deadline"
    assert abs(time.time() - deadline_of(cluster.api, pod)) < 0.5


def test_duplicate_calls_share_one_waiter_and_one_read_per_interval(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=4)
    drainer = cluster.drainer()
    assert cluster.sees(drainer, pod)
    reads_before = cluster.api.count() - cluster.api.count("create")
    duplicates = [calls.submit(drainer.drain, NS, pod.token) for _ in range(5)]
    assert pod.target.wait_for_scrapes(8)
    assert len(drainer.in_progress()) == 1
    pod.target.allocations = 0
    answers = [d.result(timeout=5) for d in duplicates]
    assert {(a.outcome, a.pod, a.allocations) for a in answers} == {
        (DRAINED, f"{NS}/{pod.name}", 0)
    }
    gaps = [b - a for a, b in zip(pod.target.scrapes, pod.target.scrapes[1:], strict=False)]
    assert min(gaps) >= POLL * 0.8, gaps
    # The watch had the pod: no call asked the API, and only one drain's events were sent.
    assert cluster.api.count() - cluster.api.count("create") == reads_before
    assert cluster.reasons(pod, 2) == ["DrainStarted", "Drained"]


def test_api_requests_do_not_grow_with_the_number_of_drains(cluster, calls):
    pods = [cluster.pod(f"udp-gateway-{i}", allocations=1) for i in range(20)]
    drainer = cluster.drainer()
    assert all(cluster.sees(drainer, pod) for pod in pods)
    held = [calls.submit(drainer.drain, NS, pod.token) for pod in pods[:16]]
    assert all(pod.target.wait_for_scrapes(1) for pod in pods[:16])
    for pod in pods:
        pod.target.allocations = 0
    assert {h.result(timeout=5).outcome for h in held} == {DRAINED}
    reads = {k: n for k, n in cluster.api.requests().items() if k[0] != "create"}
    assert reads == {("list", "/api/v1/pods"): 1, ("watch", "/api/v1/pods"): 1}


def test_a_pods_reads_share_one_kept_alive_connection(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(5)
    assert pod.target.connections == 1
    pod.target.allocations = 0
    assert call.result(timeout=5).outcome == DRAINED


def test_a_kept_connection_the_pod_closed_is_replaced_without_a_failed_read(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(2)
    cluster.fleet.close_idle(pod.target)  # stunnerd restarted its metrics server, say
    assert pod.target.wait_for_scrapes(4)
    assert pod.target.connections == 2
    pod.target.allocations = 0
    assert call.result(timeout=5).outcome == DRAINED
    registry = drainer.metrics.registry
    assert registry.get_sample_value("stunner_guard_drain_scrapes_total", {"result": "failed"}) == 0
    assert registry.get_sample_value("stunner_guard_drain_scrapes_total", {"result": "ok"}) >= 4


@pytest.fixture
def reader(cluster):
    """A running ``python -m webhooks.lifecycle.scrape`` reading the cluster's fake pods."""
    reader = Reader(ReadSpec.of(replace(FAST, metricsPort=cluster.port)))
    reader.start()
    yield reader
    assert reader.stop() == 0  # closing its stdin ends it cleanly


def received(reader: Reader, count: int) -> list[list]:
    """The reader's results, until ``count`` came or none came for 5 s."""
    got: list[list] = []
    with selectors.DefaultSelector() as selector:
        selector.register(reader.process.stdout, selectors.EVENT_READ)
        while len(got) < count and selector.select(5):
            got += reader.receive() or []
    return got


def test_the_reader_process_reads_keeps_and_forgets_connections(cluster, reader):
    """The drainer's reads run in ``python -m webhooks.lifecycle.scrape``: its protocol, end to end."""
    first = cluster.pod("udp-gateway-a", allocations=4)
    second = cluster.pod("udp-gateway-b")
    cluster.fleet.refuse(second.target)

    def answers(count: int) -> list[list]:
        # Without when each read ended.
        return sorted(result[:4] for result in received(reader, count))

    assert reader.send([[1, first.target.ip], [2, second.target.ip]])
    (one, two) = answers(2)
    # It yields the CPU to the worker (admission) when both want it.
    niceness = os.getpriority(os.PRIO_PROCESS, reader.process.pid)
    assert niceness == min(19, os.getpriority(os.PRIO_PROCESS, 0) + READER_NICENESS)
    assert one == [1, 4, "", False]
    assert two[0] == 2 and two[1] is None and two[3] is True
    assert "connection refused" in two[2]
    first.target.allocations = 0
    assert reader.send([[1, first.target.ip]])
    assert answers(1) == [[1, 0, "", False]]
    assert first.target.connections == 1  # the second read reused the connection
    assert reader.send([[1, None]])  # forget: the reader closes it
    assert cluster.api.wait_until(lambda: cluster.fleet.open_connections(first.target) == 0)


def test_batches_larger_than_a_pipe_never_deadlock_the_reader(cluster, reader):
    """The drainer writes a batch while it does not read results: were the reader to block
    writing results into a full pipe meanwhile, neither would ever go on."""
    pod = cluster.pod("udp-gateway-a")
    cluster.fleet.refuse(pod.target)  # every read fails at once, with a long message
    count = 12000  # per batch ~100 KiB of commands, ~700 KiB of results: beyond a pipe
    batches = [[[key, pod.target.ip] for key in range(n, n + count // 2)] for n in (0, count // 2)]
    # The second batch goes while the first one's results fill the pipe back.
    sent: list[bool] = []
    sender = threading.Thread(
        target=lambda: sent.append(all(reader.send(batch) for batch in batches)), daemon=True
    )
    sender.start()
    sender.join(20)
    assert sent == [True], "deadlocked: the reader stopped reading while writing"
    got = received(reader, count)
    assert sorted(key for key, *_ in got) == list(range(count))
    assert all(fatal and "connection refused" in problem for _, _, problem, fatal, _ in got)


def test_results_reach_the_drainer_in_batches_of_bounded_size(cluster, reader):
    """The drainer takes a batch in one go under the worker's GIL: however many reads end
    together, no line carries more than RESULTS_BATCH_MAX results."""
    pod = cluster.pod("udp-gateway-a", allocations=2)  # counts above 0: the batched kind
    count = 4 * RESULTS_BATCH_MAX + 10
    assert reader.send([[key, pod.target.ip] for key in range(count)])
    # The pipe's raw lines, not reader.receive(), which joins the batches.
    results, raw = reader.process.stdout.fileno(), b""
    with selectors.DefaultSelector() as selector:
        selector.register(results, selectors.EVENT_READ)
        while raw.count(b"\n") < 5 and selector.select(5):
            raw += os.read(results, 1 << 20)
    batches = [orjson.loads(line) for line in raw.splitlines()]
    assert sorted(key for batch in batches for key, *_ in batch) == list(range(count))
    assert max(len(batch) for batch in batches) <= RESULTS_BATCH_MAX
    assert all(allocations == 2 for batch in batches for _, allocations, *_ in batch)


def test_a_reader_that_dies_is_replaced_and_the_drain_goes_on(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer(pollIntervalSeconds=0.1)
    call = calls.submit(drainer.drain, NS, pod.token)
    assert cluster.held(drainer, pod, 3)
    first = drainer._reader.process  # the running reader (private: no API exposes it)
    first.kill()
    assert cluster.api.wait_until(
        lambda: drainer._reader.process not in (None, first) and len(pod.target.scrapes) > 3
    )
    pod.target.allocations = 0
    answer = call.result(timeout=5)
    assert answer.outcome == DRAINED
    assert first.wait(timeout=5) == -signal.SIGKILL


def test_a_reader_that_cannot_start_fails_reads_and_the_drain_gives_up(cluster):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer(pollIntervalSeconds=0.1)
    drainer._reader.python = "/nonexistent/python3"  # no process can be made
    answer = drainer.drain(NS, pod.token)
    assert answer.outcome == "unobservable"
    assert answer.message.startswith("3 failed reads in a row, last: cannot start the metrics")
    assert pod.target.scrapes == []


def test_a_pod_deleted_mid_drain_is_answered_at_once(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert cluster.held(drainer, pod, 3)
    cluster.api.delete("Pod", NS, pod.name)  # e.g. kubectl delete --force
    answer = call.result(timeout=2)
    assert (answer.status, answer.outcome, answer.allocations) == (410, "pod_deleted", 3)


def test_a_dropped_watch_reconnects_and_the_held_drain_still_sees_the_pod(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    assert cluster.sees(drainer, pod)  # the watch is open
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    cluster.api.drop_watches()
    assert cluster.api.wait_until(lambda: cluster.api.count("watch") == 2, timeout=5)
    assert not call.done()
    cluster.api.delete("Pod", NS, pod.name)  # seen through the new watch
    assert call.result(timeout=2).outcome == "pod_deleted"


def test_a_pod_deleted_while_the_api_was_down_is_found_by_the_relist(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    cluster.api.stop()
    cluster.api.delete("Pod", NS, pod.name)
    cluster.api.compact()  # the watch's resourceVersion is gone: 410, list again
    assert pod.target.wait_for_scrapes(len(pod.target.scrapes) + 2), "reads go on without the API"
    assert not call.done()
    cluster.api.start()
    assert call.result(timeout=5).outcome == "pod_deleted"
    assert cluster.api.count("list", "/api/v1/pods") == 2


def test_a_drain_completes_while_the_api_is_unreachable(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    cluster.api.stop()
    pod.target.allocations = 0
    assert call.result(timeout=2).outcome == DRAINED


# --------------------------------------------------------------------------- unobservable


def test_refused_metrics_are_answered_at_once(cluster):
    pod = cluster.pod("udp-gateway-abc")
    cluster.fleet.refuse(pod.target)  # Dataplane without enableMetricsEndpoint
    drainer = cluster.drainer()
    answer = drainer.drain(NS, pod.token)
    assert (answer.status, answer.outcome) == (502, "unobservable")
    assert "connection refused" in answer.message
    assert answer.seconds < 0.5
    assert cluster.reasons(pod, 1) == ["DrainNotObservable"]


def test_an_absent_metric_is_answered_at_once(cluster):
    pod = cluster.pod("udp-gateway-abc", mode="absent")
    answer = cluster.drainer().drain(NS, pod.token)
    assert answer.outcome == "unobservable" and "not on the page" in answer.message
    assert len(pod.target.scrapes) == 1


def test_a_pod_without_an_ip_is_answered_at_once(cluster):
    pod = cluster.pod("udp-gateway-abc")
    cluster.api.update("Pod", NS, pod.name, lambda p: p["status"].pop("podIP"))
    answer = cluster.drainer().drain(NS, pod.token)
    assert answer.outcome == "unobservable" and "no IP" in answer.message
    assert pod.target.scrapes == []


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("slow", "did not answer within"),
        ("garbage", "is not Prometheus text"),
        ("huge", "byte limit"),
    ],
)
def test_broken_metrics_give_up_after_max_failed_reads(cluster, mode, says):
    pod = cluster.pod("udp-gateway-abc", mode=mode)
    answer = cluster.drainer().drain(NS, pod.token)
    assert answer.outcome == "unobservable"
    assert answer.message.startswith("3 failed reads in a row, last: ")
    assert says in answer.message
    assert len(pod.target.scrapes) == 3
    assert cluster.reasons(pod, 1) == ["DrainNotObservable"]


def test_a_good_read_resets_the_failed_read_count(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=2, mode="garbage")
    drainer = cluster.drainer(pollIntervalSeconds=0.1)
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(2)
    pod.target.mode = "ok"
    assert pod.target.wait_for_scrapes(3)
    pod.target.mode = "garbage"
    assert pod.target.wait_for_scrapes(5)
    pod.target.mode, pod.target.allocations = "ok", 0
    assert call.result(timeout=5).outcome == DRAINED


# --------------------------------------------------------------------------- capacity, events


def test_calls_beyond_max_concurrent_are_503_at_once(cluster, calls):
    first, second = cluster.pod("udp-gateway-a"), cluster.pod("udp-gateway-b")
    drainer = cluster.drainer(maxConcurrent=1)
    held = calls.submit(drainer.drain, NS, first.token)
    assert first.target.wait_for_scrapes(1)
    answer = drainer.drain(NS, second.token)
    assert (answer.status, answer.outcome) == (503, "over_capacity")
    assert answer.seconds < 0.1
    first.target.allocations = 0
    assert held.result(timeout=5).outcome == DRAINED


def test_refused_events_never_fail_the_drain(cluster, calls):
    cluster.api.event_status = 403  # no RBAC for events
    pod = cluster.pod("udp-gateway-abc", allocations=1)
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    pod.target.allocations = 0
    assert call.result(timeout=5).outcome == DRAINED
    assert cluster.api.wait_until(lambda: cluster.api.count("create") == 2)
    assert cluster.api.events == []


def test_closing_the_drainer_answers_held_calls(cluster, calls):
    pod = cluster.pod("udp-gateway-abc")
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    drainer.close()
    assert call.result(timeout=2).outcome == "stopped"


def test_drain_metrics_count_outcomes_and_drains_in_progress(cluster, calls):
    pod = cluster.pod("udp-gateway-abc")
    drainer = cluster.drainer()
    call = calls.submit(drainer.drain, NS, pod.token)
    assert pod.target.wait_for_scrapes(1)
    registry = drainer.metrics.registry
    assert registry.get_sample_value("stunner_guard_drains_in_progress") == 1
    pod.target.allocations = 0
    call.result(timeout=5)
    drainer.drain(NS, "unknown")
    assert registry.get_sample_value("stunner_guard_drains_in_progress") == 0
    outcomes = {
        o: registry.get_sample_value("stunner_guard_drain_outcomes_total", {"outcome": o})
        for o in ("drained", "not_found")
    }
    assert outcomes == {"drained": 1, "not_found": 1}
    assert (
        registry.get_sample_value(
            "stunner_guard_drain_duration_seconds_count", {"outcome": "drained"}
        )
        == 1
    )
    assert b'stunner_guard_drain_scrapes_total{result="ok"}' in generate_latest(registry)


# --------------------------------------------------------------------------- pods, settings


def test_only_pods_with_a_drain_token_are_drain_pods():
    pod = stunnerd_pod("p", NS, token="t", ip="10.0.0.5")
    pod["metadata"] |= {
        "uid": "u1",
        "deletionTimestamp": "2026-11-24T14:00:05Z",
        "resourceVersion": "1234",
        "annotations": {"controller.kubernetes.io/pod-deletion-cost": "3"},
    }
    seen = DrainPod.from_object(pod)
    deleted = datetime.datetime(2026, 11, 24, 14, 0, 5, tzinfo=datetime.UTC).timestamp()
    assert seen == DrainPod(NS, "p", "u1", "t", "10.0.0.5", deleted, True, "3", "1234")
    assert seen.terminating
    assert DrainPod.from_object(stunnerd_pod("p", NS, token=None)) is None
    assert DrainPod.from_object("not a pod") is None


def test_the_watch_keeps_no_more_of_a_hostile_cost_annotation_than_an_int32_needs():
    pod = stunnerd_pod("p", NS, token="t")
    pod["metadata"]["annotations"] = {"controller.kubernetes.io/pod-deletion-cost": "9" * 100_000}
    kept = DrainPod.from_object(pod).cost
    assert kept == "9" * 12  # still not an int32, as the whole value is not


@pytest.mark.parametrize(
    ("drain", "error"),
    [
        ({"maxFailedReads": 0}, "drain.maxFailedReads: must be at least 1"),
        ({"pollIntervalSeconds": 0}, "drain.pollIntervalSeconds: must be greater than 0"),
    ],
)
def test_drain_settings_are_checked_when_the_policy_loads(drain, error):
    with pytest.raises(PolicyError, match=error):
        load_policy_document({"drain": drain})


# --------------------------------------------------------------------------- over HTTP (Flask)


def test_the_drain_routes_answer_kubelet_shaped_requests_with_json(cluster, calls):
    pod = cluster.pod("udp-gateway-abc", allocations=1)
    settings = Settings(drain=replace(FAST, metricsPort=cluster.port))
    app = create_app(settings, kube=Kube.for_host(cluster.api.url, timeout=1.0))
    client = app.test_client()
    service = app.extensions["stunner_guard"]
    try:
        held = calls.submit(client.get, f"/drain/{NS}/{pod.token}", headers=KUBELET)
        assert pod.target.wait_for_scrapes(1)
        listing = client.get("/drains")
        assert listing.status_code == 200
        assert [(d["namespace"], d["pod"]) for d in listing.get_json()] == [(NS, pod.name)]
        pod.target.allocations = 0
        response = held.result(timeout=5)
        assert response.status_code == 200
        body = response.get_json()
        assert set(body) == {"outcome", "pod", "allocations", "seconds", "message"}
        assert (body["outcome"], body["pod"], body["allocations"]) == (
            DRAINED,
            f"{NS}/{pod.name}",
            0,
        )
        missing = client.get(f"/drain/{NS}/nobody", headers=KUBELET)
        assert (missing.status_code, missing.get_json()["outcome"]) == (404, "not_found")
    finally:
        service.close()


def test_a_percent_encoded_newline_in_the_path_never_reaches_the_api(cluster):
    app = create_app(Settings(drain=FAST), kube=Kube.for_host(cluster.api.url, timeout=1.0))
    try:
        response = app.test_client().get(f"/drain/{NS}/tok%0A", headers=KUBELET)
        assert (response.status_code, response.get_json()["outcome"]) == (404, "not_found")
        assert cluster.api.count() == 0
    finally:
        app.extensions["stunner_guard"].close()


def test_a_head_request_never_starts_a_drain():
    from app import create_app
    from webhooks.settings import Settings

    client = create_app(Settings(), kube=None).test_client()
    response = client.head("/drain/media/abc")
    assert response.status_code == 405
