"""The AdmissionReview ``admission.k8s.io/v1`` wire contract: decode and encode, nothing else.

HTTP error contract (kept apart from policy verdicts):

    body                                              answer
    ------------------------------------------------  ----------------------------------
    larger than the size limit                        413, reason
    not JSON / not an object                          400, reason
    apiVersion is not admission.k8s.io/v1             400, reason (v1beta1 included)
    kind is not AdmissionReview                       400, reason
    no ``request`` object, no ``request.uid``         400, reason
    no ``request.kind`` {group, version, kind}        400, reason
    nested more than 1024 levels (orjson's limit)     400, reason (not JSON)
    request.object nested more than MAX_DEPTH (100)   400, reason naming the field, where
      levels of maps and lists in a field the guard   the rules copy or diff (a Dataplane's
      copies to edit                                  spec, a pod template's spec, a
                                                      container's resources, args...)
    a well-formed review                              200, AdmissionReview with verdict

No body reaches a 500: an exception is a bug (http.py logs it in one line).

Response rules the apiserver enforces (k8s.io/apiserver .../request/admissionreview.go):
echo apiVersion, kind and request.uid; ``patch`` and ``patchType: JSONPatch`` together or
not at all (and only from the mutating webhook); ``status`` only matters when denied.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
# Kubernetes truncates nothing, but kubectl shows warnings one per line; the API
# conventions ask for at most 120 characters each.
MAX_WARNING_CHARS = 120
MAX_WARNINGS = 20
ELLIPSIS = "..."
# How many levels of maps and lists request.object may nest where the guard walks it. Real
# objects are far shallower (a Pod's deepest field, inside managedFields, is about 15 levels
# down), and the walks stay well inside Python's recursion limit and orjson's encoder, which
# refuses more than 254 levels. A client that is not the apiserver could send up to 1024.
MAX_DEPTH = 100
# Path segments shown in a TooDeep reason before "...": the first few say which field.
SHOWN_PATH_SEGMENTS = 8
SHOWN_KEY_CHARS = 40


class BadReview(Exception):
    """The body is not an AdmissionReview this service can answer (HTTP 400/413)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


FieldPath = tuple[str | int, ...]


class TooDeep(BadReview):
    """A part of request.object the guard walks nests more than MAX_DEPTH levels (400).

    ``where`` is the path of ``value`` in the object; the reason names the path down to the
    first map or list found past the limit."""

    def __init__(self, where: FieldPath, value: Any) -> None:
        path = where + (path_past(value, MAX_DEPTH - len(where)) or ())
        super().__init__(
            f"request.object nests more than {MAX_DEPTH} levels of maps and lists, the "
            f"guard's limit (Kubernetes objects are far shallower), at {show_path(path)}"
        )


def path_past(value: Any, levels: int) -> FieldPath | None:
    """The path from ``value`` to the first map or list found more than ``levels`` levels
    down (``value`` itself being level 1), or None when it nests no deeper. An explicit
    stack: this is the check for trees too deep to recurse on. It stops at the first find,
    so a cycle (YAML anchors can make one) ends it too."""
    stack: list[tuple[Any, FieldPath]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict | list):
            continue
        if len(path) >= levels:
            return path
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((child, (*path, key)) for key, child in items)
    return None


def show_path(path: FieldPath, root: str = "request.object") -> str:
    """``request.object.spec.containers[0].args``: the first segments of a path, each key
    cut, with the number of levels when the rest is left out."""
    text = root
    for key in path[:SHOWN_PATH_SEGMENTS]:
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            text += f".{key[:SHOWN_KEY_CHARS]}{'...' if len(key) > SHOWN_KEY_CHARS else ''}"
    if len(path) > SHOWN_PATH_SEGMENTS:
        text += f"... ({len(path)} levels down)"
    return text


@dataclass(frozen=True)
class Request:
    """The parts of ``request`` the guard uses."""

    uid: str
    group: str
    version: str
    kind: str
    operation: str
    namespace: str
    name: str
    sub_resource: str
    dry_run: bool
    object: Any
    old_object: Any

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def describe(self) -> str:
        """``Kind namespace/name`` for messages; ReplicaSet pods have only generateName."""
        name = self.name
        if not name and isinstance(self.object, dict):
            meta = self.object.get("metadata") or {}
            if isinstance(meta, dict):
                name = meta.get("name") or f"{meta.get('generateName') or ''}<generated>"
        name = name or "<unnamed>"
        return f"{self.kind} {self.namespace}/{name}" if self.namespace else f"{self.kind} {name}"


@dataclass(frozen=True)
class Verdict:
    """One vocabulary for every answer: allowed (maybe patched) or denied, plus warnings."""

    allowed: bool
    warnings: tuple[str, ...] = ()
    patch: list[dict] = field(default_factory=list)
    message: str = ""
    code: int = 200

    @property
    def label(self) -> str:
        if not self.allowed:
            return "denied"
        return "patched" if self.patch else "allowed"


def allowed(warnings: list[str] | tuple[str, ...] = ()) -> Verdict:
    return Verdict(True, tuple(warnings))


def denied(message: str, warnings: list[str] | tuple[str, ...] = ()) -> Verdict:
    return Verdict(False, tuple(warnings), message=message, code=403)


def patched(original: Any, desired: Any, warnings: list[str] | tuple[str, ...] = ()) -> Verdict:
    """Allowed, with the JSONPatch that turns ``original`` (the dict that came in the
    request) into ``desired``."""
    ops: list[dict] = []
    _diff(original, desired, "", ops, 0)
    return Verdict(True, tuple(warnings), patch=ops)


def _diff(a: Any, b: Any, pointer: str, ops: list[dict], depth: int) -> None:
    """Append to ``ops`` the JSONPatch (RFC 6902) operations that turn ``a`` into ``b``.

    Rules edit a copy that shares every untouched member with the request's object
    (rules/common.py copy_for_edit), so ``is`` skips managedFields, volumes, env and probes
    without looking inside; only the copied paths are walked. Maps are diffed member by
    member, lists of equal length item by item (what an edit in place looks like), and a
    list whose length changed is replaced whole: no insert or move pointers to get wrong.
    Leaves compare by type too: ``True == 1`` in Python, not in JSON.

    jsonpatch.make_patch gave the same patches at several times the cost (it serializes
    members to compare them); the tests apply every patch with jsonpatch.

    ``depth`` counts the maps and lists above ``a``. Both sides are only walked where they
    differ, which is inside what the rules copied (copy_tree refuses more than MAX_DEPTH
    levels), so the limit here holds for any caller rather than being reached."""
    if a is b:
        return
    if depth >= MAX_DEPTH and isinstance(b, dict | list):
        raise TooDeep(tuple(_unescape(k) for k in pointer.split("/")[1:]), b)
    if isinstance(a, dict) and isinstance(b, dict):
        kept = 0  # members of b that a has: fewer than len(a), and a lost some
        for key, value in b.items():
            if key in a:
                kept += 1
                if a[key] is not value:
                    _diff(a[key], value, f"{pointer}/{_escape(key)}", ops, depth + 1)
            else:
                ops.append({"op": "add", "path": f"{pointer}/{_escape(key)}", "value": value})
        if kept < len(a):
            for key in a.keys() - b.keys():
                ops.append({"op": "remove", "path": f"{pointer}/{_escape(key)}"})
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            if x is not y:
                _diff(x, y, f"{pointer}/{index}", ops, depth + 1)
        return
    if type(a) is type(b) and not isinstance(a, dict | list) and a == b:
        return
    ops.append({"op": "replace", "path": pointer, "value": b})


def _escape(key: str) -> str:
    """A map key as a JSON Pointer reference token (RFC 6901: ``~`` first, then ``/``)."""
    return key.replace("~", "~0").replace("/", "~1") if "~" in key or "/" in key else key


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _require(mapping: dict, key: str, kind: type, where: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or (kind is str and not value):
        raise BadReview(f"{where}.{key} is missing or not a {'string' if kind is str else 'map'}")
    return value


# A value of the body echoed in a reason is cut: the reason is answered and logged, and
# neither may carry a body.
ECHOED_CHARS = 60


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= ECHOED_CHARS else text[: ECHOED_CHARS - 3] + "..."


def parse(body: bytes, limit: int) -> Request:
    """Decode an HTTP body into a Request, or raise BadReview naming what is wrong."""
    if len(body) > limit:
        raise BadReview(f"body of {len(body)} bytes exceeds the {limit}-byte limit", 413)
    # orjson: a third of json's cost on a pod review, and it reads numbers as the apiserver
    # does (NaN and Infinity are not JSON; an integer beyond 64 bits becomes a float, as
    # in apimachinery's unstructured decoding).
    try:
        review = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise BadReview(f"body is not JSON: {err}") from None
    if not isinstance(review, dict):
        raise BadReview("body is not a JSON object")
    if review.get("apiVersion") != API_VERSION:
        raise BadReview(
            f"apiVersion {_echo(review.get('apiVersion'))} is not supported; send {API_VERSION} "
            "(set admissionReviewVersions: [v1] on the webhook configuration)"
        )
    if review.get("kind") != KIND:
        raise BadReview(f"kind {_echo(review.get('kind'))} is not {KIND}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("request is missing or not an object")
    uid = _require(request, "uid", str, "request")
    kind = _require(request, "kind", dict, "request")
    kind_name = _require(kind, "kind", str, "request.kind")
    version = _require(kind, "version", str, "request.kind")
    group = kind.get("group", "")
    if not isinstance(group, str):
        raise BadReview("request.kind.group is not a string")
    fields = {}
    for key in ("operation", "namespace", "name", "subResource"):
        value = request.get(key) or ""
        if not isinstance(value, str):
            raise BadReview(f"request.{key} is not a string")
        fields[key] = value
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool | type(None)):
        raise BadReview("request.dryRun is not a boolean")
    return Request(
        uid=uid,
        group=group,
        version=version,
        kind=kind_name,
        operation=fields["operation"],
        namespace=fields["namespace"],
        name=fields["name"],
        sub_resource=fields["subResource"],
        dry_run=bool(dry_run),
        object=request.get("object"),
        old_object=request.get("oldObject"),
    )


def _fit(warning: str) -> str:
    """The last resort for a warning over MAX_WARNING_CHARS: the rules word theirs to fit
    (policy.py ``fitting``), so only a hostile name or value gets here. Cut at a word
    boundary, with an ellipsis."""
    warning = " ".join(warning.split())
    if len(warning) <= MAX_WARNING_CHARS:
        return warning
    cut = warning[: MAX_WARNING_CHARS - len(ELLIPSIS) + 1]
    space = cut.rfind(" ")
    # One long word (a hostile name) has no boundary worth keeping: cut inside it.
    cut = cut[:space] if space >= MAX_WARNING_CHARS // 2 else cut[:-1]
    return cut.rstrip(" ,;:") + ELLIPSIS


def encode(uid: str, verdict: Verdict, mutating: bool) -> dict:
    """The one place an AdmissionReview response is written."""
    response: dict[str, Any] = {"uid": uid, "allowed": verdict.allowed}
    if not verdict.allowed:
        response["status"] = {
            "code": verdict.code,
            "reason": "Forbidden",
            "message": verdict.message,
        }
    if verdict.warnings:
        unique = list(dict.fromkeys(_fit(w) for w in verdict.warnings))
        if len(unique) > MAX_WARNINGS:
            more = len(unique) - MAX_WARNINGS + 1
            unique = unique[: MAX_WARNINGS - 1] + [f"stunner-guard: {more} more warnings"]
        response["warnings"] = unique
    if mutating and verdict.allowed and verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(verdict.patch)).decode()
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}
