"""The serving certificate, reloaded as a pair when kubelet swaps a Secret's files.

kubelet writes a Secret volume with an atomic symlink swap (pkg/volume/util/atomic_writer.go):
each generation in a timestamped directory, ``..data`` pointing at the current one, and
``tls.crt``/``tls.key`` pointing into ``..data``; the old generation is deleted right after
the swap. A server that opens the two files one after the other can get a certificate of one
generation and a key of the other (or a file that was just deleted)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import gunicorn
from webhooks import certs, serving
from webhooks.metrics import Metrics
from webhooks.serving import TLS_CHECK_SECONDS, TLSContext


class SecretVolume:
    """A directory laid out as kubelet lays out a mounted Secret."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (root / name).symlink_to(f"..data/{name}")

    def write(self, files: dict[str, bytes]) -> None:
        """One update: a new generation directory, then the atomic ``..data`` swap, then the
        old generation removed (as kubelet's AtomicWriter does)."""
        self.generation += 1
        new = self.root / f"..gen_{self.generation}"
        new.mkdir()
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (new / name).write_bytes(files[name])
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        (self.root / "..data_tmp").symlink_to(new.name)
        os.rename(self.root / "..data_tmp", data)
        if old:
            for child in (self.root / old).iterdir():
                child.unlink()
            (self.root / old).rmdir()

    @property
    def cert(self) -> str:
        return str(self.root / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.root / "tls.key")


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def test_a_torn_pair_keeps_the_last_good_context_until_the_pair_is_whole(tmp_path, monkeypatch):
    first, second = certs.generate(), certs.generate()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(first["tls.crt"])
    key.write_bytes(first["tls.key"])
    tls = TLSContext(str(cert), str(key))
    good = tls.current()
    clock = [time.monotonic()]
    monkeypatch.setattr("webhooks.serving.time.monotonic", lambda: clock[0])
    # The certificate of the next generation with the key of this one: refused, kept.
    cert.write_bytes(second["tls.crt"])
    clock[0] += TLS_CHECK_SECONDS
    assert tls.current() is good and tls.failures == 1
    assert tls.stale and tls.served == first["tls.crt"]  # still serving the first
    # The pair is whole: loaded.
    key.write_bytes(second["tls.key"])
    clock[0] += TLS_CHECK_SECONDS
    assert tls.current() is not good and tls.reloads == 1
    assert not tls.stale and tls.served == second["tls.crt"]


def test_the_expiry_metric_follows_the_certificate_served_not_the_file(tmp_path, monkeypatch):
    """A new certificate whose key does not match is not what clients get: the metric keeps
    the served one's expiry and says the file is not usable (the unreadable alert fires)."""
    served, unusable = certs.generate(days=90), certs.generate(days=400)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(served["tls.crt"])
    key.write_bytes(served["tls.key"])
    tls = TLSContext(str(cert), str(key))
    metrics = Metrics()
    metrics.certificates.watch(serving=str(cert), ca=str(cert))
    metrics.certificates.serve_from(lambda: (tls.served, tls.stale))
    cert.write_bytes(unusable["tls.crt"])  # its key never comes
    tls._checked -= TLS_CHECK_SECONDS
    tls.current()
    page = {
        (s.name, s.labels.get("certificate")): s.value
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in f.samples
    }
    expected = x509.load_pem_x509_certificate(served["tls.crt"]).not_valid_after_utc.timestamp()
    assert page[("stunner_guard_certificate_expiry_timestamp_seconds", "serving")] == expected
    assert page[("stunner_guard_certificate_readable", "serving")] == 0.0


def test_an_unchanged_pair_is_not_loaded_again(tmp_path):
    files = certs.generate()
    (tmp_path / "tls.crt").write_bytes(files["tls.crt"])
    (tmp_path / "tls.key").write_bytes(files["tls.key"])
    loads = []

    def counting(cert: bytes, key: bytes):
        loads.append(cert)
        return serving._server_context(cert, key)

    tls = TLSContext(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), make=counting)
    for _ in range(3):
        tls._checked -= TLS_CHECK_SECONDS
        tls.current()
    assert len(loads) == 1


# New connections at once, several hundred a second in all: each swap meets some.
CLIENTS = 8


@pytest.mark.e2e
def test_certificates_swapped_under_load_never_fail_a_connection(tmp_path):
    volume = SecretVolume(tmp_path / "tls")
    generations = [certs.generate() for _ in range(41)]
    volume.write(generations[0])
    env = {
        "STUNNER_GUARD_CERT_FILE": volume.cert,
        "STUNNER_GUARD_KEY_FILE": volume.key,
        "STUNNER_GUARD_DRAIN_HOST": "10.96.0.10",
    }
    with gunicorn(tmp_path / "tls", env, home=tmp_path) as (base, _process):
        port = int(base.rsplit(":", 1)[1])
        failures: list[str] = []
        served: set[int] = set()
        stop = threading.Event()

        def connect_repeatedly() -> int:
            # New connections only: each one gets whatever context the server has now.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            made = 0
            while not stop.is_set():
                try:
                    with (
                        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                        context.wrap_socket(raw, server_hostname="localhost") as tls,
                    ):
                        served.add(
                            serial_of(ssl.DER_cert_to_PEM_cert(tls.getpeercert(True)).encode())
                        )
                        tls.sendall(
                            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        )
                        answer = b""
                        while chunk := tls.recv(4096):
                            answer += chunk
                        if not answer.startswith(b"HTTP/1.1 200 "):
                            failures.append(repr(answer[:60]))
                except OSError as err:
                    failures.append(f"{type(err).__name__}: {err}")
                made += 1
            return made

        with ThreadPoolExecutor(CLIENTS) as pool:
            clients = [pool.submit(connect_repeatedly) for _ in range(CLIENTS)]
            time.sleep(0.5)
            for files in generations[1:]:
                volume.write(files)
                time.sleep(0.02)
            time.sleep(TLS_CHECK_SECONDS + 0.5)
            stop.set()
            made = sum(c.result() for c in clients)
    assert failures == [], failures[:5]
    assert made > 100
    # The newest generation is what it serves now.
    assert serial_of(generations[-1]["tls.crt"]) in served
    with contextlib.suppress(FileNotFoundError):
        assert serial_of(Path(volume.cert).read_bytes()) == serial_of(generations[-1]["tls.crt"])
