"""gunicorn configuration shared by `make run`, the end-to-end tests, the benchmark and the
container image. Every value can be overridden by environment variable.

Why gthread: a drain holds its request for up to the pod's grace period (an hour by
default). sync workers are killed once a request outlives --timeout; gthread workers are
not (the heartbeat runs in the worker's main loop), and gthread builds the TLS context per
accepted connection, so a rotated certificate Secret is used without a restart.
"""

import os

wsgi_app = "app:create_app()"
bind = f"{os.environ.get('BIND', '127.0.0.1')}:{os.environ.get('PORT', '8443')}"
worker_class = "gthread"
# One process: the drain keeps one pod watch and one waiter per pod per process.
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
threads = int(os.environ.get("GUNICORN_THREADS", "64"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# The apiserver reuses connections to webhooks.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
certfile = os.environ.get("STUNNER_GUARD_CERT_FILE", "certs/tls.crt")
keyfile = os.environ.get("STUNNER_GUARD_KEY_FILE", "certs/tls.key")
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
# gunicorn >= 25 opens a control socket under $HOME by default: unused here, it would
# collide between instances and fail on the chart's read-only root filesystem.
control_socket_disable = True
