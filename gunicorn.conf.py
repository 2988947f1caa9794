"""gunicorn configuration shared by `make run`, the end-to-end tests, the benchmark and the
container image. Every value can be overridden by environment variable.

Why gthread: a drain holds its request for up to the pod's grace period (an hour by
default). sync workers are killed once a request outlives --timeout; gthread workers are
not (the heartbeat runs in the worker's main loop). webhooks/serving.py subclasses it: the
request phase under a deadline on the main loop, eviction at worker_connections, a graceful
stop that keeps held drains, and one TLS context reloaded (as a pair) when the certificate
Secret changes, without a restart.

Sizing: every held drain occupies one gthread thread (WSGI is blocking) for as long as it
is held, so the pool is the drain cap (policy ``drain.maxConcurrent``, which answers calls
beyond it with 503 at once) plus threads that only admission and probes can use. A held
drain costs an idle thread (~tens of KiB resident) and nothing else: the metric reads all
run in the drainer's reader process (webhooks/lifecycle/scrape.py), the worker's child. `make bench`
(bench/drain.py) measures 1,000 held drains: resident memory and admission latency with
and without them.
"""

import gc
import os
import resource

from webhooks import logs
from webhooks.serving import MAX_LINGERING
from webhooks.settings import from_env

# The policy file's drain section (the same file the app reads): fail here, before any
# worker starts, when it is invalid.
_drain = from_env().drain

wsgi_app = "app:create_app()"
bind = f"{os.environ.get('BIND', '127.0.0.1')}:{os.environ.get('PORT', '8443')}"
# gthread, with its lingering closes moved off the main loop (webhooks/serving.py).
worker_class = "webhooks.serving.ThreadWorker"
# One process: the drain keeps one pod watch and one waiter per pod per process.
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# Threads no drain can take: admission (the apiserver's webhook calls), probes, /metrics.
admission_threads = int(os.environ.get("GUNICORN_ADMISSION_THREADS", "64"))
threads = int(os.environ.get("GUNICORN_THREADS") or _drain.maxConcurrent + admission_threads)
if threads <= _drain.maxConcurrent:
    raise SystemExit(
        f"GUNICORN_THREADS={threads} leaves no thread for admission once "
        f"drain.maxConcurrent={_drain.maxConcurrent} drains are held; raise it or lower the cap"
    )
# Connections of every kind: held drains, requests in flight, kept-alive idle ones, and ones
# still sending their request (read on the main loop, no thread: webhooks/serving.py). At
# the limit a new connection evicts the oldest one still sending its request. Room for
# thousands of hostile half-open connections beside the real ones: measured, an idle TLS
# connection costs the worker about 30 KiB.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS") or threads + 4000)
# Held drains never reach this: gthread's heartbeat runs in the worker's main loop, not in
# the request threads. It only catches a worker whose main loop is stuck.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# After SIGTERM the worker keeps serving and keeps every held drain until it ends
# (webhooks/serving.py); this is its hard limit, a few seconds before which the drains
# still held are answered "stopped". The chart sets it above the longest drain the policy
# allows (rules.gracePeriod.max), and the pod's terminationGracePeriodSeconds above that.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# The apiserver reuses connections to webhooks.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
certfile = os.environ.get("STUNNER_GUARD_CERT_FILE", "certs/tls.crt")
keyfile = os.environ.get("STUNNER_GUARD_KEY_FILE", "certs/tls.key")
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
# LOG_FORMAT=text|json: one line per event, for people or for a log pipeline (webhooks/logs.py).
log_format = logs.log_format()
# gunicorn >= 25 opens a control socket under $HOME by default: unused here, it would
# collide between instances and fail on the chart's read-only root filesystem.
control_socket_disable = True

# One file descriptor per connection: make sure worker_connections can be reached (the soft
# limit is often 1024 outside containers).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# + one kept-alive metrics connection per held drain, closing connections still lingering
# (serving.MAX_LINGERING), the API client, logs.
_wanted = worker_connections + _drain.maxConcurrent + MAX_LINGERING + 256
if _soft != resource.RLIM_INFINITY and _soft < _wanted:
    _raised = _wanted if _hard == resource.RLIM_INFINITY else min(_wanted, _hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_raised, _hard))


def on_starting(server) -> None:
    """The master, before it forks the worker: the service and gunicorn log in one format."""
    logs.configure(log_format, loglevel)


def post_worker_init(worker) -> None:
    """The app is loaded: start its background loops (pod watch, drain loop, census: a
    census must run from worker start, not from the first drain call). What exists now
    (modules, the kubernetes client's models, the policy) lives as long as the worker.
    Freezing it keeps the cyclic GC's full collections from rescanning it: measured, one
    took 39 ms of a loaded worker, every request in flight waiting on it."""
    if worker.service is not None:  # the worker found it (None: the benchmark's baseline)
        worker.service.start()
    gc.freeze()
