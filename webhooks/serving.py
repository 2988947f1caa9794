"""gunicorn's gthread worker, hardened for a service in the apiserver's request path and in
every stunnerd pod's termination path (``worker_class`` in gunicorn.conf.py).

Stock gthread hands a connection to a pool thread as soon as its first byte arrives; the
TLS handshake and the header read then block that thread with no deadline. Measured:
1,100 connections that each sent one byte (or 2,500 idle TLS connections) took every
thread, and ``/mutate`` and ``/healthz`` stalled until they closed; in a cluster the
liveness probe then restarts the pod and every held drain is cut. So, four changes:

1. **The request phase runs on the main loop.** The TLS handshake, the request head and a
   body of known length up to ``maxBodyBytes`` are read there, non-blocking, under one
   deadline from the first byte (``requestTimeoutSeconds``: Go's ``ReadHeaderTimeout``,
   extended over the handshake and the body). A pool thread is taken only by a whole
   request, so idle, half-open and trickling connections cost a socket and a buffer, never
   a thread. Bodies the main loop does not buffer (chunked, or larger than the limit, which
   the app refuses with 413) are read by the thread under the same deadline. Held drains
   never read from their socket, so no deadline ever cuts them.
2. **Bounded.** At ``worker_connections`` a new connection evicts the oldest one still in
   its request phase (then the oldest idle kept-alive one) instead of stalling the accept
   loop; request-phase buffers together stay under ``MAX_BUFFERED_BYTES``.
3. **Shutdown keeps its promises.** On SIGTERM the worker tells the service (``/readyz``
   fails at once) but keeps its listener open, answers every request that still arrives
   (with ``Connection: close``, so clients reconnect to another replica), closes idle
   kept-alive connections oldest first, and keeps every held drain until it ends normally.
   It exits when nothing is left, or at gunicorn's graceful timeout minus
   ``HARD_STOP_MARGIN_SECONDS``, when the drains still held are answered ``stopped``
   first. Stock gthread stopped accepting at once and dropped kept-alive connections after
   2 s: the apiserver saw refused and reset connections during every guard rollout.
4. **One TLS context, reloaded as a pair.** Stock gunicorn loads the certificate and the
   key from their files for every connection; kubelet swaps a Secret's files by an atomic
   symlink swap, so a connection could get the new certificate with the old key (seen: 1 in
   20-40 new connections failed during a swap). Here the pair is loaded once, re-checked
   when the files change, and a pair that does not load keeps the last good context.

And, as before: a connection's lingering close (up to 2 s while the peer keeps its end
open) runs on threads of its own, never on the main loop, where a few such peers stalled
every connection and then got the worker killed with its held drains.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from gunicorn import http, util
from gunicorn.workers import gthread

from webhooks import logs
from webhooks.settings import DISCARD_OVERSIZED_FACTOR, from_env

if TYPE_CHECKING:
    from webhooks.service import Service

log = logging.getLogger(__name__)

# Lingering closes at once; more wait their turn (each ends within 2 s), up to
# MAX_LINGERING waiting: past that a connection is closed at once. A peer that never closes
# its end would otherwise keep a socket (a file descriptor) open outside every limit.
CLOSING_THREADS = 8
MAX_LINGERING = 256
# Request-phase bytes buffered by the main loop, all connections together. A hostile
# client must send them to fill them; past this, the oldest unfinished requests go.
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
# A request head larger than this is refused (431) by the main loop. The apiserver's,
# kubelet's and Prometheus's are well under 2 KiB.
MAX_HEAD_BYTES = 64 * 1024
# How often the TLS files are checked for a change (a stat each), and retried after a
# pair that did not load (kubelet writes a Secret's files within one symlink swap; a torn
# read is retried at once on the next accept after this).
TLS_CHECK_SECONDS = 1.0
# Drains still held this long before gunicorn's graceful timeout are answered "stopped",
# so that kubelet gets an answer rather than a cut connection.
HARD_STOP_MARGIN_SECONDS = 5.0
# On shutdown, a kept-alive connection idle this long is closed (oldest first). The one
# just used is the one a client reuses next; one idle for a while is not in its hands.
STOP_IDLE_CLOSE_SECONDS = 1.0
# On shutdown, the listener stays open at least this long, for connections a client opened
# before it learnt this replica is going away.
STOP_LINGER_SECONDS = 2.0

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([^\r\n]*)", re.IGNORECASE)
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding:", re.IGNORECASE)
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE)
_HTTP_11 = re.compile(rb"^[^\r\n]* HTTP/1\.1\r\n")


_loop_errors_logged = logs.Throttle(per_second=1)
# Requests refused by the main loop (431, 411, 413) are logged at most this many a second.
_refusals_logged = logs.Throttle(per_second=10)
# Out of file descriptors with nothing to evict: accepting stops this long.
ACCEPT_PAUSE_SECONDS = 0.1


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Framing:
    """What the main loop knows of a request from its bytes so far."""

    complete: bool  # the whole request is buffered (or cannot be framed: let gunicorn say)
    expects_continue: bool = False
    refuse: tuple[int, str, str] | None = None  # (status, reason phrase, why): answer, close
    discard: int = 0  # body bytes still coming, to read and drop after the refusal


def framing(buf: bytes | bytearray, max_body: int) -> Framing:
    """Whether ``buf`` holds a whole HTTP/1.1 request. Only what the hand-over needs is
    looked at: the end of the head and the body's length. gunicorn's parser reads the
    request again, validates everything and refuses what is malformed, so a head this
    cannot frame (a repeated or invalid Content-Length) counts as complete and goes to the
    parser as it is. What would make a thread wait on the client is refused here instead:
    a head over MAX_HEAD_BYTES, a chunked body (the apiserver, kubelet and Prometheus send a
    Content-Length), a body over the limit."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            why = f"request head over {MAX_HEAD_BYTES} bytes"
            return Framing(complete=False, refuse=(431, "Request Header Fields Too Large", why))
        return Framing(complete=False)
    head = bytes(buf[: end + 4])
    if _TRANSFER_ENCODING.search(head):
        why = "send the body with a Content-Length; a Transfer-Encoding is not read"
        return Framing(complete=False, refuse=(411, "Length Required", why))
    lengths = {m.group(1).strip() for m in _CONTENT_LENGTH.finditer(head)}
    if not lengths:
        return Framing(complete=True)
    (length_text,) = lengths if len(lengths) == 1 else (b"",)
    if not length_text.isdigit():
        return Framing(complete=True)
    expects = bool(_EXPECT_CONTINUE.search(head)) and bool(_HTTP_11.match(head))
    # int() of a few thousand digits is refused by Python itself: a length with more digits
    # than the discard bound has is simply too large.
    bound = DISCARD_OVERSIZED_FACTOR * max_body
    length = int(length_text) if len(length_text) <= len(str(bound)) else bound + 1
    if len(length_text) > len(str(max_body)) or length > max_body:
        why = f"body of {length_text[:30].decode()} bytes exceeds the {max_body}-byte limit"
        # A client that waits for "100 Continue" sends no body; one that is sending it
        # would see a reset instead of the answer if the connection closed under it.
        discard = 0
        if not expects and length <= bound:
            discard = max(0, length - (len(buf) - len(head)))
        return Framing(complete=False, refuse=(413, "Content Too Large", why), discard=discard)
    return Framing(complete=len(buf) >= len(head) + length, expects_continue=expects)


class _DeadlineSocket:
    """What gunicorn's parser reads from: the socket, every read bounded by what is left of
    the request phase's deadline (the request is whole by then; this only bounds a
    surprise)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv(self, size: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received within the request timeout")
        self.sock.settimeout(left)
        try:
            return self.sock.recv(size)
        finally:
            self.sock.settimeout(None)


# --------------------------------------------------------------------------- TLS


class TLSContext:
    """The serving certificate and key as one SSLContext, reloaded when either file
    changes. Both files are read into memory and loaded from those copies together, so the
    pair loaded is the pair read; a pair that does not load (read in the middle of a swap,
    or a certificate that does not match its key) leaves the last good context in use
    (``stale`` until a pair loads) and is tried again after ``TLS_CHECK_SECONDS``.
    ``served`` is the certificate PEM in use, for its expiry metric."""

    def __init__(self, certfile: str, keyfile: str, make=None) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self._make = make or _server_context
        self.context: ssl.SSLContext | None = None
        self.served = b""
        self.stale = False
        self._loaded: tuple | None = None  # the files' stat signatures of `context`
        self._checked = 0.0
        self.reloads = 0
        self.failures = 0
        self.current()

    def _signature(self) -> tuple:
        return tuple(_stat_signature(path) for path in (self.certfile, self.keyfile))

    def current(self) -> ssl.SSLContext:
        """The context to wrap the next connection with (checked at most once a second)."""
        now = time.monotonic()
        if self.context is not None and now - self._checked < TLS_CHECK_SECONDS:
            return self.context
        self._checked = now
        signature = self._signature()
        if signature == self._loaded:
            return self.context
        try:
            cert, key = _read(self.certfile), _read(self.keyfile)
            context = self._make(cert, key)
        except (OSError, ssl.SSLError, ValueError) as err:
            self.failures += 1
            self.stale = self.context is not None
            if self.context is None:
                raise
            log.warning("TLS certificate not reloaded, still serving the last good one: %s", err)
        else:
            if self.context is not None:
                self.reloads += 1
                log.info("TLS certificate reloaded from %s", self.certfile)
            self.context, self.served, self._loaded, self.stale = context, cert, signature, False
        return self.context


def _stat_signature(path: str) -> tuple:
    try:
        st = os.stat(path)  # follows kubelet's ..data symlink
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A server context from PEM bytes (ssl loads only from paths: in-memory files)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _memory_file(cert) as cert_path, _memory_file(key) as key_path:
        context.load_cert_chain(cert_path, key_path)
    return context


@contextlib.contextmanager
def _memory_file(data: bytes):
    """A path that reads ``data``: an anonymous in-memory file (Linux memfd), never on disk
    (a key among them)."""
    fd = os.memfd_create("stunner-guard-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- connections


class _Conn(gthread.TConn):
    """A connection, with its request phase: TLS handshake (once), then the bytes of the
    next request, until it is whole or its deadline passes."""

    closer: _Closer | None = None

    def __init__(self, cfg, sock, client, server) -> None:
        super().__init__(cfg, sock, client, server)
        self.handshaken = not cfg.is_ssl
        self.buf = bytearray()
        self.deadline = 0.0  # of the request phase, monotonic
        self.in_phase = False
        self.sent_continue = False
        self.discard = 0  # body bytes of a refused request still to read and drop
        self.idle_since = 0.0

    def close(self, graceful: bool = False) -> None:
        if graceful and self.closer is not None:
            self.closer.submit(super().close)
        else:
            super().close(graceful)


class _Closer:
    """Lingering closes (shut the write side, read until the peer closes, at most 2 s) on
    threads of their own, at most MAX_LINGERING waiting; past that, closed at once."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(CLOSING_THREADS, thread_name_prefix="close")
        self.pending = 0
        self._lock = threading.Lock()

    def submit(self, close) -> None:
        with self._lock:
            linger = self.pending < MAX_LINGERING
            self.pending += linger
        if linger:
            self.pool.submit(self._linger, close)
        else:
            close(False)

    def _linger(self, close) -> None:
        try:
            close(True)
        finally:
            with self._lock:
                self.pending -= 1


class ThreadWorker(gthread.ThreadWorker):
    """``worker_class = "webhooks.serving.ThreadWorker"`` (gunicorn.conf.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (deadline, connection) of every request phase begun, oldest first; an entry whose
        # connection has left that phase (or begun another) is skipped.
        self.phase: deque[tuple[float, _Conn]] = deque()
        self.accept_paused_until: float | None = None
        self.buffered = 0
        self.in_flight: set[_Conn] = set()
        self.stopping_since: float | None = None
        self.hard_stopped = False
        self.tls: TLSContext | None = None
        self.service: Service | None = None
        self.request_timeout = 10.0
        self.max_body = 0

    # ---------------------------------------------------------------- set-up

    def init_process(self) -> None:
        self.closer = _Closer()
        if self.cfg.is_ssl:
            self.tls = TLSContext(self.cfg.certfile, self.cfg.keyfile)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The app's Service (app.create_app); None for another WSGI app served by this
        # worker (the benchmark's allow-all baseline).
        self.service = getattr(self.wsgi, "extensions", {}).get("stunner_guard")
        if self.service is not None and self.tls is not None:
            # The expiry metric follows the certificate served, not the file: a new file
            # whose pair does not load is not what clients see.
            tls = self.tls
            self.service.metrics.certificates.serve_from(lambda: (tls.served, tls.stale))
        settings = self.service.settings if self.service is not None else from_env()
        self.request_timeout = settings.requestTimeoutSeconds
        self.max_body = settings.maxBodyBytes

    # ---------------------------------------------------------------- accepting

    def accept(self, listener) -> None:
        try:
            sock, addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # Out of file descriptors (a limit below worker_connections): make room
                # rather than crash the worker and every held drain with it; with nothing to
                # evict, stop accepting for a moment rather than spin on the listener.
                if not self._evict_one():
                    self.set_accept_enabled(False)
                    self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
            elif e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        if self.nr_conns >= self.worker_connections and not self._evict_one():
            util.close(sock)  # every connection is a request in flight: no room
            return
        self.nr_conns += 1
        sock.setblocking(False)
        if self.tls is not None:
            try:
                sock = self.tls.current().wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except OSError:  # the peer is already gone
                self.nr_conns -= 1
                util.close(sock)
                return
        conn = _Conn(self.cfg, sock, addr, listener.getsockname())
        conn.closer = self.closer
        self._begin_phase(conn, b"")

    def _evict_one(self) -> bool:
        """Make room for a new connection: the oldest one still sending its request, else
        the oldest idle kept-alive one. False when every connection is a request in
        flight."""
        while self.phase:
            entry = self.phase.popleft()
            if self._current(entry):
                self._abandon(entry[1])
                return True
        if self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            self._unregister(conn)
            self._drop(conn)
            return True
        return False

    # ---------------------------------------------------------------- the request phase

    def _begin_phase(self, conn: _Conn, seed: bytes) -> None:
        conn.in_phase = True
        conn.deadline = time.monotonic() + self.request_timeout
        conn.buf = bytearray(seed)
        conn.sent_continue = False
        self.buffered += len(seed)
        self.phase.append((conn.deadline, conn))
        if seed and self._advance(conn) and not conn.discard:
            return  # handed to a thread, or answered and closed
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_phase_io, conn))

    def _end_phase(self, conn: _Conn) -> None:
        conn.in_phase = False
        self.buffered -= len(conn.buf)

    def _drop(self, conn: _Conn) -> None:
        self.nr_conns -= 1
        conn.close()

    def _unregister(self, conn: _Conn) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):  # closed, or not registered
            self.poller.unregister(conn.sock)

    @staticmethod
    def _current(entry: tuple[float, _Conn]) -> bool:
        """A ``phase`` entry whose connection is still in the request phase it was made for
        (a kept-alive connection's next request makes a new entry)."""
        deadline, conn = entry
        return conn.in_phase and conn.deadline == deadline

    def _on_phase_io(self, conn: _Conn, _sock) -> None:
        if not conn.in_phase:
            return
        try:
            if not conn.handshaken:
                conn.sock.do_handshake()
                conn.handshaken = True
            while True:
                data = conn.sock.recv(1 << 16)
                if not data:  # the peer closed
                    raise ConnectionResetError
                if conn.discard:  # the rest of a refused body
                    conn.discard -= len(data)
                    if conn.discard <= 0:
                        self._close_answered(conn)
                        return
                    continue
                conn.buf += data
                self.buffered += len(data)
                if self._advance(conn):
                    return
        except ssl.SSLWantReadError:
            self.poller.modify(conn.sock, selectors.EVENT_READ, partial(self._on_phase_io, conn))
        except ssl.SSLWantWriteError:
            self.poller.modify(conn.sock, selectors.EVENT_WRITE, partial(self._on_phase_io, conn))
        except BlockingIOError:
            pass
        except OSError:  # reset, TLS failure, a peer that closed: nothing to answer
            self._abandon(conn)
            return
        except Exception as err:  # a surprise on one connection must not stop the worker
            _loop_errors_logged.log(
                log,
                logging.ERROR,
                "connection from %s dropped: %s: %s",
                conn.client,
                type(err).__name__,
                err,
            )
            self._abandon(conn)
            return
        if self.buffered > MAX_BUFFERED_BYTES:
            self._shed_buffers()

    def _advance(self, conn: _Conn) -> bool:
        """Hand the connection to a thread once its request is whole (True)."""
        frame = framing(conn.buf, self.max_body)
        if frame.refuse is not None:
            self._refuse(conn, *frame.refuse, discard=frame.discard)
            return True
        if frame.expects_continue and not conn.sent_continue and not frame.complete:
            # The client waits for this before it sends the body (curl, for bodies over
            # 1 KiB); gunicorn would send it only once a thread reads the request.
            conn.sent_continue = True
            with contextlib.suppress(OSError):
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not frame.complete:
            return False
        self._unregister(conn)
        self._end_phase(conn)
        data, conn.buf = bytes(conn.buf), bytearray()
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.initialized = True
        conn.parser.unreader.unread(data)
        # The request is whole: the parser needs nothing more from the socket. Should it
        # read anyway, it waits no longer than the request phase's deadline.
        conn.parser.unreader.sock = _DeadlineSocket(conn.sock, conn.deadline)
        conn.data_ready = True
        self.enqueue_req(conn)
        return True

    def _refuse(self, conn: _Conn, status: int, phrase: str, why: str, discard: int = 0) -> None:
        """Answer a request that would have a thread wait on its client, and close; with
        ``discard``, first read and drop that much more of its body (on the main loop,
        within the request's deadline) so that the client, still sending, gets the answer."""
        body = f"{why}\n".encode()
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # a small answer; one that does not fit is lost
            conn.sock.send(head.encode() + body)
        _refusals_logged.log(
            log, logging.INFO, "refused a request from %s: %s %s", conn.client[0], status, why
        )
        if discard > 0:
            self.buffered -= len(conn.buf)
            conn.buf, conn.discard = bytearray(), discard
            return
        self._close_answered(conn)

    def _close_answered(self, conn: _Conn) -> None:
        self._unregister(conn)
        self._end_phase(conn)
        self.nr_conns -= 1
        conn.close(graceful=True)

    def _abandon(self, conn: _Conn) -> None:
        self._unregister(conn)
        self._end_phase(conn)
        self._drop(conn)

    def _shed_buffers(self) -> None:
        while self.buffered > MAX_BUFFERED_BYTES and self.phase:
            entry = self.phase.popleft()
            if self._current(entry):
                self._abandon(entry[1])

    def murder_pending(self) -> None:
        """Close connections whose request phase outlived its deadline (and forget the
        ones that left it)."""
        now = time.monotonic()
        while self.phase:
            current = self._current(self.phase[0])
            if current and self.phase[0][0] > now:
                break
            _, conn = self.phase.popleft()
            if current:
                self._abandon(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gthread's, with each callback on its own: an exception in one (one connection's
        surprise) is logged, and the loop, the heartbeat and every held drain go on."""
        try:
            events = self.poller.select(timeout)
        except InterruptedError:
            return
        for key, _ in events:
            try:
                key.data(key.fileobj)
            except Exception as err:
                _loop_errors_logged.log(
                    log, logging.ERROR, "worker main loop: %s: %s", type(err).__name__, err
                )

    # ---------------------------------------------------------------- threads

    def enqueue_req(self, conn: _Conn) -> None:
        self.in_flight.add(conn)
        super().enqueue_req(conn)

    def on_client_socket_readable(self, conn: _Conn, client) -> None:
        """A kept-alive connection's next request begins: read it on the main loop."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._begin_phase(conn, b"")

    def finish_request(self, conn: _Conn, fs) -> None:
        self.in_flight.discard(conn)
        try:
            keep = (fs.result() if not fs.cancelled() else False) and self.cfg.keepalive
        except Exception:
            keep = False
        if not keep:
            self.nr_conns -= 1
            conn.close(graceful=True)
            return
        with contextlib.suppress(OSError):
            conn.sock.setblocking(False)
        # A client may have sent its next request behind this one (read ahead by the body
        # reader): it is the next request phase's first bytes.
        ahead = conn.parser.unreader.take_buffered()
        if ahead:
            self._begin_phase(conn, ahead)
            return
        conn.set_timeout()
        conn.idle_since = time.monotonic()
        self.keepalived_conns.append(conn)
        self.poller.register(
            conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn)
        )

    def handle(self, conn: _Conn):
        try:
            return super().handle(conn)
        finally:
            conn.parser.unreader.sock = conn.sock

    def handle_request(self, req, conn: _Conn):
        if conn.sent_continue:
            # The main loop already sent "100 Continue"; gunicorn would send another.
            req._expected_100_continue = False
        return super().handle_request(req, conn)

    # ---------------------------------------------------------------- shutdown

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: begin the graceful stop (the main loop carries it out)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        super().handle_exit(sig, frame)

    def run(self) -> None:
        self.poller.register(
            self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks
        )
        self.set_accept_enabled(True)
        told = False
        while True:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=self._loop_timeout())
            if not self.is_parent_alive():
                break
            self.murder_keepalived()
            self.murder_pending()
            self._resume_accepting()
            if self.alive:
                continue
            if self.stopping_since is None:  # max_requests, a parent change
                self.stopping_since = time.monotonic()
            if not told:
                told = True
                if self.service is not None:
                    self.service.begin_shutdown()
                log.info("stopping: serving what arrives, %d drain calls held", self._drains())
            if self._stopped():
                break
        self._close_all()

    def _resume_accepting(self) -> None:
        if self.accept_paused_until is not None and time.monotonic() >= self.accept_paused_until:
            self.accept_paused_until = None
            self.set_accept_enabled(True)

    def _loop_timeout(self) -> float:
        if self.accept_paused_until is not None:
            return ACCEPT_PAUSE_SECONDS
        return 1.0 if self.alive else 0.2

    def _drains(self) -> int:
        # The count, not in_progress(): this runs on the main loop, five times a second
        # while stopping, and a thousand held drains' listing is work it need not do.
        return self.service.drainer.held if self.service is not None else 0

    def _stopped(self) -> bool:
        """One pass of the stop, on the main loop; True when the worker may exit."""
        now = time.monotonic()
        elapsed = now - self.stopping_since
        hard_at = self.cfg.graceful_timeout - HARD_STOP_MARGIN_SECONDS
        if not self.hard_stopped and elapsed >= hard_at:
            self.hard_stopped = True
            log.warning("graceful timeout near: answering %d held drain calls", self._drains())
            if self.service is not None:
                self.service.stop_drains()
        if self.hard_stopped and elapsed >= self.cfg.graceful_timeout - 1.0:
            return True
        if self.sockets and elapsed >= STOP_LINGER_SECONDS and not self._drains():
            # Nothing held: new connections are refused from now on (fast, so the client
            # goes to another replica), and what is open finishes within a request timeout.
            self._close_listeners()
        # Idle kept-alive connections go, oldest first, once idle for a while.
        while (
            self.keepalived_conns
            and now - self.keepalived_conns[0].idle_since >= STOP_IDLE_CLOSE_SECONDS
        ):
            conn = self.keepalived_conns.popleft()
            self._unregister(conn)
            self._drop(conn)
        busy = self.in_flight or self.keepalived_conns or any(c.in_phase for _, c in self.phase)
        return not busy and not self.sockets

    def _close_listeners(self) -> None:
        self.set_accept_enabled(False)
        for listener in self.sockets:
            listener.close()
        self.sockets = []

    def _close_all(self) -> None:
        with contextlib.suppress(Exception):
            if self.service is not None:
                self.service.close()
        in_phase = {c for _, c in self.phase if c.in_phase}
        for conn in list(in_phase) + list(self.keepalived_conns):
            with contextlib.suppress(OSError):
                conn.close()
        self.tpool.shutdown(wait=False)
        self.closer.pool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for s in self.sockets:
            s.close()
