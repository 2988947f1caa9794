"""The offline check (`python -m webhooks check`) runs the webhook's code on manifests."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml

from tests.conftest import STUNNER
from webhooks import check

OPERATOR_DATAPLANE = STUNNER / "dataplane_default_v1.operator.yaml"


def run(*args: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = check.main(list(args), stdin=io.StringIO(stdin), stdout=out)
    return code, out.getvalue()


def test_prints_verdict_warnings_and_the_mutated_manifest():
    code, out = run(str(OPERATOR_DATAPLANE))
    assert code == 0
    assert "# Dataplane default" in out and "allowed, mutated" in out
    assert "#   warning: stunner-guard set spec.terminationGracePeriodSeconds=600" in out
    manifest = yaml.safe_load(out.split("---\n", 1)[1].rsplit("# 1 objects", 1)[0])
    assert manifest["spec"]["terminationGracePeriodSeconds"] == 600
    assert manifest["spec"]["args"] == ["-w", "--udp-thread-num=2"]


def test_diff_mode_prints_a_unified_diff():
    code, out = run("--diff", str(OPERATOR_DATAPLANE))
    assert code == 0
    assert "-  terminationGracePeriodSeconds: 60\n+  terminationGracePeriodSeconds: 600" in out


HPA_STREAM = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: udp-gateway, namespace: media}
spec:
  selector: {matchLabels: {app: stunner}}
  template:
    metadata: {labels: {app: stunner}}
    spec:
      containers:
      - name: stunnerd
        image: l7mp/stunnerd:1.2.0
        command: [stunnerd]
        args: [-w]
        resources: {requests: {cpu: 500m}, limits: {cpu: "2"}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: udp-gateway, namespace: media}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: udp-gateway}
  minReplicas: 1
  maxReplicas: 10
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 500}}
"""


def test_an_infeasible_hpa_in_the_same_stream_is_denied_and_exits_1():
    code, out = run("-", stdin=HPA_STREAM)
    assert code == 1
    assert "# HorizontalPodAutoscaler media/udp-gateway (-): DENIED" in out
    assert "500% x CPU request 500m = 2500m is not below the CPU limit 2" in out
    assert "# 2 objects, 1 denied" in out


def test_the_same_hpa_at_300_percent_passes():
    code, out = run("-", stdin=HPA_STREAM.replace("500}", "300}"))
    assert code == 0, out


def test_unreadable_input_and_policy_exit_2(tmp_path):
    assert run(str(tmp_path / "missing.yaml"))[0] == 2
    assert run("-", stdin="just a string\n")[0] == 2
    bad = tmp_path / "policy.yaml"
    bad.write_text("rules: {gracePeriod: {mode: maybe}}\n")
    assert run("--policy", str(bad), str(OPERATOR_DATAPLANE))[0] == 2


def test_policy_file_changes_the_outcome(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  gracePeriod: {mode: 'off'}\n")
    code, out = run("--policy", str(policy), "--diff", str(OPERATOR_DATAPLANE))
    assert code == 0 and "terminationGracePeriodSeconds: 600" not in out


def test_runs_as_a_module_from_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "webhooks", "check", str(OPERATOR_DATAPLANE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "# 1 objects, 0 denied" in result.stdout
    usage = subprocess.run(
        [sys.executable, "-m", "webhooks"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_a_reader_that_stops_early_gets_no_traceback():
    many = "\n---\n".join([OPERATOR_DATAPLANE.read_text()] * 200)
    with subprocess.Popen(
        [sys.executable, "-m", "webhooks", "check", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        proc.stdin.write(many.encode())
        proc.stdin.close()
        proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        stderr = proc.stderr.read().decode()
        proc.wait(timeout=60)
    assert "Traceback" not in stderr


def _nested_yaml(levels: int) -> str:
    """A Dataplane whose spec.affinity nests ``levels`` flow-style maps."""
    return (
        "apiVersion: stunner.l7mp.io/v1\nkind: Dataplane\nmetadata: {name: default}\n"
        "spec:\n  affinity: " + "{a: " * levels + "x" + "}" * levels + "\n"
    )


@pytest.mark.parametrize(
    ("levels", "reason"),
    [
        pytest.param(150, "nests more than 100 levels of maps and lists", id="past the limit"),
        pytest.param(5_000, "nested too deeply to read", id="past PyYAML's stack"),
    ],
)
def test_input_nested_too_deeply_exits_2_naming_the_file(tmp_path, capsys, levels, reason):
    manifest = tmp_path / "deep.yaml"
    manifest.write_text(_nested_yaml(levels))
    assert run(str(manifest))[0] == 2
    error = capsys.readouterr().err
    assert f"{manifest}: " in error and reason in error
    assert "Traceback" not in error and len(error) < 1000


def test_input_as_deep_as_the_limit_is_checked():
    # The object and its spec are two levels: 98 more make 100.
    code, out = run("-", stdin=_nested_yaml(98))
    assert code == 0 and "# 1 objects, 0 denied" in out
    assert run("-", stdin=_nested_yaml(99))[0] == 2
