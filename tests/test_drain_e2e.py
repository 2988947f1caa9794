"""End to end: the real gunicorn TLS server (gunicorn.conf.py) draining pods of the stand-in
API server, with requests shaped like kubelet's preStop httpGet: a plain GET,
``User-Agent: kube-lifecycle/1.36``, ``Accept: */*``, no certificate verification and no
client timeout of its own."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import POD_REVIEW, load_json
from tests.fake_stunnerd import FakeStunnerdFleet
from tests.servers import gunicorn
from tests.standin_apiserver import StandinAPIServer, stunnerd_pod

pytestmark = pytest.mark.e2e

NS = "media"
KUBELET = {"User-Agent": "kube-lifecycle/1.36", "Accept": "*/*", "Accept-Encoding": "gzip"}


def _unverified() -> ssl.SSLContext:
    # kubelet's HTTPS preStop skips certificate verification (InsecureSkipVerify).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def kubelet_get(base: str, path: str) -> tuple[int, dict, float]:
    """One preStop call: status, JSON body, seconds held."""
    url = urlsplit(base)
    connection = http.client.HTTPSConnection(url.hostname, url.port, context=_unverified())
    started = time.monotonic()
    try:
        connection.request("GET", path, headers=KUBELET)
        response = connection.getresponse()
        return response.status, json.loads(response.read()), time.monotonic() - started
    finally:
        connection.close()


class Guard:
    """gunicorn with a drain policy, a kubeconfig for the stand-in API, and a fleet of
    fake stunnerd pods on 127.0.0.x sharing one metrics port."""

    def __init__(self, api, fleet, base, port, process) -> None:
        self.api, self.fleet, self.base, self.port = api, fleet, base, port
        self.process = process  # the gunicorn master

    def terminating_pod(self, i: int, allocations: int = 1):
        ip = f"127.0.1.{i + 1}"
        target = self.fleet.add(ip, self.port, allocations=allocations)
        self.api.put(stunnerd_pod(f"udp-gateway-{i}", NS, token=f"tok-{i}", ip=ip))
        self.api.terminate(NS, f"udp-gateway-{i}", grace_seconds=60)
        return f"/drain/{NS}/tok-{i}", target


@pytest.fixture
def guard(request, dev_certs, tmp_path):
    """Started per test: parametrize indirectly with extra environment variables."""
    extra_env = getattr(request, "param", {})
    with socket.socket() as probe:
        probe.bind(("127.0.1.1", 0))
        port = probe.getsockname()[1]
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "drain": {
                    "pollIntervalSeconds": 0.1,
                    "marginSeconds": 1,
                    "metricsPort": port,
                    "confirmSeconds": 0.5,
                    "maxConcurrent": 20,
                }
            }
        )
    )
    with StandinAPIServer() as api, FakeStunnerdFleet() as fleet:
        env = {
            "STUNNER_GUARD_POLICY_FILE": str(policy),
            "STUNNER_GUARD_DRAIN_HOST": "10.96.0.10",
            "KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
            **extra_env,
        }
        with gunicorn(dev_certs, env, home=tmp_path) as (base, process):
            yield Guard(api, fleet, base, port, process)


@pytest.mark.parametrize("guard", [{"GUNICORN_TIMEOUT": "1"}], indirect=True)
def test_a_drain_held_longer_than_the_worker_timeout_is_answered(guard):
    path, target = guard.terminating_pod(0, allocations=2)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(kubelet_get, guard.base, path)
        # 35 reads at 0.1 s: held for over three worker timeouts.
        assert target.wait_for_scrapes(35, timeout=10)
        assert not call.done()
        target.allocations = 0
        status, body, held = call.result(timeout=5)
    assert (status, body["outcome"], body["pod"]) == (200, "drained", f"{NS}/udp-gateway-0")
    assert held > 3
    assert body["seconds"] > 3


@pytest.mark.parametrize("guard", [{"GUNICORN_ADMISSION_THREADS": "4"}], indirect=True)
def test_admission_keeps_answering_while_the_drain_cap_is_held(guard):
    drains = [guard.terminating_pod(i) for i in range(21)]
    review = json.dumps(load_json(POD_REVIEW)).encode()
    with ThreadPoolExecutor(24) as pool:
        # drain.maxConcurrent=20 of the 24 threads: every one of them held.
        held = [pool.submit(kubelet_get, guard.base, path) for path, _ in drains[:20]]
        assert all(target.wait_for_scrapes(1) for _, target in drains[:20])
        # The 21st gets 503 at once instead of a thread.
        status, body, seconds = kubelet_get(guard.base, drains[20][0])
        assert (status, body["outcome"]) == (503, "over_capacity")
        assert seconds < 1
        # Admission, over a reused connection as the apiserver does, still has its threads.
        url = urlsplit(guard.base)
        connection = http.client.HTTPSConnection(url.hostname, url.port, context=_unverified())
        latencies = []
        for _ in range(50):
            started = time.monotonic()
            connection.request(
                "POST", "/mutate", body=review, headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            answer = json.loads(response.read())
            latencies.append(time.monotonic() - started)
            assert response.status == 200 and answer["response"]["allowed"] is True
        connection.close()
        assert max(latencies) < 1.0, latencies
        status, body, _ = kubelet_get(guard.base, "/drains")
        listing = body
        assert status == 200 and len(listing) == 20
        assert all(not call.done() for call in held)
        for _, target in drains:
            target.allocations = 0
        assert {call.result(timeout=5)[1]["outcome"] for call in held} == {"drained"}
