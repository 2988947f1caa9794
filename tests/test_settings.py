"""Policy file and environment: defaults from DESIGN.md, errors that name the key."""

from __future__ import annotations

import pytest

from webhooks.settings import PolicyError, Settings, from_env, load_policy_document


def test_built_in_defaults_are_the_designed_ones():
    p = Settings().policy
    assert (p.requestsPresent.cpu, p.requestsPresent.memory) == ("500m", "128Mi")
    assert (p.requestsMinimal.maxCpu, p.requestsMinimal.maxMemory) == ("1", "512Mi")
    assert (p.limitsPresent.cpu, p.limitsPresent.memory) == ("2", "512Mi")
    assert (p.limitsSane.maxCpu, p.limitsSane.maxMemory) == ("2", "2Gi")
    assert (p.listenerThreads.max, p.listenerThreads.perCore) == (16, 8)
    assert (p.gracePeriod.default, p.gracePeriod.min, p.gracePeriod.max) == (3600, 600, 14400)
    assert p.hpaReplicas.mode == "warn"
    assert all(
        getattr(p, r).mode == "enforce"
        for r in (
            "requestsPresent",
            "requestsMinimal",
            "limitsPresent",
            "limitsSane",
            "listenerThreads",
            "gracePeriod",
            "drainHook",
            "metricsEndpoint",
            "hpaFeasibility",
        )
    )


def test_a_policy_document_overlays_the_defaults():
    policy, drain = load_policy_document(
        {
            "rules": {
                "requestsPresent": {"cpu": 0.25},
                "gracePeriod": {"mode": "warn", "default": 7200},
            },
            "drain": {"pollIntervalSeconds": 2, "marginSeconds": 10},
        }
    )
    assert policy.requestsPresent.cpu == "0.25" and policy.requestsPresent.memory == "128Mi"
    assert policy.gracePeriod.mode == "warn" and policy.gracePeriod.default == 7200
    assert policy.gracePeriod.max == 14400
    assert drain.pollIntervalSeconds == 2.0 and drain.marginSeconds == 10.0


@pytest.mark.parametrize(
    ("doc", "names"),
    [
        pytest.param({"rulez": {}}, "rulez: unknown key", id="unknown-top-level"),
        pytest.param(
            {"rules": {"requestPresent": {}}}, "rules.requestPresent: unknown key", id="typo-rule"
        ),
        pytest.param(
            {"rules": {"gracePeriod": {"mode": "strict"}}},
            "rules.gracePeriod.mode: 'strict' is not one of enforce|warn|off",
            id="bad-mode",
        ),
        pytest.param(
            {"rules": {"limitsSane": {"maxCpu": "two"}}},
            "rules.limitsSane.maxCpu: 'two' is not a non-negative Kubernetes quantity",
            id="bad-quantity",
        ),
        pytest.param(
            {"rules": {"requestsPresent": {"memory": "-64Mi"}}},
            "rules.requestsPresent.memory: '-64Mi' is not a non-negative Kubernetes quantity",
            id="negative-quantity",
        ),
        pytest.param(
            {"rules": {"limitsSane": {"maxCpu": "\uff12"}}},
            "rules.limitsSane.maxCpu: '\uff12' is not a non-negative Kubernetes quantity",
            id="fullwidth-digit-quantity",
        ),
        pytest.param(
            {"rules": {"listenerThreads": {"max": "16"}}},
            "rules.listenerThreads.max: '16' is not a non-negative integer",
            id="string-int",
        ),
        pytest.param(
            {"rules": {"requestsPresent": {"cpu": "3"}}},
            "rules.requestsPresent.cpu: 3 exceeds rules.requestsMinimal.maxCpu (1)",
            id="default-above-max",
        ),
        pytest.param(
            {"rules": {"gracePeriod": {"default": 60}}},
            "rules.gracePeriod.default: 60 is outside min..max (600..14400)",
            id="grace-default-outside",
        ),
        pytest.param(
            {"rules": {"drainHook": "enforce"}},
            "rules.drainHook: expected a mapping",
            id="rule-not-a-mapping",
        ),
        pytest.param(
            {"drain": {"pollIntervalSeconds": 0}},
            "drain.pollIntervalSeconds: must be greater than 0",
            id="zero-poll",
        ),
        pytest.param(
            {"drain": {"metricsPort": 70000}},
            "drain.metricsPort: 70000 is not a port",
            id="bad-port",
        ),
        pytest.param(["rules"], "expected a mapping", id="not-a-mapping"),
    ],
)
def test_an_invalid_policy_names_the_key(doc, names):
    with pytest.raises(PolicyError, match=None) as err:
        load_policy_document(doc)
    assert names in str(err.value)


def test_invalid_policy_file_stops_startup(tmp_path):
    from app import create_app

    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  limitsSane:\n    maxMemory: lots\n")
    with pytest.raises(PolicyError, match="rules.limitsSane.maxMemory"):
        create_app(from_env({"STUNNER_GUARD_POLICY_FILE": str(path)}), kube=None)
    path.write_text("rules: [\n")
    with pytest.raises(PolicyError, match="not YAML"):
        from_env({"STUNNER_GUARD_POLICY_FILE": str(path)})
    with pytest.raises(PolicyError, match="No such file"):
        from_env({"STUNNER_GUARD_POLICY_FILE": str(tmp_path / "missing.yaml")})


def test_drain_host_comes_from_the_service_variables_kubernetes_injects():
    env = {
        "STUNNER_GUARD_SERVICE_NAME": "my-guard",
        "MY_GUARD_SERVICE_HOST": "10.96.7.7",
        "MY_GUARD_SERVICE_PORT": "443",
    }
    s = from_env(env)
    assert (s.drainHost, s.drainPort, s.serviceName) == ("10.96.7.7", 443, "my-guard")
    explicit = from_env(
        env | {"STUNNER_GUARD_DRAIN_HOST": "10.0.0.1", "STUNNER_GUARD_DRAIN_PORT": "8443"}
    )
    assert (explicit.drainHost, explicit.drainPort) == ("10.0.0.1", 8443)


def test_readiness_fails_in_a_cluster_when_the_drain_host_is_unknown():
    from webhooks.service import Service

    missing = Service(from_env({"STUNNER_GUARD_SERVICE_NAME": "my-guard"}), kube=None)
    assert "MY_GUARD_SERVICE_HOST" in missing.not_ready_reason()
    local = Service(from_env({}), kube=None)  # make run: no Service, no drain host needed
    assert local.not_ready_reason() is None


def test_environment_knobs():
    s = from_env(
        {
            "STUNNER_GUARD_WATCH_NAMESPACES": "media, , turn",
            "STUNNER_GUARD_MAX_BODY_BYTES": "1024",
            "STUNNER_GUARD_DATAPLANE": "custom",
        }
    )
    assert s.watchNamespaces == ("media", "turn") and s.watches("turn") and not s.watches("other")
    assert s.maxBodyBytes == 1024 and s.dataplaneName == "custom"
    with pytest.raises(PolicyError, match="STUNNER_GUARD_MAX_BODY_BYTES"):
        from_env({"STUNNER_GUARD_MAX_BODY_BYTES": "3MiB"})
