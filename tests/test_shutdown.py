"""End to end: the guard's own shutdown (SIGTERM to the real gunicorn master, as kubelet
sends it), with held drains and admission traffic on kept-alive and new connections.

What a rollout of the guard must never do: cut a held drain (kubelet would record
FailedPreStopHook and SIGTERM stunnerd early), or fail or reset an admission call (the
apiserver applies the failure policy). So on SIGTERM the guard fails /readyz at once,
answers every request that still arrives, keeps every held drain until it ends normally,
and only at its hard limit answers the drains still held ``stopped``."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from tests.conftest import POD_REVIEW
from tests.servers import gunicorn
from tests.test_drain_e2e import guard as guard  # noqa: F401, PLC0414  (the fixture)
from tests.test_drain_e2e import kubelet_get

pytestmark = pytest.mark.e2e

REVIEW = POD_REVIEW.read_bytes()


def _context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(base: str) -> http.client.HTTPSConnection:
    url = urlsplit(base)
    return http.client.HTTPSConnection(url.hostname, url.port, context=_context(), timeout=10)


def call(connection: http.client.HTTPSConnection, method: str, path: str, body=None):
    """(status, Connection header) of one request."""
    headers = {"Content-Type": "application/json"} if body else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status, (response.getheader("Connection") or "").lower()


@pytest.mark.parametrize("guard", [{"GUNICORN_GRACEFUL_TIMEOUT": "60"}], indirect=True)
def test_sigterm_fails_readyz_at_once_keeps_serving_and_keeps_the_held_drain(guard):
    path, target = guard.terminating_pod(0, allocations=2)
    kept = connect(guard.base)
    assert call(kept, "POST", "/mutate", REVIEW) == (200, "keep-alive")
    with ThreadPoolExecutor(1) as pool:
        drain = pool.submit(kubelet_get, guard.base, path)
        assert target.wait_for_scrapes(2)
        guard.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        fresh = connect(guard.base)
        assert call(fresh, "GET", "/readyz") == (503, "close")
        fresh.close()
        # The apiserver's kept-alive connection: answered, and told to reconnect elsewhere.
        assert call(kept, "POST", "/mutate", REVIEW) == (200, "close")
        kept.close()
        # A new connection (routed here before the endpoints caught up): answered too.
        fresh = connect(guard.base)
        assert call(fresh, "POST", "/validate", REVIEW)[0] == 200
        fresh.close()
        time.sleep(3)  # stock gthread had dropped everything after 2 s
        assert not drain.done() and guard.process.poll() is None
        target.allocations = 0
        status, body, _ = drain.result(timeout=5)
        assert (status, body["outcome"]) == (200, "drained")
    # Nothing left to hold: the guard exits on its own, cleanly.
    assert guard.process.wait(timeout=10) == 0


@pytest.mark.parametrize("guard", [{"GUNICORN_GRACEFUL_TIMEOUT": "8"}], indirect=True)
def test_at_its_hard_limit_the_guard_answers_the_drains_still_held(guard):
    drains = [guard.terminating_pod(i, allocations=3) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(kubelet_get, guard.base, path) for path, _ in drains]
        assert all(target.wait_for_scrapes(2) for _, target in drains)
        stopped = time.monotonic()
        guard.process.send_signal(signal.SIGTERM)
        answers = [c.result(timeout=15) for c in calls]
    # Answered (not cut) a few seconds before gunicorn's graceful timeout would kill it.
    assert {(status, body["outcome"]) for status, body, _ in answers} == {(503, "stopped")}
    assert all(held > 2.5 for _, _, held in answers)
    assert guard.process.wait(timeout=10) == 0
    assert time.monotonic() - stopped < 8


class ApiserverLike:
    """Admission traffic shaped like the apiserver's webhook client: a pool of kept-alive
    connections reused most-recently-used first, a connection the server marks ``close``
    dropped after its answer, new connections to wherever ``route`` points (the Service:
    kube-proxy sends a new connection to a ready endpoint). Records every failure."""

    def __init__(self, route: list[str], rate: float = 20.0) -> None:
        self.route = route
        self.rate = rate
        self.pool: list[tuple[str, http.client.HTTPSConnection]] = []
        self.failures: list[str] = []
        self.served: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApiserverLike:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)
        for _, connection in self.pool:
            connection.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            base, connection = self.pool.pop() if self.pool else (self.route[0], None)
            connection = connection or connect(base)
            try:
                status, header = call(connection, "POST", "/mutate", REVIEW)
            except (OSError, http.client.HTTPException) as err:
                self.failures.append(f"{base}: {type(err).__name__}: {err}")
                connection.close()
            else:
                if status != 200:
                    self.failures.append(f"{base}: HTTP {status}")
                self.served[base] = self.served.get(base, 0) + 1
                if header == "close":
                    connection.close()
                else:
                    self.pool.append((base, connection))
            self._stop.wait(1 / self.rate)


def test_a_guard_rollout_under_admission_traffic_fails_no_call(guard, dev_certs, tmp_path):
    """Two replicas; the old one gets SIGTERM while new connections still reach it for a
    second (endpoints propagating), then the Service sends them to the new one."""
    old = guard
    path, target = old.terminating_pod(0, allocations=1)
    env = {"STUNNER_GUARD_DRAIN_HOST": "10.96.0.10"}
    (tmp_path / "new").mkdir()
    with gunicorn(dev_certs, env, home=tmp_path / "new") as (new_base, _):
        route = [old.base]
        with ThreadPoolExecutor(1) as pool, ApiserverLike(route) as apiserver:
            drain = pool.submit(kubelet_get, old.base, path)
            assert target.wait_for_scrapes(2)
            time.sleep(1)
            old.process.send_signal(signal.SIGTERM)
            time.sleep(1)
            route[0] = new_base  # the endpoints caught up
            time.sleep(2)
            target.allocations = 0
            assert drain.result(timeout=5)[1]["outcome"] == "drained"
            assert old.process.wait(timeout=10) == 0
            time.sleep(1)
    assert apiserver.failures == []
    assert apiserver.served[old.base] > 20 and apiserver.served[new_base] > 20


@pytest.mark.parametrize(
    "guard",
    [{"GUNICORN_GRACEFUL_TIMEOUT": "60", "STUNNER_GUARD_REQUEST_TIMEOUT_SECONDS": "2"}],
    indirect=True,
)
def test_clients_that_keep_connecting_do_not_keep_a_stopping_guard_alive(guard):
    """Nothing held: once its linger is over the stopping guard refuses new connections,
    and what is open ends within a request timeout, whoever keeps connecting."""
    port = int(guard.base.rsplit(":", 1)[1])
    stop = threading.Event()

    def connect_forever() -> None:
        held = []
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            time.sleep(0.05)
        for sock in held:
            sock.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(connect_forever)
        time.sleep(0.5)
        stopped = time.monotonic()
        guard.process.send_signal(signal.SIGTERM)
        try:
            assert guard.process.wait(timeout=15) == 0
        finally:
            stop.set()
    assert time.monotonic() - stopped < 8  # linger 2 s + the last request timeout 2 s + slack
