"""Fake stunnerd metrics endpoints for tests and the benchmark: real HTTP on loopback.

stunnerd serves Prometheus text at ``http://<podIP>:8080/metrics`` when the Dataplane sets
``enableMetricsEndpoint: true``; the OpenTelemetry exporter adds ``target_info``,
``otel_scope_*`` labels and the ``go_*``/``process_*`` families around the one gauge the
drain reads, ``stunner_allocations_active``.

One ``FakeStunnerdFleet`` serves any number of pods from one thread (a selector loop), each
pod on its own loopback address, e.g. 127.0.0.2:8080, 127.0.0.3:8080, ... so a thousand
pods cost one thread. Each ``Target`` is one pod; the test controls::

    target.allocations = 3          # or [2, 1]: two series, summed by the reader
    target.mode = "slow"            # ok | slow | garbage | huge | absent | error
    fleet.refuse(target)            # connection refused (metrics off, pod gone)
    target.wait_for_scrapes(2)      # await the guard's reads instead of sleeping
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

MODES = ("ok", "slow", "garbage", "huge", "absent", "error")

# The scope labels stunnerd's OpenTelemetry Prometheus exporter puts on every series.
OTEL_LABELS = {"otel_scope_name": "stunner-metrics", "otel_scope_version": ""}

_SCOPE = 'otel_scope_name="stunner-metrics",otel_scope_version=""'
_LISTENER = 'name="media/udp-gateway/udp-listener"'
_SDK = (
    'service_name="stunnerd",telemetry_sdk_language="go",'
    'telemetry_sdk_name="opentelemetry",telemetry_sdk_version="1.28.0"'
)
_PROLOGUE = f"""\
# HELP go_gc_duration_seconds A summary of the wall-time pause duration in GC cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{{quantile="0"}} 2.9e-05
go_gc_duration_seconds{{quantile="0.25"}} 4.1e-05
go_gc_duration_seconds{{quantile="0.5"}} 5.6e-05
go_gc_duration_seconds{{quantile="0.75"}} 8.3e-05
go_gc_duration_seconds{{quantile="1"}} 0.000412
go_gc_duration_seconds_sum 0.012
go_gc_duration_seconds_count 187
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 61
# HELP go_memstats_alloc_bytes Number of bytes allocated in heap and currently in use.
# TYPE go_memstats_alloc_bytes gauge
go_memstats_alloc_bytes 8.123456e+06
# HELP go_threads Number of OS threads created.
# TYPE go_threads gauge
go_threads 19
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.48
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.4095104e+07
# HELP target_info Target metadata
# TYPE target_info gauge
target_info{{{_SDK}}} 1
"""
_ALLOCATIONS_HEADER = """\
# HELP stunner_allocations_active Number of active allocations.
# TYPE stunner_allocations_active gauge
"""
_EPILOGUE = f"""\
# HELP stunner_listener_connections Number of active downstream connections at a listener.
# TYPE stunner_listener_connections gauge
stunner_listener_connections{{{_LISTENER},{_SCOPE}}} 16
# HELP stunner_listener_packets_total Number of packets through a listener.
# TYPE stunner_listener_packets_total counter
stunner_listener_packets_total{{direction="rx",{_LISTENER},{_SCOPE}}} 918273
stunner_listener_packets_total{{direction="tx",{_LISTENER},{_SCOPE}}} 917364
"""
_GARBAGE = (
    b"<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body>\x00\xff\xfe stunner_allocations_active{{{ = ?? </body></html>\n"
)


def _labels(labels: dict[str, str], extra: dict[str, str]) -> str:
    merged = extra | labels
    return "{" + ",".join(f'{k}="{v}"' for k, v in merged.items()) + "}" if merged else ""


@dataclass(eq=False)
class Target:
    """One stunnerd pod's metrics endpoint."""

    ip: str
    port: int
    allocations: int | list[int] = 0
    mode: str = "ok"
    # Labels on the allocation series (the exporter's scope labels by default).
    labels: dict[str, str] = field(default_factory=lambda: dict(OTEL_LABELS))
    scrapes: list[float] = field(default_factory=list)  # time.monotonic() of each request
    connections: int = 0  # accepted: with keep-alive, far fewer than scrapes
    _fleet: FakeStunnerdFleet | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return self.ip, self.port

    def body(self, huge_bytes: int) -> bytes:
        """What stunnerd would answer in the current mode."""
        if self.mode == "garbage":
            return _GARBAGE
        values = self.allocations if isinstance(self.allocations, list) else [self.allocations]
        series = ""
        if self.mode != "absent":
            # Several values: one series each, told apart by an extra label.
            extra = [{"listener": f"l{i}"} if len(values) > 1 else {} for i in range(len(values))]
            series = _ALLOCATIONS_HEADER + "".join(
                f"stunner_allocations_active{_labels(self.labels, e)} {v}\n"
                for e, v in zip(extra, values, strict=True)
            )
        text = _PROLOGUE + series + _EPILOGUE
        if self.mode == "huge":
            # A well-formed page that is far too big: an endpoint gone wrong.
            filler = "# padding padding padding padding padding padding padding padding\n"
            text = text + filler * (huge_bytes // len(filler) + 1)
        return text.encode()

    def wait_for_scrapes(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` requests have reached this target."""
        assert self._fleet is not None
        deadline = time.monotonic() + timeout
        with self._fleet._cond:
            while len(self.scrapes) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._fleet._cond.wait(remaining)
        return True


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    target: Target
    inbox: bytes = b""
    answered: bool = False
    keep_alive: bool = False
    outbox: bytes = b""
    trickle: list[bytes] | None = None  # slow mode: pieces still to send, one per tick


class FakeStunnerdFleet:
    def __init__(self, huge_bytes: int = 4 << 20, trickle_seconds: float = 0.05) -> None:
        self.huge_bytes = huge_bytes
        self.trickle_seconds = trickle_seconds
        self.targets: list[Target] = []
        self._listeners: dict[Target, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._cond = threading.Condition()
        self._timers: list[tuple[float, int, _Conn]] = []
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._changes: list = []
        self._thread: threading.Thread | None = None
        self._stopped = False

    # ---------------------------------------------------------------- setup

    def add(self, ip: str = "127.0.0.1", port: int = 0, **state) -> Target:
        """A new pod endpoint listening on ``ip:port`` (port 0: any free port)."""
        sock = self._listen(ip, port)
        target = Target(ip, sock.getsockname()[1], _fleet=self, **state)
        self.targets.append(target)
        self._attach(target, sock)
        return target

    def refuse(self, target: Target) -> None:
        """Close the target's listening socket: new connections are refused."""
        sock = self._listeners.pop(target, None)
        if sock is not None:
            self._call(lambda: (self._selector.unregister(sock), sock.close()))

    def close_idle(self, target: Target) -> None:
        """Close the target's open connections, as a server ending idle keep-alives does."""

        def close_all() -> None:
            for key in list(self._selector.get_map().values()):
                if key.data[0] == "conn" and key.data[1].target is target:
                    self._close(key.data[1])

        self._call(close_all)

    def open_connections(self, target: Target) -> int:
        """How many connections to the target are open on the fleet's side."""
        counted: list[int] = []

        def count() -> None:
            keys = self._selector.get_map().values()
            counted.append(sum(k.data[0] == "conn" and k.data[1].target is target for k in keys))

        self._call(count)
        return counted[0]

    def accept(self, target: Target) -> None:
        """Listen again after ``refuse()``."""
        if target not in self._listeners:
            self._attach(target, self._listen(target.ip, target.port))

    def start(self) -> FakeStunnerdFleet:
        self._thread = threading.Thread(target=self._loop, name="fake-stunnerd", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._wake()
        if self._thread:
            self._thread.join(5)
        for sock in self._listeners.values():
            sock.close()
        self._listeners.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> FakeStunnerdFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def total_scrapes(self) -> int:
        return sum(len(t.scrapes) for t in self.targets)

    @staticmethod
    def _listen(ip: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def _attach(self, target: Target, sock: socket.socket) -> None:
        self._listeners[target] = sock
        self._call(lambda: self._selector.register(sock, selectors.EVENT_READ, ("accept", target)))

    def _call(self, change) -> None:
        """Run ``change`` on the loop thread (selectors are not thread-safe)."""
        if self._thread is None or not self._thread.is_alive():
            change()
            return
        done = threading.Event()
        with self._cond:
            self._changes.append((change, done))
        self._wake()
        done.wait(5)

    def _wake(self) -> None:
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---------------------------------------------------------------- loop

    def _loop(self) -> None:
        while not self._stopped:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            for key, events in self._selector.select(timeout):
                role, obj = key.data
                if role == "wake":
                    self._run_changes()
                elif role == "accept":
                    self._accept(key.fileobj, obj)
                elif events & selectors.EVENT_WRITE:
                    self._write(obj)
                else:
                    self._read(obj)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, conn = heapq.heappop(self._timers)
                self._trickle(conn)
        for key in list(self._selector.get_map().values()):
            if key.data[0] == "conn":
                key.data[1].sock.close()

    def _run_changes(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        with self._cond:
            changes, self._changes = self._changes, []
        for change, done in changes:
            try:
                change()
            finally:
                done.set()

    def _accept(self, listener: socket.socket, target: Target) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        target.connections += 1
        self._selector.register(sock, selectors.EVENT_READ, ("conn", _Conn(sock, target)))

    def _close(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return self._close(conn)  # the reader gave up (or finished) first
        if conn.answered:
            return
        conn.inbox += data
        if b"\r\n\r\n" not in conn.inbox:
            return
        target = conn.target
        with self._cond:
            target.scrapes.append(time.monotonic())
            self._cond.notify_all()
        self._respond(conn)

    def _respond(self, conn: _Conn) -> None:
        target = conn.target
        conn.answered = True
        if target.mode == "error":
            status, body = b"500 Internal Server Error", b"internal error\n"
        else:
            status, body = b"200 OK", target.body(self.huge_bytes)
        head = b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
        if target.mode != "huge":
            head += b"\r\nContent-Length: %d" % len(body)
        # A huge page ends only when the connection closes: the reader must stop counting
        # at its limit rather than trust a Content-Length. Otherwise, like Go's net/http,
        # keep the connection for the next request unless the client asked to close it.
        conn.keep_alive = (
            target.mode not in ("huge", "slow") and b"connection: close" not in conn.inbox.lower()
        )
        head += (
            b"\r\nConnection: keep-alive\r\n\r\n"
            if conn.keep_alive
            else b"\r\nConnection: close\r\n\r\n"
        )
        if target.mode == "slow":
            # Headers at once, then the body a few bytes per tick: only a total deadline on
            # the read catches this, not a per-recv timeout.
            conn.trickle = [body[i : i + 16] for i in range(0, len(body), 16)]
            conn.outbox = head
        else:
            conn.outbox = head + body
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except OSError:
            return self._close(conn)
        conn.outbox = conn.outbox[sent:]
        if conn.outbox:
            return
        if conn.trickle:
            self._selector.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))
            heapq.heappush(
                self._timers, (time.monotonic() + self.trickle_seconds, next(self._seq), conn)
            )
            return
        if conn.keep_alive and conn.trickle is None:
            conn.inbox, conn.answered = b"", False  # ready for the next request
            self._selector.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))
            return
        self._close(conn)

    def _trickle(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0 or not conn.trickle:
            return
        conn.outbox = conn.trickle.pop(0)
        if not conn.trickle:
            conn.trickle = None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
