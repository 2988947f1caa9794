"""The metrics the alert rules and the dashboard need, and the alert rules
(charts/stunner-guard/files/prometheus-rules.yaml).

The rules are checked by Prometheus' own promtool (Debian package `prometheus`; `.ci/run`
installs it): `promtool check rules` parses them, `promtool test rules` runs
tests/prometheus/*.test.yaml, which feed series and say when each alert fires and when it
stays quiet. Tests that need promtool fail without it (conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from tests.test_drain import NS, api, calls, cluster  # noqa: F401  (fixtures)
from webhooks import certs
from webhooks.lifecycle.drain import STATUS, Drainer
from webhooks.metrics import Metrics
from webhooks.settings import Settings, from_env

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "charts" / "stunner-guard" / "files"
RULES = FILES / "prometheus-rules.yaml"
RULE_TESTS = sorted((Path(__file__).parent / "prometheus").glob("*.test.yaml"))


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


def rules_document() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in rules_document()["groups"] for r in g["rules"]}


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
    cut = cluster.pod("udp-gateway-cut", allocations=7, grace=2)
    drained = cluster.pod("udp-gateway-empty", allocations=0)
    drainer = cluster.drainer()
    assert drainer.drain(NS, drained.token).outcome == "drained"
    assert drainer.drain(NS, cut.token).outcome == "deadline"
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
