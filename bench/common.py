"""What every benchmark needs: the real server as a subprocess, a load generator, /proc.

The server is started exactly as in production (``gunicorn --config gunicorn.conf.py``)
on a free loopback port, with the dev certificates, no cluster credentials (no KUBECONFIG,
a scratch HOME, no in-cluster service variables) and the environment a scenario adds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
CERTS = REPO / "certs"
GUNICORN = Path(sys.executable).parent / "gunicorn"
HEY = shutil.which("hey") or "/usr/bin/hey"
# Variables that would point the server at a real cluster.
CLUSTER_ENV = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")


def ensure_certs() -> None:
    """The dev CA and serving certificate, as `make certs` makes them (kept if present)."""
    if not (CERTS / "tls.crt").exists() or not (CERTS / "tls.key").exists():
        subprocess.run(
            [sys.executable, "-m", "webhooks.certs", str(CERTS)],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_context() -> ssl.SSLContext:
    """Verify the server against the dev CA, as the apiserver verifies caBundle."""
    return ssl.create_default_context(cafile=str(CERTS / "ca.crt"))


def children(pid: int) -> list[int]:
    """The process's child processes (gunicorn's workers, a worker's metrics reader)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log: Path
    ready_seconds: float = float("nan")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """gunicorn's workers: the children of the master process."""
        return sorted(children(self.process.pid))

    def worker_rss_mib(self) -> list[float]:
        return [rss_mib(pid) for pid in self.worker_pids()]

    def worker_threads(self) -> list[int]:
        return [int(proc_status(pid, "Threads") or 0) for pid in self.worker_pids()]

    def worker_cpu_seconds(self) -> float:
        """User+system CPU the workers have used: per request, it does not depend on what
        else the shared machine is doing, unlike req/s."""
        return sum(cpu_seconds(pid) for pid in self.worker_pids())

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=timeout, context=tls_context()
        )
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def proc_status(pid: int, key: str) -> str:
    """One line of /proc/<pid>/status, e.g. ``VmRSS`` -> ``"58364 kB"``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value.strip()
    return ""


def rss_mib(pid: int) -> float:
    value = proc_status(pid, "VmRSS")
    return int(value.split()[0]) / 1024 if value else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def gunicorn(
    name: str,
    wsgi_app: str | None = None,
    env: dict[str, str] | None = None,
    ready_within: float = 15.0,
):
    """Start ``gunicorn --config gunicorn.conf.py [wsgi_app]``; yield a Server once /readyz
    answers 200, with the time from process start to that answer."""
    ensure_certs()
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    home = tempfile.mkdtemp(prefix="stunner-guard-bench-")
    full_env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    full_env.update(
        PORT=str(port),
        BIND="127.0.0.1",
        HOME=home,
        STUNNER_GUARD_CERT_FILE=str(CERTS / "tls.crt"),
        STUNNER_GUARD_KEY_FILE=str(CERTS / "tls.key"),
    )
    full_env.update(env or {})
    log = OUT / f"{name}.log"
    command = [str(GUNICORN), "--config", "gunicorn.conf.py"] + ([wsgi_app] if wsgi_app else [])
    with log.open("w") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
        server = Server(name, port, process, log)
        try:
            server.ready_seconds = _wait_ready(server, started, ready_within)
            yield server
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            shutil.rmtree(home, ignore_errors=True)


def _wait_ready(server: Server, started: float, within: float) -> float:
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}; "
                f"see {server.log}:\n{server.log.read_text()[-2000:]}"
            )
        try:
            status, _ = server.request("GET", "/readyz", timeout=1.0)
            if status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > within:
            raise RuntimeError(f"{server.name}: /readyz not 200 within {within}s; see {server.log}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """One hey run, from its summary: hey keeps every request's latency and reports exact
    percentiles, plus the status codes and the errors (a CSV dump would hide errors)."""

    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    errors: int
    error_kinds: list[str] = field(default_factory=list)  # hey's error distribution
    server_cpu_ms: float = float("nan")  # server worker CPU per request

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> bool:
        return set(self.statuses) == {"200"} and not self.errors

    def figures(self) -> dict:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "requests": self.requests,
            "server_cpu_ms_per_request": round(self.server_cpu_ms, 3),
            "statuses": self.statuses,
            "errors": self.errors,
            "error_kinds": self.error_kinds[:5],
        }


def hey(
    url: str,
    body_file: Path,
    seconds: float,
    concurrency: int,
    rate_per_worker: float | None = None,
) -> Load:
    """POST ``body_file`` to ``url`` for ``seconds`` from ``concurrency`` workers, each on
    its own kept-alive HTTPS connection, as the apiserver reuses connections to webhooks.
    hey's -q is per worker: -c 10 -q 50 offers 500 req/s."""
    command = [
        HEY,
        "-z",
        f"{seconds}s",
        "-c",
        str(concurrency),
        "-m",
        "POST",
        "-D",
        str(body_file),
        "-T",
        "application/json",
    ]
    if rate_per_worker:
        command += ["-q", str(rate_per_worker)]
    result = subprocess.run(
        command + [url], capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    return parse_hey(result.stdout)


def parse_hey(text: str) -> Load:
    rps, percentiles, statuses, errors, error_kinds = float("nan"), {}, {}, 0, []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if raw and not raw.startswith(" "):
            section = line
            continue
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        elif section.startswith("Latency distribution") and "% in " in line:
            pct, _, secs, _ = line.split()
            percentiles[pct.rstrip("%")] = float(secs) * 1000
        elif section.startswith("Status code distribution") and line.startswith("["):
            code, count = line[1:].split("]")
            statuses[code] = int(count.split()[0])
        elif section.startswith("Error distribution") and line.startswith("["):
            errors += int(line[1:].split("]")[0])
            error_kinds.append(line)
    return Load(
        rps,
        percentiles.get("50", float("nan")),
        percentiles.get("99", float("nan")),
        statuses,
        errors,
        error_kinds=error_kinds,
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(name: str, figures: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path


def rows_table(title: str, rows: list[tuple[str, str, str]]) -> str:
    """A benchmark's figures as aligned columns: what, measured, target."""
    width = max(len(r[0]) for r in rows + [(title, "", "")])
    value_width = max(len(r[1]) for r in rows + [("", "measured", "")])
    lines = [f"{title:<{width}}  {'measured':<{value_width}}  target"]
    lines += [f"{a:<{width}}  {b:<{value_width}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


@contextmanager
def child(target, *args):
    """A forked helper process with a command pipe, told "stop" on exit. Forked before this
    process starts any thread, and kept apart so that its work shares no GIL with the
    stand-in API."""
    context = multiprocessing.get_context("fork")
    parent, end = context.Pipe()
    process = context.Process(target=target, args=(end, *args), daemon=True)
    process.start()
    try:
        yield parent
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()
