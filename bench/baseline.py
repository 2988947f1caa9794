"""The benchmark's baseline: an allow-all AdmissionReview webhook with nothing else in it.

Served by the same gunicorn.conf.py as the guard (``gunicorn --config gunicorn.conf.py
'bench.baseline:create_app()'``), it reads and parses the same request body and answers
a minimal allowed review, so the guard's throughput over it is the cost of its policy.
"""

from __future__ import annotations

import json

from flask import Flask, Response, jsonify, request


def create_app() -> Flask:
    app = Flask("stunner_guard_baseline")

    @app.post("/mutate")
    @app.post("/validate")
    def admit() -> Response:
        review = json.loads(request.get_data())
        answer = {
            "apiVersion": review["apiVersion"],
            "kind": review["kind"],
            "response": {"uid": review["request"]["uid"], "allowed": True},
        }
        return jsonify(answer)

    @app.get("/readyz")
    def readyz() -> Response:
        return Response("ready\n", mimetype="text/plain")

    return app
