# stunner-guard: the admission webhooks and the drain endpoint, served by gunicorn over TLS.
#   docker build -t <registry>/stunner-guard:<tag> .
# The Helm chart (charts/stunner-guard) mounts the certificate and the policy file and sets
# the environment (BIND, PORT, STUNNER_GUARD_*); see gunicorn.conf.py and
# webhooks/settings.py for every variable.
FROM python:3.11-slim

# PYTHONPATH: app.py and webhooks/ are copied, not installed (gunicorn also puts its
# working directory on sys.path before it reads gunicorn.conf.py, which imports webhooks).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# The runtime dependencies, exactly as pinned in pyproject.toml's [project].dependencies
# (no dev extras), in their own layer so code changes do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY app.py gunicorn.conf.py ./
COPY webhooks/ ./webhooks/

# Numeric, so kubelet can check runAsNonRoot; the chart's securityContext uses the same ids.
USER 10001:10001

# Listen on every interface of the container (gunicorn.conf.py defaults to 127.0.0.1 for
# `make run`). HTTPS: /mutate, /validate, /drain/..., /healthz, /readyz, /metrics.
ENV BIND=0.0.0.0 PORT=8443
EXPOSE 8443

# gunicorn.conf.py sets wsgi_app = "app:create_app()" and the worker (webhooks/serving.py).
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
