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


# --------------------------------------------------------------------------- exit status 2

LAUGHS = "apiVersion: v1\nkind: Pod\nspec:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {b}: &{b} [{', '.join(['*' + a] * 10)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
UNREADABLE = [
    pytest.param("apiVersion: v1\nkind: 5\n", "kind is 5, not a string", id="kind: 5"),
    pytest.param("apiVersion: v1\nkind: null\n", "no kind", id="kind: null"),
    pytest.param("apiVersion: v1\nkind: ''\n", "kind is empty", id="kind is empty"),
    pytest.param("apiVersion: v1\nkind: [Pod]\n", "kind is a list, not a string", id="kind list"),
    pytest.param("kind: Pod\nmetadata: {name: x}\n", "no apiVersion", id="no apiVersion"),
    pytest.param("apiVersion: 1\nkind: Pod\n", "apiVersion is 1, not a string", id="apiVersion 1"),
    pytest.param("- kind: Pod\n", "a list, not a Kubernetes object", id="a list"),
    pytest.param("just a string\n", "a str, not a Kubernetes object", id="a string"),
    pytest.param("42\n", "a int, not a Kubernetes object", id="a number"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: [a]\n", "metadata is not a map", id="meta"),
    pytest.param(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: 5}\n",
        "metadata.name is 5, not a string",
        id="name: 5",
    ),
    pytest.param("apiVersion: v1\nkind: PodList\nitems: 5\n", "items is not a list", id="items"),
    pytest.param(
        "apiVersion: v1\nkind: PodList\nitems: [x]\n",
        "items[0]: a str, not a Kubernetes object",
        id="List item",
    ),
    pytest.param("apiVersion: v1\nkind: Pod\nspec: !!binary aGVsbG8=\n", "not JSON", id="!!binary"),
    pytest.param("apiVersion: v1\nkind: Pod\nspec: !!set {a}\n", "not JSON", id="!!set"),
    pytest.param("apiVersion: v1\nkind: Pod\nspec: {x: .inf}\n", "not JSON: .inf", id=".inf"),
    pytest.param("apiVersion: v1\nkind: Pod\nspec: &a [*a]\n", "values", id="an alias cycle"),
    pytest.param(LAUGHS, "too large to check", id="a billion laughs"),
]


@pytest.mark.parametrize(("document", "reason"), UNREADABLE)
def test_an_object_that_cannot_be_read_exits_2_naming_file_and_document(
    tmp_path, capsys, document, reason
):
    manifest = tmp_path / "manifests.yaml"
    manifest.write_text(OPERATOR_DATAPLANE.read_text() + "---\n# the second one\n" + document)
    code, out = run(str(manifest))
    assert code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: {manifest}: document 2 (line ")
    assert reason in errors[0]
    assert out == "", "nothing is checked when some input cannot be read"


def test_every_unreadable_file_and_document_is_named(tmp_path, capsys):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("apiVersion: v1\nkind: 5\n---\n- a\n")
    second.write_text("kind: [unclosed\n")
    code, _ = run(str(first), str(second), str(tmp_path / "missing.yaml"))
    assert code == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == f"error: {first}: document 1 (line 1): kind is 5, not a string"
    assert errors[1].startswith(f"error: {first}: document 2 (line 4): a list")
    assert errors[2].startswith(f"error: {second}: not YAML: ")
    assert f'in "{second}", line 2' in errors[2] and "<unicode string>" not in errors[2]
    assert errors[3] == f"error: {tmp_path / 'missing.yaml'}: No such file or directory"
    assert len(errors) == 4


def test_a_policy_error_names_the_policy_file(tmp_path, capsys):
    bad = tmp_path / "policy.yaml"
    bad.write_text("rules: {gracePeriod: {mode: maybe}}\n")
    assert run("--policy", str(bad), str(OPERATOR_DATAPLANE))[0] == 2
    assert capsys.readouterr().err.startswith(f"error: policy file {bad}: rules.gracePeriod")


def test_input_that_is_not_utf8_exits_2(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: \xff\xfe\n")
    assert run(str(binary))[0] == 2
    assert capsys.readouterr().err == f"error: {binary}: not UTF-8 text (byte 6)\n"


def test_unreadable_objects_exit_2_from_the_command_line_without_a_traceback(tmp_path):
    """An uncaught exception exits 1, which a pipeline reads as "denied"."""
    manifest = tmp_path / "kind5.yaml"
    manifest.write_text("apiVersion: v1\nkind: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "webhooks", "check", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {manifest}: document 1 (line 1): kind is 5, not a string\n"


# --------------------------------------------------------------------------- denials

TWO_DENIALS = """
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: media}
spec:
  terminationGracePeriodSeconds: "soon; or
    later"
  containers:
  - name: stunnerd
    image: l7mp/stunnerd:1.2.0
    command: [stunnerd]
    args: [-w, "--udp-thread-num=2; 3"]
    resources:
      limits: {cpu: "1; 2"}
"""


def test_each_denial_is_printed_on_a_line_of_its_own():
    """The webhook's message joins denials with "; ", and values quoted in them may hold
    "; " too: splitting on it cut one denial in pieces."""
    code, out = run("-", stdin=TWO_DENIALS)
    assert code == 1
    denials = [line for line in out.splitlines() if line.startswith("#   denied: ")]
    assert all(line.startswith("#   denied: Pod media/p: spec.") for line in denials), denials
    assert len(denials) == 2, denials
