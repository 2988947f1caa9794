"""Reading a pod's ``stunner_allocations_active``, in a process of its own.

A thousand held drains are a thousand metrics reads a second. Done in the gunicorn worker
they took a fifth of a core under its GIL, the GIL admission needs: the apiserver's webhook
calls then waited on them. So the reads run in a child process the drainer starts
(``python -m webhooks.lifecycle.scrape``, which imports nothing heavier than prometheus_client's
parser and orjson): one non-blocking loop over every read, one kept-alive connection per
pod. The drainer keeps the schedule (at most one read per pod per poll interval, deadlines)
and speaks to the reader over its stdin and stdout, one JSON list per line, each a batch:

    drainer -> reader   [[key, "10.0.3.7"], ...]  read that pod's count now (key: the drain's)
                        [[key, null], ...]        forget the drain: close its connection
    reader -> drainer   [[key, allocations, problem, fatal, ended], ...]  one per read, in
                        any order; ended is when the read ended (CLOCK_MONOTONIC, one clock
                        for every process): the next read is timed from it

A reader that dies fails the reads in flight (failed reads, not fatal ones) and the
drainer starts another.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

ALLOCATIONS_METRIC = "stunner_allocations_active"
# A count above zero waits up to this long (at most half a poll interval) for others to
# go out with it; a zero or a failed read, which the drainer acts on, this long at most;
# and a batch goes out once it is this many results, whatever their age (see
# ReaderLoop.run). The drainer takes a batch in one go under the worker's GIL, about 15 us
# a result: a bounded batch keeps that to a millisecond an admission request may wait
# behind (500 at once, as a 0.5 s hold made them at 1,000 pods, were about 7 ms).
RESULTS_EVERY_SECONDS = 0.1
URGENT_RESULTS_EVERY_SECONDS = 0.02
RESULTS_BATCH_MAX = 64
# The reader runs at a lower CPU priority than the worker: its reads have a poll interval
# of slack, while an admission request is waited on by the apiserver. When both want a
# core, the kernel gives it to the worker first.
READER_NICENESS = 10
READER_MODULE = "webhooks.lifecycle.scrape"


@dataclass(frozen=True)
class ReadSpec:
    """What a read needs of the drain settings (same names as settings.DrainSettings, which
    this module does not import: it would pull the kubernetes client into the reader)."""

    metricsPort: int = 8080
    metricsPath: str = "/metrics"
    scrapeTimeoutSeconds: float = 0.5
    maxMetricsBytes: int = 1 << 20
    pollIntervalSeconds: float = 1.0

    @classmethod
    def of(cls, drain: Any) -> ReadSpec:
        return cls(
            drain.metricsPort,
            drain.metricsPath,
            drain.scrapeTimeoutSeconds,
            drain.maxMetricsBytes,
            drain.pollIntervalSeconds,
        )


# Reading.result: the scrape counter's label for each kind of read.
READ_OK, READ_FAILED, READ_UNOBSERVABLE = READ_RESULTS = ("ok", "failed", "unobservable")


@dataclass(frozen=True)
class Reading:
    """One read of a pod's metrics: a count, or a problem. A ``fatal`` problem means the
    allocations cannot be observed at all (answer at once); any other is a failed read."""

    allocations: int | None = None
    problem: str = ""
    fatal: bool = False

    @property
    def result(self) -> str:
        """Label for the scrape counter."""
        if self.allocations is not None:
            return READ_OK
        return READ_UNOBSERVABLE if self.fatal else READ_FAILED


class MetricAbsent(Exception):
    """The page is Prometheus text but has no stunner_allocations_active sample."""


# Only the lines of the one family go through the parser: stunnerd's page also carries the
# go_*/process_*/target_info families, and parsing all of them for a thousand pods every
# second would cost more CPU than serving admission.
_ALLOCATION_LINES = (
    f"{ALLOCATIONS_METRIC} ",
    f"{ALLOCATIONS_METRIC}{{",
    f"# TYPE {ALLOCATIONS_METRIC} ",
)


def _allocation_lines(text: str) -> list[str]:
    """The page's lines of the gauge, found by searching for its name (faster than
    splitting a page of a few hundred lines)."""
    lines = []
    at = text.find(ALLOCATIONS_METRIC)
    while at >= 0:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        if text.startswith(_ALLOCATION_LINES, start, end):
            lines.append(text[start:end])
        at = text.find(ALLOCATIONS_METRIC, end)
    return lines


def _family_sum(text: str) -> float | None:
    # Without a TYPE line the parser yields each untyped sample as a family of its own.
    samples = [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == ALLOCATIONS_METRIC
        for sample in family.samples
    ]
    return sum(samples) if samples else None


# The same few lines come back read after read (a pod's count changes now and then, pods
# of one Dataplane carry the same labels): each distinct text is parsed once (the parse was
# a third of the reader's CPU). Only short texts are kept: the cache holds 8 MiB at most.
_cached_family_sum = functools.lru_cache(maxsize=2048)(_family_sum)
_CACHED_TEXT_MAX = 4096


def allocations_from_text(text: str) -> int:
    """Sum of the ``stunner_allocations_active`` samples (the OpenTelemetry exporter may
    split or label them, e.g. ``otel_scope_name``). ValueError when the page is not
    Prometheus text or the value is not a count; MetricAbsent when the gauge is missing
    (metrics of a stunnerd without allocation telemetry, or another server)."""
    lines = _allocation_lines(text)
    family = "\n".join(lines) + "\n"
    parse = _cached_family_sum if len(family) <= _CACHED_TEXT_MAX else _family_sum
    total = parse(family) if lines else None
    if total is None:
        # Tell "valid page without the gauge" from "not Prometheus text at all".
        for _ in text_string_to_metric_families(text):
            pass
        raise MetricAbsent(f"{ALLOCATIONS_METRIC} is not on the page")
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"{ALLOCATIONS_METRIC} is {total}")
    return round(total)


def _dechunk(body: bytes) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (Go's net/http chunks pages it does not
    know the length of). ValueError when the chunks do not add up."""
    out, at = bytearray(), 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        start = line_end + 2
        if len(body) < start + size:
            raise ValueError("chunked body cut off")
        out += body[start : start + size]
        at = start + size + 2


@dataclass(frozen=True)
class _Head:
    """Status line and headers of an HTTP answer."""

    status: bytes
    headers: dict[bytes, bytes]
    body_start: int

    @classmethod
    def parse(cls, raw: bytes | bytearray) -> _Head | None:
        """None until the head is complete; ValueError when it is not HTTP."""
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return None
        status_line, *lines = bytes(raw[:end]).split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError("not an HTTP answer")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        return cls(parts[1], headers, end + 4)

    @property
    def chunked(self) -> bool:
        return self.headers.get(b"transfer-encoding") == b"chunked"

    @property
    def length(self) -> int | None:
        value = self.headers.get(b"content-length")
        return int(value) if value and value.isdigit() else None

    def complete(self, raw: bytes | bytearray) -> bool:
        """Whether the whole answer is in ``raw`` without waiting for the connection to
        close (Content-Length, or the last chunk of a chunked body)."""
        if self.chunked:
            return raw.endswith(b"0\r\n\r\n")
        return self.length is not None and len(raw) - self.body_start >= self.length


def reading_from_answer(raw: bytes, where: str, head: _Head | None = None) -> Reading:
    """The Reading a whole HTTP answer amounts to (``head``: already parsed)."""
    try:
        head = head or _Head.parse(raw)
    except ValueError:
        head = None
    if head is None:
        return Reading(problem=f"{where} did not send an HTTP answer")
    if head.status != b"200":
        return Reading(problem=f"{where} answered HTTP {head.status.decode(errors='replace')}")
    body = raw[head.body_start :]
    try:
        if head.chunked:
            body = _dechunk(body)
        elif (head.length or 0) > len(body):
            return Reading(problem=f"{where} closed the connection mid-answer")
        return Reading(allocations=allocations_from_text(body.decode("utf-8")))
    except MetricAbsent as err:
        return Reading(problem=f"{where}: {err} (metrics endpoint off?)", fatal=True)
    except ValueError as err:  # UnicodeDecodeError included
        return Reading(problem=f"{where} is not Prometheus text: {str(err)[:120]}")


class MetricsRead:
    """One non-blocking ``GET <metricsPath>`` of a pod's stunnerd metrics, driven by a
    selector: a thousand held drains are a thousand of these a second in one loop, not
    a thread each. ``result`` is set once it is over; the whole read, connect to last byte,
    has one deadline (a per-recv timeout would let an endpoint that trickles a byte at a
    time hold it forever) and at most ``maxMetricsBytes`` are kept.

    The connection is kept alive between a pod's reads, as Prometheus keeps its scrape
    connections: a TCP handshake and teardown per read would cost more CPU than the read.
    A kept connection the pod has meanwhile closed is ``stale``: read again on a new one."""

    def __init__(
        self, ip: str, drain: ReadSpec, now: float, kept: socket.socket | None = None
    ) -> None:
        self.ip = ip
        self.where = f"{ip}:{drain.metricsPort}{drain.metricsPath}"
        self.deadline = now + drain.scrapeTimeoutSeconds
        self.timeout = drain.scrapeTimeoutSeconds
        self.limit = drain.maxMetricsBytes
        host = f"[{ip}]" if ":" in ip else ip
        self.request = (
            f"GET {drain.metricsPath} HTTP/1.1\r\nHost: {host}:{drain.metricsPort}\r\n"
            "User-Agent: stunner-guard\r\nAccept: text/plain;version=0.0.4\r\n\r\n"
        ).encode()
        self.answer = bytearray()
        self.head: _Head | None = None
        self.result: Reading | None = None
        self.reusable = False  # the answer ended without closing the connection
        self.stale = False
        self.kept = kept is not None
        if kept is not None:
            self.sock = kept
            self._send()
            return
        self.sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        self.sock.setblocking(False)
        error = self.sock.connect_ex((ip, drain.metricsPort))
        if error not in (0, errno.EINPROGRESS):
            self._failed(error)
        else:
            # On a pod network the connection is often up already: send at once, and save
            # the drain loop a wake-up per read.
            self._send()

    @property
    def over(self) -> bool:
        return self.result is not None or self.stale

    @property
    def events(self) -> int:
        """What to wait for: the connection (writable) until the request is sent."""
        return selectors.EVENT_WRITE if self.request else selectors.EVENT_READ

    def step(self) -> None:
        """Make progress after the selector said the socket is ready."""
        if self.request:
            self._send()
        else:
            self._receive()

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.request)
        except (BlockingIOError, InterruptedError):
            return  # still connecting: wait until writable
        except OSError as err:
            if err.errno != errno.ENOTCONN:
                self._failed(err.errno)
            elif error := self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._failed(error)
            return
        self.request = self.request[sent:]

    def _receive(self) -> None:
        """Everything there is to read now, up to the end of the answer."""
        while not self.over:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._failed(err.errno)  # refused shows here when sent at once
                return
            if not data:
                if self.kept and not self.answer:
                    self.stale = True
                else:
                    self.result = reading_from_answer(bytes(self.answer), self.where)
            elif len(self.answer) + len(data) > self.limit:
                limit = self.limit
                self.result = Reading(problem=f"{self.where} sent more than the {limit}-byte limit")
            else:
                self.answer += data
                self._check_complete()

    def _check_complete(self) -> None:
        try:
            self.head = self.head or _Head.parse(self.answer)
        except ValueError:
            self.result = Reading(problem=f"{self.where} did not send an HTTP answer")
            return
        if self.head is not None and self.head.complete(self.answer):
            self.reusable = self.head.headers.get(b"connection") != b"close"
            self.result = reading_from_answer(bytes(self.answer), self.where, self.head)

    def expire(self) -> None:
        if self.result is None:
            self.result = Reading(problem=f"{self.where} did not answer within {self.timeout:g} s")

    def keep(self) -> socket.socket | None:
        """The connection, for the pod's next read, when it can serve one."""
        return self.sock if self.reusable and not self.stale else None

    def close(self) -> None:
        self.sock.close()

    def _failed(self, error: int | None) -> None:
        if self.kept and not self.answer and error in (errno.ECONNRESET, errno.EPIPE):
            self.stale = True  # the pod closed the idle connection
        elif error == errno.ECONNREFUSED:
            problem = f"connection refused by {self.where} (metrics endpoint off?)"
            self.result = Reading(problem=problem, fatal=True)
        else:
            self.result = Reading(problem=f"{self.where}: {os.strerror(error or errno.EIO)}")


def read_allocations(ip: str, drain: ReadSpec) -> Reading:
    """One read on its own (the reader process runs many at once in its loop instead)."""
    read = MetricsRead(ip, drain, time.monotonic())
    with selectors.DefaultSelector() as selector:
        selector.register(read.sock, read.events)
        while not read.over:
            remaining = read.deadline - time.monotonic()
            if remaining <= 0:
                read.expire()
            elif selector.select(remaining):
                read.step()
                selector.modify(read.sock, read.events)
    read.close()
    return read.result


# --------------------------------------------------------------------------- the reader


def _batch(items: list[list]) -> bytes:
    """One batch as the protocol frames it, either way: a JSON list on a line."""
    return orjson.dumps(items) + b"\n"


class _Batches:
    """The receiving end of either pipe: what arrives, in pieces, back into batches."""

    def __init__(self) -> None:
        self.partial = b""  # a line not yet whole

    def feed(self, data: bytes) -> list[list]:
        """The items of every batch that ``data`` completes, in order."""
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [item for line in lines for item in orjson.loads(line)]


class ReaderLoop:
    """The reader process: commands in on ``commands`` (a pipe), results out on
    ``results``, every read non-blocking in one selector.

    Results are never written blocking: the drainer may be in the middle of writing a
    batch of commands larger than a pipe holds, and stops reading results meanwhile. This
    loop keeps reading commands, so that write ends, and the drainer reads again."""

    def __init__(self, spec: ReadSpec, commands: int, results: int) -> None:
        self.spec = spec
        self.commands = commands
        self.results = results
        os.set_blocking(results, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(commands, selectors.EVENT_READ, None)
        self.incoming = _Batches()
        self.reads: dict[int, MetricsRead] = {}
        self.kept: dict[int, socket.socket] = {}
        self.deadlines: list[tuple[float, int, MetricsRead]] = []
        self.out: list[list] = []  # results not yet written
        self.out_since = 0.0  # monotonic: when the oldest of them came
        self.urgent_since: float | None = None  # the oldest zero or failed read among them
        self.hold = min(RESULTS_EVERY_SECONDS, spec.pollIntervalSeconds / 2)
        self.unsent = bytearray()
        self.waiting = False  # for the results pipe to take more

    def run(self) -> None:
        """Until the drainer closes the command pipe (it exited, or stopped the reader)."""
        while True:
            now = time.monotonic()
            due = [self.deadlines[0][0]] if self.deadlines else []
            if self.out:
                due.append(self.out_since + self.hold)
            if self.urgent_since is not None:
                due.append(self.urgent_since + URGENT_RESULTS_EVERY_SECONDS)
            timeout = max(0.0, min(due) - now) if due else None
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    if not self._commands():
                        return
                elif key.data == "results":
                    self._flush()
                else:
                    self._ready(*key.data, key.fileobj)
            now = time.monotonic()
            self._expire(now)
            # Results go out together: each write wakes the drainer, whose GIL admission
            # needs, and only a zero or a failed read changes what it does.
            urgent = self.urgent_since
            if self.out and (
                (urgent is not None and now >= urgent + URGENT_RESULTS_EVERY_SECONDS)
                or now >= self.out_since + self.hold
            ):
                self._send_out()

    def _send_out(self) -> None:
        """The results gathered so far go out as one batch."""
        self.unsent += _batch(self.out)
        self.out.clear()
        self.urgent_since = None
        self._flush()

    def _flush(self) -> None:
        """Write what the pipe takes; wait for it to be writable while some is left."""
        with contextlib.suppress(BlockingIOError):
            del self.unsent[: os.write(self.results, self.unsent)]
        if self.unsent and not self.waiting:
            self.selector.register(self.results, selectors.EVENT_WRITE, "results")
        elif self.waiting and not self.unsent:
            self.selector.unregister(self.results)
        self.waiting = bool(self.unsent)

    def _commands(self) -> bool:
        data = os.read(self.commands, 1 << 16)
        if not data:
            return False
        for key, ip in self.incoming.feed(data):
            if ip is None:
                self._forget(key)
            else:
                self._begin(key, ip)
        return True

    def _begin(self, key: int, ip: str) -> None:
        self._forget_read(key)
        kept = self.kept.pop(key, None)
        read = MetricsRead(ip, self.spec, time.monotonic(), kept)
        if read.over:  # refused at once, or a kept connection found closed
            self._end(key, read)
            return
        self.reads[key] = read
        if kept is None:
            self.selector.register(read.sock, read.events, (key, read))
        else:  # still registered while it was idle
            self.selector.modify(read.sock, read.events, (key, read))
        heapq.heappush(self.deadlines, (read.deadline, key, read))

    def _ready(self, key: int, read: MetricsRead | None, sock: socket.socket) -> None:
        if read is None:
            # A kept connection woke while idle: the pod closed it.
            if self.kept.get(key) is sock:
                del self.kept[key]
            self._close(sock)
            return
        waited_for = read.events
        read.step()
        if read.over:
            self._end(key, read)
        elif read.events != waited_for:
            self.selector.modify(read.sock, read.events, (key, read))

    def _expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, key, read = heapq.heappop(self.deadlines)
            if self.reads.get(key) is read:
                read.expire()
                self._end(key, read)

    def _end(self, key: int, read: MetricsRead) -> None:
        if self.reads.get(key) is read:
            del self.reads[key]
        if read.stale:  # the pod had closed the kept connection: the same read, anew
            self._close(read.sock)
            self._begin(key, read.ip)
            return
        if (kept := read.keep()) is not None:
            # Registered while idle: it wakes the loop only if the pod closes it.
            self.selector.modify(kept, selectors.EVENT_READ, (key, None))
            self.kept[key] = kept
        else:
            self._close(read.sock)
        result, now = read.result, time.monotonic()
        if not self.out:
            self.out_since = now
        if not result.allocations and self.urgent_since is None:
            self.urgent_since = now
        self.out.append([key, result.allocations, result.problem, result.fatal, now])
        if len(self.out) >= RESULTS_BATCH_MAX:
            self._send_out()

    def _forget_read(self, key: int) -> None:
        read = self.reads.pop(key, None)
        if read is not None:
            self._close(read.sock)

    def _forget(self, key: int) -> None:
        self._forget_read(key)
        if (sock := self.kept.pop(key, None)) is not None:
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        """Unregister, then close: a closed descriptor's number is soon reused."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Reader:
    """The drainer's handle on the reader process (used from the drain loop thread only)."""

    def __init__(self, spec: ReadSpec, python: str = sys.executable) -> None:
        self.spec = spec
        self.python = python
        self.process: subprocess.Popen | None = None
        self.incoming = _Batches()

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> int:
        """Start the process; the file descriptor its results arrive on."""
        # The directory holding the webhooks package: lifecycle/ -> webhooks/ -> its parent.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [self.python, "-m", READER_MODULE, orjson.dumps(asdict(self.spec)).decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        self.incoming = _Batches()
        os.set_blocking(self.process.stdout.fileno(), False)
        return self.process.stdout.fileno()

    def send(self, commands: list[list]) -> bool:
        """False when the process is gone."""
        try:
            _write_all(self.process.stdin.fileno(), _batch(commands))
        except OSError:  # BrokenPipeError: it exited
            return False
        return True

    def receive(self) -> list[list] | None:
        """The results that arrived; None when the process has exited."""
        try:
            data = os.read(self.process.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return []
        if not data:
            return None
        return self.incoming.feed(data)

    def stop(self) -> int | None:
        """End the process (closing its stdin ends it); its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        for pipe in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        try:
            return process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the reader ends with the
    # drainer (its stdin closes), not before it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(READER_NICENESS)  # lowering one's own priority needs no privilege
    spec = ReadSpec(**orjson.loads(argv[0]))
    with contextlib.suppress(BrokenPipeError):  # the drainer is gone: so is the reader
        ReaderLoop(spec, sys.stdin.fileno(), sys.stdout.fileno()).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
