"""gunicorn's gthread worker, with one change: a connection's lingering close never runs
on the worker's main loop.

gthread closes a connection it will not keep alive (``Connection: close``, a worker
stopping, ``worker_connections - threads`` kept-alive connections reached) with
``util.close_graceful``: shut down the write side, then read for up to 2 s until the peer
closes too. It does that on the main loop, the one thread that accepts connections, hands
requests to threads and tells the arbiter the worker is alive. A peer that keeps its end
open (kubelet leaves a preStop request open once it has killed the container, a client that
stops reading) stalls every connection for 2 s, and fifteen of them in a row exceed the
30 s worker timeout: the arbiter kills the worker and every drain it holds. Measured with
``make bench`` before this worker: a thousand drain connections left open after their
answers made the next admission requests wait until the worker was killed.

Here the lingering close runs on a small pool of its own threads; the main loop moves on.
"""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor

from gunicorn.workers import gthread

# Lingering closes at once; more wait their turn (each ends within 2 s).
CLOSING_THREADS = 8


class _Conn(gthread.TConn):
    closer: ThreadPoolExecutor | None = None

    def close(self, graceful: bool = False) -> None:
        if graceful and self.closer is not None:
            self.closer.submit(super().close, True)
        else:
            super().close(graceful)


class ThreadWorker(gthread.ThreadWorker):
    """``worker_class = "webhooks.serving.ThreadWorker"`` (gunicorn.conf.py)."""

    def init_process(self) -> None:
        self.closer = ThreadPoolExecutor(CLOSING_THREADS, thread_name_prefix="close")
        super().init_process()

    def accept(self, listener) -> None:
        # gthread.ThreadWorker.accept (gunicorn 27.0.1), making a _Conn instead of a TConn.
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = _Conn(self.cfg, client_sock, client_addr, listener.getsockname())
            conn.closer = self.closer
            self.enqueue_req(conn)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
