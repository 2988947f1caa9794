"""End to end: the real gunicorn server over TLS, verified against the dev CA, with the same
configuration as `make run`, answering real apiserver bodies over one reused connection."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time

import pytest
import requests

from tests.conftest import ADMISSION, POD_REVIEW, load_json
from tests.servers import gunicorn
from webhooks.names import DRAIN_TOKEN_LABEL

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(dev_certs, tmp_path_factory):
    env = {"STUNNER_GUARD_DRAIN_HOST": "10.96.0.10"}
    with gunicorn(dev_certs, env, home=tmp_path_factory.mktemp("home")) as (base, process):
        yield base, dev_certs / "ca.crt"


def test_fixtures_over_https_on_one_reused_connection(server):
    base, ca = server
    # verify= per request: REQUESTS_CA_BUNDLE in the environment overrides Session.verify.
    session = requests.Session()
    bodies = sorted((ADMISSION / "apiserver-v1.36").rglob("*.json"))
    for path in bodies:
        body = load_json(path)
        for webhook in ("mutate", "validate"):
            response = session.post(f"{base}/{webhook}", json=body, verify=str(ca), timeout=5)
            assert response.status_code == 200, (path.name, response.text)
            answer = response.json()
            assert answer["response"]["uid"] == body["request"]["uid"]
    pod = load_json(POD_REVIEW)
    answer = session.post(f"{base}/mutate", json=pod, verify=str(ca), timeout=5).json()["response"]
    ops = json.loads(base64.b64decode(answer["patch"]))
    assert any(
        op["path"] == f"/metadata/labels/{DRAIN_TOKEN_LABEL.replace('/', '~1')}" for op in ops
    )


def test_bad_bodies_get_4xx_over_https(server):
    base, ca = server
    response = requests.post(f"{base}/validate", data=b"{", verify=str(ca), timeout=5)
    assert response.status_code == 400 and "not JSON" in response.text
    big = b"x" * (3 * 1024 * 1024 + 1)
    response = requests.post(f"{base}/validate", data=big, verify=str(ca), timeout=10)
    assert response.status_code == 413


def test_serving_cert_is_verified_by_the_dev_ca_for_localhost_and_127_0_0_1(server):
    base, ca = server
    port = int(base.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(ca))
    for host in ("localhost", "127.0.0.1"):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # And a CA that did not sign it is refused.
    other = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        other.wrap_socket(raw, server_hostname="localhost")


def test_readyz_and_metrics(server):
    base, ca = server
    started = time.monotonic()
    assert requests.get(f"{base}/readyz", verify=str(ca), timeout=5).text.strip() == "ready"
    assert time.monotonic() - started < 3
    metrics = requests.get(f"{base}/metrics", verify=str(ca), timeout=5).text
    assert "stunner_guard_admission_requests_total" in metrics


def test_peers_that_leave_closed_connections_open_do_not_stall_the_server(server):
    """gthread lingers up to 2 s on each connection it closes, for the peer to close too;
    on its main loop, six such peers would hold every new connection for 12 s (and fifteen
    get the worker killed, with every drain it holds). webhooks/serving.py moves that off."""
    base, ca = server
    port = int(base.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(ca))
    peers = []
    try:
        for _ in range(6):
            # kubelet leaves a preStop request open once it killed the container; these ask
            # for the close and then neither read nor close.
            peer = context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5),
                server_hostname="127.0.0.1",
            )
            peer.sendall(b"GET /healthz HTTP/1.1\r\nHost: guard\r\nConnection: close\r\n\r\n")
            peers.append(peer)
        time.sleep(0.3)  # answered: their closes linger now
        started = time.monotonic()
        response = requests.get(f"{base}/healthz", verify=str(ca), timeout=30)
        assert response.status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        for peer in peers:
            peer.close()
