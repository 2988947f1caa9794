"""Logs a platform team can use: one line per event, time and level, text or JSON, bounded,
and never a request body or stunnerd's /status. The end-to-end test reads the real
server's log as kubelet collects it (stderr)."""

from __future__ import annotations

import http.client
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import POD_REVIEW
from tests.test_drain_e2e import _unverified, kubelet_get
from tests.test_drain_e2e import guard as guard  # noqa: F401, PLC0414  (the fixture)
from webhooks import logs


def record(message: str = "drain of %s: %s", *args, **extra) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": "webhooks.x", "levelname": "INFO", "msg": message, "args": args or ("a", "b")}
    )
    made.__dict__.update(extra)
    return made


def test_a_json_line_carries_time_level_logger_message_and_the_fields():
    line = json.loads(logs.JSONFormatter().format(record(pod="media/p", outcome="drained")))
    assert line["level"] == "INFO" and line["logger"] == "webhooks.x"
    assert line["message"] == "drain of a: b"
    assert (line["pod"], line["outcome"]) == ("media/p", "drained")
    assert line["time"].endswith("Z") and "T" in line["time"]


def test_a_text_line_is_one_line_with_key_value_fields():
    text = logs.TextFormatter().format(record("x %s", "two\nlines", pod="media/p"))
    assert "\n" not in text and text.endswith("webhooks.x: x two lines pod=media/p")


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JSONFormatter()])
def test_no_line_is_longer_than_the_limit_whatever_it_carries(formatter):
    huge = "x" * 100_000
    for made in (record("%s", huge), record("m %s", "a", pod=huge)):
        text = formatter.format(made)
        assert len(text) <= logs.MAX_LINE_CHARS
    if isinstance(formatter, logs.JSONFormatter):
        assert json.loads(formatter.format(record("m %s", "a", pod=huge)))["message"] == "m a"


def test_the_throttle_lets_a_burst_through_then_counts_what_it_leaves_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("webhooks.logs.time.monotonic", lambda: now[0])
    throttle = logs.Throttle(per_second=2)
    assert [throttle.take() for _ in range(5)] == [0, 0, None, None, None]
    now[0] += 1.0
    assert throttle.take() == 3  # three left out before this one
    assert throttle.take() == 0


def test_an_unknown_log_format_stops_startup():
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.log_format({"LOG_FORMAT": "xml"})


def _lines(log_path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.e2e
@pytest.mark.parametrize("guard", [{"LOG_FORMAT": "json"}], indirect=True)
def test_the_server_logs_each_drain_refusal_and_api_failure_in_one_json_line(guard):
    path, target = guard.terminating_pod(0, allocations=2)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(kubelet_get, guard.base, path)
        assert target.wait_for_scrapes(2)
        target.allocations = 0
        assert call.result(timeout=5)[1]["outcome"] == "drained"
    # A refused body whose contents must not reach the log.
    port = int(guard.base.rsplit(":", 1)[1])
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=_unverified())
    secret = b'{"apiVersion": "v0", "kind": "AdmissionReview", "x": "%s"}' % (b"y" * 50_000)
    connection.request("POST", "/mutate", body=secret, headers={"Content-Type": "application/json"})
    assert connection.getresponse().read() and connection.close() is None
    # An API failure: the stand-in API goes away, a drain lookup needs it.
    guard.api.stop()
    kubelet_get(guard.base, f"/drain/media/{'0' * 16}")
    time.sleep(0.5)
    lines = _lines(guard.process.log)
    drain = [line for line in lines if line.get("outcome") == "drained"]
    assert len(drain) == 1
    assert drain[0]["pod"] == "media/udp-gateway-0" and drain[0]["allocations"] == 0
    assert drain[0]["seconds"] > 0 and drain[0]["level"] == "INFO"
    refused = [line for line in lines if line["message"].startswith("refused a body")]
    assert refused and refused[0]["status"] == 400 and refused[0]["client"] == "127.0.0.1"
    assert any(line["message"].startswith("Kubernetes API ") for line in lines)
    text = guard.process.log.read_text()
    assert "y" * 100 not in text
    assert all(len(line) <= logs.MAX_LINE_CHARS for line in text.splitlines())
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


@pytest.mark.e2e
def test_every_line_of_the_default_text_log_has_a_time_and_a_level(guard):
    """Default text format: every line of the service and of gunicorn is one timestamped
    line with a level (no Flask default handler, no gunicorn bracket format)."""
    review = POD_REVIEW.read_bytes()
    connection = http.client.HTTPSConnection(
        "127.0.0.1", int(guard.base.rsplit(":", 1)[1]), context=_unverified()
    )
    connection.request("POST", "/mutate", body=b"not json", headers={})
    connection.getresponse().read()
    connection.request("POST", "/mutate", body=review, headers={})
    connection.getresponse().read()
    connection.close()
    time.sleep(0.3)
    lines = guard.process.log.read_text().splitlines()[1:]  # gunicorn's first, pre-config line
    assert lines and all(
        line[:4].isdigit() and line[10] == "T" and (" INFO " in line or " WARNING " in line)
        for line in lines
    ), lines


def test_gunicorns_invalid_request_lines_are_throttled_and_others_are_not(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("webhooks.logs.time.monotonic", lambda: now[0])
    only = logs.ThrottleFilter("Invalid request from", per_second=2)
    invalid = [record("Invalid request from ip=10.0.0.1: x %s", "y") for _ in range(5)]
    assert [only.filter(r) for r in invalid] == [True, True, False, False, False]
    assert all(only.filter(record("Booting worker %s", "1")) for _ in range(5))


def test_a_field_with_a_newline_keeps_the_text_line_one_line():
    text = logs.TextFormatter().format(record(pod="media/tok\n", outcome="not found"))
    assert "\n" not in text
    assert text.endswith("pod='media/tok\\n' outcome='not found'")
