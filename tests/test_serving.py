"""End to end: the real gunicorn TLS server (webhooks/serving.py's worker) against hostile
and awkward clients. The request phase (handshake, head, body) runs on the worker's main
loop under one deadline, so no connection holds a thread until its request is whole, and
the worker never stops accepting."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import POD_REVIEW
from tests.hostile_clients import Attack
from tests.servers import gunicorn
from tests.test_drain_e2e import guard as guard  # noqa: F401, PLC0414  (the fixture)
from tests.test_drain_e2e import kubelet_get
from webhooks.serving import MAX_LINGERING

pytestmark = pytest.mark.e2e

REVIEW = POD_REVIEW.read_bytes()


def _context(ca=None) -> ssl.SSLContext:
    if ca:
        return ssl.create_default_context(cafile=str(ca))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _port(base: str) -> int:
    return urlsplit(base).port


def timed(connection: http.client.HTTPSConnection, method: str, path: str, body=None):
    """(seconds, status) of one request on ``connection``."""
    started = time.monotonic()
    headers = {"Content-Type": "application/json"} if body else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    return time.monotonic() - started, response.status


def fresh(port: int, method: str, path: str, body=None):
    """(seconds, status) of one request on a new connection, closed after it."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=_context(), timeout=10)
    try:
        return timed(connection, method, path, body)
    finally:
        connection.close()


def raw_tls(port: int) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return _context().wrap_socket(sock, server_hostname="localhost")


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# --------------------------------------------------------------------------- hostile mix


def test_the_hostile_connection_mix_neither_stalls_admission_nor_drops_a_held_drain(guard):
    port = _port(guard.base)
    path, target = guard.terminating_pod(0, allocations=3)
    with ThreadPoolExecutor(1) as pool:
        drain = pool.submit(kubelet_get, guard.base, path)
        assert target.wait_for_scrapes(2)
        kept = http.client.HTTPSConnection("127.0.0.1", port, context=_context(), timeout=10)
        assert timed(kept, "POST", "/mutate", REVIEW)[1] == 200
        # What stalled stock gthread, all open at once, reopened as the server closes
        # them; held past the request timeout, so the deadline's closes are exercised.
        with Attack(port, idle=1500, one_byte=1100, slowloris=200) as attack:
            assert attack.wait_open(60), attack.open_now()
            slowest = {"new": 0.0, "kept": 0.0, "healthz": 0.0}
            # Past the 10 s request timeout: the deadline's closes and reopens too.
            until = time.monotonic() + 12
            while time.monotonic() < until:
                for name, (seconds, status) in {
                    "new": fresh(port, "POST", "/mutate", REVIEW),
                    "kept": timed(kept, "POST", "/mutate", REVIEW),
                    "healthz": fresh(port, "GET", "/healthz"),
                }.items():
                    assert status == 200, name
                    slowest[name] = max(slowest[name], seconds)
                time.sleep(0.2)
            # The deadline closed the ones that never finished a request, and they came back.
            assert attack.closed["one-byte"] >= 1100 and attack.closed["slowloris"] >= 200
            assert not drain.done()
        assert max(slowest.values()) < 2.0, slowest
        # At once after the attack ends, on new and kept-alive connections.
        assert timed(kept, "POST", "/mutate", REVIEW)[0] < 0.5
        kept.close()
        assert fresh(port, "GET", "/healthz")[0] < 0.5
        target.allocations = 0
        status, body, _ = drain.result(timeout=10)
    assert (status, body["outcome"]) == (200, "drained")


# --------------------------------------------------------------------------- the deadline


@pytest.fixture(scope="module")
def quick_server(dev_certs, tmp_path_factory):
    """A server with a 2 s request timeout and little room, no cluster."""
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text("drain: {maxConcurrent: 4}\n")
    env = {
        "STUNNER_GUARD_POLICY_FILE": str(policy),
        "STUNNER_GUARD_DRAIN_HOST": "10.96.0.10",
        "STUNNER_GUARD_REQUEST_TIMEOUT_SECONDS": "2",
        "GUNICORN_THREADS": "8",
        "GUNICORN_ADMISSION_THREADS": "4",
        "GUNICORN_WORKER_CONNECTIONS": "60",
        "STUNNER_GUARD_MAX_BODY_BYTES": "65536",
    }
    with gunicorn(dev_certs, env, home=tmp_path_factory.mktemp("home")) as (base, process):
        yield _port(base), process


@pytest.fixture
def quick(quick_server) -> int:
    return quick_server[0]


def test_a_request_head_trickled_past_the_request_timeout_is_closed_unanswered(quick):
    with raw_tls(quick) as sock:
        started = time.monotonic()
        head = b"POST /mutate HTTP/1.1\r\nHost: x\r\n"
        closed = None
        for byte in head:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = time.monotonic() - started
                break
            sock.settimeout(0.25)
            try:
                if sock.recv(1) == b"":
                    closed = time.monotonic() - started
                    break
            except TimeoutError:
                pass
        assert closed is not None and 1.5 < closed < 3.5


def test_a_slow_request_that_ends_within_the_request_timeout_is_answered(quick):
    with raw_tls(quick) as sock:
        request = (
            b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(REVIEW)
            + REVIEW
        )
        pieces = [
            request[i : i + len(request) // 5 + 1]
            for i in range(0, len(request), len(request) // 5 + 1)
        ]
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.25)
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["response"]["allowed"] is True


def test_a_connection_that_never_shakes_hands_is_closed_at_the_deadline(quick):
    with socket.create_connection(("127.0.0.1", quick), timeout=10) as sock:
        sock.send(b"\x16")  # a TLS record header's first byte, then nothing
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 1.5 < time.monotonic() - started < 3.5


def test_a_new_connection_at_the_connection_limit_evicts_the_oldest_unfinished_one(quick):
    # worker_connections=60: fill them with connections that never send a request.
    hogs = [socket.create_connection(("127.0.0.1", quick), timeout=10) for _ in range(60)]
    try:
        time.sleep(0.3)
        assert fresh(quick, "GET", "/healthz")[1] == 200
        # The oldest hog made room: the server closed it.
        hogs[0].settimeout(2)
        assert hogs[0].recv(1) == b""
    finally:
        for hog in hogs:
            hog.close()


# --------------------------------------------------------------------------- framing


def test_expect_100_continue_gets_one_interim_answer_before_the_body(quick):
    with raw_tls(quick) as sock:
        sock.sendall(
            b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            % len(REVIEW)
        )
        sock.settimeout(1.0)  # curl waits 1 s for it, then sends the body anyway
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.settimeout(10)
        sock.sendall(REVIEW)
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        assert b"100 Continue" not in answer


def _answer_to(port: int, request: bytes) -> tuple[bytes, float]:
    """What the server answers to ``request`` (sent at once), and how long it took."""
    with raw_tls(port) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the server may close while we still send
            sock.sendall(request)
        return read_until_closed(sock), time.monotonic() - started


HEAD = b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n", 411, id="chunked"),
        pytest.param(HEAD + b"Content-Length: 10000000\r\n\r\n{", 413, id="over-the-limit"),
        pytest.param(HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 413, id="5000-digits"),
        pytest.param(HEAD + b"X-Pad: " + b"a" * 70_000, 431, id="head-over-64-KiB"),
    ],
)
def test_a_request_that_would_keep_a_thread_waiting_is_refused_at_once(
    quick, request_bytes, status
):
    """Stock gthread read these in a thread: an unfinished chunked body, a body over the
    limit and a long head each held a thread until the client went away."""
    answer, seconds = _answer_to(quick, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    assert b"Connection: close" in answer and seconds < 1.0


def test_refused_requests_never_stall_admission(quick):
    # More of them than the server has threads, all open at once.
    socks = [raw_tls(quick) for _ in range(12)]
    try:
        for sock in socks:
            sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        seconds, status = fresh(quick, "POST", "/mutate", REVIEW)
        assert status == 200 and seconds < 1.0
    finally:
        for sock in socks:
            sock.close()


def _worker_fds(process) -> int:
    (worker,) = [
        int(pid)
        for task in Path(f"/proc/{process.pid}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    return len(list(Path(f"/proc/{worker}/fd").iterdir()))


def test_answered_connections_whose_peers_never_close_stay_bounded(quick_server):
    """Each ``Connection: close`` answer lingers (up to 2 s) for the peer to close; peers
    that never do must not pile up open sockets beyond MAX_LINGERING."""
    port, process = quick_server
    socks = []
    try:
        for _ in range(MAX_LINGERING + 200):
            sock = raw_tls(port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            socks.append(sock)  # read nothing, close nothing
        time.sleep(0.5)
        # The limit the server keeps (60) plus the lingering ones plus its own few.
        assert _worker_fds(process) < 60 + MAX_LINGERING + 40
        assert fresh(port, "GET", "/healthz")[1] == 200
    finally:
        for sock in socks:
            sock.close()


def test_two_pipelined_requests_get_two_answers_in_order(quick):
    with raw_tls(quick) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = read_until_closed(sock)
        assert answer.count(b"HTTP/1.1 ") == 2
        assert answer.index(b"HTTP/1.1 200 ") < answer.index(b"HTTP/1.1 404 ")


def test_out_of_file_descriptors_the_worker_evicts_and_answers(dev_certs, tmp_path):
    """A descriptor limit below worker_connections: accept fails with EMFILE. The worker
    makes room (the oldest connection still sending nothing) and goes on answering,
    instead of crashing (and cutting held drains) or spinning on the listener."""
    env = {"STUNNER_GUARD_DRAIN_HOST": "10.96.0.10"}
    with gunicorn(dev_certs, env, home=tmp_path, fd_limit=300) as (base, process):
        port = _port(base)
        hogs = []
        try:
            for _ in range(320):  # more than the worker has descriptors
                with contextlib.suppress(OSError):
                    hogs.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.5)
            connection = http.client.HTTPSConnection(
                "127.0.0.1", port, context=_context(), timeout=5
            )
            assert timed(connection, "POST", "/mutate", REVIEW)[1] == 200
            connection.close()
            assert process.poll() is None
        finally:
            for hog in hogs:
                hog.close()
        assert "Worker exiting" not in process.log.read_text()


def test_an_oversized_request_pipelined_behind_another_is_answered_413(quick):
    """The second request arrives with the first (read ahead): its refusal still reads and
    drops its body before closing."""
    body = b"x" * 70_000  # over the quick server's 64 KiB limit
    answer, seconds = _answer_to(
        quick,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        + HEAD
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 413 " in answer
    assert seconds < 1.0  # closed once the body was dropped, not at the request deadline
