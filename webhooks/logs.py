"""Logging for the service: one line per event, with time and level, as text or JSON.

    LOG_FORMAT=text  2026-11-30T02:34:22.123Z INFO webhooks.lifecycle.drain: drain media/...
    LOG_FORMAT=json  {"time": "...", "level": "INFO", "logger": "...", "message": "...",
                      "pod": "media/udp-gateway-x", "outcome": "drained", ...}

gunicorn.conf.py calls ``configure()``, so gunicorn's own lines (worker boots, signals) and
the service's share one format on stderr, where kubelet collects them. Fields passed as
``extra={...}`` become JSON keys (and ``key=value`` pairs in text), so a log pipeline can
filter drains by outcome without parsing sentences.

What is never logged: a request body, stunnerd's ``/status`` (it holds credentials and
keys), a metrics page. Every line is cut to ``MAX_LINE_CHARS``: a hostile path, header or
exception message cannot make a line longer than that.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time

import orjson

FORMATS = ("text", "json")
# No request may produce a log line longer than a few KB (README "Logs").
MAX_LINE_CHARS = 2048
# What logging.LogRecord itself carries: everything else on a record came from extra={...}.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LINE_CHARS else text[: MAX_LINE_CHARS - 3] + "..."


def _extra(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    # One line: a message never spans lines (tracebacks are not logged, see http.App).
    return " ".join(record.getMessage().split())


def _field(value: object) -> str:
    """A field value on a text line: quoted when it has spaces or control characters (a
    drain path's token may carry a newline), so that a line stays one line."""
    text = str(value)
    return text if text.isprintable() and " " not in text else repr(text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {k}={_field(v)}" for k, v in _extra(record).items())
        return _cut(f"{_time(record)} {record.levelname} {record.name}: {_message(record)}{fields}")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        for key, value in _extra(record).items():
            line.setdefault(key, value if isinstance(value, int | float | bool) else str(value))
        text = orjson.dumps(line, default=str).decode()
        # Too long: the fields go first, then the message is cut (escapes can double it).
        if len(text) > MAX_LINE_CHARS:
            line = {k: line[k] for k in ("time", "level", "logger", "message")}
            text = orjson.dumps(line).decode()
        keep = MAX_LINE_CHARS
        while len(text) > MAX_LINE_CHARS:
            keep //= 2
            line["message"] = line["message"][:keep] + "..."
            text = orjson.dumps(line).decode()
        return text


class Throttle:
    """At most ``per_second`` lines a second (after a burst as large) for one kind of event
    a hostile client can cause at will (refused bodies, API failures under an outage); the
    lines left out are counted and reported on the next one that goes out."""

    def __init__(self, per_second: float = 10.0) -> None:
        self.per_second = per_second
        self._tokens = per_second
        self._refilled = time.monotonic()
        self._lock = threading.Lock()
        self.suppressed = 0

    def take(self) -> int | None:
        """None: leave this line out. Else how many were left out before it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(
                self.per_second, self._tokens + (now - self._refilled) * self.per_second
            )
            self._refilled = now
            if self._tokens < 1:
                self.suppressed += 1
                return None
            self._tokens -= 1
            left_out, self.suppressed = self.suppressed, 0
            return left_out

    def log(self, logger: logging.Logger, level: int, msg: str, *args, **fields) -> None:
        """``logger.log(level, msg, *args)`` with ``fields`` as extra and the count left
        out before it (``left_out``), when the allowance has room; else nothing."""
        left_out = self.take()
        if left_out is not None:
            logger.log(level, msg, *args, extra={**fields, "left_out": left_out})


def log_format(env: dict[str, str] | None = None) -> str:
    value = (env if env is not None else os.environ).get("LOG_FORMAT") or "text"
    if value not in FORMATS:
        raise ValueError(f"LOG_FORMAT: {value!r} is not one of {'|'.join(FORMATS)}")
    return value


def configure(fmt: str, level: str = "info") -> None:
    """One handler on stderr, in ``fmt``, for the service's loggers (the root logger) and
    gunicorn's own (which do not propagate). gunicorn.conf.py calls it in the master before
    the worker is forked, so the worker and the Flask app inherit it (Flask adds no handler
    of its own when the root logger has one)."""
    formatter = JSONFormatter() if fmt == "json" else TextFormatter()
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
    # gunicorn logs every request it cannot parse ("Invalid request from ip=..."): any
    # client can make those at will.
    logging.getLogger("gunicorn.error").addFilter(ThrottleFilter("Invalid request from"))


class ThrottleFilter(logging.Filter):
    """Lets through at most ``per_second`` records a second whose message starts with
    ``prefix`` (the rest pass as they are)."""

    def __init__(self, prefix: str, per_second: float = 10.0) -> None:
        super().__init__()
        self.prefix = prefix
        self.throttle = Throttle(per_second)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        return self.throttle.take() is not None
