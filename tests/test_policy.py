"""Policy rules per kind, table-driven, asserting on the patched object (no server, no cluster)."""

from __future__ import annotations

import copy
import json

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import (
    ADMISSION,
    DRAIN_HOST,
    POD_REVIEW,
    STUNNER,
    context,
    load_json,
    load_yaml_docs,
    stunnerd_pod,
    with_rules,
)
from webhooks.admission import dispatch
from webhooks.admission.policy import API_DEFAULT_GRACE_SECONDS, get_in
from webhooks.admission.quantities import quantity
from webhooks.admission.stunnerd import effective_threads, go_int, thread_values
from webhooks.names import (
    CHANGES_ANNOTATION,
    DRAIN_ANNOTATION,
    DRAIN_TOKEN_LABEL,
    MAX_RECORDED_CHANGE_CHARS,
    MAX_RECORDED_CHANGES,
)
from webhooks.settings import (
    GracePeriod,
    LimitsPresent,
    LimitsSane,
    ListenerThreads,
    RequestsMinimal,
    RequestsPresent,
    Rule,
    Settings,
)

V136 = ADMISSION / "apiserver-v1.36"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def run(
    obj: dict,
    webhook: str = "mutate",
    settings: Settings | None = None,
    kube=None,
    operation: str = "CREATE",
    namespace: str = "media",
):
    """(verdict, object after the verdict's patch) through the same path as the webhook."""
    group, _, version = obj["apiVersion"].rpartition("/")
    handler = dispatch.handler_for(group, version, obj["kind"], operation)
    assert handler is not None, f"no handler for {obj['kind']}"
    ctx = context(settings, webhook, kube, api_version=obj["apiVersion"], namespace=namespace)
    pristine = copy.deepcopy(obj)
    verdict = dispatch.verdict(obj, handler(obj, ctx), ctx)
    # Rules edit a copy: the request's object is what the patch is computed against.
    assert obj == pristine, "a rule modified the request's object"
    return verdict, jsonpatch.apply_patch(obj, verdict.patch) if verdict.patch else obj


def container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]


def resources(pod: dict) -> dict:
    return container(pod).get("resources", {})


# ---------------------------------------------------------------- requests and limits

RESOURCE_CASES = [
    pytest.param(
        {},
        {"requests": {"cpu": "500m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}},
        id="missing-all-filled",
    ),
    pytest.param(
        {"requests": {"cpu": "4", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "2Gi"}},
        {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        id="big-requests-and-limits-capped",
    ),
    pytest.param(
        {"limits": {"cpu": "250m", "memory": "64Mi"}},
        {
            "requests": {"cpu": "250m", "memory": "64Mi"},
            "limits": {"cpu": "250m", "memory": "64Mi"},
        },
        id="filled-request-never-exceeds-limit",
    ),
    pytest.param(
        {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        id="limit-below-request-raised",
    ),
    pytest.param(
        {"requests": {"cpu": 1, "memory": "128Mi"}, "limits": {"cpu": 2, "memory": "512Mi"}},
        {"requests": {"cpu": 1, "memory": "128Mi"}, "limits": {"cpu": 2, "memory": "512Mi"}},
        id="integer-quantities-kept-as-written",
    ),
    pytest.param(
        {
            "requests": {"cpu": "0.5", "memory": "134217728"},
            "limits": {"cpu": "2000m", "memory": "0.5Gi"},
        },
        {
            "requests": {"cpu": "0.5", "memory": "134217728"},
            "limits": {"cpu": "2000m", "memory": "0.5Gi"},
        },
        id="equivalent-spellings-untouched",
    ),
]


@pytest.mark.parametrize(("given_resources", "expected"), RESOURCE_CASES)
def test_pod_resources_are_shaped_to_policy(given_resources, expected):
    verdict, pod = run(stunnerd_pod(resources=given_resources))
    assert verdict.allowed
    assert resources(pod) == expected


def test_request_above_capped_limit_comes_down_to_the_limit_when_requests_minimal_is_off():
    settings = with_rules(requestsMinimal=RequestsMinimal("off"))
    _, pod = run(stunnerd_pod(resources={"requests": {"cpu": "3"}}), settings=settings)
    assert resources(pod)["requests"]["cpu"] == resources(pod)["limits"]["cpu"] == "2"


def test_a_quantity_that_does_not_parse_is_denied_naming_field_value_and_rule():
    verdict, _ = run(stunnerd_pod(resources={"requests": {"cpu": "lots"}}))
    assert not verdict.allowed
    assert "spec.containers[stunner-daemon].resources.requests.cpu is 'lots'" in verdict.message
    assert "rule quantity syntax" in verdict.message


@pytest.mark.parametrize("webhook", ["mutate", "validate"])
def test_warn_mode_changes_nothing(webhook):
    settings = with_rules(
        requestsPresent=RequestsPresent("warn"), limitsPresent=LimitsPresent("warn")
    )
    verdict, pod = run(stunnerd_pod(resources={}), webhook=webhook, settings=settings)
    assert verdict.allowed
    assert resources(pod) == {}


def test_warn_mode_warns_from_the_validating_webhook_only():
    settings = with_rules(requestsPresent=RequestsPresent("warn"))
    pod = stunnerd_pod(resources={"limits": {"cpu": "2", "memory": "512Mi"}})
    mutated, _ = run(pod, settings=settings)
    validated, _ = run(pod, webhook="validate", settings=settings)
    assert not any("requests" in w for w in mutated.warnings)
    assert validated.allowed
    assert any(
        "resources.requests.cpu is <unset>" in w and "requestsPresent" in w
        for w in validated.warnings
    )


def test_off_rules_leave_resources_alone():
    settings = with_rules(
        requestsPresent=RequestsPresent("off"),
        requestsMinimal=RequestsMinimal("off"),
        limitsPresent=LimitsPresent("off"),
        limitsSane=LimitsSane("off"),
    )
    _, pod = run(stunnerd_pod(resources={"requests": {"cpu": "8"}}), settings=settings)
    assert resources(pod) == {"requests": {"cpu": "8"}}


STRICT_SETTINGS = Settings(drainHost=DRAIN_HOST, fixableFindings="deny")


def test_validating_webhook_denies_what_enforce_mode_should_have_fixed_when_told_to():
    verdict, _ = run(
        stunnerd_pod(resources={"requests": {"cpu": "4"}}),
        webhook="validate",
        settings=STRICT_SETTINGS,
    )
    assert not verdict.allowed
    assert "resources.requests.cpu is 4" in verdict.message
    assert "rule requestsMinimal, mode enforce" in verdict.message


@pytest.mark.parametrize("kind", ["Pod", "Dataplane"])
def test_an_object_the_mutating_webhook_never_saw_is_admitted_with_warnings_by_default(kind):
    """The mutating call failed open (failurePolicy Ignore, a guard rollout): validation
    admits the object as it is, saying what mutation would have changed."""
    if kind == "Pod":
        obj = stunnerd_pod(resources={"requests": {"cpu": "4"}})
    else:
        obj = load_yaml_docs(STUNNER / "dataplane_default_v1.stunner.yaml")[0]
        obj["spec"]["resources"] = {"limits": {"cpu": "3"}}
    verdict, _ = run(obj, webhook="validate")
    assert verdict.allowed, verdict.message
    assert any(w.startswith("not adjusted") and "cpu" in w for w in verdict.warnings)
    strict, _ = run(obj, webhook="validate", settings=STRICT_SETTINGS)
    assert not strict.allowed


def test_what_mutation_cannot_fix_is_denied_whatever_fixable_findings_says():
    obj = stunnerd_pod(resources={"limits": {"cpu": "lots"}})
    for settings in (Settings(drainHost=DRAIN_HOST), STRICT_SETTINGS):
        verdict, _ = run(obj, webhook="validate", settings=settings)
        assert not verdict.allowed
        assert "limits.cpu is 'lots'" in verdict.message


def test_a_mutated_object_gets_no_warning_from_the_tolerant_validation():
    _, mutated = run(stunnerd_pod(resources={"requests": {"cpu": "4"}}))
    verdict, _ = run(mutated, webhook="validate")
    assert verdict.allowed
    assert not any(w.startswith("not adjusted") for w in verdict.warnings)


@hsettings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["requests", "limits"]),
        st.dictionaries(
            st.sampled_from(["cpu", "memory"]),
            st.sampled_from(
                ["0", "100m", "250m", "1", "1500m", "3", 7, "64Mi", "1Gi", "3Gi", "0.5"]
            ),
        ),
    ),
    st.sampled_from(["enforce", "warn", "off"]),
    st.sampled_from(["enforce", "warn", "off"]),
)
def test_the_guard_never_emits_a_request_above_its_limit(
    given_resources, requests_mode, limits_mode
):
    settings = with_rules(
        requestsPresent=RequestsPresent(requests_mode),
        requestsMinimal=RequestsMinimal(requests_mode),
        limitsPresent=LimitsPresent(limits_mode),
    )
    original = stunnerd_pod(resources=copy.deepcopy(given_resources))
    verdict, pod = run(original, settings=settings)
    before = given_resources
    after = resources(pod)
    for r in ("cpu", "memory"):
        req = quantity(after.get("requests", {}).get(r))
        lim = quantity(after.get("limits", {}).get(r))
        user_req = quantity(before.get("requests", {}).get(r))
        user_lim = quantity(before.get("limits", {}).get(r))
        if req is not None and lim is not None and req > lim:
            # Only ever the user's own inconsistency, untouched.
            assert (req, lim) == (user_req, user_lim)


# ---------------------------------------------------------------- listener threads

THREAD_CASES = [
    pytest.param(
        "2", ["-w", "--udp-thread-num=16"], ["-w", "--udp-thread-num=16"], id="default-pairing"
    ),
    pytest.param("1", ["-w", "--udp-thread-num=16"], ["-w", "--udp-thread-num=8"], id="equals"),
    pytest.param(
        "2", ["--udp-thread-num", "4", "-w"], ["--udp-thread-num", "16", "-w"], id="next-arg"
    ),
    pytest.param("2", ["-u", "4"], ["-u", "16"], id="short"),
    pytest.param("2", ["-u=4"], ["-u=16"], id="short-equals"),
    pytest.param("2", ["-u4"], ["-u16"], id="short-attached"),
    pytest.param("500m", ["-w"], ["-w", "--udp-thread-num=4"], id="absent-appended"),
    pytest.param(
        "250m",
        ["-w", "--", "extra"],
        ["-w", "--udp-thread-num=2", "--", "extra"],
        id="inserted-before-double-dash",
    ),
    pytest.param("100m", ["-u", "8"], ["-u", "1"], id="at-least-one"),
    pytest.param(
        "2",
        ["-u", "1", "--udp-thread-num=3"],
        ["-u", "16", "--udp-thread-num=16"],
        id="every-occurrence",
    ),
    pytest.param(
        "2", ["-w", "--udp-thread-num"], ["-w", "--udp-thread-num", "16"], id="missing-value"
    ),
    pytest.param("2", ["-w", "-u", "many"], ["-w", "-u", "16"], id="garbage-value"),
]


@pytest.mark.parametrize(("cpu_limit", "args", "expected"), THREAD_CASES)
def test_udp_thread_num_matches_the_cpu_limit(cpu_limit, args, expected):
    pod = stunnerd_pod(
        args=args,
        resources={
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": cpu_limit, "memory": "512Mi"},
        },
    )
    _, mutated = run(pod)
    assert container(mutated)["args"] == expected


def test_thread_flag_in_the_command_is_rewritten_there():
    pod = stunnerd_pod(
        command=["stunnerd", "--udp-thread-num=3"], args=["-w"], resources={"limits": {"cpu": "1"}}
    )
    _, mutated = run(pod)
    assert container(mutated)["command"] == ["stunnerd", "--udp-thread-num=8"]
    assert container(mutated)["args"] == ["-w"]


def test_no_command_and_no_args_warns_instead_of_overriding_the_image_cmd():
    pod = stunnerd_pod(command=None, args=None)
    verdict, mutated = run(pod)
    assert "args" not in container(mutated)
    assert any("cannot check --udp-thread-num" in w for w in verdict.warnings)


def test_thread_rule_respects_its_own_limits():
    settings = with_rules(listenerThreads=ListenerThreads(max=4, perCore=2))
    _, mutated = run(stunnerd_pod(resources={"limits": {"cpu": "1"}}), settings=settings)
    assert container(mutated)["args"] == ["-w", "--udp-thread-num=2"]


# stunnerd reads command[1:] + args with pflag (webhooks/admission/stunnerd.py): the rule
# reads them the same way and rewrites every occurrence in its own place and spelling.
ARGV_CASES = [
    pytest.param(
        ["stunnerd", "--udp-thread-num=3"],
        ["--udp-thread-num=99"],
        ["stunnerd", "--udp-thread-num=8"],
        ["--udp-thread-num=8"],
        id="in-command-and-args-both-rewritten",
    ),
    pytest.param(["stunnerd"], ["-wu4"], ["stunnerd"], ["-wu8"], id="cluster-attached"),
    pytest.param(["stunnerd"], ["-wu", "4"], ["stunnerd"], ["-wu", "8"], id="cluster-next"),
    pytest.param(["stunnerd"], ["-vwu=4"], ["stunnerd"], ["-vwu=8"], id="cluster-equals"),
    pytest.param(["stunnerd"], ["-uw"], ["stunnerd"], ["-u8"], id="u-takes-the-rest"),
    pytest.param(
        ["stunnerd"],
        ["-cu4"],
        ["stunnerd"],
        ["-cu4", "--udp-thread-num=8"],
        id="config-value-is-not-a-flag",
    ),
    pytest.param(
        ["stunnerd"],
        ["--log", "-u", "-w"],
        ["stunnerd"],
        ["--log", "-u", "-w", "--udp-thread-num=8"],
        id="long-flag-value-is-not-a-flag",
    ),
    pytest.param(
        ["stunnerd", "-u"], ["4", "-w"], ["stunnerd", "-u"], ["8", "-w"], id="value-in-args"
    ),
    pytest.param(
        ["stunnerd"],
        ["-w", "--", "-u", "4"],
        ["stunnerd"],
        ["-w", "--udp-thread-num=8", "--", "-u", "4"],
        id="after-double-dash-positional",
    ),
    pytest.param(
        ["stunnerd", "-w", "-c"],
        None,
        ["stunnerd", "-w", "--udp-thread-num=8", "-c"],
        None,
        id="not-swallowed-by-a-dangling-flag",
    ),
    pytest.param(["stunnerd"], ["-u", "0x8"], ["stunnerd"], ["-u", "0x8"], id="go-int-kept"),
    pytest.param(
        ["/sbin/tini", "--", "stunnerd", "-u", "3"],
        ["-w"],
        ["/sbin/tini", "--", "stunnerd", "-u", "8"],
        ["-w"],
        id="init-wrapper",
    ),
    pytest.param(None, ["-w", "-u", "3"], None, ["-w", "-u", "8"], id="image-entrypoint"),
]


@pytest.mark.parametrize(("command", "args", "expected_command", "expected_args"), ARGV_CASES)
def test_thread_flag_is_set_wherever_stunnerd_reads_it(
    command, args, expected_command, expected_args
):
    pod = stunnerd_pod(command=command, args=args, resources={"limits": {"cpu": "1"}})
    _, mutated = run(pod)
    assert container(mutated).get("command") == expected_command
    assert container(mutated).get("args") == expected_args
    assert effective_threads(expected_command, expected_args or []) == 8


@pytest.mark.parametrize(
    ("command", "args"),
    [
        pytest.param(["sh", "-c", "stunnerd -u 4"], None, id="sh-c"),
        pytest.param(["/bin/bash", "-ec"], ["exec stunnerd -u 4"], id="bash-script-in-args"),
        pytest.param(["tini", "--", "/bin/sh", "/run.sh"], None, id="shell-under-tini"),
        pytest.param(None, ["sh", "-c", "stunnerd -u 4"], id="shell-as-image-cmd"),
    ],
)
def test_a_shell_wrapper_gets_a_warning_instead_of_an_edit(command, args):
    pod = stunnerd_pod(command=command, args=args, resources={"limits": {"cpu": "1"}})
    verdict, mutated = run(pod)
    assert container(mutated).get("command") == command
    assert container(mutated).get("args") == args
    (warning,) = [w for w in verdict.warnings if "--udp-thread-num" in w]
    assert "cannot check --udp-thread-num (want 8)" in warning


THREAD_TOKENS = st.sampled_from(
    ["-w", "-u", "-wu", "-uw", "-u4", "-wu3", "-u=5", "-vu", "--udp-thread-num",
     "--udp-thread-num=7", "--", "-c", "/c", "-cu4", "--log", "--watch", "--config=/c",
     "-n", "4", "0x10", "x", "-", "-dwu9"]
)  # fmt: skip


@hsettings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.lists(THREAD_TOKENS, max_size=6).map(lambda t: ["stunnerd", *t])),
    st.one_of(st.none(), st.lists(THREAD_TOKENS, max_size=6)),
    st.sampled_from(["100m", "1", "1500m", "2"]),
)
def test_stunnerd_reads_the_wanted_thread_count_after_mutation_and_a_second_pass_is_a_no_op(
    command, args, cpu_limit
):
    pod = stunnerd_pod(command=command, args=args, resources={"limits": {"cpu": cpu_limit}})
    verdict, mutated = run(pod)
    if command is None and not args:
        return  # the image's CMD: warned, not edited
    new_command = container(mutated).get("command")
    new_args = container(mutated).get("args") or []
    want = min(16, max(1, int(8 * quantity(cpu_limit))))
    assert effective_threads(new_command, new_args) == want
    assert all(go_int(v) == want for v in thread_values(new_command, new_args))
    again, twice = run(mutated)
    assert again.patch == [] and twice == mutated


# ---------------------------------------------------------------- grace period


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(None, 3600, id="unset-default"),
        pytest.param(30, 3600, id="api-default-is-unset"),
        pytest.param(31, 600, id="below-min-raised-to-min"),
        pytest.param(900, 900, id="in-range-kept"),
        pytest.param(20000, 14400, id="above-max-capped"),
    ],
)
def test_grace_period_is_kept_in_range(given, expected):
    pod = stunnerd_pod()
    if given is None:
        del pod["spec"]["terminationGracePeriodSeconds"]
    else:
        pod["spec"]["terminationGracePeriodSeconds"] = given
    _, mutated = run(pod)
    assert mutated["spec"]["terminationGracePeriodSeconds"] == expected


def _made_stunnerd(review: dict) -> dict:
    """The object of a real captured review, its one container made a stunnerd one."""
    obj = copy.deepcopy(review["request"]["object"])
    spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]
    spec["containers"][0].update(
        name="stunnerd", image="docker.io/l7mp/stunnerd:1.2.0", command=["stunnerd"], args=["-w"]
    )
    return obj


# kubectl apply recorded what the user sent (last-applied-configuration): no grace period;
# the apiserver's defaulting filled one in before calling the webhook.
APISERVER_DEFAULTED = [
    pytest.param(V136 / "001-Pod-CREATE-stunner-hooked-pod.json", ("spec",), id="pod"),
    pytest.param(
        V136 / "002-Deployment-CREATE-stunner-hooked-deploy.json",
        ("spec", "template", "spec"),
        id="deployment-template",
    ),
]


@pytest.mark.parametrize(("path", "pod_spec"), APISERVER_DEFAULTED)
def test_the_apiserver_fills_in_30_where_the_user_set_no_grace_period(path, pod_spec):
    obj = load_json(path)["request"]["object"]
    sent = json.loads(obj["metadata"]["annotations"][LAST_APPLIED])
    assert "terminationGracePeriodSeconds" not in get_in(sent, *pod_spec)
    assert get_in(obj, *pod_spec)["terminationGracePeriodSeconds"] == API_DEFAULT_GRACE_SECONDS


@pytest.mark.parametrize(("path", "pod_spec"), APISERVER_DEFAULTED)
def test_a_grace_period_the_apiserver_filled_in_gets_the_default_not_the_minimum(path, pod_spec):
    verdict, mutated = run(_made_stunnerd(load_json(path)))
    assert get_in(mutated, *pod_spec)["terminationGracePeriodSeconds"] == 3600
    at = ".".join(pod_spec) + ".terminationGracePeriodSeconds"
    changes = json.loads(mutated["metadata"]["annotations"][CHANGES_ANNOTATION])
    assert any(c.startswith(f"{at}: 30 (API default) -> 3600 (gracePeriod") for c in changes)
    assert f"stunner-guard set {at}=3600, was 30 (API default) (gracePeriod)" in verdict.warnings


def test_the_real_operator_pod_review_with_the_api_default_grace_ends_with_the_default():
    # The captured operator pod carries the Dataplane's 3600; a Dataplane that sets none
    # still renders 3600, so 30 reaches a stunnerd Pod only from the apiserver's defaulting.
    review = load_json(POD_REVIEW)
    assert review["request"]["object"]["spec"]["terminationGracePeriodSeconds"] == 3600
    pod = copy.deepcopy(review["request"]["object"])
    pod["spec"]["terminationGracePeriodSeconds"] = API_DEFAULT_GRACE_SECONDS
    _, mutated = run(pod)
    assert mutated["spec"]["terminationGracePeriodSeconds"] == 3600


def test_a_dataplane_has_no_api_default_so_its_30_is_raised_to_the_minimum():
    _, dp = run(dataplane(terminationGracePeriodSeconds=30))
    assert dp["spec"]["terminationGracePeriodSeconds"] == 600


def test_a_policy_default_of_30_keeps_30():
    settings = with_rules(gracePeriod=GracePeriod(default=30, min=10))
    pod = stunnerd_pod()
    pod["spec"]["terminationGracePeriodSeconds"] = 30
    verdict, mutated = run(pod, settings=settings)
    assert mutated["spec"]["terminationGracePeriodSeconds"] == 30
    assert not any("terminationGracePeriodSeconds" in w for w in verdict.warnings)


def test_grace_period_that_is_not_an_integer_is_denied():
    pod = stunnerd_pod()
    pod["spec"]["terminationGracePeriodSeconds"] = "an hour"
    verdict, _ = run(pod)
    assert not verdict.allowed
    assert "spec.terminationGracePeriodSeconds is 'an hour'" in verdict.message


def test_short_grace_period_in_warn_mode_is_a_validation_warning_about_the_drain():
    settings = with_rules(gracePeriod=GracePeriod("warn"))
    pod = stunnerd_pod()
    pod["spec"]["terminationGracePeriodSeconds"] = 120
    _, mutated = run(pod, settings=settings)
    verdict, _ = run(mutated, webhook="validate", settings=settings)
    assert verdict.allowed
    assert any("drain can hold 115s" in w for w in verdict.warnings)


# ---------------------------------------------------------------- drain hook (Pod CREATE)


def test_drain_hook_is_injected_with_a_token_label_and_a_static_https_path():
    verdict, pod = run(stunnerd_pod())
    token = pod["metadata"]["labels"][DRAIN_TOKEN_LABEL]
    assert len(token) == 16
    assert container(pod)["lifecycle"]["preStop"] == {
        "httpGet": {
            "scheme": "HTTPS",
            "host": DRAIN_HOST,
            "port": 443,
            "path": f"/drain/media/{token}",
        }
    }
    assert any("lifecycle.preStop" in w for w in verdict.warnings)


def test_existing_token_is_kept_so_reinvocation_is_idempotent():
    pod = stunnerd_pod()
    pod["metadata"]["labels"][DRAIN_TOKEN_LABEL] = "feedfacecafebeef"
    _, mutated = run(pod)
    assert (
        container(mutated)["lifecycle"]["preStop"]["httpGet"]["path"]
        == "/drain/media/feedfacecafebeef"
    )


def test_a_user_prestop_is_kept_and_drain_is_declared_off():
    user_hook = {"exec": {"command": ["sleep", "30"]}}
    verdict, pod = run(stunnerd_pod(lifecycle={"preStop": user_hook}))
    assert container(pod)["lifecycle"]["preStop"] == user_hook
    assert DRAIN_TOKEN_LABEL not in pod["metadata"]["labels"]
    assert pod["metadata"]["annotations"][DRAIN_ANNOTATION].startswith("off:")
    assert any("drain is off" in w for w in verdict.warnings)


def test_without_a_drain_host_injection_is_skipped_with_a_warning():
    verdict, pod = run(stunnerd_pod(), settings=Settings())
    assert "lifecycle" not in container(pod)
    assert any("drain host unknown" in w for w in verdict.warnings)


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_drain_hook_is_not_injected_unless_enforced(mode):
    _, pod = run(stunnerd_pod(), settings=with_rules(drainHook=Rule(mode)))
    assert "lifecycle" not in container(pod)
    assert DRAIN_TOKEN_LABEL not in pod["metadata"]["labels"]


# ---------------------------------------------------------------- every mutation explained


def test_every_change_is_listed_in_the_changes_annotation_and_warned():
    verdict, pod = run(stunnerd_pod(resources={"requests": {"cpu": "4"}}))
    changes = json.loads(pod["metadata"]["annotations"][CHANGES_ANNOTATION])
    assert any(
        c.startswith("spec.containers[stunner-daemon].resources.requests.cpu: 4 -> 1")
        for c in changes
    )
    assert len(verdict.warnings) >= len(changes)
    assert all(len(w) <= 120 for w in verdict.warnings)


REQUEST_CPU = "spec.containers[stunner-daemon].resources.requests.cpu"


def test_changes_annotation_merges_with_earlier_runs():
    pod = stunnerd_pod(resources={"requests": {"cpu": "4"}})
    pod["metadata"]["annotations"] = {CHANGES_ANNOTATION: json.dumps(["earlier change"])}
    _, mutated = run(pod)
    changes = json.loads(mutated["metadata"]["annotations"][CHANGES_ANNOTATION])
    assert changes[0] == "earlier change" and len(changes) > 1


def test_re_applies_with_new_changes_keep_only_the_newest_changes():
    """A GitOps loop re-applying a manifest whose CPU request keeps changing: the annotation
    once grew by every change forever, towards the apiserver's 256 KiB annotation limit."""
    _, pod = run(stunnerd_pod())  # the first run also adds the drain hook
    runs = range(2, 2 + 3 * MAX_RECORDED_CHANGES)
    for cpu in runs:
        pod = copy.deepcopy(pod)
        container(pod)["resources"] = {
            "requests": {"cpu": str(cpu), "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "512Mi"},
        }
        _, pod = run(pod)
        changes = json.loads(pod["metadata"]["annotations"][CHANGES_ANNOTATION])
        assert len(changes) <= MAX_RECORDED_CHANGES
        assert changes[-1].startswith(f"{REQUEST_CPU}: {cpu} -> 1 "), changes[-1]
    assert [c.split(": ")[1] for c in changes] == [
        f"{cpu} -> 1 (requestsMinimal" for cpu in runs[-MAX_RECORDED_CHANGES:]
    ]


def test_a_change_made_again_moves_to_the_end_of_the_list():
    pod = stunnerd_pod(resources={"requests": {"cpu": "4"}})
    pod["metadata"]["labels"][DRAIN_TOKEN_LABEL] = "t0ken"  # the same hook path each run
    _, first = run(pod)
    made = json.loads(first["metadata"]["annotations"][CHANGES_ANNOTATION])
    pod["metadata"]["annotations"] = {CHANGES_ANNOTATION: json.dumps([*made, "someone else"])}
    _, again = run(pod)
    assert json.loads(again["metadata"]["annotations"][CHANGES_ANNOTATION]) == [
        "someone else",
        *made,
    ]


def test_a_hostile_changes_annotation_leaves_a_bounded_one():
    """Any client may write the annotation: 10,000 long entries of characters JSON escapes."""
    hostile = [f"{i}: " + '\u0001"\u00e9\U0001f600' * 200 for i in range(10_000)]
    pod = stunnerd_pod(resources={"requests": {"cpu": "4"}})
    pod["metadata"]["annotations"] = {CHANGES_ANNOTATION: json.dumps(hostile)}
    _, mutated = run(pod)
    text = mutated["metadata"]["annotations"][CHANGES_ANNOTATION]
    changes = json.loads(text)
    assert len(changes) == MAX_RECORDED_CHANGES
    assert all(len(c) <= MAX_RECORDED_CHANGE_CHARS for c in changes)
    assert len(text.encode()) < 100_000
    # The guard's own changes come last; before them, the newest of the earlier ones.
    made = [c for c in changes if c.startswith("spec.")]
    assert made and changes[-len(made) :] == made
    earlier = [int(c.split(":")[0]) for c in changes[: -len(made)]]
    assert earlier == list(range(10_000 - len(earlier), 10_000))


IDEMPOTENCY_OBJECTS = [
    pytest.param(stunnerd_pod(resources={"requests": {"cpu": "4"}}, args=["-u", "3"]), id="pod"),
    pytest.param(
        stunnerd_pod(lifecycle={"preStop": {"exec": {"command": ["true"]}}}), id="pod-user-hook"
    ),
] + [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}")
    for path in sorted(STUNNER.glob("*.yaml"))
    if not path.name.startswith(("crd_", "helm_"))
    for doc in load_yaml_docs(path)
    if dispatch.handler_for(
        doc["apiVersion"].rpartition("/")[0],
        doc["apiVersion"].rpartition("/")[2],
        doc["kind"],
        "CREATE",
    )
]


@pytest.mark.parametrize("obj", IDEMPOTENCY_OBJECTS)
def test_mutating_the_mutated_object_gives_an_empty_patch(obj):
    first, once = run(obj)
    assert first.allowed
    second, twice = run(once)
    assert second.patch == []
    assert twice == once


@pytest.mark.parametrize("obj", IDEMPOTENCY_OBJECTS)
def test_the_validating_webhook_accepts_what_the_mutating_webhook_produced(obj):
    _, mutated = run(obj)
    verdict, _ = run(mutated, webhook="validate")
    assert verdict.allowed, verdict.message


# ---------------------------------------------------------------- Dataplane


def dataplane(api_version="stunner.l7mp.io/v1", **spec) -> dict:
    return {
        "apiVersion": api_version,
        "kind": "Dataplane",
        "metadata": {"name": "default"},
        "spec": spec,
    }


def test_dataplane_gets_resources_threads_grace_and_metrics():
    _, dp = run(dataplane(resources={"limits": {"cpu": "1"}}))
    spec = dp["spec"]
    assert spec["resources"] == {
        "limits": {"cpu": "1", "memory": "512Mi"},
        "requests": {"cpu": "500m", "memory": "128Mi"},
    }
    # args were unset: the operator's defaults, with the thread count matched to 1 core.
    assert spec["args"] == ["-w", "--udp-thread-num=8"]
    assert spec["terminationGracePeriodSeconds"] == 3600
    assert spec["enableMetricsEndpoint"] is True


def test_dataplane_with_operator_default_args_and_two_cores_keeps_args_unset():
    _, dp = run(
        dataplane(
            resources={
                "limits": {"cpu": 2, "memory": "512Mi"},
                "requests": {"cpu": "500m", "memory": "128Mi"},
            }
        )
    )
    assert "args" not in dp["spec"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"command": ["stunnerd", "-u", "3"]},
            {"command": ["stunnerd", "-u", "8"], "args": ["-w", "--udp-thread-num=8"]},
            id="command-flag-and-operator-default-args",
        ),
        pytest.param(
            {"command": [], "args": []},
            {"command": [], "args": ["-w", "--udp-thread-num=8"]},
            id="empty-lists-are-the-operator-defaults",
        ),
        pytest.param(
            {"args": ["-wu4", "--log-format=text"]},
            {"args": ["-wu8", "--log-format=text"]},
            id="cluster",
        ),
        pytest.param(
            {"command": ["sh", "-c", "stunnerd -u 4"]},
            {"command": ["sh", "-c", "stunnerd -u 4"], "args": None},
            id="shell-left-alone",
        ),
    ],
)
def test_dataplane_thread_flag_follows_what_the_operator_renders(spec, expected):
    _, dp = run(dataplane(resources={"limits": {"cpu": "1"}}, **spec))
    assert {k: dp["spec"].get(k) for k in expected} == expected


def test_v1alpha1_dataplane_has_no_metrics_field_to_set():
    _, dp = run(dataplane("stunner.l7mp.io/v1alpha1"))
    assert "enableMetricsEndpoint" not in dp["spec"]


def test_dataplane_replicas_fighting_the_hpa_is_a_validation_warning_by_default():
    obj = dataplane(replicas=3)
    mutation, mutated = run(obj)
    verdict, _ = run(mutated, webhook="validate")
    assert mutated["spec"]["replicas"] == 3
    assert verdict.allowed
    assert any("spec.replicas is 3" in w and "hpaReplicas" in w for w in verdict.warnings)


def test_dataplane_without_spec_gets_one():
    obj = {"apiVersion": "stunner.l7mp.io/v1", "kind": "Dataplane", "metadata": {"name": "x"}}
    _, dp = run(obj)
    assert dp["spec"]["enableMetricsEndpoint"] is True


# ---------------------------------------------------------------- Deployment


def deployment(owned: bool, **container_fields) -> dict:
    pod = stunnerd_pod(**container_fields)
    labels = {"stunner.l7mp.io/owned-by": "stunner"} if owned else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "udp-gateway", "namespace": "media", "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": "stunner"}},
            "template": {"metadata": {"labels": {"app": "stunner"}}, "spec": pod["spec"]},
        },
    }


def test_operator_owned_deployment_is_never_mutated():
    verdict, dep = run(deployment(owned=True, resources={"requests": {"cpu": "4"}}))
    assert verdict.patch == [] and verdict.warnings == ()


def test_operator_owned_deployment_validation_warns_what_pods_will_get():
    verdict, _ = run(
        deployment(owned=True, resources={"requests": {"cpu": "4"}}), webhook="validate"
    )
    assert verdict.allowed
    assert any("pods will get" in w and "requests.cpu=1" in w for w in verdict.warnings)
    assert any("set these in the Dataplane" in w for w in verdict.warnings)


def test_operator_owned_deployment_is_denied_what_its_pods_would_be_denied():
    verdict, _ = run(
        deployment(owned=True, resources={"limits": {"memory": "a lot"}}), webhook="validate"
    )
    assert not verdict.allowed
    assert "resources.limits.memory is 'a lot'" in verdict.message


def test_other_stunnerd_deployments_get_their_pod_template_shaped():
    _, dep = run(deployment(owned=False, resources={}))
    template = dep["spec"]["template"]["spec"]
    assert template["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    assert "lifecycle" not in template["containers"][0]  # drain hook is per pod, at Pod CREATE
    assert CHANGES_ANNOTATION in dep["metadata"]["annotations"]


def test_non_stunnerd_pods_are_untouched():
    pod = stunnerd_pod(name="nginx", image="nginx:1.27", command=["nginx"])
    verdict, mutated = run(pod)
    assert verdict.patch == [] and mutated == pod


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"name": "stunnerd", "image": "x", "command": None}, True),
        (
            {
                "name": "app",
                "image": "registry.local:5000/l7mp/stunnerd@sha256:abc",
                "command": None,
            },
            True,
        ),
        ({"name": "app", "image": "busybox", "command": ["/usr/local/bin/stunnerd"]}, True),
        ({"name": "app", "image": "stunnerd-exporter:1", "command": None}, False),
    ],
)
def test_stunnerd_container_detection(fields, expected):
    from webhooks.admission.stunnerd import is_stunnerd

    assert is_stunnerd(container(stunnerd_pod(**fields))) is expected


def test_operator_owned_advice_derives_threads_from_the_limit_the_pods_will_get():
    verdict, _ = run(
        deployment(
            owned=True, args=["-w", "--udp-thread-num=16"], resources={"limits": {"cpu": "8"}}
        ),
        webhook="validate",
    )
    assert any("limits.cpu=2" in w for w in verdict.warnings)
    # 8 cores would mean 64 -> capped 16 (no advice); the pods' 2 cores mean 16 too.
    assert not any("--udp-thread-num" in w for w in verdict.warnings)
    verdict, _ = run(
        deployment(
            owned=True,
            args=["-w", "--udp-thread-num=16"],
            resources={"limits": {"cpu": "8"}, "requests": {"cpu": "1"}},
        ),
        webhook="validate",
        settings=with_rules(limitsSane=LimitsSane(maxCpu="1")),
    )
    assert any("--udp-thread-num=8" in w for w in verdict.warnings)


def _bare_metadata_pod() -> dict:
    pod = stunnerd_pod(resources={"limits": {"cpu": "8"}})
    pod["metadata"] = {"generateName": "x-", "namespace": "media"}
    return pod


def _user_hook_pod_without_annotations() -> dict:
    pod = stunnerd_pod(lifecycle={"preStop": {"exec": {"command": ["true"]}}})
    del pod["metadata"]["labels"]
    return pod


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(_bare_metadata_pod(), id="pod-without-labels-or-annotations"),
        pytest.param(_user_hook_pod_without_annotations(), id="pod-user-hook-no-labels"),
        pytest.param(
            {
                "apiVersion": "stunner.l7mp.io/v1",
                "kind": "Dataplane",
                "metadata": {"name": "d"},
                "spec": {"args": ["-u", "3"]},
            },
            id="dataplane-no-annotations",
        ),
        pytest.param(
            {
                "apiVersion": "stunner.l7mp.io/v1",
                "kind": "Dataplane",
                "metadata": "junk",
                "spec": "junk",
            },
            id="dataplane-junk",
        ),
        pytest.param(deployment(owned=False, resources={}), id="deployment"),
    ],
)
def test_rules_never_modify_the_request_object_whatever_its_shape(obj):
    verdict, mutated = run(obj)  # run() asserts the input is untouched
    assert mutated != obj or not verdict.patch
