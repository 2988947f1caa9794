"""The HPA rule: HPAs that can never fire are refused at apply time.

The rule reads the target through an API facade; here a plain lookup object stands in for
it (the HTTP-level tests use the real kubernetes client against a stand-in API server).
"""

from __future__ import annotations

import copy

import pytest

from tests.conftest import context, stunnerd_pod, with_rules
from webhooks.admission.rules import hpa
from webhooks.kube import KubeUnavailable
from webhooks.settings import RequestsPresent, Rule


class Lookup:
    def __init__(self, deployments=(), dataplane=None, error: str | None = None):
        self.deployments = {
            (d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments
        }
        self.dataplane = dataplane
        self.error = error
        self.reads = []

    def read_deployment(self, namespace, name):
        self.reads.append(("deployment", namespace, name))
        if self.error:
            raise KubeUnavailable(self.error)
        return copy.deepcopy(self.deployments.get((namespace, name)))

    def read_dataplane(self, name):
        self.reads.append(("dataplane", name))
        return copy.deepcopy(self.dataplane) if self.dataplane and name == "default" else None


def deployment(
    resources: dict | None = None, owned: bool = True, name="udp-gateway", **fields
) -> dict:
    spec = stunnerd_pod(resources=resources, **fields)["spec"]
    labels = {"stunner.l7mp.io/owned-by": "stunner"} if owned else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "media", "labels": labels},
        "spec": {"template": {"spec": spec}},
    }


def autoscaler(*metrics, target="udp-gateway") -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "udp-gateway", "namespace": "media"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 10,
            "metrics": list(metrics),
        },
    }


def cpu(utilization: int, container: str | None = None) -> dict:
    target = {"type": "Utilization", "averageUtilization": utilization}
    if container:
        return {
            "type": "ContainerResource",
            "containerResource": {"name": "cpu", "container": container, "target": target},
        }
    return {"type": "Resource", "resource": {"name": "cpu", "target": target}}


def review(obj, lookup, settings=None, webhook="validate"):
    return hpa.review(obj, context(settings, webhook, kube=lookup))


STANDARD = {
    "requests": {"cpu": "500m", "memory": "128Mi"},
    "limits": {"cpu": "2", "memory": "512Mi"},
}


@pytest.mark.parametrize(
    ("utilization", "allowed"),
    [
        pytest.param(300, True, id="300%x500m=1500m<2-fires"),
        pytest.param(399, True, id="399%-just-below"),
        pytest.param(400, False, id="400%x500m=2-equals-limit-never-fires"),
        pytest.param(500, False, id="500%x500m=2500m>2-never-fires"),
    ],
)
def test_feasibility_is_target_times_request_below_limit(utilization, allowed):
    outcome = review(autoscaler(cpu(utilization)), Lookup([deployment(STANDARD)]))
    assert (not outcome.denials) is allowed


def test_denial_names_object_field_value_rule_and_the_way_out():
    outcome = review(autoscaler(cpu(500)), Lookup([deployment(STANDARD)]))
    (message,) = outcome.denials
    assert message.startswith(
        "Test media/x: spec.metrics[0].resource.target.averageUtilization is 500"
    )
    assert "500% x CPU request 500m = 2500m is not below the CPU limit 2" in message
    assert "use at most 399%" in message
    assert "rule hpaFeasibility" in message


def test_feasibility_uses_the_resources_the_pods_will_actually_get():
    # No resources in the template: the Pod webhook fills 500m/2, so 300% fires.
    assert not review(autoscaler(cpu(300)), Lookup([deployment({})])).denials
    # A limit of 8 is capped to 2 on the pods: 500% x 500m can't be reached.
    capped = {"requests": {"cpu": "500m"}, "limits": {"cpu": "8"}}
    assert review(autoscaler(cpu(500)), Lookup([deployment(capped)])).denials


def test_no_cpu_request_means_utilization_is_undefined():
    settings = with_rules(requestsPresent=RequestsPresent("off"))
    outcome = review(autoscaler(cpu(80)), Lookup([deployment({"limits": {"cpu": "2"}})]), settings)
    assert "no CPU request" in outcome.denials[0]


def test_container_resource_metrics_measure_the_named_container():
    lookup = Lookup([deployment(STANDARD)])
    assert review(autoscaler(cpu(500, container="stunner-daemon")), lookup).denials
    assert not review(autoscaler(cpu(500, container="sidecar")), lookup).denials


def test_warn_mode_warns_instead_of_denying():
    outcome = review(
        autoscaler(cpu(500)),
        Lookup([deployment(STANDARD)]),
        with_rules(hpaFeasibility=Rule("warn")),
    )
    assert not outcome.denials
    assert any("can never fire" in w for w in outcome.warnings)


def test_memory_and_value_metrics_are_not_judged():
    memory = {
        "type": "Resource",
        "resource": {
            "name": "memory",
            "target": {"type": "Utilization", "averageUtilization": 900},
        },
    }
    value = {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "AverageValue", "averageValue": "5"}},
    }
    outcome = review(autoscaler(memory, value), Lookup([deployment(STANDARD)]))
    assert not outcome.denials and not outcome.warnings


def test_hpa_on_a_non_stunnerd_deployment_is_none_of_our_business():
    plain = deployment(STANDARD, name="web", image="nginx", command=["nginx"])
    plain["spec"]["template"]["spec"]["containers"][0]["name"] = "web"
    outcome = review(autoscaler(cpu(900), target="web"), Lookup([plain]))
    assert not outcome.denials and not outcome.warnings


@pytest.mark.parametrize(
    ("lookup", "says"),
    [
        pytest.param(None, "no Kubernetes API access", id="no-cluster"),
        pytest.param(
            Lookup(error="API unreachable: connection refused"), "could not read", id="api-down"
        ),
        pytest.param(Lookup([]), "not found", id="target-missing"),
    ],
)
def test_when_the_target_cannot_be_read_the_hpa_is_allowed_with_a_warning(lookup, says):
    outcome = review(autoscaler(cpu(900)), lookup)
    assert not outcome.denials
    assert any(says in w for w in outcome.warnings)


def test_dataplane_replicas_other_than_one_warns_for_operator_owned_targets():
    lookup = Lookup([deployment(STANDARD)], dataplane={"spec": {"replicas": 3}})
    outcome = review(autoscaler(cpu(300)), lookup)
    assert not outcome.denials
    assert any("spec.replicas=3 fights this HPA" in w for w in outcome.warnings)
    assert ("dataplane", "default") in lookup.reads


def test_dataplane_replicas_is_not_read_for_deployments_the_operator_does_not_own():
    lookup = Lookup([deployment(STANDARD, owned=False)], dataplane={"spec": {"replicas": 3}})
    outcome = review(autoscaler(cpu(300)), lookup)
    assert not outcome.warnings
    assert ("dataplane", "default") not in lookup.reads


def test_the_mutating_webhook_never_touches_hpas():
    lookup = Lookup([deployment(STANDARD)])
    outcome = review(autoscaler(cpu(900)), lookup, webhook="mutate")
    assert outcome.desired is None and not outcome.denials and not lookup.reads
