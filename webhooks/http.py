"""The HTTP layer: the only module that imports Flask. Decode -> decide -> encode."""

from __future__ import annotations

import time

import orjson
from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webhooks.admission import dispatch, review
from webhooks.service import Service

blueprint = Blueprint("stunner_guard", __name__)
DISCARD_OVERSIZED_FACTOR = 4


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
        service.metrics.bad_requests.labels(webhook, "413").inc()
        if request.content_length <= DISCARD_OVERSIZED_FACTOR * limit:
            while request.stream.read(1 << 16):
                pass
        return _plain(413, f"body of {request.content_length} bytes exceeds the {limit}-byte limit")
    body = _read_body(limit)
    try:
        req = review.parse(body, limit)
    except review.BadReview as err:
        service.metrics.bad_requests.labels(webhook, str(err.status)).inc()
        return _plain(err.status, err.reason)
    verdict = dispatch.decide(req, webhook, service)
    answer = review.encode(req.uid, verdict, mutating=webhook == dispatch.MUTATE)
    service.metrics.admission_requests.labels(
        webhook, req.kind, req.operation or "-", verdict.label
    ).inc()
    service.metrics.admission_latency.labels(webhook).observe(time.perf_counter() - started)
    return _json(answer)


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
