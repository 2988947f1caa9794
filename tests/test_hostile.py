"""Hostile inputs on /mutate and /validate: whatever arrives, the guard never answers 5xx, a
body that is not a v1 AdmissionReview gets 400/413 with the reason in plain text, and every
200 is a response a real apiserver accepts (k8s.io/apiserver .../request/admissionreview.go:
echoed apiVersion/kind/uid, patch and patchType together and only from the mutating
webhook, a JSONPatch that applies to the object it was asked about).

With failurePolicy Ignore a 5xx silently skips the guard; with Fail it blocks every stunnerd
pod in the cluster. Either way a crash is a bug, so exceptions propagate here and fail the
example with their traceback.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import random
import string
import time
from typing import Any

import jsonpatch
import pytest
from hypothesis import assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from tests.conftest import ADMISSION, DRAIN_HOST, load_json
from webhooks import logs
from webhooks.admission import dispatch
from webhooks.admission.review import API_VERSION, KIND, MAX_DEPTH, MAX_WARNING_CHARS
from webhooks.names import CHANGES_ANNOTATION, DRAIN_TOKEN_LABEL, OPERATOR_OWNED_LABEL
from webhooks.settings import Settings

LIMIT = Settings().maxBodyBytes
WEBHOOKS = ("mutate", "validate")
RFC6902_OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})

# Real request bodies captured from kube-apiserver v1.36 (Pods, Deployments, Dataplanes, HPA).
REVIEWS = {p.name: load_json(p) for p in sorted((ADMISSION / "apiserver-v1.36").rglob("*.json"))}
POD_REVIEW = "009-mutate-Pod-v1-CREATE-media-udp-gateway-8547c954bb-.json"
DEPLOYMENT_REVIEW = "007-mutate-Deployment-v1-CREATE-media-udp-gateway.json"
DATAPLANE_REVIEW = "003-mutate-Dataplane-v1-UPDATE-cluster-default.json"
V1BETA1 = sorted((ADMISSION / "requests").glob("v1beta1_*.json"))


@pytest.fixture(scope="module")
def guard():
    """The production app (drain host set, so pod mutation injects the preStop hook), no
    cluster. Module-scoped: hypothesis runs many examples against one app."""
    app = create_app(Settings(drainHost=DRAIN_HOST), kube=None)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    return app.test_client()


@pytest.fixture(scope="module")
def small_guard():
    """The same app with a 2 KiB body limit, so the 413 boundary is cheap to explore."""
    app = create_app(Settings(drainHost=DRAIN_HOST, maxBodyBytes=2048), kube=None)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    return app.test_client()


# --------------------------------------------------------------------------- the contract


def post(client, webhook: str, body: bytes):
    return client.post(f"/{webhook}", data=body, content_type="application/json")


def strict_json(data: bytes | str) -> Any:
    """JSON as Go's encoding/json reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def contract_status(body: bytes, limit: int = LIMIT) -> set[int]:
    """The HTTP statuses the error table in webhooks/admission/review.py allows for ``body``."""
    if len(body) > limit:
        return {413}
    try:
        review = json.loads(body)
    except (ValueError, RecursionError):
        return {400}
    if not isinstance(review, dict):
        return {400}
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        return {400}
    request = review.get("request")
    if not isinstance(request, dict) or not _text(request.get("uid")):
        return {400}
    kind = request.get("kind")
    if (
        not isinstance(kind, dict)
        or not _text(kind.get("kind"))
        or not _text(kind.get("version"))
        or not isinstance(kind.get("group", ""), str)
    ):
        return {400}
    # Fields the table does not list: a wrongly typed one may be refused with a reason.
    optional = [request.get(k) for k in ("operation", "namespace", "name", "subResource")]
    dry_run = request.get("dryRun")
    if any(v is not None and not isinstance(v, str) for v in optional) or not (
        dry_run is None or isinstance(dry_run, bool)
    ):
        return {200, 400}
    return {200}


def assert_reason_in_plain_text(response) -> str:
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True).strip()
    assert text and not text.startswith("<"), "the reason, not an HTML error page"
    return text


def assert_apiserver_accepts(webhook: str, review: dict, response) -> dict:
    """Everything the apiserver checks on a webhook's answer, and what the guard promises.
    The response, with the object after its patch under ``patched`` when there is one."""
    assert response.mimetype == "application/json"
    answer = strict_json(response.get_data())
    assert answer["apiVersion"] == API_VERSION
    assert answer["kind"] == KIND
    result = answer["response"]
    assert result["uid"] == review["request"]["uid"]
    assert isinstance(result["allowed"], bool)
    assert ("patch" in result) == ("patchType" in result)
    warnings = result.get("warnings", [])
    assert isinstance(warnings, list)
    for warning in warnings:
        assert isinstance(warning, str) and len(warning) <= MAX_WARNING_CHARS, warning
    if not result["allowed"]:
        assert result["status"]["code"] == 403
        assert _text(result["status"]["message"])
        assert "patch" not in result
    if "patch" in result:
        assert webhook == "mutate", "only the mutating webhook may patch"
        assert result["patchType"] == "JSONPatch"
        ops = strict_json(base64.b64decode(result["patch"], validate=True))
        assert isinstance(ops, list) and ops, "an empty patch is sent as no patch"
        for op in ops:
            assert isinstance(op, dict) and op.get("op") in RFC6902_OPS, op
            assert isinstance(op.get("path"), str), op
        result["patched"] = jsonpatch.apply_patch(review["request"].get("object"), ops)
    return result


def _count(outcome: str) -> None:
    """Outcome shares for ``pytest --hypothesis-show-statistics``."""
    if currently_in_test_context():
        event(outcome)


def assert_contract(client, webhook: str, body: bytes, limit: int = LIMIT) -> dict | None:
    """Post ``body``; check the answer against the contract. The response, when 200."""
    response = post(client, webhook, body)
    assert response.status_code < 500
    allowed = contract_status(body, limit)
    assert response.status_code in allowed, (
        response.status_code,
        response.get_data(as_text=True)[:300],
    )
    if response.status_code != 200:
        assert_reason_in_plain_text(response)
        _count(f"{webhook}: {response.status_code}")
        return None
    result = assert_apiserver_accepts(webhook, json.loads(body), response)
    verdict = "denied" if not result["allowed"] else "patched" if "patch" in result else "allowed"
    _count(f"{webhook}: 200 {verdict}")
    return result


def encode(review: Any) -> bytes:
    return json.dumps(review).encode()


# --------------------------------------------------------------------------- strategies

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
# Kubernetes quantities, well-formed and not: what users type into resources.
QUANTITIES = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "500m",
            "0.5",
            ".5",
            "1e3",
            "1E-3",
            "2.5Gi",
            "1Ei",
            "1e308",
            "1e-308",
            "1.5m",
            "0.0001",
            "+1",
            "-0",
            "1_000",
            " 1",
            "1 ",
            "NaN",
            "Infinity",
            "inf",
            "1e",
            "m",
            "Mi",
            "0x10",
            "\uff11",
            "1e999",
            "1e-999",
            "99999999999999999999999999",
            "1e4301",
            "1e5000",
            "1e999999999",
            "1e-999999999",
            "9223372036854775808",
        ]
    ),
    st.from_regex(
        r"[+-]?([0-9]{1,4}(\.[0-9]{0,3})?|\.[0-9]{1,3})([eE][+-]?[0-9]{1,3}|[numkMGTPE]|[KMGTPE]i)?",
        fullmatch=True,
    ),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
)
# stunnerd argv, with the thread flag in every spelling and some that are not.
ARGV = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "-u",
                "--udp-thread-num",
                "--udp-thread-num=",
                "--udp-thread-num=4",
                "-u=",
                "-u4",
                "-u0",
                "-u-1",
                "--udp-thread-num=99999999999999999999",
                "--",
                "-w",
                "stunnerd",
                "-l",
                "all:INFO",
                "-uu",
            ]
        ),
        st.text(max_size=6),
        SCALARS,
    ),
    max_size=6,
)
SPECIAL = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        1,
        2**63,
        1.5,
        "",
        [],
        {},
        [{}],
        [None],
        "stunnerd",
        "stunner-daemon",
        "docker.io/l7mp/stunnerd:1.2.0",
        ["stunnerd"],
        ["/usr/bin/stunnerd"],
        "stunner",
        "Deployment",
        "Utilization",
        '["spec: a -> b"]',
        "not json",
        "{}",
        "/drain/media/x",
        {"httpGet": {"path": "/drain/media/abc"}},
        {"exec": {"command": ["sleep", "1"]}},
        {"cpu": "1"},
        {"limits": {"cpu": "1"}},
        {"requests": "1"},
    ]
)
WILD = st.one_of(QUANTITIES, ARGV, SPECIAL, JUNK)

CONTAINER_FIELDS: list[tuple] = [
    (),
    ("name",),
    ("image",),
    ("command",),
    ("command", 0),
    ("args",),
    ("args", 0),
    ("args", 1),
    ("resources",),
    ("resources", "requests"),
    ("resources", "limits"),
    ("resources", "requests", "cpu"),
    ("resources", "requests", "memory"),
    ("resources", "limits", "cpu"),
    ("resources", "limits", "memory"),
    ("lifecycle",),
    ("lifecycle", "preStop"),
    ("lifecycle", "preStop", "httpGet", "path"),
]
METADATA_FIELDS: list[tuple] = [
    ("metadata",),
    ("metadata", "name"),
    ("metadata", "generateName"),
    ("metadata", "labels"),
    ("metadata", "labels", DRAIN_TOKEN_LABEL),
    ("metadata", "labels", OPERATOR_OWNED_LABEL),
    ("metadata", "annotations"),
    ("metadata", "annotations", CHANGES_ANNOTATION),
]


def _pod_spec_fields(prefix: tuple) -> list[tuple]:
    return [prefix, prefix + ("containers",), prefix + ("terminationGracePeriodSeconds",)] + [
        prefix + ("containers", i) + f for i in (0, 1) for f in CONTAINER_FIELDS
    ]


# Fields each rule reads, by request.kind: where random types do the most damage.
HOT_FIELDS: dict[str, list[tuple]] = {
    "Pod": METADATA_FIELDS + _pod_spec_fields(("spec",)),
    "Deployment": METADATA_FIELDS
    + [("spec",), ("spec", "template")]
    + _pod_spec_fields(("spec", "template", "spec")),
    "Dataplane": METADATA_FIELDS
    + [("spec", *f) for f in CONTAINER_FIELDS]
    + [
        ("spec", "replicas"),
        ("spec", "enableMetricsEndpoint"),
        ("spec", "terminationGracePeriodSeconds"),
    ],
    "HorizontalPodAutoscaler": METADATA_FIELDS
    + [
        ("spec",),
        ("spec", "scaleTargetRef"),
        ("spec", "scaleTargetRef", "kind"),
        ("spec", "scaleTargetRef", "name"),
        ("spec", "metrics"),
        ("spec", "metrics", 0),
        ("spec", "metrics", 0, "type"),
        ("spec", "metrics", 0, "resource", "target"),
        ("spec", "metrics", 0, "resource", "target", "averageUtilization"),
    ],
}
# The envelope around the object: mostly 400s, and the dispatch inputs.
ENVELOPE_FIELDS: list[tuple] = [
    ("apiVersion",),
    ("kind",),
    ("request",),
    ("request", "uid"),
    ("request", "kind"),
    ("request", "kind", "group"),
    ("request", "kind", "version"),
    ("request", "kind", "kind"),
    ("request", "operation"),
    ("request", "namespace"),
    ("request", "name"),
    ("request", "subResource"),
    ("request", "dryRun"),
    ("request", "object"),
    ("request", "oldObject"),
]
DISPATCH = st.sampled_from(
    [
        ("", "v1", "Pod"),
        ("apps", "v1", "Deployment"),
        ("stunner.l7mp.io", "v1", "Dataplane"),
        ("stunner.l7mp.io", "v1alpha1", "Dataplane"),
        ("autoscaling", "v2", "HorizontalPodAutoscaler"),
        ("autoscaling", "v1", "HorizontalPodAutoscaler"),
        ("apps", "v1", "ReplicaSet"),
        ("", "v1", "Service"),
        ("stunner.l7mp.io", "v2", "Dataplane"),
    ]
)
OPERATIONS = st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT", "create", ""])


def set_in(node: Any, path: tuple, value: Any) -> Any:
    """``node`` with ``value`` at ``path``; maps and lists are made where missing or of
    another type (a string key needs a map, an int index a list)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, int):
        node = list(node) if isinstance(node, list) else []
        while len(node) <= key:
            node.append({})
        node[key] = set_in(node[key], rest, value)
    else:
        node = dict(node) if isinstance(node, dict) else {}
        node[key] = set_in(node.get(key), rest, value)
    return node


def delete_in(node: Any, path: tuple) -> None:
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)
    elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        del node[path[-1]]


def all_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += all_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += all_paths(child, prefix + (index,))
    return paths


OBJECT_PATHS = {name: all_paths(r["request"]["object"]) for name, r in REVIEWS.items()}


def _patched_as_captured() -> list[str]:
    """The captured reviews the mutating webhook patches as they are."""
    client = create_app(Settings(drainHost=DRAIN_HOST), kube=None).test_client()
    return sorted(
        name
        for name, review in REVIEWS.items()
        if "patch" in post(client, "mutate", encode(review)).get_json()["response"]
    )


PATCHED_REVIEWS = _patched_as_captured()


@st.composite
def damaged_reviews(draw, envelope: bool = False, names: list[str] | None = None) -> dict:
    """A real apiserver request with a few fields replaced by anything, or deleted: the
    fields the rules read most of the time, any field of the object otherwise."""
    name = draw(st.sampled_from(names or sorted(REVIEWS)))
    review = copy.deepcopy(REVIEWS[name])
    hot = HOT_FIELDS[review["request"]["kind"]["kind"]]
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.sampled_from(["hot", "hot", "any"] + (["envelope"] if envelope else [])))
        if where == "envelope":
            path = draw(st.sampled_from(ENVELOPE_FIELDS))
        else:
            fields = hot if where == "hot" else OBJECT_PATHS[name]
            path = ("request", "object") + draw(st.sampled_from(fields))
        if draw(st.integers(min_value=0, max_value=3)) == 0 and len(path) > 2:
            delete_in(review, path)
        else:
            review = set_in(review, path, draw(WILD))
    if isinstance(review.get("request"), dict) and draw(st.booleans()):
        review["request"]["dryRun"] = draw(st.booleans())
    return review


@st.composite
def made_up_reviews(draw) -> dict:
    """Envelopes with a Pod/Deployment/Dataplane/HPA-shaped object that has random types
    in random places, under random dispatch keys and operations."""
    group, version, kind = draw(DISPATCH)
    obj: Any = {"apiVersion": f"{group}/{version}".lstrip("/"), "kind": kind}
    # Most start as a stunnerd workload, so the rules run before the random fields land.
    container = {"name": "stunner-daemon", "image": "docker.io/l7mp/stunnerd:1.2.0"}
    seed = {"Pod": ("spec",), "Deployment": ("spec", "template", "spec")}.get(kind)
    if seed and draw(st.integers(min_value=0, max_value=3)):
        obj = set_in(obj, seed + ("containers",), [container])
    fields = HOT_FIELDS.get(kind) or HOT_FIELDS["Pod"]
    for path in draw(st.lists(st.sampled_from(fields), max_size=8)):
        obj = set_in(obj, path, draw(WILD))
    request = {
        "uid": draw(st.one_of(st.just("made-up-uid"), st.text(min_size=1, max_size=8))),
        "kind": {"group": group, "version": version, "kind": kind},
        "operation": draw(OPERATIONS),
        "namespace": draw(st.sampled_from(["media", "", "stunner-guard", "a/b"])),
        "object": draw(st.one_of(st.just(obj), JUNK)) if draw(st.booleans()) else obj,
    }
    for key in draw(
        st.lists(st.sampled_from(["name", "subResource", "oldObject", "dryRun"]), max_size=2)
    ):
        request[key] = draw(
            st.sampled_from(["", "status", "scale", None, True])
            if draw(st.integers(min_value=0, max_value=3))
            else JUNK
        )
    return {"apiVersion": API_VERSION, "kind": KIND, "request": request}


def truncated_reviews() -> st.SearchStrategy[bytes]:
    bodies = [encode(r) for r in REVIEWS.values()]
    return st.sampled_from(bodies).flatmap(
        lambda body: st.integers(min_value=0, max_value=len(body) - 1).map(lambda n: body[:n])
    )


RANDOM_BODIES = st.one_of(
    st.binary(max_size=256),
    JUNK.map(encode),
    truncated_reviews(),
    st.fixed_dictionaries(
        {},
        optional={
            "apiVersion": st.one_of(
                st.sampled_from([API_VERSION, "admission.k8s.io/v1beta1", "v1", ""]), JUNK
            ),
            "kind": st.one_of(st.sampled_from([KIND, "AdmissionRequest", "Pod"]), JUNK),
            "request": st.one_of(
                JUNK,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "uid": st.one_of(st.just("u"), JUNK),
                        "kind": st.one_of(
                            DISPATCH.map(
                                lambda d: dict(zip(("group", "version", "kind"), d, strict=True))
                            ),
                            JUNK,
                        ),
                        "object": JUNK,
                        "dryRun": JUNK,
                    },
                ),
            ),
        },
    ).map(encode),
)

# No deadline: a shared CI machine makes per-example timing noise, not signal.
FAST = settings(max_examples=150, deadline=None)


# --------------------------------------------------------------------------- properties


@FAST
@given(body=RANDOM_BODIES)
def test_random_bodies_get_a_reason_or_a_valid_review(guard, body):
    for webhook in WEBHOOKS:
        assert_contract(guard, webhook, body)


@FAST
@given(review=damaged_reviews(envelope=True))
def test_real_reviews_with_damaged_envelopes_get_a_reason_or_a_valid_review(guard, review):
    body = encode(review)
    for webhook in WEBHOOKS:
        assert_contract(guard, webhook, body)


@settings(FAST, max_examples=300)
@given(review=damaged_reviews())
def test_real_objects_with_random_types_in_their_fields_get_an_applicable_answer(guard, review):
    body = encode(review)
    for webhook in WEBHOOKS:
        assert assert_contract(guard, webhook, body) is not None


@FAST
@given(review=made_up_reviews())
def test_made_up_workloads_of_every_kind_get_an_applicable_answer(guard, review):
    body = encode(review)
    for webhook in WEBHOOKS:
        assert_contract(guard, webhook, body)


# From the reviews the guard patches as captured: damage then leaves about 80% of them
# patched, where drawing from every review left so few that Hypothesis gave up
# (filter_too_much) in some runs.
@settings(FAST, max_examples=100)
@given(review=damaged_reviews(names=PATCHED_REVIEWS))
def test_mutating_a_mutated_hostile_object_changes_nothing(guard, review):
    """The apiserver may call the webhook again on its own output (reinvocationPolicy)."""
    first = assert_contract(guard, "mutate", encode(review))
    assume(first is not None and "patched" in first)
    review["request"]["object"] = first["patched"]
    second = assert_contract(guard, "mutate", encode(review))
    assert second is not None and "patch" not in second, second


@settings(FAST, max_examples=60)
@given(padding=st.integers(min_value=1500, max_value=2600), chunked=st.booleans())
def test_the_body_limit_holds_at_every_size_around_it(small_guard, padding, chunked):
    body = encode(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "request": {
                "uid": "u",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "object": {"metadata": {"annotations": {"p": "x" * padding}}},
            },
        }
    )
    if chunked:
        response = small_guard.post("/validate", **_chunked(body))
    else:
        response = post(small_guard, "validate", body)
    assert response.status_code == (413 if len(body) > 2048 else 200)


# --------------------------------------------------------------------------- the error table


def _chunked(body: bytes) -> dict:
    """A request with no Content-Length, as gunicorn passes a chunked upload."""
    return {
        "input_stream": io.BytesIO(body),
        "headers": {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},
    }


def _pod_review(**request_changes) -> dict:
    review = copy.deepcopy(REVIEWS[POD_REVIEW])
    for key, value in request_changes.items():
        if value is _DELETE:
            del review["request"][key]
        else:
            review["request"][key] = value
    return review


_DELETE = object()


def _kind_without(key: str) -> dict:
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    del kind[key]
    return kind


def _padded_pod_review(size: int) -> bytes:
    """The real Pod review, padded with an annotation to exactly ``size`` bytes."""
    review = _pod_review()
    review["request"]["object"]["metadata"]["annotations"]["padding"] = ""
    body = encode(review)
    review["request"]["object"]["metadata"]["annotations"]["padding"] = "x" * (size - len(body))
    body = encode(review)
    assert len(body) == size
    return body


ERROR_TABLE = [
    pytest.param(b"", 400, "not JSON", id="empty body is not JSON"),
    pytest.param(b"{not json", 400, "not JSON", id="broken JSON"),
    pytest.param(b'{"kind": "AdmissionReview"', 400, "not JSON", id="truncated JSON"),
    pytest.param(b'{"a": "\xff"}', 400, "not JSON", id="not UTF-8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "not JSON", id="nested past the stack"),
    pytest.param(b"[]", 400, "not a JSON object", id="a list is not an object"),
    pytest.param(b'"AdmissionReview"', 400, "not a JSON object", id="a string is not an object"),
    pytest.param(b"null", 400, "not a JSON object", id="null is not an object"),
    pytest.param(
        encode({**_pod_review(), "apiVersion": None}), 400, "apiVersion", id="no apiVersion"
    ),
    pytest.param(
        encode({**_pod_review(), "apiVersion": "admission.k8s.io/v2"}),
        400,
        "admission.k8s.io/v2",
        id="apiVersion v2",
    ),
    pytest.param(
        encode({**_pod_review(), "kind": "AdmissionRequest"}),
        400,
        "AdmissionRequest",
        id="kind is not AdmissionReview",
    ),
    pytest.param(encode({**_pod_review(), "kind": None}), 400, "kind", id="no kind"),
    pytest.param(
        encode({"apiVersion": API_VERSION, "kind": KIND}), 400, "request", id="no request"
    ),
    pytest.param(
        encode({**_pod_review(), "request": []}), 400, "request", id="request is not an object"
    ),
    pytest.param(encode(_pod_review(uid=_DELETE)), 400, "request.uid", id="no uid"),
    pytest.param(encode(_pod_review(uid="")), 400, "request.uid", id="empty uid"),
    pytest.param(encode(_pod_review(uid=42)), 400, "request.uid", id="uid is a number"),
    pytest.param(encode(_pod_review(kind=_DELETE)), 400, "request.kind", id="no request.kind"),
    pytest.param(
        encode(_pod_review(kind="Pod")), 400, "request.kind", id="request.kind is a string"
    ),
    pytest.param(
        encode(_pod_review(kind=_kind_without("kind"))),
        400,
        "request.kind.kind",
        id="request.kind without kind",
    ),
    pytest.param(
        encode(_pod_review(kind=_kind_without("version"))),
        400,
        "request.kind.version",
        id="request.kind without version",
    ),
    pytest.param(
        encode(_pod_review(kind={"group": 1, "version": "v1", "kind": "Pod"})),
        400,
        "request.kind.group",
        id="request.kind.group is a number",
    ),
    pytest.param(encode(_pod_review(dryRun="true")), 400, "dryRun", id="dryRun is a string"),
    pytest.param(
        encode(_pod_review(operation=["CREATE"])),
        400,
        "request.operation",
        id="operation is a list",
    ),
] + [
    pytest.param(path.read_bytes(), 400, "admission.k8s.io/v1beta1", id=f"v1beta1 {path.name}")
    for path in V1BETA1
]


@pytest.mark.parametrize("webhook", WEBHOOKS)
@pytest.mark.parametrize(("body", "status", "reason"), ERROR_TABLE)
def test_each_row_of_the_error_table_gets_its_status_and_names_the_reason(
    guard, webhook, body, status, reason
):
    response = post(guard, webhook, body)
    assert response.status_code == status
    assert reason in assert_reason_in_plain_text(response)


@pytest.mark.parametrize("webhook", WEBHOOKS)
@pytest.mark.parametrize(
    ("size", "chunked", "status"),
    [
        pytest.param(LIMIT, False, 200, id="exactly the limit"),
        pytest.param(LIMIT + 1, False, 413, id="one byte over"),
        pytest.param(LIMIT + 1, True, 413, id="one byte over, chunked"),
        pytest.param(10 * LIMIT, False, 413, id="ten times over"),
        pytest.param(10 * LIMIT, True, 413, id="ten times over, chunked"),
    ],
)
def test_bodies_over_the_size_limit_get_413(guard, webhook, size, chunked, status):
    body = _padded_pod_review(size)
    if chunked:
        response = guard.post(f"/{webhook}", **_chunked(body))
    else:
        response = post(guard, webhook, body)
    assert response.status_code == status
    if status == 413:
        assert f"exceeds the {LIMIT}-byte limit" in assert_reason_in_plain_text(response)
    else:
        assert_apiserver_accepts(webhook, json.loads(body), response)


def test_a_content_length_far_over_the_limit_is_refused_without_reading_the_body(guard):
    announced = 100 * LIMIT
    response = guard.post(
        "/mutate",
        data=b"{}",
        content_type="application/json",
        environ_overrides={"CONTENT_LENGTH": str(announced)},
    )
    assert response.status_code == 413
    assert f"{announced} bytes" in assert_reason_in_plain_text(response)


# --------------------------------------------------------------------------- found here
#
# Crashes the properties above found, fixed since; kept as plain reproducers.


def _with(name: str, path: tuple, value: Any) -> bytes:
    return encode(set_in(copy.deepcopy(REVIEWS[name]), path, value))


_CONTAINER = ("request", "object", "spec", "containers", 0)
_DATAPLANE_CPU = ("request", "object", "spec", "resources", "limits", "cpu")
_DATAPLANE_ARGS = ("request", "object", "spec", "args")


@pytest.mark.parametrize("webhook", WEBHOOKS)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            _with(DEPLOYMENT_REVIEW, ("request", "object", "metadata"), ["a"]),
            id="Deployment metadata is a list",
        ),
        pytest.param(
            _with(POD_REVIEW, _CONTAINER + ("name",), []), id="Pod container name is a list"
        ),
        pytest.param(
            _with(POD_REVIEW, ("request", "object", "metadata", "generateName"), 5),
            id="Pod generateName is a number",
        ),
        pytest.param(
            _with(DATAPLANE_REVIEW, _DATAPLANE_CPU, "1e999999999"),
            id="CPU limit 1e999999999 overflows a Decimal",
        ),
        pytest.param(
            encode(
                set_in(
                    json.loads(_with(DATAPLANE_REVIEW, _DATAPLANE_CPU, "1e5000")),
                    _DATAPLANE_ARGS,
                    ["-u", "3"],
                )
            ),
            id="CPU limit 1e5000 has more than 4300 digits",
        ),
    ],
)
def test_inputs_that_once_crashed_the_guard_get_an_answer(guard, webhook, body):
    assert_contract(guard, webhook, body)


@pytest.mark.parametrize("webhook", WEBHOOKS)
def test_an_absurd_cpu_limit_is_answered_as_fast_as_a_normal_one(guard, webhook):
    """int(8 x 1e999999) once held the GIL for 30 s: every admission call stalled."""
    body = _with(DATAPLANE_REVIEW, _DATAPLANE_CPU, "1e200000")
    started = time.perf_counter()
    assert_contract(guard, webhook, body)
    assert time.perf_counter() - started < 0.25


# --------------------------------------------------------------------------- nothing grows


def _review_of(group: str, kind: str, operation: str, uid: str) -> bytes:
    request = {
        "uid": uid,
        "kind": {"group": group, "version": "v1", "kind": kind},
        "operation": operation,
        "object": None,
    }
    return encode({"apiVersion": API_VERSION, "kind": KIND, "request": request})


def test_made_up_kinds_and_operations_do_not_grow_the_metrics_page():
    """Label values from the request made a series per made-up kind: 30,000 such reviews
    once grew /metrics to 107 MB. The kinds the guard handles and the apiserver's
    operations keep their names; everything else is counted as "other"."""
    client = create_app(Settings(drainHost=DRAIN_HOST), kube=None).test_client()
    rng = random.Random(9)
    made_up = [
        "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 60))) for _ in range(3_000)
    ]
    real = [("", "Pod"), ("apps", "Deployment"), ("stunner.l7mp.io", "Dataplane")]
    for index, name in enumerate(made_up):
        group, kind = real[index % 3] if index % 10 == 0 else (name[:5], name)
        operation = rng.choice(["CREATE", "UPDATE", "DELETE", "CONNECT", "", name[::-1]])
        response = post(client, WEBHOOKS[index % 2], _review_of(group, kind, operation, name))
        assert response.status_code == 200
    page = client.get("/metrics").get_data()
    assert len(page) < 200_000, f"/metrics is {len(page)} bytes"
    samples = [
        sample
        for family in text_string_to_metric_families(page.decode())
        if family.name == "stunner_guard_admission_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    ]
    assert sum(s.value for s in samples) == len(made_up)
    kinds = {s.labels["kind"] for s in samples}
    operations = {s.labels["operation"] for s in samples}
    assert kinds == {"Pod", "Deployment", "Dataplane", "other"}
    assert operations == {"CREATE", "UPDATE", "DELETE", "CONNECT", "other"}
    # webhook x kind x operation x verdict, whatever was sent.
    assert len(samples) <= 2 * 5 * 5 * 3


# --------------------------------------------------------------------------- depth
#
# orjson reads a body nested up to 1024 levels; the guard's own walks (the copies the rules
# edit, the diff, the changes annotation) once recursed, and 500 levels exhausted Python's
# stack: a 500 and a 3,000-line traceback per request.


def _nested(depth: int, shape: str) -> str:
    """JSON text of ``depth`` maps (or lists) inside one another, a string at the bottom.
    Written as text: json.dumps itself recurses."""
    opening, closing = ('{"a":', "}") if shape == "map" else ("[", "]")
    return opening * depth + '"x"' + closing * depth


def _with_nested(name: str, path: tuple, depth: int, shape: str) -> bytes:
    """A real review with a value ``depth`` levels deep at ``path``."""
    marker = "stunner-guard-test-marker"
    text = encode(set_in(copy.deepcopy(DEEP_BASES[name]), path, marker)).decode()
    return text.replace(json.dumps(marker), _nested(depth, shape)).encode()


# A Deployment the operator does not own: the mutating webhook shapes its pod template.
UNOWNED_DEPLOYMENT_REVIEW = "007-unowned-Deployment"
DEEP_BASES = {
    **REVIEWS,
    UNOWNED_DEPLOYMENT_REVIEW: set_in(
        REVIEWS[DEPLOYMENT_REVIEW],
        ("request", "object", "metadata", "labels", OPERATOR_OWNED_LABEL),
        "someone-else",
    ),
}
DEEP_PLACES = [
    pytest.param(DATAPLANE_REVIEW, ("request", "object", "spec", "affinity"), id="Dataplane spec"),
    pytest.param(DATAPLANE_REVIEW, _DATAPLANE_ARGS, id="Dataplane args"),
    pytest.param(
        UNOWNED_DEPLOYMENT_REVIEW,
        ("request", "object", "spec", "template", "spec", "affinity"),
        id="Deployment pod template",
    ),
    pytest.param(POD_REVIEW, _CONTAINER + ("resources", "limits"), id="Pod container resources"),
    pytest.param(POD_REVIEW, _CONTAINER + ("lifecycle",), id="Pod container lifecycle"),
    pytest.param(POD_REVIEW, ("request", "object", "metadata", "labels"), id="Pod labels"),
]


@pytest.mark.parametrize("webhook", WEBHOOKS)
@pytest.mark.parametrize("shape", ["map", "list"])
@pytest.mark.parametrize(("name", "path"), DEEP_PLACES)
def test_an_object_nested_500_deep_gets_a_400_naming_the_limit_and_the_field(
    guard, webhook, shape, name, path
):
    response = post(guard, webhook, _with_nested(name, path, 500, shape))
    assert response.status_code == 400
    reason = assert_reason_in_plain_text(response)
    assert f"nests more than {MAX_DEPTH} levels of maps and lists" in reason
    assert f"at request.object.{'.'.join(map(str, path[2:4]))}" in reason.replace("[0]", ".0")
    assert len(reason) < 1000


@pytest.mark.parametrize("webhook", WEBHOOKS)
@pytest.mark.parametrize(("name", "path"), DEEP_PLACES)
def test_an_object_exactly_as_deep_as_the_limit_gets_an_applicable_answer(
    guard, webhook, name, path
):
    # request.object is level 1; the value at ``path`` starts at level len(path) - 1.
    body = _with_nested(name, path, MAX_DEPTH - (len(path) - 2), "map")
    assert assert_contract(guard, webhook, body) is not None
    deeper = _with_nested(name, path, MAX_DEPTH - (len(path) - 2) + 1, "map")
    assert post(guard, webhook, deeper).status_code == 400


@pytest.mark.parametrize("webhook", WEBHOOKS)
@pytest.mark.parametrize("shape", ["map", "list"])
def test_deep_values_in_fields_the_guard_does_not_walk_are_answered(guard, webhook, shape):
    """Only what the rules copy is refused: a deep volume is the apiserver's business.
    300 levels: more than orjson writes (254), so the answer cannot have copied it."""
    body = _with_nested(POD_REVIEW, ("request", "object", "spec", "volumes"), 300, shape)
    assert assert_contract(guard, webhook, body) is not None


@pytest.mark.parametrize(
    "annotation",
    [
        pytest.param("[" * 1000, id="1,000 ["),
        pytest.param("[" * 1023 + "]" * 1023, id="1,023 nested lists"),
        pytest.param('{"a": 1}', id="a JSON map"),
        pytest.param('["kept", 1]', id="a list with a number"),
        pytest.param("not json", id="not JSON"),
        pytest.param(5, id="a number, not a string"),
    ],
)
def test_an_unreadable_changes_annotation_is_replaced_and_said_so(guard, annotation):
    """An annotation anyone may write (2 KB of ``[`` passes a real apiserver) once raised
    RecursionError in the mutating webhook."""
    path = ("request", "object", "metadata", "annotations", CHANGES_ANNOTATION)
    review = set_in(copy.deepcopy(REVIEWS[POD_REVIEW]), path, annotation)
    result = assert_contract(guard, "mutate", encode(review))
    assert result is not None and "patched" in result
    changes = json.loads(result["patched"]["metadata"]["annotations"][CHANGES_ANNOTATION])
    assert changes and all(isinstance(c, str) and not c.startswith("[[") for c in changes)
    assert "kept" not in changes
    assert any(
        w.startswith(f"stunner-guard replaced metadata.annotations[{CHANGES_ANNOTATION}]")
        for w in result["warnings"]
    )


def test_a_readable_changes_annotation_is_kept_without_a_warning(guard):
    path = ("request", "object", "metadata", "annotations", CHANGES_ANNOTATION)
    review = set_in(copy.deepcopy(REVIEWS[POD_REVIEW]), path, '["earlier change"]')
    result = assert_contract(guard, "mutate", encode(review))
    changes = json.loads(result["patched"]["metadata"]["annotations"][CHANGES_ANNOTATION])
    assert changes[0] == "earlier change" and len(changes) > 1
    assert not any("replaced" in w for w in result["warnings"])


# --------------------------------------------------------------------------- bugs stay short


@pytest.mark.parametrize(
    "error",
    [
        pytest.param("recursion", id="RecursionError"),
        pytest.param("x" * 100_000 + "\n" * 1_000, id="a 100 KB message over 1,000 lines"),
    ],
)
def test_an_unexpected_exception_is_logged_in_one_short_line_and_answered_500(
    monkeypatch, caplog, error
):
    """A bug path (no body reaches it): Flask's default logged the whole traceback, ~3,000
    lines for one RecursionError, for every such request."""

    def explode(*args):
        if error == "recursion":
            return explode(*args)
        raise ValueError(error)

    monkeypatch.setattr(dispatch, "decide", explode)
    # Logged at most once a second: each case starts with a fresh allowance.
    monkeypatch.setattr("webhooks.http._exceptions_logged", logs.Throttle(per_second=1))
    client = create_app(Settings(drainHost=DRAIN_HOST), kube=None).test_client()
    with caplog.at_level(logging.ERROR):
        response = post(client, "mutate", encode(REVIEWS[POD_REVIEW]))
    assert response.status_code == 500
    assert "a bug" in assert_reason_in_plain_text(response)
    assert len(caplog.records) == 1
    logged = caplog.text.strip()
    assert "\n" not in logged and len(logged) < 4096, logged[:300]
    record = caplog.records[0]
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("POST /mutate failed: ")
    assert "test_hostile.py:" in logged and "in explode)" in logged
