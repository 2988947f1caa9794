"""The observability pack: certificate metrics, the drain's capacity, watch and deadline
metrics, the alert rules (charts/stunner-guard/files/prometheus-rules.yaml) and the Grafana
dashboard (charts/stunner-guard/files/grafana-dashboard.json).

The rules and every dashboard query are checked by Prometheus' own promtool (Debian package
`prometheus`; `.ci/run` installs it): `promtool check rules` parses them, `promtool test
rules` runs tests/prometheus/*.test.yaml, which feed series and say when each alert fires
and when it stays quiet. The metric names they use are read with promql-parser (a PromQL
parser, for walking the expressions; promtool has no command that lists them) and must be
on the guard's real /metrics page or in APISERVER_METRICS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import promql_parser
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from observability import dashboard
from tests.conftest import POD_REVIEW, load_json
from tests.test_drain import FAST, NS, api, calls, cluster  # noqa: F401  (fixtures)
from webhooks import certs
from webhooks.kube import Kube
from webhooks.lifecycle.drain import STATUS, Drainer
from webhooks.metrics import Metrics
from webhooks.settings import Settings, from_env

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "charts" / "stunner-guard" / "files"
RULES = FILES / "prometheus-rules.yaml"
DASHBOARD = FILES / "grafana-dashboard.json"
RULE_TESTS = sorted((Path(__file__).parent / "prometheus").glob("*.test.yaml"))

# The kube-apiserver's admission metrics, as it exposes them: k8s.io/apiserver
# pkg/admission/metrics/metrics.go (namespace "apiserver", subsystem "admission"; component-base
# metrics add no _total suffix, so the *_count counters keep their names). Histograms expose
# _bucket, _sum and _count; the step summary exposes its name, _sum and _count.
APISERVER_METRICS = frozenset(
    [
        f"apiserver_admission_{name}{suffix}"
        for name in (
            "step_admission_duration_seconds",
            "controller_admission_duration_seconds",
            "webhook_admission_duration_seconds",
            "match_condition_evaluation_seconds",
        )
        for suffix in ("_bucket", "_sum", "_count")
    ]
    + [
        f"apiserver_admission_step_admission_duration_seconds_summary{suffix}"
        for suffix in ("", "_sum", "_count")
    ]
    + [
        "apiserver_admission_webhook_rejection_count",
        "apiserver_admission_webhook_fail_open_count",
        "apiserver_admission_webhook_request_total",
        "apiserver_admission_match_condition_evaluation_errors_total",
        "apiserver_admission_match_condition_exclusions_total",
    ]
)
# Prometheus writes `up` for every target it scrapes.
PROMETHEUS_METRICS = frozenset(["up"])


# --------------------------------------------------------------------------- helpers


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None):
    """promtool's answer; its stdout and stderr in one stream, in the order written (it
    reports a file on one and that file's failures on the other)."""
    return subprocess.run(
        [promtool, *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )


def samples(page: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def sample_names(page: str) -> set[str]:
    return {name for name, _ in samples(page)}


def rules_document() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in rules_document()["groups"] for r in g["rules"]}


# Grafana's own variables are not PromQL: give them a duration for parsing.
GRAFANA_VARIABLES = re.compile(r"\$__(rate_interval|interval|range)\b")
# label_replace's references to its regex's groups ("$1"): PromQL, and no Grafana variable
# (Grafana leaves a $name it does not know as it is).
GROUP_REFERENCE = re.compile(r"\$[0-9]+\b")


def dashboard_queries() -> list[str]:
    def panels(nodes):
        for node in nodes:
            yield node
            yield from panels(node.get("panels", []))

    found = [
        target["expr"]
        for panel in panels(json.loads(DASHBOARD.read_text())["panels"])
        for target in panel.get("targets", [])
    ]
    assert found, "the dashboard has no queries"
    return found


def as_promql(expr: str) -> str:
    promql = GRAFANA_VARIABLES.sub("5m", expr)
    assert "$" not in GROUP_REFERENCE.sub("", promql), (
        f"a dashboard variable PromQL cannot parse: {expr}"
    )
    return promql


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name cannot be checked: {expr}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


# --------------------------------------------------------------------------- certificates


class KubeletSecret:
    """A Secret volume as kubelet writes it (AtomicWriter): the files live in a timestamped
    directory, ``..data`` links to it, and each key is a link through ``..data``. An update
    writes a new directory and swaps ``..data`` with one rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def write(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        payload = self.root / f"..2026_11_30_00_00_00.{self.generation:09d}"
        payload.mkdir()
        for name, data in files.items():
            (payload / name).write_bytes(data)
        old = os.readlink(self.root / "..data") if (self.root / "..data").exists() else None
        os.symlink(payload.name, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")
        for link in self.root.iterdir():  # keys the Secret no longer has
            if not link.name.startswith("..") and link.name not in files:
                link.unlink()
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old:
            shutil.rmtree(self.root / old)


def not_after(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def certificate_samples(client) -> dict[str, dict[str, float]]:
    page = client.get("/metrics")
    assert page.status_code == 200
    found = samples(page.text)
    return {
        metric: {
            dict(labels)["certificate"]: value
            for (name, labels), value in found.items()
            if name == metric
        }
        for metric in (
            "stunner_guard_certificate_expiry_timestamp_seconds",
            "stunner_guard_certificate_readable",
        )
    }


@pytest.fixture
def secret(tmp_path):
    mounted = KubeletSecret(tmp_path / "tls")
    mounted.write(certs.generate(days=30))
    return mounted


def app_for(secret: KubeletSecret):
    settings = from_env(
        {
            "STUNNER_GUARD_CERT_FILE": str(secret.root / "tls.crt"),
            "STUNNER_GUARD_KEY_FILE": str(secret.root / "tls.key"),
            "STUNNER_GUARD_DRAIN_HOST": "10.96.0.10",
        }
    )
    return create_app(settings, kube=None)


def test_the_ca_file_defaults_to_ca_crt_next_to_the_certificate():
    settings = from_env({"STUNNER_GUARD_CERT_FILE": "/etc/stunner-guard/tls/tls.crt"})
    assert settings.caFile == "/etc/stunner-guard/tls/ca.crt"
    settings = from_env({"STUNNER_GUARD_CA_FILE": "/etc/ca/bundle.pem"})
    assert settings.caFile == "/etc/ca/bundle.pem"
    assert Path(from_env({}).caFile) == REPO / "certs" / "ca.crt"


def test_the_certificate_expiry_follows_a_secret_kubelet_updates(secret):
    client = app_for(secret).test_client()
    first = {n: (secret.root / n).read_bytes() for n in ("tls.crt", "ca.crt")}
    assert certificate_samples(client) == {
        "stunner_guard_certificate_expiry_timestamp_seconds": {
            "serving": not_after(first["tls.crt"]),
            "ca": not_after(first["ca.crt"]),
        },
        "stunner_guard_certificate_readable": {"serving": 1.0, "ca": 1.0},
    }
    secret.write(certs.generate(days=400))  # renewed, as cert-manager or helm upgrade do
    renewed = {n: (secret.root / n).read_bytes() for n in ("tls.crt", "ca.crt")}
    expiry = certificate_samples(client)["stunner_guard_certificate_expiry_timestamp_seconds"]
    assert expiry == {"serving": not_after(renewed["tls.crt"]), "ca": not_after(renewed["ca.crt"])}
    assert expiry["serving"] - not_after(first["tls.crt"]) > 369 * 86400


def test_a_certificate_file_is_parsed_again_only_when_it_changes(secret, monkeypatch):
    parsed: list[int] = []
    real = certs.expiry_timestamps

    def counting(pem: bytes) -> list[float]:
        parsed.append(len(pem))
        return real(pem)

    monkeypatch.setattr(certs, "expiry_timestamps", counting)
    client = app_for(secret).test_client()
    for _ in range(3):
        certificate_samples(client)
    assert len(parsed) == 2  # tls.crt and ca.crt, once each
    secret.write(certs.generate(days=60))
    certificate_samples(client)
    certificate_samples(client)
    assert len(parsed) == 4


UNREADABLE = {
    "missing": None,
    "empty": b"",
    "not PEM": b"ca.crt was here\n",
    "PEM of a key": certs.generate()["ca.key"],
    "broken certificate": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "over 1 MiB": b"-----BEGIN CERTIFICATE-----\n" + b"A" * (1 << 20) + b"\n",
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_ca_file_drops_its_expiry_and_the_scrape_goes_on(secret, case):
    good = certs.generate(days=30)
    files = dict(good)
    if UNREADABLE[case] is None:
        del files["ca.crt"]
    else:
        files["ca.crt"] = UNREADABLE[case]
    secret.write(files)
    client = app_for(secret).test_client()
    found = certificate_samples(client)
    assert found["stunner_guard_certificate_readable"] == {"serving": 1.0, "ca": 0.0}
    assert found["stunner_guard_certificate_expiry_timestamp_seconds"] == {
        "serving": not_after(good["tls.crt"])
    }
    # Fixed by the next Secret update: read again.
    secret.write(good)
    found = certificate_samples(client)
    assert found["stunner_guard_certificate_readable"] == {"serving": 1.0, "ca": 1.0}
    assert found["stunner_guard_certificate_expiry_timestamp_seconds"]["ca"] == not_after(
        good["ca.crt"]
    )


def test_the_serving_file_counts_its_leaf_and_a_ca_bundle_its_earliest_ca(secret):
    leaf = certs.generate(days=400)
    old_ca, new_ca = certs.generate(days=20)["ca.crt"], certs.generate(days=700)["ca.crt"]
    # A chain after the leaf (an intermediate expiring first) does not count as the
    # serving certificate; a CA bundle mid-rotation counts its first expiry.
    secret.write(
        {
            "tls.crt": leaf["tls.crt"] + old_ca,
            "tls.key": leaf["tls.key"],
            "ca.crt": new_ca + old_ca,
        }
    )
    expiry = certificate_samples(app_for(secret).test_client())[
        "stunner_guard_certificate_expiry_timestamp_seconds"
    ]
    assert expiry == {"serving": not_after(leaf["tls.crt"]), "ca": not_after(old_ca)}


# --------------------------------------------------------------------------- drain metrics


def test_every_drain_outcome_is_exported_at_zero_from_the_start():
    # increase() cannot count a series' first sample: an outcome series that appeared only
    # with the first deadline drain would never raise StunnerGuardDrainDeadline.
    metrics = Metrics()
    drainer = Drainer(Settings(), None, metrics)
    try:
        for outcome in STATUS:
            value = metrics.registry.get_sample_value(
                "stunner_guard_drain_outcomes_total", {"outcome": outcome}
            )
            assert value == 0, outcome
    finally:
        drainer.close()


def test_held_calls_capacity_and_the_pod_watch_state_are_exported(cluster, calls):  # noqa: F811
    pod = cluster.pod("udp-gateway-abc", allocations=3)
    drainer = cluster.drainer(maxConcurrent=5)
    registry = drainer.metrics.registry

    def value(name: str) -> float | None:
        return registry.get_sample_value(name)

    assert value("stunner_guard_drain_capacity") == 5
    assert value("stunner_guard_drain_calls_held") == 0
    assert value("stunner_guard_pod_watch_connected") is None  # not started yet
    first = calls.submit(drainer.drain, NS, pod.token)
    repeated = calls.submit(drainer.drain, NS, pod.token)  # kubelet may deliver twice
    assert cluster.api.wait_until(lambda: value("stunner_guard_drain_calls_held") == 2)
    assert cluster.api.wait_until(lambda: value("stunner_guard_drains_in_progress") == 1)
    assert cluster.api.wait_until(lambda: value("stunner_guard_pod_watch_connected") == 1)
    cluster.api.stop()
    assert cluster.api.wait_until(lambda: value("stunner_guard_pod_watch_connected") == 0)
    cluster.api.start()
    assert cluster.api.wait_until(lambda: value("stunner_guard_pod_watch_connected") == 1)
    pod.target.allocations = 0
    assert first.result(timeout=5).outcome == repeated.result(timeout=5).outcome == "drained"
    assert value("stunner_guard_drain_calls_held") == 0


def test_a_deadline_drain_records_the_allocations_it_left(cluster, calls):  # noqa: F811
    drained = cluster.pod("udp-gateway-empty", allocations=0)
    drainer = cluster.drainer()
    assert drainer.drain(NS, drained.token).outcome == "drained"
    cut = cluster.pod("udp-gateway-cut", allocations=7, grace=3)
    call = calls.submit(drainer.drain, NS, cut.token)
    assert cluster.held(drainer, cut, 7)  # read before the deadline
    assert call.result(timeout=5).outcome == "deadline"
    registry = drainer.metrics.registry
    assert registry.get_sample_value("stunner_guard_drain_allocations_left_count") == 1
    assert registry.get_sample_value("stunner_guard_drain_allocations_left_sum") == 7
    assert (
        registry.get_sample_value("stunner_guard_drain_allocations_left_bucket", {"le": "5.0"}) == 0
    )
    assert (
        registry.get_sample_value("stunner_guard_drain_allocations_left_bucket", {"le": "10.0"})
        == 1
    )


def test_ready_mirrors_readyz(client):
    assert samples(client.get("/metrics").text)[("stunner_guard_ready", frozenset())] == 1
    assert client.get("/readyz").status_code == 200
    unready = create_app(Settings(serviceName="stunner-guard"), kube=None).test_client()
    assert unready.get("/readyz").status_code == 503
    assert samples(unready.get("/metrics").text)[("stunner_guard_ready", frozenset())] == 0


# --------------------------------------------------------------------------- alert rules


def test_promtool_accepts_the_rules_file(promtool):
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@pytest.mark.parametrize("tests_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(promtool, tests_file):
    result = run_promtool(promtool, "test", "rules", tests_file.name, cwd=tests_file.parent)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout


def _alert_tests() -> dict[str, list[tuple[Path, bool]]]:
    """alert -> [(test file, whether that check expects it firing)]."""
    found: dict[str, list[tuple[Path, bool]]] = {}
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                found.setdefault(check["alertname"], []).append(
                    (path, bool(check.get("exp_alerts")))
                )
    return found


def test_one_unit_test_file_per_alert_group_and_every_alert_fires_and_stays_quiet():
    groups = {g["name"] for g in rules_document()["groups"]}
    assert {f"stunner-guard-{p.name.removesuffix('.test.yaml')}" for p in RULE_TESTS} == groups
    tested = _alert_tests()
    assert set(tested) == set(alerts())
    for alert, checks in tested.items():
        assert any(firing for _, firing in checks), f"{alert} is never expected to fire"
        assert any(not firing for _, firing in checks), f"{alert} is never expected quiet"


@pytest.mark.parametrize("broken", ["never fires", "always fires"])
def test_the_unit_tests_catch_every_alert_that_misbehaves(promtool, tmp_path, broken):
    """Each alert's expression swapped for one that never (or always) fires must fail its
    group's unit tests: the tests pin down every alert, both ways."""
    tested = _alert_tests()
    test_files = {}
    for alert in sorted(alerts()):
        work = tmp_path / alert
        work.mkdir()
        document = rules_document()
        for group in document["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    rule["expr"] = "vector(1)" if broken == "always fires" else "vector(0) > 1"
        (work / "rules.yaml").write_text(yaml.safe_dump(document))
        (path,) = {p for p, _ in tested[alert]}
        test_doc = yaml.safe_load(path.read_text())
        test_doc["rule_files"] = ["rules.yaml"]
        test_files[alert] = work / path.name
        test_files[alert].write_text(yaml.safe_dump(test_doc))
    # One promtool run for them all; it reports each file under "Unit Testing:  <file>".
    report = run_promtool(promtool, "test", "rules", *test_files.values()).stdout
    verdicts = dict(re.findall(r"Unit Testing:\s+(\S+)\s*\n\s*(SUCCESS|FAILED)", report))
    assert {alert: verdicts.get(str(path)) for alert, path in test_files.items()} == {
        alert: "FAILED" for alert in test_files
    }, report


def test_every_alert_has_a_severity_a_summary_and_a_description():
    for name, rule in alerts().items():
        assert re.fullmatch(r"StunnerGuard[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert len(rule["annotations"]["description"]) > 80, name


def test_rules_and_dashboard_select_exactly_the_charts_webhooks():
    """The apiserver's metrics are filtered by webhook name; the chart's names must match
    and nothing else must."""
    from tests.test_chart import _render_mode, webhooks_of

    names = [hook["name"] for _, hook in webhooks_of(_render_mode("defaults"))]
    selectors = set()
    for expr in [r["expr"] for r in alerts().values()] + dashboard_queries():
        for match in re.finditer(r'name=~"([^"]+)"', expr):
            selectors.add(match.group(1))
    (regex,) = selectors
    pattern = re.compile(regex.encode().decode("unicode_escape"))
    assert all(pattern.fullmatch(name) for name in names), names
    for other in ("validate.kyverno.svc-fail", "stunner-guard.l7mp.io", "x.stunner-guardXl7mp.io"):
        assert not pattern.fullmatch(other), other


# --------------------------------------------------------------------------- dashboard


def test_the_dashboard_file_is_what_its_generator_writes():
    assert DASHBOARD.read_text() == dashboard.render(), "run make dashboard"


def test_every_dashboard_query_parses_with_promtool(promtool, tmp_path):
    queries = dashboard_queries()
    wrapped = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"alert": f"DashboardQuery{n}", "expr": as_promql(q)}
                    for n, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(wrapped))
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    # ... and the check has teeth.
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum by (le (x)"}]}]}
        )
    )
    assert run_promtool(promtool, "check", "rules", path).returncode != 0


@pytest.fixture
def busy_guard_page(cluster, calls, dev_certs) -> str:  # noqa: F811
    """/metrics of a guard that has reviewed, refused a body and drained a pod: every family
    has samples, so the page shows every sample name the guard exports (the certificates'
    too: the test's own, not certs/, which a fresh clone has not made)."""
    pod = cluster.pod("udp-gateway-abc", allocations=0)
    settings = Settings(
        drain=replace(FAST, metricsPort=cluster.port),
        drainHost="10.96.0.10",
        certFile=str(dev_certs / "tls.crt"),
        caFile=str(dev_certs / "ca.crt"),
    )
    app = create_app(settings, kube=Kube.for_host(cluster.api.url, timeout=1.0))
    service = app.extensions["stunner_guard"]
    try:
        client = app.test_client()
        review = load_json(POD_REVIEW)
        assert client.post("/mutate", json=review).status_code == 200
        assert client.post("/validate", json=review).status_code == 200
        assert client.post("/mutate", data=b"{").status_code == 400
        answer = client.get(f"/drain/{NS}/{pod.token}")
        assert answer.json["outcome"] == "drained"
        return client.get("/metrics").text
    finally:
        service.close()


def test_dashboard_and_rules_name_only_metrics_the_guard_or_the_apiserver_exports(
    busy_guard_page,
):
    guard = sample_names(busy_guard_page)
    known = guard | APISERVER_METRICS | PROMETHEUS_METRICS
    used: dict[str, set[str]] = {}
    for expr in [r["expr"] for r in alerts().values()]:
        for name in metric_names(expr):
            used.setdefault(name, set()).add("rules")
    for query in dashboard_queries():
        for name in metric_names(as_promql(query)):
            used.setdefault(name, set()).add("dashboard")
    assert {n: w for n, w in used.items() if n not in known} == {}
    # The page is the guard's real one: it would show a renamed metric.
    assert "stunner_guard_admission_requests_total" in guard
    assert "stunner_guard_pod_watch_connected" in guard
    # Every family the guard exports has a place on the dashboard.
    families = {
        f.name
        for f in text_string_to_metric_families(busy_guard_page)
        if not f.name.endswith("_created")  # prometheus_client's creation times
    }
    shown = {n for n, where in used.items() if "dashboard" in where}
    unshown = {
        family
        for family in families
        if not any(
            name == family or name.removeprefix(family) in ("_total", "_bucket", "_sum", "_count")
            for name in shown
        )
    }
    assert unshown == set()


def test_metric_names_are_read_from_the_parsed_query_not_its_text():
    expr = (
        'sum by (le) (rate(a_bucket{job="x", name=~"b.+"}[5m])) > on() group_left '
        'scalar(c) or absent(up{job="y"} == 1)  # d_total'
    )
    assert metric_names(expr) == {"a_bucket", "c", "up"}
    with pytest.raises(AssertionError, match="without a metric name"):
        metric_names('{__name__=~"stunner_guard_.+"}')


def test_a_grafana_variable_left_in_a_query_is_reported():
    with pytest.raises(AssertionError, match="variable"):
        as_promql("rate(x[$interval])")
    with pytest.raises(AssertionError, match="variable"):
        as_promql('label_replace(x{a="$a1"}, "b", "$1", "a", "(.*)")')
    assert as_promql("increase(x[$__range])") == "increase(x[5m])"
    padded = 'label_replace(x, "cost", "0$1", "cost", "([0-9])")'
    assert as_promql(padded) == padded


def test_the_dashboard_uses_its_datasource_variable_everywhere():
    model = json.loads(DASHBOARD.read_text())
    (variable,) = model["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in model["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs) and all(refs), panel["title"]
    ids = [p["id"] for p in model["panels"]]
    assert len(set(ids)) == len(ids)


def test_the_only_job_the_rules_and_dashboard_name_is_the_one_the_chart_rewrites():
    # The chart rewrites exactly up{job="stunner-guard"} to its own job name: any other
    # job selector would be left behind.
    for path, quote in ((RULES, '"'), (DASHBOARD, '\\"')):
        text = path.read_text()
        exact = f"up{{job={quote}stunner-guard{quote}}}"
        assert text.count("job=") == text.count(exact) > 0, path.name


def test_the_charts_rules_fire_at_the_thresholds_and_job_its_values_set(promtool, tmp_path):
    """The PrometheusRule rendered with other thresholds and chart name, run by promtool:
    what fires at the file's defaults now stays quiet, and the other way round."""
    from tests.test_chart import render

    rendered = render(
        {
            "nameOverride": "guard",
            "prometheusRule": {
                "enabled": True,
                "thresholds": {
                    "admissionP99Seconds": 1.5,
                    "drainCapacityRatio": 0.95,
                    "certificateWarningDays": 45,
                    "certificateCriticalDays": 25,
                    "censusWriteFailureRatio": 0.7,
                    "censusReadFailureRatio": 0.25,
                },
            },
        }
    )
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": rendered.one("PrometheusRule")["spec"]["groups"]})
    )
    guard = 'job="guard", instance="10.0.0.1:8443"'
    latency = "stunner_guard_admission_duration_seconds_bucket"
    unit_tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # p99 0.995 s: above the default 0.5, below 1.5
                    {
                        "series": f'{latency}{{{guard}, webhook="mutate", le="0.5"}}',
                        "values": "0x40",
                    },
                    {
                        "series": f'{latency}{{{guard}, webhook="mutate", le="1.0"}}',
                        "values": "0+100x40",
                    },
                    {
                        "series": f'{latency}{{{guard}, webhook="mutate", le="+Inf"}}',
                        "values": "0+100x40",
                    },
                    # 90% of the drain capacity: above the default 0.8, below 0.95
                    {"series": f"stunner_guard_drain_calls_held{{{guard}}}", "values": "900x40"},
                    {"series": f"stunner_guard_drain_capacity{{{guard}}}", "values": "1000x40"},
                    # 40 days left: quiet at the default 30, a warning at 45, not critical at 25
                    {
                        "series": f'stunner_guard_certificate_expiry_timestamp_seconds{{{guard}, certificate="serving"}}',
                        "values": "3456000x40",
                    },
                    # 60% of census writes fail: above the default 0.5, below 0.7
                    {
                        "series": f'stunner_guard_census_writes_total{{{guard}, result="ok"}}',
                        "values": "0+4x40",
                    },
                    {
                        "series": f'stunner_guard_census_writes_total{{{guard}, result="failed"}}',
                        "values": "0+6x40",
                    },
                    # 40% of census reads fail: quiet at the default 0.5, firing at 0.25
                    {
                        "series": f'stunner_guard_census_reads_total{{{guard}, result="ok"}}',
                        "values": "0+12x40",
                    },
                    {
                        "series": f'stunner_guard_census_reads_total{{{guard}, result="failed"}}',
                        "values": "0+8x40",
                    },
                    # the chart's job is "guard"; "stunner-guard" is some other scrape
                    {"series": f"up{{{guard}}}", "values": "0x40"},
                    {
                        "series": 'up{job="stunner-guard", instance="10.0.0.9:8443"}',
                        "values": "0x40",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "StunnerGuardAdmissionSlow"},
                    {"eval_time": "30m", "alertname": "StunnerGuardDrainCapacityNearlyFull"},
                    {"eval_time": "30m", "alertname": "StunnerGuardCertificateExpiring"},
                    {"eval_time": "30m", "alertname": "StunnerGuardCensusWritesFailing"},
                    {
                        "eval_time": "30m",
                        "alertname": "StunnerGuardCensusReadsFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "job": "guard"},
                                "exp_annotations": alerts()["StunnerGuardCensusReadsFailing"][
                                    "annotations"
                                ]
                                | {
                                    "summary": "The census cannot read the allocations of "
                                    "40% of the stunnerd pods."
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "StunnerGuardCertificateExpiringSoon",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "guard",
                                    "certificate": "serving",
                                },
                                "exp_annotations": alerts()["StunnerGuardCertificateExpiringSoon"][
                                    "annotations"
                                ]
                                | {
                                    "summary": "The stunner-guard serving certificate expires in 40.0 days."
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "StunnerGuardReplicaDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "guard",
                                    "instance": "10.0.0.1:8443",
                                },
                                "exp_annotations": {
                                    "summary": "stunner-guard replica 10.0.0.1:8443 cannot be scraped.",
                                    "description": alerts()["StunnerGuardReplicaDown"][
                                        "annotations"
                                    ]["description"],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "chart.test.yaml").write_text(yaml.safe_dump(unit_tests))
    result = run_promtool(promtool, "test", "rules", "chart.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    # The same series against the file's defaults: the quiet ones fire.
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    result = run_promtool(promtool, "test", "rules", "chart.test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    for alert in (
        "StunnerGuardAdmissionSlow",
        "StunnerGuardDrainCapacityNearlyFull",
        "StunnerGuardCertificateExpiringSoon",  # at 30 days, 40 left is quiet
        "StunnerGuardCensusWritesFailing",
        "StunnerGuardCensusReadsFailing",  # 40% failing is below the default half
        "StunnerGuardReplicaDown",  # job stunner-guard is down too
    ):
        assert f"alertname: {alert}," in result.stdout, result.stdout
