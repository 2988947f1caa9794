"""The HTTP layer: the only module that imports Flask. Decode -> decide -> encode."""

from __future__ import annotations

import logging
import time
from pathlib import PurePath

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webhooks import logs
from webhooks import metrics as metric_labels
from webhooks.admission import dispatch, review
from webhooks.service import DECODING_WAIT_SECONDS, Service
from webhooks.settings import DISCARD_OVERSIZED_FACTOR

log = logging.getLogger(__name__)
blueprint = Blueprint("stunner_guard", __name__)
# The ``kind`` label: a kind the guard handles (Pod, Deployment, Dataplane,
# HorizontalPodAutoscaler) in its own API group, else "other" (metrics.py: labels come
# from closed sets, never from the request).
HANDLED_KINDS = {(group, kind): kind for group, kind in dispatch.HANDLERS}
# An unexpected exception is logged in one line of at most about this many characters.
LOGGED_MESSAGE_CHARS = 500
LOGGED_PATH_CHARS = 200


class App(Flask):
    """Flask, logging an unexpected exception in one bounded line. Flask's own
    log_exception writes the whole traceback: a RecursionError wrote ~3,000 lines per
    request, so any client could fill the node's disk and bury every other log line."""

    def log_exception(self, exc_info) -> None:
        # A bug, but one a client may be able to trigger at will: at most a line a second.
        _exceptions_logged.log(self.logger, logging.ERROR, "%s", one_line(exc_info))


def one_line(exc_info) -> str:
    """``POST /mutate failed: RecursionError: maximum recursion depth exceeded (at
    admission/rules/common.py:31 in _copy)``: the type, the message cut, the innermost
    frame; no traceback."""
    kind, error, trace = exc_info
    where = ""
    if trace is not None:
        while trace.tb_next is not None:
            trace = trace.tb_next
        code = trace.tb_frame.f_code
        where = f" (at {'/'.join(PurePath(code.co_filename).parts[-3:])}:{trace.tb_lineno}"
        where += f" in {code.co_name})"
    message = " ".join(str(error).split())
    if len(message) > LOGGED_MESSAGE_CHARS:
        message = message[: LOGGED_MESSAGE_CHARS - 3] + "..."
    path = request.path[:LOGGED_PATH_CHARS]
    name = kind.__name__ if kind is not None else "error"
    return f"{request.method} {path} failed: {name}: {message}{where}"


def _service() -> Service:
    return current_app.extensions["stunner_guard"]


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")


def _json(body, status: int = 200) -> Response:
    # orjson, as for reviews: 5 us a drain answer where Flask's jsonify took 21.
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def _admit(webhook: str) -> Response:
    service = _service()
    started = time.perf_counter()
    limit = service.settings.maxBodyBytes
    # Refuse oversized bodies before parsing them. A client that is still sending when the
    # connection closes sees a reset instead of the 413, so a body up to a few times the
    # limit is read and dropped first; anything larger is cut off.
    if request.content_length is not None and request.content_length > limit:
        if request.content_length <= DISCARD_OVERSIZED_FACTOR * limit:
            while request.stream.read(1 << 16):
                pass
        reason = f"body of {request.content_length} bytes exceeds the {limit}-byte limit"
        return _refuse(service, webhook, 413, reason)
    body = _read_body(limit)
    if not service.decoding.take(len(body), DECODING_WAIT_SECONDS):
        why = f"busy: {service.decoding.taken} bytes of reviews being decided; retry"
        return _refuse(service, webhook, 503, why)
    try:
        req = review.parse(body, limit)
        # The rules refuse (TooDeep) an object nested too deeply to walk.
        verdict = dispatch.decide(req, webhook, service)
        answer = review.encode(req.uid, verdict, mutating=webhook == dispatch.MUTATE)
    except review.BadReview as err:
        return _refuse(service, webhook, err.status, err.reason)
    finally:
        service.decoding.give(len(body))
    service.metrics.admission_requests.labels(
        webhook,
        HANDLED_KINDS.get((req.group, req.kind), metric_labels.OTHER),
        metric_labels.closed(req.operation, metric_labels.OPERATIONS),
        verdict.label,
    ).inc()
    service.metrics.admission_latency.labels(webhook).observe(time.perf_counter() - started)
    return _json(answer)


_exceptions_logged = logs.Throttle(per_second=1)
# Refused bodies are logged (one line each: status, reason, client), at most this many a
# second; any client can send them at will.
_refusals_logged = logs.Throttle(per_second=10)


def _refuse(service: Service, webhook: str, status: int, reason: str) -> Response:
    """A body that is not an AdmissionReview this service can answer: counted, logged,
    answered with the reason in plain text."""
    service.metrics.bad_requests.labels(webhook, str(status)).inc()
    _refusals_logged.log(
        log,
        logging.INFO,
        "refused a body on /%s: %s %s",
        webhook,
        status,
        reason,
        client=request.remote_addr,
        status=status,
    )
    return _plain(status, reason)


def _read_body(limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the body: its declared length, or pieces of a chunked
    one. werkzeug's stream.read(n) allocates n bytes up front, and reading ``limit + 1``
    at once cost a 3 MiB buffer (an mmap and a munmap) per review of a few KiB."""
    if request.content_length is not None:
        return request.stream.read(request.content_length)
    chunks, size = [], 0
    while size <= limit:
        chunk = request.stream.read(min(1 << 16, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@blueprint.post("/mutate")
def mutate() -> Response:
    return _admit(dispatch.MUTATE)


@blueprint.post("/validate")
def validate() -> Response:
    return _admit(dispatch.VALIDATE)


@blueprint.get("/drain/<namespace>/<token>")
def drain(namespace: str, token: str) -> Response:
    """kubelet's preStop httpGet: held until the pod's allocations are gone (drain.py)."""
    if request.method == "HEAD":
        # Flask serves HEAD with the GET view; a probe must not start (and hold) a drain.
        return _plain(405, "HEAD does not drain; the preStop hook sends GET")
    answer = _service().drainer.drain(namespace, token)
    return _json(answer.body(), answer.status)


@blueprint.get("/drains")
def drains() -> Response:
    return _json(_service().drainer.in_progress())


@blueprint.get("/census")
def census() -> Response:
    """The census: each running stunnerd pod's allocations and pod-deletion-cost."""
    return _json(_service().census.snapshot())


@blueprint.get("/healthz")
def healthz() -> Response:
    return _plain(200, "ok")


@blueprint.get("/readyz")
def readyz() -> Response:
    reason = _service().not_ready_reason()
    return _plain(503, f"not ready: {reason}") if reason else _plain(200, "ready")


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(_service().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@blueprint.app_errorhandler(405)
def method_not_allowed(err) -> Response:
    return _plain(405, f"{request.method} is not allowed on {request.path}")


@blueprint.app_errorhandler(404)
def not_found(err) -> Response:
    return _plain(404, f"no endpoint at {request.path}")


@blueprint.app_errorhandler(500)
def internal_error(err) -> Response:
    """A bug, logged by App.log_exception; the client gets a short reason, not a page."""
    return _plain(500, "stunner-guard failed on this request (a bug; see its log)")
