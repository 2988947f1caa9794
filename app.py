"""WSGI entry point: ``gunicorn 'app:create_app()'`` (see gunicorn.conf.py)."""

from __future__ import annotations

from flask import Flask

from webhooks import kube as kube_module
from webhooks.http import App, blueprint
from webhooks.service import Service
from webhooks.settings import Settings, from_env

_UNSET = object()


def create_app(settings: Settings | None = None, kube=_UNSET) -> Flask:
    """Build the service. ``settings`` default to the environment (and the policy file it
    names); ``kube`` defaults to in-cluster config, else the local kubeconfig, else none
    (admission works without a cluster)."""
    settings = settings or from_env()
    if kube is _UNSET:
        kube = kube_module.connect(settings.kubeTimeoutSeconds)
    app = App("stunner_guard")
    app.extensions["stunner_guard"] = Service(settings, kube)
    app.register_blueprint(blueprint)
    return app
