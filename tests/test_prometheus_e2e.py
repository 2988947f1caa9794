"""End to end: a real Prometheus server (Debian's `prometheus`, as `.ci/run` installs it)
scrapes the real gunicorn TLS server with the scrape configuration README.md shows,
verifying it with the dev CA, loads the alert rules file, and answers queries about what it
scraped. Only the target discovery (a static loopback target instead of kubernetes_sd),
the CA's path and the intervals differ from the README's block."""

from __future__ import annotations

import copy
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from cryptography import x509

from tests.conftest import POD_REVIEW, load_json
from tests.servers import free_port, gunicorn, stop
from tests.test_observability import RULES, alerts, as_promql, dashboard_queries

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def readme_prometheus_config() -> dict:
    """The prometheus.yml excerpt of README.md "Monitoring": its one YAML block with the
    guard's job."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "job_name: stunner-guard" in b]
    return yaml.safe_load(block)


def local_config(readme: dict, target: str, ca_file: Path) -> dict:
    """The README's configuration aimed at one loopback target."""
    config = copy.deepcopy(readme)
    (job,) = config["scrape_configs"]
    job.pop("kubernetes_sd_configs")
    job.pop("relabel_configs")
    job["static_configs"] = [{"targets": [target]}]
    job["tls_config"]["ca_file"] = str(ca_file)
    config["rule_files"] = [str(RULES)]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    return config


@pytest.fixture(scope="module")
def guard(dev_certs, tmp_path_factory):
    env = {"STUNNER_GUARD_DRAIN_HOST": "10.96.0.10"}
    with gunicorn(dev_certs, env, home=tmp_path_factory.mktemp("home")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, guard, dev_certs, tmp_path_factory):
    """Prometheus on a free loopback port, scraping the guard every second."""
    work = tmp_path_factory.mktemp("prometheus")
    target = guard.removeprefix("https://")
    config = work / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(local_config(readme_prometheus_config(), target, dev_certs / "ca.crt"))
    )
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited {process.returncode}:\n{process.stdout.read()}")
            try:
                if requests.get(f"{url}/-/ready", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        stop(process)
        process.stdout.close()


def query(url: str, promql: str) -> list[dict]:
    answer = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def eventually(check, timeout: float = 20.0):
    """check() once it returns something truthy; its last answer in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_prometheus_scrapes_the_guard_over_verified_tls_and_counts_its_reviews(
    prometheus, guard, dev_certs
):
    up = eventually(lambda: query(prometheus, 'up{job="stunner-guard"} == 1'))
    assert up, query(prometheus, "up")
    ca = str(dev_certs / "ca.crt")
    review = load_json(POD_REVIEW)
    for _ in range(3):
        assert requests.post(f"{guard}/mutate", json=review, verify=ca, timeout=5).ok
    assert requests.post(f"{guard}/validate", json=review, verify=ca, timeout=5).ok

    def counted():
        found = query(
            prometheus,
            'sum by (webhook) (stunner_guard_admission_requests_total{job="stunner-guard"})',
        )
        by_webhook = {s["metric"]["webhook"]: float(s["value"][1]) for s in found}
        return by_webhook if by_webhook == {"mutate": 3.0, "validate": 1.0} else None

    assert eventually(counted), query(prometheus, "stunner_guard_admission_requests_total")
    # The certificate Prometheus verified is the one whose expiry the guard exports.
    serving = x509.load_pem_x509_certificate((dev_certs / "tls.crt").read_bytes())
    (expiry,) = query(
        prometheus, 'stunner_guard_certificate_expiry_timestamp_seconds{certificate="serving"}'
    )
    assert float(expiry["value"][1]) == serving.not_valid_after_utc.timestamp()


def test_every_dashboard_query_runs_on_the_real_server(prometheus, guard, dev_certs):
    # Past parsing (promtool): evaluation errors such as many-to-many matches show here.
    review = load_json(POD_REVIEW)
    assert requests.post(f"{guard}/mutate", json=review, verify=str(dev_certs / "ca.crt")).ok
    assert eventually(lambda: query(prometheus, "stunner_guard_admission_requests_total"))
    for expr in dashboard_queries():
        query(prometheus, as_promql(expr))  # asserts status success


def test_prometheus_loads_every_alert_rule_and_evaluates_them(prometheus):
    def loaded():
        answer = requests.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]
        rules = [r for g in answer["groups"] for r in g["rules"]]
        evaluated = all(r.get("lastEvaluation", "").startswith("20") for r in rules)
        return rules if rules and evaluated else None

    rules = eventually(loaded)
    assert rules
    assert {r["name"] for r in rules} == set(alerts())
    assert {
        (r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"
    } == set()
    # A guard that is up, ready and whose certificates are far from expiry raises none.
    assert {r["name"]: r["state"] for r in rules if r["state"] != "inactive"} == {}


def test_the_readme_configuration_is_aimed_at_the_charts_default_install():
    """The parts the local run replaces: kubernetes_sd (Debian's Prometheus is built
    without it, so neither the test's server nor its promtool can read them) must find the
    chart's default install (release and namespace stunner-guard): its Service and port,
    the name its certificate carries, and the job the alert rules expect."""
    (job,) = readme_prometheus_config()["scrape_configs"]
    from tests.test_chart import render
    from webhooks import certs

    rendered = render(namespace="stunner-guard")
    service = rendered.one("Service")
    (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert re.fullmatch(keep["regex"], f"{service['metadata']['name']};https")
    assert [p["name"] for p in service["spec"]["ports"]] == ["https"]
    assert job["tls_config"]["server_name"] in certs.service_dns_names(
        service["metadata"]["name"], "stunner-guard"
    )
    assert job["job_name"] == service["metadata"]["labels"]["app.kubernetes.io/name"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "endpointslice" and sd["namespaces"]["names"] == ["stunner-guard"]
