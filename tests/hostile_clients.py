"""Hostile TCP/TLS clients for the serving tests and the hostile benchmark: many
connections that never send a whole request, kept open (and reopened when the server
closes them) from one background thread.

    idle       TLS handshake completed, then nothing (what a crashed or hostile peer,
               or a port scanner that speaks TLS, leaves behind)
    one-byte   a TCP connection that sends one byte (a TLS record header's first byte)
               and then nothing: the server is left inside its TLS handshake
    slowloris  TLS handshake, then a request head trickled one byte a second

Every kind is reopened as soon as the server closes it, so the mix stays open for as long
as the attack runs: what an attacker does, and the hardest case for the server.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

IDLE, ONE_BYTE, SLOWLORIS = KINDS = ("idle", "one-byte", "slowloris")
SLOW_HEAD = (
    b"POST /mutate HTTP/1.1\r\nHost: stunner-guard\r\nContent-Type: application/json\r\n"
    + b"X-Slow: "
    + b"a" * 4000
)
# Connections opened per loop pass: the server's backlog and the client's own CPU both
# like a steady ramp better than 2,800 connects at once.
OPEN_PER_PASS = 200


@dataclass(eq=False)
class _Conn:
    kind: str
    sock: socket.socket
    state: str = "connecting"  # connecting, handshaking, open
    sent: int = 0
    next_byte: float = 0.0


@dataclass
class Attack:
    """``with Attack(port, idle=1500, one_byte=1100, slowloris=200) as attack:`` keeps that
    many connections of each kind open (reopening those the server closes) until exit."""

    port: int
    idle: int = 0
    one_byte: int = 0
    slowloris: int = 0
    host: str = "127.0.0.1"
    # What happened, by kind: opened, closed by the server, failed to connect.
    opened: Counter = field(default_factory=Counter)
    closed: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._selector = selectors.DefaultSelector()
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE
        self._want = {IDLE: self.idle, ONE_BYTE: self.one_byte, SLOWLORIS: self.slowloris}
        self._lock = threading.Lock()

    def __enter__(self) -> Attack:
        total = sum(self._want.values())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < total + 1024:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, total + 4096), hard))
        self._thread = threading.Thread(target=self._run, name="attack", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        for conn in list(self._conns):
            self._drop(conn)
        self._selector.close()

    def open_now(self) -> Counter:
        """Connections of each kind open and in their intended state right now."""
        with self._lock:
            return Counter(c.kind for c in self._conns if c.state == "open")

    def wait_open(self, timeout: float = 60.0) -> bool:
        """Wait until every wanted connection is open at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.open_now()
            if all(now[k] >= n for k, n in self._want.items()):
                return True
            time.sleep(0.1)
        return False

    # ---------------------------------------------------------------- the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            self._top_up()
            now = time.monotonic()
            for key, events in self._selector.select(0.05):
                self._event(key.data, events)
            for conn in [c for c in self._conns if c.kind == SLOWLORIS and c.state == "open"]:
                if now >= conn.next_byte:
                    self._trickle(conn, now)

    def _top_up(self) -> None:
        have = Counter(c.kind for c in self._conns)
        budget = OPEN_PER_PASS
        for kind, wanted in self._want.items():
            for _ in range(min(budget, wanted - have[kind])):
                self._open(kind)
                budget -= 1

    def _open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect((self.host, self.port))
        except BlockingIOError:
            pass
        except OSError:
            self.failed[kind] += 1
            sock.close()
            return
        conn = _Conn(kind, sock)
        with self._lock:
            self._conns.add(conn)
        self._selector.register(sock, selectors.EVENT_WRITE, conn)

    def _event(self, conn: _Conn, events: int) -> None:
        if conn.state == "connecting":
            error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.failed[conn.kind] += 1
                self._drop(conn)
                return
            self.opened[conn.kind] += 1
            if conn.kind == ONE_BYTE:
                with contextlib.suppress(OSError):
                    conn.sock.send(b"\x16")
                self._set_open(conn)
                return
            conn.sock = self._tls.wrap_socket(
                conn.sock, do_handshake_on_connect=False, server_hostname="localhost"
            )
            conn.state = "handshaking"
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        if conn.state == "handshaking":
            try:
                conn.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
                return
            except ssl.SSLWantWriteError:
                self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
                return
            except OSError:
                self.closed[conn.kind] += 1
                self._drop(conn)
                return
            self._set_open(conn)
            return
        # Open: the only thing the server can send is its close (or an error answer).
        try:
            data = conn.sock.recv(4096)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError:
            data = b""
        if not data or conn.state == "open":
            self.closed[conn.kind] += 1
            self._drop(conn)

    def _set_open(self, conn: _Conn) -> None:
        conn.state = "open"
        conn.next_byte = time.monotonic() + 1.0
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _trickle(self, conn: _Conn, now: float) -> None:
        try:
            conn.sock.send(SLOW_HEAD[conn.sent % len(SLOW_HEAD) : conn.sent % len(SLOW_HEAD) + 1])
        except (ssl.SSLWantWriteError, BlockingIOError):
            return
        except OSError as err:
            if err.errno not in (errno.EAGAIN,):
                self.closed[conn.kind] += 1
                self._drop(conn)
            return
        conn.sent += 1
        conn.next_byte = now + 1.0

    def _drop(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
