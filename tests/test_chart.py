"""The Helm chart (charts/stunner-guard) and the image (Dockerfile).

The chart is rendered by Helm's own engine: helm-python-sdk embeds Helm v4's Go SDK, so
``Chart.render`` is ``helm template``, ``lint`` is ``helm lint`` and ``Config.install(...,
dry_run=...)`` is ``helm install --dry-run``; no ``helm`` binary is involved. Every rendered
object is validated with kubernetes-validate in strict mode against KUBE_VERSIONS; the
cert-manager and Prometheus Operator objects, which those schemas do not know, against the
strict subset schemas in CRD_SCHEMAS instead.

Where the chart must agree with the service, the test asks the service's own code: the
policy ConfigMap is loaded with webhooks.settings.load_policy_document, the Deployment's
environment goes through webhooks.settings.from_env, the webhook rules are compared with
webhooks.admission.dispatch.HANDLERS and the matchConditions CEL with webhooks.admission.stunnerd.is_stunnerd.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import runpy
import shlex
import shutil
import ssl
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cel
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.standin_apiserver import merge_patch, send_json
from webhooks import certs, names
from webhooks.admission import dispatch, stunnerd
from webhooks.service import Service
from webhooks.serving import HARD_STOP_MARGIN_SECONDS
from webhooks.settings import (
    CensusSettings,
    DrainSettings,
    Policy,
    from_env,
    load_document,
    load_policy_document,
)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "stunner-guard"
FIXTURES = Path(__file__).parent / "fixtures"
RELEASE = "stunner-guard"
NAMESPACE = "stunner"
# The chart's kubeVersion floor (matchConditions GA) and the current releases.
KUBE_VERSIONS = ("1.30.0", "1.36.0", "1.37.0")
CLUSTER_IP = "10.96.0.10"

# Values for each way the chart is installed; every test that takes `mode` runs on all.
MODES: dict[str, dict] = {
    "defaults": {},
    "self-managed": {"tls": {"selfManaged": {"validityDays": 365}}},
    "cert-manager": {"tls": {"certManager": {"enabled": True}}},
    "cert-manager-clusterissuer": {
        "tls": {
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"},
            }
        }
    },
    "servicemonitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        "grafanaDashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "STUNner"},
        },
    },
    "failure-policies-fail": {
        "webhooks": {
            "mutating": {"failurePolicy": "Fail"},
            "validating": {"failurePolicy": "Fail"},
            "timeoutSeconds": 10,
        }
    },
    "watch-namespaces": {
        "watchNamespaces": ["media", "turn"],
        "webhooks": {"excludeNamespaces": ["legacy"]},
    },
    "warn-first": {"policy": {"allRulesMode": "warn"}},
    "network-policy-pinned-ip-short-grace": {
        "networkPolicy": {
            "enabled": True,
            "apiserverCIDRs": ["172.16.0.0/28"],
            "nodeCIDRs": ["10.0.0.0/16", "172.16.0.0/28"],
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
            ],
        },
        "service": {"clusterIP": "10.96.0.42"},
        "shutdown": {"endpointDelaySeconds": 5},
        "policy": {"rules": {"gracePeriod": {"max": 5400}}},
    },
    "census-warn": {"census": {"mode": "warn"}},
    "census-off": {"census": {"mode": "off"}},
    "hard-anti-affinity-3-replicas": {
        "replicaCount": 3,
        "podAntiAffinity": "hard",
        "podDisruptionBudget": {"minAvailable": 2},
    },
    "everything-set": {
        "image": {
            "repository": "registry.example.com/stunner-guard",
            "digest": "sha256:" + "a" * 64,
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "media"},
        "podLabels": {"example.com/tier": "control"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "media", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "stunner-guard"}},
            }
        ],
        "serviceAccount": {"annotations": {"example.com/role": "guard"}},
        "service": {"port": 8443},
        "gunicorn": {"threads": 1200, "timeout": 60, "logLevel": "debug"},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {
            "enabled": True,
            "thresholds": {
                "admissionP99Seconds": 1.5,
                "drainCapacityRatio": 0.95,
                "certificateWarningDays": 40,
                "certificateCriticalDays": 10,
                "censusWriteFailureRatio": 0.25,
                "censusReadFailureRatio": 0.75,
            },
        },
        "grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "stunner"}},
        "tls": {"certManager": {"enabled": True}},
        "census": {"leaseName": "turn-census", "intervalSeconds": 15, "writeBurst": 5},
    },
}


# --------------------------------------------------------------------------- rendering


@dataclasses.dataclass
class Rendered:
    values: dict
    objects: list[dict]
    notes: str

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    def named(self, kind: str, name: str) -> dict:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
        return found[0]


def render(
    values: dict | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=name, namespace=namespace, is_install=True)
    notes = files.pop(f"{CHART.name}/templates/NOTES.txt")
    objects = [doc for _, text in sorted(files.items()) for doc in yaml.safe_load_all(text) if doc]
    return Rendered(values or {}, objects, notes)


@functools.cache
def _render_mode(mode: str) -> Rendered:
    return render(MODES[mode])


@pytest.fixture(params=sorted(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture
def chart(mode) -> Rendered:
    # Cached: each render generates RSA keys. Tests must not modify it.
    return _render_mode(mode)


def values_yaml() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def mode_values(mode: str) -> dict:
    """values.yaml overlaid with the mode's values, as Helm coalesces them."""
    with helm.Chart.load(CHART) as loaded:
        return loaded.merge_values(MODES[mode])


def fullname(rendered: Rendered) -> str:
    return rendered.one("Deployment")["metadata"]["name"]


def webhooks_of(rendered: Rendered) -> list[tuple[str, dict]]:
    return [
        (config["kind"], hook)
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
        for config in rendered.all(kind)
        for hook in config["webhooks"]
    ]


def container(rendered: Rendered) -> dict:
    (guard,) = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return guard


def env_of(rendered: Rendered) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(rendered)["env"]}


# --------------------------------------------------------------------------- lint, schemas


def test_chart_lints_clean_in_every_mode(mode):
    report = helm.lint(CHART, MODES[mode], strict=True, namespace=NAMESPACE, kube_version="v1.36.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report
    assert report["total_charts_linted"] == 1


# Subsets of the cert-manager.io/v1 and monitoring.coreos.com/v1 CRD schemas (field names
# from cert-manager's deploy/crds/cert-manager.io_{certificates,issuers}.yaml and
# prometheus-operator's monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml), made
# strict: the chart may only use fields listed here, so a misspelt field fails instead of
# being pruned. kubernetes-validate has no schema for custom resources.
def _strict(properties: dict, required: tuple = ()) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


_STR, _BOOL, _INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = _strict(
    {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
    ("name", "namespace"),
)
_ISSUER_REF = _strict({"name": _STR, "kind": _STR, "group": _STR}, ("name",))
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}


def _crd_object(api_version: str, kind: str, spec: dict) -> dict:
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Issuer"): _crd_object(
        "cert-manager.io/v1",
        "Issuer",
        {
            **_strict(
                {"selfSigned": _strict({}), "ca": _strict({"secretName": _STR}, ("secretName",))}
            ),
            "minProperties": 1,
            "maxProperties": 1,
        },
    ),
    ("cert-manager.io/v1", "Certificate"): _crd_object(
        "cert-manager.io/v1",
        "Certificate",
        _strict(
            {
                "secretName": _STR,
                "commonName": _STR,
                "isCA": _BOOL,
                "dnsNames": {"type": "array", "items": _STR},
                "duration": _STR,
                "renewBefore": _STR,
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "signing",
                            "digital signature",
                            "content commitment",
                            "key encipherment",
                            "key agreement",
                            "data encipherment",
                            "cert sign",
                            "crl sign",
                            "encipher only",
                            "decipher only",
                            "any",
                            "server auth",
                            "client auth",
                            "code signing",
                            "email protection",
                            "s/mime",
                            "ipsec end system",
                            "ipsec tunnel",
                            "ipsec user",
                            "timestamping",
                            "ocsp signing",
                            "microsoft sgc",
                            "netscape sgc",
                        ]
                    },
                },
                "privateKey": _strict(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": _INT,
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    }
                ),
                "issuerRef": _ISSUER_REF,
            },
            ("secretName", "issuerRef"),
        ),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd_object(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _strict(
            {
                "jobLabel": _STR,
                "selector": _strict({"matchLabels": _STR_MAP}),
                "namespaceSelector": _strict(
                    {"matchNames": {"type": "array", "items": _STR}, "any": _BOOL}
                ),
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "port": _STR,
                            "scheme": {"enum": ["http", "https"]},
                            "path": _STR,
                            "interval": _STR,
                            "scrapeTimeout": _STR,
                            "tlsConfig": _strict(
                                {
                                    "serverName": _STR,
                                    "insecureSkipVerify": _BOOL,
                                    "ca": _strict(
                                        {
                                            "secret": _strict(
                                                {"name": _STR, "key": _STR}, ("name", "key")
                                            )
                                        }
                                    ),
                                }
                            ),
                        }
                    ),
                },
            },
            ("selector", "endpoints"),
        ),
    ),
    # prometheus-operator's monitoring.coreos.com_prometheusrules.yaml, every field of v1.
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd_object(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": _INT,
                            "partial_response_strategy": _STR,
                            "labels": _STR_MAP,
                            "rules": {
                                "type": "array",
                                "items": _strict(
                                    {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": {"anyOf": [_INT, _STR]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STR_MAP,
                                        "annotations": _STR_MAP,
                                    },
                                    ("expr",),
                                ),
                            },
                        },
                        ("name",),
                    ),
                }
            },
            ("groups",),
        ),
    ),
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(mode, chart, kube_version):
    for obj in chart.objects:
        key = (obj["apiVersion"], obj["kind"])
        try:
            if key in CRD_SCHEMAS:
                jsonschema.validate(obj, CRD_SCHEMAS[key])
            else:
                kubernetes_validate.validate(obj, kube_version, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as err:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} ({mode}, {kube_version}): "
                f"{err.message} at {'.'.join(map(str, err.absolute_path))}"
            )


def test_the_crd_subset_schemas_are_strict():
    # A field the real CRD lacks (or a typo) must fail, or the subset checks nothing.
    certificate = copy.deepcopy(
        _render_mode("cert-manager").named("Certificate", f"{RELEASE}-serving")
    )
    certificate["spec"]["dnsName"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError, match="dnsName"):
        jsonschema.validate(certificate, CRD_SCHEMAS[("cert-manager.io/v1", "Certificate")])


def test_default_install_renders_exactly_these_objects():
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in _render_mode("defaults").objects)
    assert kinds == sorted(
        [
            ("ClusterRole", RELEASE),
            ("ClusterRoleBinding", RELEASE),
            ("ConfigMap", f"{RELEASE}-policy"),
            ("Deployment", RELEASE),
            ("MutatingWebhookConfiguration", RELEASE),
            ("PodDisruptionBudget", RELEASE),
            ("Secret", f"{RELEASE}-tls"),
            ("Service", RELEASE),
            ("ServiceAccount", RELEASE),
            ("ValidatingWebhookConfiguration", RELEASE),
            # census.mode enforce: the Lease's RBAC and the policy that limits pod patches.
            ("Role", f"{RELEASE}-census"),
            ("RoleBinding", f"{RELEASE}-census"),
            ("ValidatingAdmissionPolicy", f"{RELEASE}-census"),
            ("ValidatingAdmissionPolicyBinding", f"{RELEASE}-census"),
        ]
    )


# --------------------------------------------------------------------------- webhooks


def _selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace_labels(name: str) -> dict[str, str]:
    # Set by the apiserver on every namespace (immutable since Kubernetes 1.22).
    return {"kubernetes.io/metadata.name": name}


def test_webhooks_never_see_kube_system_or_the_guards_own_namespace(mode, chart):
    values = mode_values(mode)
    open_namespace = (values["watchNamespaces"] or ["media"])[0]
    for _, hook in webhooks_of(chart):
        scopes = {rule["scope"] for rule in hook["rules"]}
        if scopes == {"Cluster"}:
            # Dataplanes are cluster-scoped: no namespace to match, nothing in kube-system.
            assert "namespaceSelector" not in hook, hook["name"]
            continue
        assert scopes == {"Namespaced"}, hook["name"]
        selector = hook["namespaceSelector"]
        for ns in ("kube-system", NAMESPACE, *values["webhooks"]["excludeNamespaces"]):
            assert not _selector_matches(selector, _namespace_labels(ns)), (hook["name"], ns)
        # ... while stunnerd namespaces still are matched.
        assert _selector_matches(selector, _namespace_labels(open_namespace)), hook["name"]


def test_watch_namespaces_limit_the_webhooks_to_those_namespaces():
    for _, hook in webhooks_of(_render_mode("watch-namespaces")):
        if "namespaceSelector" in hook:
            selector = hook["namespaceSelector"]
            assert _selector_matches(selector, _namespace_labels("turn"))
            assert not _selector_matches(selector, _namespace_labels("default"))


def test_webhooks_are_dry_run_safe_v1_only_and_short(mode, chart):
    values = mode_values(mode)
    hooks = webhooks_of(chart)
    assert len(hooks) == 7
    for kind, hook in hooks:
        assert hook["sideEffects"] == "None", hook["name"]
        assert hook["admissionReviewVersions"] == ["v1"], hook["name"]
        assert hook["timeoutSeconds"] == values["webhooks"]["timeoutSeconds"] <= 30
        assert hook["matchPolicy"] == "Equivalent"
        side = "mutating" if kind.startswith("Mutating") else "validating"
        assert hook["failurePolicy"] == values["webhooks"][side]["failurePolicy"]
        if side == "mutating":
            assert hook["reinvocationPolicy"] == "IfNeeded", hook["name"]
            assert hook["clientConfig"]["service"]["path"] == "/mutate"
        else:
            assert "reinvocationPolicy" not in hook
            assert hook["clientConfig"]["service"]["path"] == "/validate"
        service = chart.one("Service")
        assert hook["clientConfig"]["service"] == {
            "name": service["metadata"]["name"],
            "namespace": NAMESPACE,
            "path": hook["clientConfig"]["service"]["path"],
            "port": service["spec"]["ports"][0]["port"],
        }


def test_failure_policy_defaults_are_ignore_for_both_and_documented():
    values = values_yaml()["webhooks"]
    assert values["mutating"]["failurePolicy"] == "Ignore"
    assert values["validating"]["failurePolicy"] == "Ignore"
    text = (CHART / "values.yaml").read_text()
    comment = text[text.index("  validating:") : text.index("tls:")]
    assert "Ignore by default" in comment and "Set Fail" in comment
    fail = _render_mode("failure-policies-fail")
    assert {h["failurePolicy"] for _, h in webhooks_of(fail)} == {"Fail"}


_PLURAL = {
    "Dataplane": "dataplanes",
    "Pod": "pods",
    "Deployment": "deployments",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
}
_SCOPE = {"Dataplane": "Cluster"}  # every other kind the guard handles is namespaced


def _rule_rows(rendered: Rendered, kind: str) -> set[tuple]:
    return {
        (group, version, resource, operation, rule["scope"])
        for config in rendered.all(kind)
        for hook in config["webhooks"]
        for rule in hook["rules"]
        for group in rule["apiGroups"]
        for version in rule["apiVersions"]
        for resource in rule["resources"]
        for operation in rule["operations"]
    }


def _handled_rows(*, mutating: bool) -> set[tuple]:
    return {
        (group, version, _PLURAL[kind], operation, _SCOPE.get(kind, "Namespaced"))
        for (group, kind), (versions, operations, _) in dispatch.HANDLERS.items()
        # HPAs are validated, never mutated (DESIGN.md "Where to act").
        if not (mutating and kind == "HorizontalPodAutoscaler")
        for version in versions
        for operation in operations
    }


def test_webhook_rules_are_exactly_what_the_guard_handles(chart):
    expected_validating = {
        ("stunner.l7mp.io", "v1", "dataplanes", "CREATE", "Cluster"),
        ("stunner.l7mp.io", "v1", "dataplanes", "UPDATE", "Cluster"),
        ("stunner.l7mp.io", "v1alpha1", "dataplanes", "CREATE", "Cluster"),
        ("stunner.l7mp.io", "v1alpha1", "dataplanes", "UPDATE", "Cluster"),
        ("", "v1", "pods", "CREATE", "Namespaced"),
        ("apps", "v1", "deployments", "CREATE", "Namespaced"),
        ("apps", "v1", "deployments", "UPDATE", "Namespaced"),
        ("autoscaling", "v2", "horizontalpodautoscalers", "CREATE", "Namespaced"),
        ("autoscaling", "v2", "horizontalpodautoscalers", "UPDATE", "Namespaced"),
    }
    expected_mutating = {row for row in expected_validating if row[0] != "autoscaling"}
    assert _rule_rows(chart, "ValidatingWebhookConfiguration") == expected_validating
    assert _rule_rows(chart, "MutatingWebhookConfiguration") == expected_mutating
    # ... and that is what the code dispatches on.
    assert _handled_rows(mutating=False) == expected_validating
    assert _handled_rows(mutating=True) == expected_mutating


def test_operator_owned_deployments_are_validated_but_never_sent_for_mutation(chart):
    hooks = dict((f"{kind}/{hook['name']}", hook) for kind, hook in webhooks_of(chart))
    mutating = hooks["MutatingWebhookConfiguration/deployments.mutate.stunner-guard.l7mp.io"]
    owned = {"stunner.l7mp.io/owned-by": "stunner"}
    assert not _selector_matches(mutating["objectSelector"], owned)
    assert _selector_matches(mutating["objectSelector"], {"app": "my-turn"})
    validating = hooks["ValidatingWebhookConfiguration/deployments.validate.stunner-guard.l7mp.io"]
    assert "objectSelector" not in validating


# matchConditions are evaluated with a real CEL implementation against real objects.


def _conditions(rendered: Rendered, webhook: str) -> list[str]:
    (hook,) = [h for _, h in webhooks_of(rendered) if h["name"] == webhook]
    return [c["expression"] for c in hook.get("matchConditions", [])]


def _sent(rendered: Rendered, webhook: str, obj: dict) -> bool:
    return all(cel.evaluate(expr, {"object": obj}) for expr in _conditions(rendered, webhook))


def _review_object(name: str) -> dict:
    path = FIXTURES / "admission" / "apiserver-v1.36" / "stunner" / name
    return json.loads(path.read_text())["request"]["object"]


def _pod(*containers: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": list(containers)}}


CONTAINERS = {
    "operator stunner-daemon": ({"name": "stunner-daemon", "image": "l7mp/stunnerd"}, True),
    "static manifest stunnerd": ({"name": "stunnerd", "image": "example/turn:1"}, True),
    "image with tag": ({"name": "turn", "image": "docker.io/l7mp/stunnerd:1.2.1"}, True),
    "image with digest": ({"name": "turn", "image": "l7mp/stunnerd@sha256:" + "0" * 64}, True),
    "registry with port": ({"name": "turn", "image": "localhost:5000/stunnerd:dev"}, True),
    "custom build": ({"name": "turn", "image": "ghcr.io/acme/my-stunnerd:2"}, True),
    "command stunnerd": ({"name": "turn", "image": "acme/turn", "command": ["stunnerd"]}, True),
    "command path": ({"name": "turn", "image": "x", "command": ["/usr/bin/stunnerd"]}, True),
    "tag named stunnerd": ({"name": "web", "image": "acme/web:stunnerd"}, False),
    "stunnerd registry host": ({"name": "web", "image": "stunnerd:5000/web"}, False),
    "other image": ({"name": "nginx", "image": "nginx:1.27"}, False),
    "no image, no command": ({"name": "sidecar"}, False),
    "empty command": ({"name": "web", "image": "nginx", "command": []}, False),
    "stunnerd as an argument": ({"name": "web", "image": "sh", "args": ["stunnerd"]}, False),
}


@pytest.mark.parametrize("case", sorted(CONTAINERS))
def test_pods_are_sent_exactly_when_the_guard_sees_a_stunnerd_container(case):
    rendered = _render_mode("defaults")
    c, expected = CONTAINERS[case]
    assert stunnerd.is_stunnerd(c) is expected  # the guard's own test
    pod = _pod({"name": "istio-proxy", "image": "istio/proxyv2"}, c)
    template = {"spec": {"template": {"spec": pod["spec"]}}}
    for webhook in ("pods.mutate", "pods.validate"):
        assert _sent(rendered, f"{webhook}.stunner-guard.l7mp.io", pod) is expected
    for webhook in ("deployments.mutate", "deployments.validate"):
        assert _sent(rendered, f"{webhook}.stunner-guard.l7mp.io", template) is expected


_IMAGE_PART = st.text(alphabet="ab:/@.-stunerd5", max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    prefix=_IMAGE_PART,
    middle=st.sampled_from(["", "stunnerd", "/stunnerd", "stunnerd:"]),
    suffix=_IMAGE_PART,
)
def test_the_image_condition_agrees_with_the_guard_on_any_image(prefix, middle, suffix):
    c = {"name": "turn", "image": prefix + middle + suffix}
    pod = _pod(c)
    assert _sent(
        _render_mode("defaults"), "pods.mutate.stunner-guard.l7mp.io", pod
    ) is stunnerd.is_stunnerd(c), c["image"]


def test_real_stunner_objects_are_sent_and_the_guards_own_pods_are_not():
    rendered = _render_mode("defaults")
    pod = _review_object("009-mutate-Pod-v1-CREATE-media-udp-gateway-8547c954bb-.json")
    deployment = _review_object("007-mutate-Deployment-v1-CREATE-media-udp-gateway.json")
    hpa = _review_object("017-mutate-HorizontalPodAutoscaler-v2-CREATE-media-udp-gateway.json")
    assert _sent(rendered, "pods.mutate.stunner-guard.l7mp.io", pod)
    assert _sent(rendered, "deployments.validate.stunner-guard.l7mp.io", deployment)
    assert _sent(rendered, "hpas.validate.stunner-guard.l7mp.io", hpa)
    other = copy.deepcopy(hpa)
    other["spec"]["scaleTargetRef"]["kind"] = "StatefulSet"
    assert not _sent(rendered, "hpas.validate.stunner-guard.l7mp.io", other)
    # Dataplanes: always.
    assert _conditions(rendered, "dataplanes.mutate.stunner-guard.l7mp.io") == []
    guard_template = rendered.one("Deployment")
    assert not _sent(rendered, "deployments.mutate.stunner-guard.l7mp.io", guard_template)


def test_a_malformed_object_does_not_break_the_conditions():
    # An evaluation error would apply the failure policy; has() guards keep it a plain no.
    rendered = _render_mode("defaults")
    for broken in ({}, {"spec": {}}, {"spec": {"template": {}}}):
        assert not _sent(rendered, "pods.validate.stunner-guard.l7mp.io", broken)
        assert not _sent(rendered, "deployments.validate.stunner-guard.l7mp.io", broken)
        assert not _sent(rendered, "hpas.validate.stunner-guard.l7mp.io", broken)


# --------------------------------------------------------------------------- TLS


def _pem_cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def _tls_handshake(
    tmp_path: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, server_name: str
) -> None:
    """A TLS handshake in memory: the client trusts only ca_pem and checks server_name, as
    the apiserver does with a webhook's caBundle and service DNS name."""
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_pem.decode())
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=server_name)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, conn, outgoing, peer_incoming in (
            ("client", client, bios[1], bios[2]),
            ("server", server, bios[3], bios[0]),
        ):
            if not done[side]:
                try:
                    conn.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_incoming.write(outgoing.read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not complete")


def test_self_managed_ca_bundle_verifies_the_serving_certificate(tmp_path):
    rendered = _render_mode("self-managed")
    secret = rendered.one("Secret")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    bundles = {hook["clientConfig"]["caBundle"] for _, hook in webhooks_of(rendered)}
    assert len(bundles) == 1, "every webhook must trust the same CA"
    ca = _pem_cert(base64.b64decode(bundles.pop()))
    assert ca.public_bytes(serialization.Encoding.PEM) == _pem_cert(data["ca.crt"]).public_bytes(
        serialization.Encoding.PEM
    )
    cert = _pem_cert(data["tls.crt"])
    cert.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = rendered.one("Service")["metadata"]["name"]
    assert set(certs.service_dns_names(service, NAMESPACE)) <= set(
        sans.get_values_for_type(x509.DNSName)
    )
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 364 <= validity.days <= 366  # tls.selfManaged.validityDays
    # The apiserver calls https://<service>.<namespace>.svc and trusts only the caBundle.
    _tls_handshake(
        tmp_path, data["ca.crt"], data["tls.crt"], data["tls.key"], f"{service}.{NAMESPACE}.svc"
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(
            tmp_path, data["ca.crt"], data["tls.crt"], data["tls.key"], f"{service}.elsewhere.svc"
        )
    # The guard mounts exactly this Secret.
    volumes = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "tls",
        "secret": {"secretName": secret["metadata"]["name"], "defaultMode": 0o440},
    } in volumes


@pytest.mark.parametrize("mode_name", ["cert-manager", "cert-manager-clusterissuer"])
def test_cert_manager_issues_the_certificate_and_injects_the_ca(mode_name):
    rendered = _render_mode(mode_name)
    assert rendered.all("Secret") == []
    certificate = rendered.named("Certificate", f"{RELEASE}-serving")
    service = rendered.one("Service")["metadata"]["name"]
    assert certificate["spec"]["dnsNames"] == certs.service_dns_names(service, NAMESPACE)
    assert "server auth" in certificate["spec"]["usages"]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        config = rendered.one(kind)
        assert config["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{certificate['metadata']['name']}"
        }
        assert all("caBundle" not in hook["clientConfig"] for hook in config["webhooks"])
    volumes = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    (tls,) = [v for v in volumes if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == certificate["spec"]["secretName"]
    issuers = {i["metadata"]["name"]: i for i in rendered.all("Issuer")}
    ref = certificate["spec"]["issuerRef"]
    if mode_name == "cert-manager-clusterissuer":
        assert issuers == {} and rendered.all("Certificate") == [certificate]
        assert ref == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        return
    # Self-signed Issuer -> CA Certificate -> CA Issuer -> serving Certificate.
    ca_issuer = issuers[ref["name"]]
    ca_certificate = rendered.named("Certificate", f"{RELEASE}-ca")
    assert ca_certificate["spec"]["isCA"] is True
    assert ca_issuer["spec"] == {"ca": {"secretName": ca_certificate["spec"]["secretName"]}}
    assert issuers[ca_certificate["spec"]["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}


class _StandInAPIServer(BaseHTTPRequestHandler):
    """Just enough of an apiserver for `helm install --dry-run=server`: discovery for the
    chart's kinds, and GET of objects (404 except those in `objects`)."""

    objects: dict[str, dict] = {}
    requests: list[str] = []
    GROUPS = {
        "v1": [
            ("secrets", "Secret", True),
            ("configmaps", "ConfigMap", True),
            ("services", "Service", True),
            ("serviceaccounts", "ServiceAccount", True),
        ],
        "apps/v1": [("deployments", "Deployment", True)],
        "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
        "rbac.authorization.k8s.io/v1": [
            ("clusterroles", "ClusterRole", False),
            ("clusterrolebindings", "ClusterRoleBinding", False),
            ("roles", "Role", True),
            ("rolebindings", "RoleBinding", True),
        ],
        "admissionregistration.k8s.io/v1": [
            ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False),
            ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration", False),
            ("validatingadmissionpolicies", "ValidatingAdmissionPolicy", False),
            ("validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding", False),
        ],
    }

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.requests.append(path)
        if path == "/version":
            return send_json(self, 200, {"major": "1", "minor": "36", "gitVersion": "v1.36.0"})
        if path == "/api":
            return send_json(self, 200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            return send_json(
                self,
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": gv.split("/")[0],
                            "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                        }
                        for gv in self.GROUPS
                        if "/" in gv
                    ],
                },
            )
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in self.GROUPS:
            return send_json(
                self,
                200,
                {
                    "kind": "APIResourceList",
                    "groupVersion": gv,
                    "resources": [
                        {
                            "name": r,
                            "singularName": r[:-1],
                            "namespaced": ns,
                            "kind": k,
                            "verbs": ["get", "list"],
                        }
                        for r, k, ns in self.GROUPS[gv]
                    ],
                },
            )
        if path in self.objects:
            return send_json(self, 200, self.objects[path])
        return send_json(
            self,
            404,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
            },
        )

    def do_POST(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        send_json(self, 405, {"kind": "Status", "code": 405})

    do_PUT = do_PATCH = do_DELETE = do_POST


def test_an_existing_tls_secret_is_reused_not_regenerated():
    """As on `helm upgrade`: the Secret from the first install exists; the render must carry
    it over byte for byte and trust its CA. `lookup` only talks to a cluster in a
    server-side dry run or a real install, so this runs against a stand-in apiserver.
    (OpenAPI validation is switched off: the stand-in serves no OpenAPI documents, and
    helm-python's install() does not expose the option, hence the raw library call.)"""
    pem = certs.generate("stunner-guard", NAMESPACE, days=30)
    secret_name = f"{RELEASE}-tls"
    existing = {k: base64.b64encode(pem[k]).decode() for k in ("ca.crt", "tls.crt", "tls.key")}
    _StandInAPIServer.objects = {
        f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name}": {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": secret_name,
                "namespace": NAMESPACE,
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": RELEASE,
                    "meta.helm.sh/release-namespace": NAMESPACE,
                },
            },
            "data": existing,
        }
    }
    _StandInAPIServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInAPIServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "standin",
            "clusters": [
                {
                    "name": "standin",
                    "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"},
                }
            ],
            "users": [{"name": "standin", "user": {"token": "standin"}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "standin", "namespace": NAMESPACE},
                }
            ],
        }
    )
    try:
        with helm.Config(kubeconfig_content=kubeconfig, namespace=NAMESPACE) as cfg:
            from helm_python import _native

            release = json.loads(
                _native.call_string(
                    "helm_install",
                    cfg._raw(),
                    _native.HANDLE(0),
                    _native.HANDLE(0),
                    str(CHART),
                    RELEASE,
                    None,
                    json.dumps(
                        {
                            "namespace": NAMESPACE,
                            "dry_run": "server",
                            "disable_openapi_validation": True,
                            "timeout_seconds": 30,
                        }
                    ),
                )
            )
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name}" in _StandInAPIServer.requests
    assert not [r for r in _StandInAPIServer.requests if " " in r], "a dry run writes nothing"
    objects = [o for o in yaml.safe_load_all(release["manifest"]) if o]
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert secret["data"] == existing
    for config in (o for o in objects if o["kind"].endswith("WebhookConfiguration")):
        assert {h["clientConfig"]["caBundle"] for h in config["webhooks"]} == {existing["ca.crt"]}


def test_without_a_cluster_each_render_makes_a_fresh_certificate():
    # What `helm template` shows; also proves the reuse above is lookup's doing.
    first = render(MODES["defaults"]).one("Secret")["data"]["tls.crt"]
    assert render(MODES["defaults"]).one("Secret")["data"]["tls.crt"] != first


# --------------------------------------------------------------------------- RBAC, names


EXPECTED_RBAC = {
    ("", "pods", ("get", "list", "watch")),
    ("", "events", ("create",)),
    ("apps", "deployments", ("get",)),
    ("stunner.l7mp.io", "dataplanes", ("get",)),
}
# census.mode enforce adds these; warn and off nothing (warn writes nothing).
CENSUS_RBAC = {("", "pods", ("patch",))}


def _granted(role: dict, *, names: bool = False) -> set[tuple]:
    granted = set()
    for rule in role["rules"]:
        allowed = {"apiGroups", "resources", "verbs"} | ({"resourceNames"} if names else set())
        assert set(rule) <= allowed, rule  # no URLs; names only where asked
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                row = (group, resource, tuple(sorted(rule["verbs"])))
                granted.add(
                    row + (tuple(rule["resourceNames"]),) if "resourceNames" in rule else row
                )
    return granted


def test_rbac_is_exactly_what_the_guard_calls(mode, chart):
    enforce = mode_values(mode)["census"]["mode"] == "enforce"
    role = chart.one("ClusterRole")
    assert _granted(role) == EXPECTED_RBAC | (CENSUS_RBAC if enforce else set())
    if enforce:
        lease = yaml.safe_load(_policy_document(chart))["census"]["leaseName"]
        [census_role] = chart.all("Role")
        assert census_role["metadata"]["namespace"] == NAMESPACE  # its own namespace only
        assert _granted(census_role, names=True) == {
            ("coordination.k8s.io", "leases", ("get", "update"), (lease,)),
            ("coordination.k8s.io", "leases", ("create",)),
        }
        [census_binding] = chart.all("RoleBinding")
        assert census_binding["roleRef"]["name"] == census_role["metadata"]["name"]
        assert census_binding["subjects"] == [
            {"kind": "ServiceAccount", "name": fullname(chart), "namespace": NAMESPACE}
        ]
    else:
        assert chart.all("Role") == [] and chart.all("RoleBinding") == []
        assert chart.all("ValidatingAdmissionPolicy") == []
    binding = chart.one("ClusterRoleBinding")
    account = chart.one("ServiceAccount")["metadata"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}
    ]
    pod_spec = chart.one("Deployment")["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == account["name"]


DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
NAME_CASES = {
    "fullnameOverride of 63": ({"fullnameOverride": "g" * 63}, RELEASE),
    "fullnameOverride of 70": ({"fullnameOverride": "g" * 70}, RELEASE),
    "cut lands on a dash": ({"fullnameOverride": "g" * 46 + "-" + "h" * 16}, RELEASE),
    "longest release name": ({}, "r" * 53),
    "release named like the chart": ({}, "media-stunner-guard"),
    "nameOverride": ({"nameOverride": "guard"}, "media"),
}


@pytest.mark.parametrize("case", sorted(NAME_CASES))
def test_every_name_is_a_dns_label_of_at_most_63_characters(case):
    overrides, release = NAME_CASES[case]
    for tls in ({}, {"tls": {"certManager": {"enabled": True}}}):
        monitoring = {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        }
        rendered = render({**overrides, **tls, **monitoring}, name=release)
        for obj in rendered.objects:
            name = obj["metadata"]["name"]
            assert len(name) <= 63 and DNS_LABEL.match(name), (obj["kind"], name)
            for label in obj["metadata"].get("labels", {}).values():
                assert len(label) <= 63, label
        service = rendered.one("Service")["metadata"]["name"]
        assert env_of(rendered)["STUNNER_GUARD_SERVICE_NAME"] == service
    if case == "release named like the chart":
        assert service == release  # not "media-stunner-guard-stunner-guard"


# --------------------------------------------------------------------------- Deployment


def test_the_guard_runs_at_least_two_spread_replicas(mode, chart):
    values = mode_values(mode)
    deployment = chart.one("Deployment")
    assert deployment["spec"]["replicas"] == values["replicaCount"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_spec = deployment["spec"]["template"]["spec"]
    anti = pod_spec["affinity"]["podAntiAffinity"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    if values["podAntiAffinity"] == "hard":
        (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    else:
        (weighted,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        term = weighted["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == selector
    assert _selector_matches(
        {"matchLabels": selector}, deployment["spec"]["template"]["metadata"]["labels"]
    )


def test_a_stopping_guard_pod_outlives_the_longest_drain_it_may_hold(mode, chart):
    """The guard's own shutdown (README "Shutdown and rollouts"): the preStop sleep, then
    gunicorn's graceful timeout covering the longest stunnerd grace the policy allows, then
    the pod's grace covering both; new pods up before old ones stop."""
    values = mode_values(mode)
    deployment = chart.one("Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    env = env_of(chart)
    delay = values["shutdown"]["endpointDelaySeconds"]
    assert container(chart)["lifecycle"]["preStop"] == {"sleep": {"seconds": delay}} and delay > 0
    graceful = int(env["GUNICORN_GRACEFUL_TIMEOUT"])
    longest_drain = values["policy"]["rules"]["gracePeriod"]["max"]
    # Held drains are answered HARD_STOP_MARGIN_SECONDS before the graceful timeout.
    assert graceful - HARD_STOP_MARGIN_SECONDS >= longest_drain
    assert pod_spec["terminationGracePeriodSeconds"] >= delay + graceful + 5
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert deployment["spec"]["minReadySeconds"] > 0


def test_a_pod_grace_too_short_for_the_drains_fails_the_render():
    with pytest.raises(Exception, match="terminationGracePeriodSeconds .* must cover"):
        render({"terminationGracePeriodSeconds": 600})
    ok = render({"terminationGracePeriodSeconds": 20000})
    assert (
        ok.one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20000
    )


def test_validation_denies_fixable_findings_only_when_mutation_cannot_fail_open(mode, chart):
    mutating = mode_values(mode)["webhooks"]["mutating"]["failurePolicy"]
    expected = "deny" if mutating == "Fail" else "warn"
    assert env_of(chart)["STUNNER_GUARD_FIXABLE_FINDINGS"] == expected


def test_the_network_policy_admits_exactly_the_apiserver_the_nodes_and_metrics_peers():
    rendered = _render_mode("network-policy-pinned-ip-short-grace")
    policy = rendered.one("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == (rendered.one("Deployment")["spec"]["selector"]["matchLabels"])
    )
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "https", "protocol": "TCP"}]
    assert rule["from"] == [
        {"ipBlock": {"cidr": "172.16.0.0/28"}},
        {"ipBlock": {"cidr": "10.0.0.0/16"}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}},
    ]
    assert rendered.one("Service")["spec"]["clusterIP"] == "10.96.0.42"
    assert "NetworkPolicy" not in {o["kind"] for o in _render_mode("defaults").objects}


@pytest.mark.parametrize("missing", ["apiserverCIDRs", "nodeCIDRs"])
def test_a_network_policy_without_its_cidrs_fails_the_render(missing):
    values = {"enabled": True, "apiserverCIDRs": ["172.16.0.0/28"], "nodeCIDRs": ["10.0.0.0/16"]}
    values[missing] = []
    with pytest.raises(Exception, match="networkPolicy.enabled needs"):
        render({"networkPolicy": values})


def test_the_guard_pod_meets_the_restricted_pod_security_standard(chart):
    pod_spec = chart.one("Deployment")["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] != 0
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod_spec and "hostPID" not in pod_spec
    sc = container(chart)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The read-only root still needs a writable /tmp (gunicorn's worker heartbeat file).
    assert {"name": "tmp", "mountPath": "/tmp"} in container(chart)["volumeMounts"]


def test_probes_check_healthz_and_readyz_over_https_on_the_serving_port(chart):
    guard = container(chart)
    assert guard["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    assert guard["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "https",
        "scheme": "HTTPS",
    }
    assert guard["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "https",
        "scheme": "HTTPS",
    }
    assert guard["resources"]["requests"]["cpu"] and guard["resources"]["requests"]["memory"]
    service = chart.one("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == "https"


def _clean_environment(monkeypatch) -> None:
    for var in list(os.environ):
        if var.startswith(("GUNICORN_", "STUNNER_GUARD_")) or var in {
            "BIND",
            "PORT",
            "WEB_CONCURRENCY",
        }:
            monkeypatch.delenv(var)


def test_gunicorn_values_default_to_gunicorn_conf_defaults(monkeypatch):
    _clean_environment(monkeypatch)
    conf = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    defaults = values_yaml()["gunicorn"]
    assert defaults["threads"] == 0  # gunicorn.conf.py sizes the pool itself
    assert conf["threads"] == DrainSettings().maxConcurrent + defaults["admissionThreads"]
    assert {k: defaults[k] for k in ("admissionThreads", "timeout", "logLevel")} == {
        "admissionThreads": conf["admission_threads"],
        "timeout": conf["timeout"],
        "logLevel": conf["loglevel"],
    }


def test_gunicorn_configures_itself_from_the_rendered_environment(
    mode, chart, monkeypatch, tmp_path
):
    values = mode_values(mode)
    _clean_environment(monkeypatch)
    for name, value in _guard_environment(chart, tmp_path).items():
        monkeypatch.setenv(name, value)
    conf = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    assert (
        conf["wsgi_app"] == "app:create_app()"
        and conf["worker_class"] == "webhooks.serving.ThreadWorker"
    )
    assert conf["bind"] == "0.0.0.0:8443" and conf["workers"] == 1
    held = values["policy"]["drain"]["maxConcurrent"]
    gunicorn = values["gunicorn"]
    assert conf["threads"] == (gunicorn["threads"] or held + gunicorn["admissionThreads"]) > held
    assert (conf["timeout"], conf["loglevel"]) == (gunicorn["timeout"], gunicorn["logLevel"])
    assert conf["certfile"].endswith("/tls.crt") and conf["keyfile"].endswith("/tls.key")


def _container_environment(rendered: Rendered, service_links: bool = True) -> dict[str, str]:
    """What the guard process sees: the rendered env, the downward API resolved, and the
    Service variables Kubernetes injects (enableServiceLinks) into pods created after it."""
    env = {}
    for name, value in env_of(rendered).items():
        if isinstance(value, dict):
            assert value == {"fieldRef": {"fieldPath": "metadata.namespace"}}, name
            value = NAMESPACE
        env[name] = value
    assert rendered.one("Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is True
    if service_links:
        service = rendered.one("Service")
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = CLUSTER_IP
        env[f"{prefix}_SERVICE_PORT"] = str(service["spec"]["ports"][0]["port"])
    return env


def _not_ready_reason(settings_) -> str | None:
    """What the guard's /readyz would say with these settings."""
    service = Service(settings_, None)
    try:
        return service.not_ready_reason()
    finally:
        service.close()


def _mounted_path(rendered: Rendered, path: str) -> tuple[dict, str]:
    """(volume, key) that provides the file at `path` in the guard container."""
    for mount in container(rendered)["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/"):
            volumes = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
            (volume,) = [v for v in volumes if v["name"] == mount["name"]]
            return volume, path[len(mount["mountPath"]) + 1 :]
    raise AssertionError(f"{path} is not mounted")


def _guard_environment(rendered: Rendered, tmp_path: Path) -> dict[str, str]:
    """The container environment, with the policy file from the ConfigMap written where
    the guard would find it (under tmp_path) and the TLS files checked to be mounted."""
    env = _container_environment(rendered)
    volume, key = _mounted_path(rendered, env["STUNNER_GUARD_POLICY_FILE"])
    configmap = rendered.named("ConfigMap", volume["configMap"]["name"])
    (tmp_path / key).write_text(configmap["data"][key])
    env["STUNNER_GUARD_POLICY_FILE"] = str(tmp_path / key)
    for var, wanted in (
        ("STUNNER_GUARD_CERT_FILE", "tls.crt"),
        ("STUNNER_GUARD_KEY_FILE", "tls.key"),
        ("STUNNER_GUARD_CA_FILE", "ca.crt"),  # both TLS modes' Secrets carry it
    ):
        volume, key = _mounted_path(rendered, env[var])
        assert key == wanted and "secret" in volume, var
    return env


def test_the_guard_reads_its_settings_from_the_rendered_environment(mode, chart, tmp_path):
    values = mode_values(mode)
    env = _guard_environment(chart, tmp_path)
    settings_ = from_env(env)
    service = chart.one("Service")
    assert settings_.serviceName == service["metadata"]["name"]
    assert settings_.drainHost == CLUSTER_IP  # the preStop host kubelet will call
    assert settings_.drainPort == service["spec"]["ports"][0]["port"]
    assert settings_.namespace == NAMESPACE
    assert settings_.watchNamespaces == tuple(values["watchNamespaces"])
    assert settings_.dataplaneName == values["dataplaneName"]
    assert (settings_.certFile, settings_.caFile) == (
        env["STUNNER_GUARD_CERT_FILE"],
        env["STUNNER_GUARD_CA_FILE"],
    )
    assert _not_ready_reason(settings_) is None


def test_without_the_injected_service_variables_the_guard_is_not_ready(chart):
    env = _container_environment(chart, service_links=False)
    env.pop("STUNNER_GUARD_POLICY_FILE")
    reason = _not_ready_reason(from_env(env))
    assert reason and "_SERVICE_HOST" in reason


# --------------------------------------------------------------------------- policy


def _policy_document(rendered: Rendered) -> str:
    return rendered.named("ConfigMap", f"{fullname(rendered)}-policy")["data"]["policy.yaml"]


def test_default_policy_configmap_loads_as_the_guards_built_in_policy():
    document = yaml.safe_load(_policy_document(_render_mode("defaults")))
    assert set(document) == {"rules", "drain", "census"}
    assert load_policy_document(document) == (Policy(), DrainSettings())
    # The census: the built-in defaults, but on (the chart grants what it needs) and with
    # the Lease named after the release.
    census = CensusSettings(mode="enforce", leaseName=f"{RELEASE}-census")
    assert load_document(document) == (Policy(), DrainSettings(), census)


def test_census_values_reach_the_guard():
    document = yaml.safe_load(_policy_document(_render_mode("everything-set")))
    _, _, census = load_document(document)
    assert (census.leaseName, census.intervalSeconds, census.writeBurst) == ("turn-census", 15, 5)
    for mode in ("warn", "off"):
        document = yaml.safe_load(_policy_document(_render_mode(f"census-{mode}")))
        assert load_document(document)[2].mode == mode


def test_changed_policy_values_reach_the_guard():
    values = {
        "policy": {
            "rules": {
                "gracePeriod": {"default": 7200},
                "requestsPresent": {"cpu": "250m"},
                "hpaReplicas": {"mode": "enforce"},
                "drainHook": {"mode": "off"},
            },
            "drain": {"marginSeconds": 10, "maxConcurrent": 20, "scrapeTimeoutSeconds": 0.25},
        }
    }
    policy, drain = load_policy_document(yaml.safe_load(_policy_document(render(values))))
    assert policy.gracePeriod.default == 7200 and policy.gracePeriod.max == 14400
    assert policy.requestsPresent.cpu == "250m" and policy.requestsPresent.memory == "128Mi"
    assert policy.hpaReplicas.mode == "enforce" and policy.drainHook.mode == "off"
    assert (drain.marginSeconds, drain.maxConcurrent, drain.scrapeTimeoutSeconds) == (10, 20, 0.25)


def test_all_rules_mode_sets_every_rule_for_a_warn_first_rollout():
    policy, _ = load_policy_document(yaml.safe_load(_policy_document(_render_mode("warn-first"))))
    assert {getattr(policy, f.name).mode for f in dataclasses.fields(Policy)} == {"warn"}
    assert "Policy modes in use: warn." in _render_mode("warn-first").notes


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_policy_values_mirror_the_code_keys_and_defaults():
    policy = values_yaml()["policy"]
    assert set(policy) == {"allRulesMode", "rules", "drain"}
    assert policy["allRulesMode"] == ""
    defaults = Policy()
    assert set(policy["rules"]) == _field_names(Policy)
    for rule, fields in policy["rules"].items():
        assert set(fields) == _field_names(type(getattr(defaults, rule))), rule
        assert fields == dataclasses.asdict(getattr(defaults, rule)), rule
    assert set(policy["drain"]) == _field_names(DrainSettings)
    assert policy["drain"] == dataclasses.asdict(DrainSettings())
    # The schema lists the same keys, so an unknown one fails at `helm install`.
    props = schema()["properties"]["policy"]["properties"]
    assert set(props["rules"]["properties"]) == _field_names(Policy)
    for rule, rule_schema in props["rules"]["properties"].items():
        assert set(rule_schema["properties"]) == _field_names(type(getattr(defaults, rule)))
        assert rule_schema["properties"]["mode"]["enum"] == ["enforce", "warn", "off"]
    assert set(props["drain"]["properties"]) == _field_names(DrainSettings)
    census = values_yaml()["census"]
    assert set(census) == _field_names(CensusSettings)
    assert set(schema()["properties"]["census"]["properties"]) == _field_names(CensusSettings)
    assert schema()["properties"]["census"]["properties"]["mode"]["enum"] == [
        "enforce",
        "warn",
        "off",
    ]
    # The same defaults, but two: the chart turns the census on (with the RBAC and the
    # policy it needs), and names the Lease after the release.
    assert census | {"mode": "off", "leaseName": "stunner-guard-census"} == dataclasses.asdict(
        CensusSettings()
    )


def test_a_policy_change_rolls_the_guard_pods_and_nothing_else_does():
    def checksum(rendered: Rendered) -> str:
        template = rendered.one("Deployment")["spec"]["template"]["metadata"]
        return template["annotations"]["checksum/policy"]

    base = _render_mode("defaults")
    document = _policy_document(base)
    assert checksum(base) == hashlib.sha256(document.rstrip("\n").encode()).hexdigest()
    assert checksum(_render_mode("warn-first")) != checksum(base)
    assert checksum(render({"policy": {"drain": {"marginSeconds": 9}}})) != checksum(base)
    assert checksum(_render_mode("servicemonitor")) == checksum(base)
    assert checksum(render()) == checksum(base)  # a new certificate does not roll the pods


# --------------------------------------------------------------------------- the rest


def test_the_disruption_budget_keeps_one_guard_up_and_never_blocks_drains(mode, chart):
    values = mode_values(mode)
    pdb = chart.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == values["podDisruptionBudget"]["minAvailable"]
    assert 1 <= pdb["spec"]["minAvailable"] < values["replicaCount"]
    assert pdb["spec"]["selector"] == chart.one("Deployment")["spec"]["selector"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("mode_name", ["servicemonitor", "everything-set"])
def test_the_service_monitor_scrapes_metrics_over_verified_https(mode_name):
    rendered = _render_mode(mode_name)
    monitor = rendered.one("ServiceMonitor")["spec"]
    service = rendered.one("Service")
    assert _selector_matches(monitor["selector"], service["metadata"]["labels"])
    assert monitor["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["scheme"], endpoint["path"]) == ("https", "/metrics")
    tls = endpoint["tlsConfig"]
    volumes = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "tls"]
    assert tls["ca"]["secret"] == {"name": volume["secret"]["secretName"], "key": "ca.crt"}
    assert tls["serverName"] in certs.service_dns_names(service["metadata"]["name"], NAMESPACE)
    assert "insecureSkipVerify" not in tls


# --------------------------------------------------------------------------- alerts, dashboard

RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE = CHART / "files" / "grafana-dashboard.json"


def test_monitoring_objects_are_rendered_only_when_enabled():
    for kind in ("PrometheusRule", "ServiceMonitor"):
        assert _render_mode("defaults").all(kind) == []
    assert [c["metadata"]["name"] for c in _render_mode("defaults").all("ConfigMap")] == [
        f"{RELEASE}-policy"
    ]
    monitoring = _render_mode("monitoring")
    assert monitoring.one("PrometheusRule")["metadata"]["name"] == RELEASE
    monitoring.named("ConfigMap", f"{RELEASE}-dashboard")


def test_the_prometheus_rule_is_the_plain_rules_file_with_the_default_values():
    # One source: non-operator users load files/prometheus-rules.yaml itself.
    rule = _render_mode("monitoring").one("PrometheusRule")
    assert rule["spec"] == {"groups": yaml.safe_load(RULES_FILE.read_text())["groups"]}
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "prom"  # what the Prometheus selects


def _with_threshold(expr: str, name: str, value: str) -> str:
    return re.sub(rf"[0-9.]+(\s+# threshold: {name})$", rf"{value}\1", expr, flags=re.M)


def test_threshold_values_and_the_chart_name_reach_the_rules_and_nothing_else_changes():
    thresholds = {
        "admissionP99Seconds": "1.5",
        "drainCapacityRatio": "0.95",
        "certificateWarningDays": "40",
        "certificateCriticalDays": "10",
        "censusWriteFailureRatio": "0.25",
        "censusReadFailureRatio": "0.75",
    }
    rendered = render(
        {
            "nameOverride": "guard",
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {
                "enabled": True,
                "thresholds": {k: float(v) for k, v in thresholds.items()},
            },
        }
    )
    expected = yaml.safe_load(RULES_FILE.read_text())["groups"]
    changed = set()
    for group in expected:
        for rule in group["rules"]:
            before = rule["expr"]
            for name, value in thresholds.items():
                rule["expr"] = _with_threshold(rule["expr"], name, value)
            rule["expr"] = rule["expr"].replace('up{job="stunner-guard"}', 'up{job="guard"}')
            if rule["expr"] != before:
                changed.add(rule["alert"])
    assert rendered.one("PrometheusRule")["spec"]["groups"] == expected
    assert changed == {
        "StunnerGuardDown",
        "StunnerGuardReplicaDown",
        "StunnerGuardAdmissionSlow",
        "StunnerGuardAdmissionSlowAtAPIServer",
        "StunnerGuardDrainCapacityNearlyFull",
        "StunnerGuardCertificateExpiringSoon",
        "StunnerGuardCertificateExpiring",
        "StunnerGuardCensusWritesFailing",
        "StunnerGuardCensusReadsFailing",
    }
    # up{job=...} names the job the ServiceMonitor gives the guard: the Service's label.
    monitor = rendered.one("ServiceMonitor")["spec"]
    job = rendered.one("Service")["metadata"]["labels"][monitor["jobLabel"]]
    assert job == "guard"


def test_every_threshold_value_is_marked_in_the_rules_file_and_defaults_to_its_number():
    text = RULES_FILE.read_text()
    marked = dict(
        (name, float(number))
        for number, name in re.findall(r"([0-9.]+)\s+# threshold: (\w+)$", text, flags=re.M)
    )
    assert marked == values_yaml()["prometheusRule"]["thresholds"]


def test_a_threshold_the_rules_file_no_longer_marks_fails_the_render(tmp_path):
    chart = tmp_path / "stunner-guard"
    shutil.copytree(CHART, chart)
    rules = chart / "files" / "prometheus-rules.yaml"
    rules.write_text(rules.read_text().replace("  # threshold: drainCapacityRatio", ""))
    with helm.Chart.load(chart) as loaded, pytest.raises(helm.HelmRenderError) as err:
        loaded.render({"prometheusRule": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)
    assert 'no "# threshold: drainCapacityRatio"' in str(err.value)


def test_the_dashboard_configmap_carries_the_dashboard_file_for_the_grafana_sidecar():
    rendered = _render_mode("monitoring")
    configmap = rendered.named("ConfigMap", f"{RELEASE}-dashboard")
    meta = configmap["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert meta["annotations"] == {"grafana_folder": "STUNner"}
    assert values_yaml()["grafanaDashboard"]["labels"] == {"grafana_dashboard": "1"}
    (key,) = configmap["data"]
    assert key.endswith(".json")
    assert json.loads(configmap["data"][key]) == json.loads(DASHBOARD_FILE.read_text())
    # Another chart name: only the job in up{job=...} follows it.
    renamed = render({"nameOverride": "guard", "grafanaDashboard": {"enabled": True}})
    text = renamed.named("ConfigMap", f"{RELEASE}-dashboard")["data"][key]
    assert json.loads(text) == json.loads(
        DASHBOARD_FILE.read_text().replace('up{job=\\"stunner-guard\\"}', 'up{job=\\"guard\\"}')
    )
    assert 'up{job=\\"guard\\"}' in text


def _hours(duration: str) -> float:
    """A Go duration of hours, as the chart writes them (e.g. 2160h)."""
    match = re.fullmatch(r"(\d+)h", duration)
    assert match, duration
    return float(match.group(1))


def test_cert_manager_renews_before_the_certificate_alert_could_fire():
    """A certificate cert-manager renews on time never has fewer days left than the
    warning threshold: the serving certificate is renewed renewBefore ahead, and the CA
    (which the serving Secret's ca.crt shows until the next serving renewal) early enough
    that the old CA still has more than the threshold left when that renewal comes."""
    warning_days = values_yaml()["prometheusRule"]["thresholds"]["certificateWarningDays"]
    rendered = _render_mode("cert-manager")
    serving = rendered.named("Certificate", f"{RELEASE}-serving")["spec"]
    ca = rendered.named("Certificate", f"{RELEASE}-ca")["spec"]
    serving_left = _hours(serving["renewBefore"]) / 24
    serving_interval = (_hours(serving["duration"]) - _hours(serving["renewBefore"])) / 24
    ca_left = _hours(ca["renewBefore"]) / 24 - serving_interval
    assert serving_left > warning_days and ca_left > warning_days, (serving_left, ca_left)


def test_notes_end_with_a_command_that_verifies_the_install(mode, chart):
    lines = [line.strip() for line in chart.notes.strip().splitlines()]
    verify = lines[-1]
    assert lines[-2].endswith(":") and "Verify" in "\n".join(lines[-6:])
    words = shlex.split(verify)
    assert words[0] == "kubectl" and "--dry-run=server" in words
    name = fullname(chart)
    assert f"deployment/{name}" in verify
    assert f"services/https:{name}:{chart.one('Service')['spec']['ports'][0]['port']}" in verify
    assert "/proxy/readyz" in verify
    # The dry run lands in a namespace the webhooks are called for.
    check_ns = words[words.index("create") - 1]
    for _, hook in webhooks_of(chart):
        if "namespaceSelector" in hook:
            assert _selector_matches(hook["namespaceSelector"], _namespace_labels(check_ns))
    assert f"kubectl delete mutatingwebhookconfiguration {name}" in chart.notes


def test_uninstall_removes_the_webhook_configurations():
    # Ordinary release resources, deleted by `helm uninstall` (first, by Helm's reverse kind
    # order); a hook or a keep policy would leave them behind, pointing at a deleted guard.
    for mode_name in ("defaults", "cert-manager"):
        for obj in _render_mode(mode_name).objects:
            annotations = obj["metadata"].get("annotations", {})
            assert not [a for a in annotations if a.startswith("helm.sh/")], obj["kind"]
    with helm.Config(storage_driver="memory", namespace=NAMESPACE) as cfg:
        release = cfg.install(str(CHART), RELEASE, dry_run="client", namespace=NAMESPACE)
    kinds = [o["kind"] for o in yaml.safe_load_all(release["manifest"]) if o]
    # In the release (what uninstall deletes), created after the guard's Service and
    # Deployment; Helm's uninstall order is the reverse, so they are deleted first.
    webhooks = [
        kinds.index("MutatingWebhookConfiguration"),
        kinds.index("ValidatingWebhookConfiguration"),
    ]
    assert min(webhooks) > max(kinds.index("Deployment"), kinds.index("Service"))


BAD_VALUES = {
    "unknown top-level key": ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    "unknown rule key": (
        {"policy": {"rules": {"requestsPresent": {"cpuu": "1"}}}},
        "at '/policy/rules/requestsPresent': additional properties 'cpuu'",
    ),
    "unknown rule": (
        {"policy": {"rules": {"threads": {"mode": "warn"}}}},
        "at '/policy/rules': additional properties 'threads' not allowed",
    ),
    "unknown drain key": (
        {"policy": {"drain": {"margin": 5}}},
        "at '/policy/drain': additional properties 'margin' not allowed",
    ),
    "bad mode": (
        {"policy": {"rules": {"gracePeriod": {"mode": "audit"}}}},
        "at '/policy/rules/gracePeriod/mode': value must be one of 'enforce', 'warn'",
    ),
    "bad allRulesMode": (
        {"policy": {"allRulesMode": "dry"}},
        "at '/policy/allRulesMode': value must be one of",
    ),
    "not a quantity": (
        {"policy": {"rules": {"limitsPresent": {"cpu": "two"}}}},
        "at '/policy/rules/limitsPresent/cpu': 'two' does not match pattern",
    ),
    "replicas 0": ({"replicaCount": 0}, "at '/replicaCount': minimum: got 0, want 2"),
    "replicas 1": ({"replicaCount": 1}, "at '/replicaCount': minimum: got 1, want 2"),
    "timeout above 30": (
        {"webhooks": {"timeoutSeconds": 31}},
        "at '/webhooks/timeoutSeconds': maximum: got 31, want 30",
    ),
    "failure policy case": (
        {"webhooks": {"mutating": {"failurePolicy": "fail"}}},
        "at '/webhooks/mutating/failurePolicy': value must be one of",
    ),
    "unknown webhook key": (
        {"webhooks": {"namespaceSelector": {}}},
        "at '/webhooks': additional properties 'namespaceSelector'",
    ),
    "string threads": (
        {"gunicorn": {"threads": "64"}},
        "at '/gunicorn/threads': got string, want integer",
    ),
    "threads not above held drains": (
        {"gunicorn": {"threads": 1000}},
        "gunicorn.threads (1000) must exceed policy.drain",
    ),
    "critical certificate days not below warning": (
        {"prometheusRule": {"enabled": True, "thresholds": {"certificateCriticalDays": 30}}},
        "certificateCriticalDays (30) must be below certificateWarningDays (30)",
    ),
    "capacity ratio above 1": (
        {"prometheusRule": {"thresholds": {"drainCapacityRatio": 1.5}}},
        "at '/prometheusRule/thresholds/drainCapacityRatio': maximum: got 1.5, want 1",
    ),
    "failure ratio of 1 (never fires)": (
        {"prometheusRule": {"thresholds": {"censusReadFailureRatio": 1}}},
        "at '/prometheusRule/thresholds/censusReadFailureRatio': exclusiveMaximum: got 1, want 1",
    ),
    "unknown threshold": (
        {"prometheusRule": {"thresholds": {"p95Seconds": 1}}},
        "at '/prometheusRule/thresholds': additional properties 'p95Seconds' not allowed",
    ),
    "dashboard namespace not a name": (
        {"grafanaDashboard": {"namespace": "Monitoring"}},
        "at '/grafanaDashboard/namespace'",
    ),
    "unknown census key": (
        {"census": {"interval": 10}},
        "at '/census': additional properties 'interval' not allowed",
    ),
    "bad census mode": (
        {"census": {"mode": "dry-run"}},
        "at '/census/mode': value must be one of 'enforce', 'warn', 'off'",
    ),
    "pdb blocks drains": (
        {"podDisruptionBudget": {"minAvailable": 2}},
        "podDisruptionBudget.minAvailable (2) must be below replicaCount (2)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_rendering_with_a_message_naming_the_key(case):
    values, message = BAD_VALUES[case]
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
        render(values)
    assert message in str(err.value)


_PASS_THROUGH = {  # Kubernetes objects and string maps, checked by the apiserver
    "affinity",
    "tolerations",
    "metricsFrom",  # NetworkPolicyPeers; the rendered NetworkPolicy is validated
    "topologySpreadConstraints",
    "podAnnotations",
    "podLabels",
    "nodeSelector",
    "annotations",
    "labels",
    "requests",
    "limits",
}


def _schema_objects(node: dict, path: str = ""):
    if node.get("type") == "object" or "properties" in node:
        yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _schema_objects(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _schema_objects(node["items"], f"{path}[]")


def test_the_values_schema_closes_every_level_and_matches_values_yaml():
    for path, node in _schema_objects(schema()):
        name = path.rsplit(".", 1)[-1].removesuffix("[]")
        if name in _PASS_THROUGH:
            continue
        assert node.get("additionalProperties") is False, path or "(root)"
    with helm.Chart.load(CHART) as loaded:
        loaded.validate_schema(values_yaml())

    def keys(values: dict, node: dict, path: str = "") -> None:
        props = node.get("properties", {})
        assert set(values) == set(props), path or "(root)"
        for key, value in values.items():
            if isinstance(value, dict) and value and key not in _PASS_THROUGH:
                keys(value, props[key], f"{path}.{key}")

    keys(values_yaml(), schema())


def test_every_values_key_is_commented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match or not match.group(3).strip():
            continue  # a parent mapping: its children carry the comments
        previous = lines[number - 1].strip()
        assert previous.startswith("#"), f"values.yaml:{number + 1}: {line.strip()}"


# --------------------------------------------------------------------------- image


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_image_is_slim_non_root_and_runs_gunicorn_with_the_repo_config():
    instructions = _dockerfile()
    assert [args for op, args in instructions if op == "FROM"] == ["python:3.11-slim"]
    (user,) = [args for op, args in instructions if op == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid > 0 and gid > 0
    pod = _render_mode("defaults").one("Deployment")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert [op for op, _ in instructions][-1] == "CMD"
    assert json.loads(instructions[-1][1]) == ["gunicorn", "--config", "gunicorn.conf.py"]
    copied = " ".join(args for op, args in instructions if op == "COPY")
    for path in ("pyproject.toml", "app.py", "gunicorn.conf.py", "webhooks/"):
        assert path in copied.split(), path


def test_the_image_installs_exactly_the_runtime_dependencies(tmp_path):
    runs = " ".join(args for op, args in _dockerfile() if op == "RUN")
    assert "[dev]" not in runs and "pip install" in runs
    # Run the Dockerfile's own extraction on the real pyproject.toml.
    (snippet,) = re.findall(r'python -c "([^"]+)"', runs)
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert out.stdout.split() == project["dependencies"]
    dev = {re.split(r"[=<>~!\[]", d)[0] for d in project["optional-dependencies"]["dev"]}
    assert not dev & {re.split(r"[=<>~!\[]", d)[0] for d in out.stdout.split()}


def test_the_build_context_leaves_out_keys_tests_and_the_venv():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Everything is excluded (certs/ with the development keys, tests/, .venv/ ...) except
    # what the Dockerfile copies.
    assert patterns[0] == "*"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "app.py", "gunicorn.conf.py", "webhooks/"}


# --------------------------------------------------------------------------- census policy


def _admission_policy(rendered: Rendered) -> dict:
    return rendered.one("ValidatingAdmissionPolicy")


def _vap_verdict(policy: dict, request: dict, obj: dict, old: dict) -> list[str]:
    """What the apiserver's ValidatingAdmissionPolicy plugin does with one request, with a
    real CEL evaluator: [] when it does not apply or allows, else the failed messages.
    matchConstraints first, then matchConditions, then the variables (each once, as the
    apiserver's lazy evaluation does), then every validation."""
    spec = policy["spec"]
    resource = request["resource"]["resource"]
    sub = request.get("subResource", "")
    target = f"{resource}/{sub}" if sub else resource
    rules = spec["matchConstraints"]["resourceRules"]
    if not any(
        request["operation"] in r["operations"]
        and (target in r["resources"] or (sub and f"{resource}/*" in r["resources"]))
        for r in rules
    ):
        return []
    context = {"request": request, "object": obj, "oldObject": old}
    if not all(cel.evaluate(c["expression"], context) for c in spec.get("matchConditions", [])):
        return []
    context["variables"] = {
        v["name"]: cel.evaluate(v["expression"], context) for v in spec.get("variables", [])
    }
    return [v["message"] for v in spec["validations"] if not cel.evaluate(v["expression"], context)]


GUARD_USER = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"


def _running_pod() -> dict:
    """The real stunnerd pod from the validating review, as it runs: a name, a token
    label, an owner, a status."""
    pod = copy.deepcopy(
        _review_object("010-validate-Pod-v1-CREATE-media-udp-gateway-8547c954bb-7gk8k.json")
    )
    meta = pod["metadata"]
    meta["labels"]["stunner-guard.l7mp.io/drain-token"] = "t0k3n"
    meta["annotations"] = {"stunner-guard.l7mp.io/changes": "[]"}
    meta.setdefault(
        "ownerReferences",
        [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "udp-gateway-8547c954bb",
                "uid": "6d6f6e6b-6579-4000-8000-000000000001",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    )
    meta |= {"resourceVersion": "1000", "uid": "6d6f6e6b-6579-4000-8000-000000000002"}
    pod["status"] = {"phase": "Running", "podIP": "10.244.1.7", "qosClass": "Burstable"}
    return pod


def _update(change, user: str = GUARD_USER, sub: str = "") -> tuple[dict, dict, dict]:
    old = _running_pod()
    new = copy.deepcopy(old)
    change(new)
    # What the apiserver itself changes on every update, before validating admission.
    new["metadata"]["resourceVersion"] = "1001"
    new["metadata"]["managedFields"] = [{"manager": "stunner-guard", "operation": "Update"}]
    request = {
        "operation": "UPDATE",
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "subResource": sub,
        "userInfo": {"username": user, "groups": ["system:serviceaccounts"]},
    }
    return request, new, old


def _set(path: str, value):
    def change(pod: dict) -> None:
        *parents, last = path.split(".")
        node = pod
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value

    return change


def _annotate(key: str, value):
    def change(pod: dict) -> None:
        annotations = pod["metadata"].setdefault("annotations", {})
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value

    return change


def _the_guards_patch(pod: dict) -> None:
    """The merge patch webhooks.kube.Kube.patch_pod_annotation sends, applied as the
    apiserver applies it."""
    patch = {"metadata": {"resourceVersion": "1000", "annotations": {COST_KEY: "3"}}}
    pod.clear()
    pod.update(merge_patch(_running_pod(), patch))


COST_KEY = "controller.kubernetes.io/pod-deletion-cost"
ALLOWED_UPDATES = {
    "the guard's own merge patch": _the_guards_patch,
    "cost added": _annotate(COST_KEY, "0"),
    "cost changed": lambda pod: (_annotate(COST_KEY, "2")(pod), _annotate(COST_KEY, "5")(pod)),
    "nothing changed": lambda pod: None,
}
REFUSED_UPDATES = {
    "a label changed": (
        lambda pod: pod["metadata"]["labels"].update({"app": "not-stunner"}),
        "labels",
    ),
    "the drain token removed": (
        lambda pod: pod["metadata"]["labels"].pop("stunner-guard.l7mp.io/drain-token"),
        "labels",
    ),
    "a container image changed": (
        lambda pod: pod["spec"]["containers"][0].update({"image": "evil/stunnerd:1"}),
        "spec",
    ),
    "another annotation added": (_annotate("example.com/owned", "yes"), "annotation"),
    "another annotation changed": (_annotate("stunner-guard.l7mp.io/changes", "[1]"), "annotation"),
    "another annotation removed": (_annotate("stunner-guard.l7mp.io/changes", None), "annotation"),
    "every annotation replaced by the cost": (
        _set("metadata.annotations", {COST_KEY: "1"}),
        "annotation",
    ),
    "a finalizer added": (_set("metadata.finalizers", ["example.com/hold"]), "finalizers"),
    "the owner removed (orphaned from its ReplicaSet)": (
        _set("metadata.ownerReferences", None),
        "ownerReferences",
    ),
    "an active deadline set (kills the pod)": (
        _set("spec.activeDeadlineSeconds", 1),
        "spec",
    ),
}


@pytest.mark.parametrize("case", sorted(ALLOWED_UPDATES))
def test_the_census_policy_lets_the_guard_change_the_pod_deletion_cost(case):
    policy = _admission_policy(_render_mode("defaults"))
    assert _vap_verdict(policy, *_update(ALLOWED_UPDATES[case])) == []


@pytest.mark.parametrize("case", sorted(REFUSED_UPDATES))
def test_the_census_policy_refuses_the_guard_any_other_change_to_a_pod(case):
    change, names_ = REFUSED_UPDATES[case]
    policy = _admission_policy(_render_mode("defaults"))
    refused = _vap_verdict(policy, *_update(change))
    assert len(refused) == 1 and names_ in refused[0], refused
    # Anyone else (here: the ReplicaSet controller) is not this policy's business.
    other = "system:serviceaccount:kube-system:replicaset-controller"
    assert _vap_verdict(policy, *_update(change, user=other)) == []


def test_the_census_policy_refuses_the_cost_on_pods_the_guard_did_not_stamp():
    """Not the scale-down order of every workload in the cluster: stunnerd pods only."""
    policy = _admission_policy(_render_mode("defaults"))
    request, new, old = _update(_annotate(COST_KEY, "0"))
    for pod in (new, old):
        pod["metadata"]["labels"].pop(names.DRAIN_TOKEN_LABEL)
    refused = _vap_verdict(policy, request, new, old)
    assert len(refused) == 1 and "stamped with a drain token" in refused[0], refused


@pytest.mark.parametrize(
    ("sub", "change"),
    [
        ("status", _set("status.phase", "Failed")),
        ("ephemeralcontainers", _set("spec.ephemeralContainers", [{"name": "x", "image": "sh"}])),
        ("resize", lambda pod: pod["spec"]["containers"][0]["resources"].update({"limits": {}})),
    ],
)
def test_the_census_policy_refuses_the_guard_pod_subresource_updates_too(sub, change):
    policy = _admission_policy(_render_mode("defaults"))
    assert _vap_verdict(policy, *_update(change, sub=sub)), sub
    # ... which RBAC does not grant it in the first place.
    assert all(
        "/" not in r
        for rule in _render_mode("defaults").one("ClusterRole")["rules"]
        for r in rule["resources"]
    )


def test_the_census_policy_names_the_guards_own_service_account(mode, chart):
    if mode_values(mode)["census"]["mode"] != "enforce":
        assert chart.all("ValidatingAdmissionPolicy") == []
        assert chart.all("ValidatingAdmissionPolicyBinding") == []
        return
    policy = _admission_policy(chart)
    [condition] = policy["spec"]["matchConditions"]
    account = chart.one("ServiceAccount")["metadata"]["name"]
    user = f"system:serviceaccount:{NAMESPACE}:{account}"
    assert cel.evaluate(condition["expression"], {"request": {"userInfo": {"username": user}}})
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = chart.one("ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
