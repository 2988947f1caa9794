"""Run the real gunicorn server (same gunicorn.conf.py as `make run`) for end-to-end tests."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn(
    certs: Path,
    env: dict[str, str] | None = None,
    home: Path | None = None,
    ready_within: float = 15.0,
    fd_limit: int | None = None,
):
    """Start gunicorn over TLS on a free loopback port; yield (base URL, process); the
    process's ``log`` attribute is the path of its log file.

    The environment is the caller's plus ``env``; no KUBECONFIG unless given, and HOME is
    a scratch folder so a developer's ~/.kube/config is never picked up."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    full_env.update(
        PORT=str(port),
        BIND="127.0.0.1",
        STUNNER_GUARD_CERT_FILE=str(certs / "tls.crt"),
        STUNNER_GUARD_KEY_FILE=str(certs / "tls.key"),
        HOME=str(home or certs),
    )
    full_env.update(env or {})
    # The server's log goes to a file: a pipe nobody reads would block the server once full.
    log = Path(full_env["HOME"]) / f"gunicorn-{port}.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [str(GUNICORN), "--config", "gunicorn.conf.py"],
            cwd=REPO,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # A hard limit on file descriptors gunicorn.conf.py cannot raise.
            preexec_fn=(lambda: _limit_fds(fd_limit)) if fd_limit else None,
        )
    process.log = log
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited {process.returncode}:\n{log.read_text()}")
            try:
                if requests.get(f"{base}/healthz", verify=str(certs / "ca.crt"), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not answer /healthz in time")
            time.sleep(0.05)
        yield base, process
    finally:
        stop(process)


def _limit_fds(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def stop(process: subprocess.Popen, within: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited ``within`` seconds later."""
    process.terminate()
    try:
        process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
