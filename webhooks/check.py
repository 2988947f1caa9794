"""Offline check for GitOps pipelines: run the webhook's own code on manifests.

    python -m webhooks check [--diff] [--policy FILE] FILE... (or - for stdin)

Each object in the (multi-document) YAML goes through the mutating webhook as a CREATE,
then the validating webhook on the mutated object, exactly as the apiserver would call
them. HPAs are checked against the Deployments and the Dataplane found in the same input
(no cluster is contacted). Prints per object the verdict, the warnings, each denial on a
line of its own, and the mutated manifest (or a unified diff with --diff).

Exit status:
  0  every object is allowed (perhaps mutated)
  1  at least one object is denied
  2  the input or the policy cannot be read: a file, a YAML document, or a document that
     is not a Kubernetes object (not a map, kind or apiVersion missing or not a string,
     nested past the webhook's limit, larger than its body limit, values JSON cannot
     hold). Each problem is printed on stderr with the file and document number, and
     nothing is checked.
  3  the check itself failed (a bug; the traceback is printed)
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import jsonpatch
import orjson
import yaml

from webhooks.admission import dispatch, review
from webhooks.service import Service
from webhooks.settings import PolicyError, Settings, from_env, load_policy_file

DENIED = 1
UNREADABLE = 2

# Cluster-scoped kinds among those the guard handles.
CLUSTER_SCOPED = frozenset({"Dataplane"})


class ManifestLookup:
    """Answers the HPA rule's API reads from the manifests being checked."""

    def __init__(self, objects: list[dict]) -> None:
        self.objects = objects

    def _find(self, api_version: str, kind: str, namespace: str | None, name: str):
        for obj in self.objects:
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            if (
                obj.get("kind") == kind
                and str(obj.get("apiVersion")).startswith(api_version)
                and meta.get("name") == name
                and (namespace is None or (meta.get("namespace") or "default") == namespace)
            ):
                return obj
        return None

    def read_deployment(self, namespace: str, name: str) -> dict | None:
        return self._find("apps/", "Deployment", namespace, name)

    def read_dataplane(self, name: str) -> dict | None:
        return self._find("stunner.l7mp.io/", "Dataplane", None, name)


def _request(obj: dict, webhook_object: dict) -> review.Request:
    api_version = str(obj.get("apiVersion") or "")
    group, _, version = api_version.rpartition("/")
    kind = str(obj.get("kind") or "")
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    namespace = "" if kind in CLUSTER_SCOPED else (meta.get("namespace") or "default")
    return review.Request(
        uid=str(uuid.uuid4()),
        group=group,
        version=version,
        kind=kind,
        operation="CREATE",
        namespace=namespace,
        name=meta.get("name") or "",
        sub_resource="",
        dry_run=True,
        object=webhook_object,
        old_object=None,
    )


def check_object(obj: dict, service: Service) -> tuple[review.Verdict, dict, list[str]]:
    """(final verdict, mutated object, all warnings) for one manifest."""
    mutation = dispatch.decide(_request(obj, obj), dispatch.MUTATE, service)
    if not mutation.allowed:
        return mutation, obj, list(mutation.warnings)
    mutated = jsonpatch.apply_patch(obj, mutation.patch) if mutation.patch else obj
    validation = dispatch.decide(_request(obj, mutated), dispatch.VALIDATE, service)
    final = replace(validation, patch=mutation.patch)
    return final, mutated, list(mutation.warnings) + list(validation.warnings)


def _dump(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


@dataclass(frozen=True)
class Document:
    """One Kubernetes object of the input, with the file it came from."""

    path: str
    obj: dict


def _load(paths: list[str], stdin: TextIO, body_limit: int) -> tuple[list[Document], list[str]]:
    """The objects in ``paths``, and one error (naming file and document) per thing that
    cannot be read."""
    documents: list[Document] = []
    errors: list[str] = []
    for path in paths:
        try:
            text = stdin.read() if path == "-" else Path(path).read_text()
        except OSError as err:
            errors.append(f"{path}: {err.strerror or err}")
            continue
        except UnicodeDecodeError as err:
            errors.append(f"{path}: not UTF-8 text (byte {err.start})")
            continue
        loader = yaml.SafeLoader(text)
        loader.name = path  # YAML errors then name the file, not "<unicode string>"
        number = 0
        try:
            while loader.check_node():
                number += 1
                node = loader.get_node()
                where = f"{path}: document {number} (line {node.start_mark.line + 1})"
                doc = loader.construct_document(node)
                if doc is not None:
                    _objects(doc, where, path, body_limit, documents, errors)
        except yaml.YAMLError as err:
            errors.append(f"{path}: not YAML: {' '.join(str(err).split())}")
        except RecursionError:
            # PyYAML composes nodes recursively: a few hundred levels exhaust the stack.
            errors.append(f"{path}: document {number}: nested too deeply to read")
        finally:
            loader.dispose()
    return documents, errors


def _objects(
    doc: Any, where: str, path: str, body_limit: int, into: list[Document], errors: list[str]
) -> None:
    """Append ``doc`` (or each item of a List) to ``into``, or an error to ``errors``."""
    problem = _not_an_object(doc)
    if problem is None:
        doc, problem = _as_json(doc, body_limit)
    if problem is not None:
        errors.append(f"{where}: {problem}")
        return
    if not doc["kind"].endswith("List") or "items" not in doc:
        into.append(Document(path, doc))
        return
    items = doc["items"]
    if not isinstance(items, list):
        errors.append(f"{where}: items is not a list")
        return
    for index, item in enumerate(items):
        problem = _not_an_object(item)
        if problem is not None:
            errors.append(f"{where}: items[{index}]: {problem}")
        else:
            into.append(Document(path, item))


def _not_an_object(doc: Any) -> str | None:
    """What keeps ``doc`` from being a Kubernetes object the webhook could be sent."""
    if not isinstance(doc, dict):
        return f"a {type(doc).__name__}, not a Kubernetes object (a map with apiVersion, kind)"
    for key in ("apiVersion", "kind"):
        if doc.get(key) is None:
            return f"no {key}"
        if not isinstance(doc[key], str):
            return f"{key} is {_shown(doc[key])}, not a string"
        if not doc[key]:
            return f"{key} is empty"
    metadata = doc.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata is not a map"
    for key in ("name", "generateName", "namespace"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            return f"metadata.{key} is {_shown(metadata[key])}, not a string"
    return None


def _shown(value: Any) -> str:
    """A scalar as written; a map or list by its type only (it may hold a YAML alias bomb)."""
    if isinstance(value, bool | int | float):
        return repr(value) if abs(value) < 10**20 else "a huge number"
    return {dict: "a map", list: "a list"}.get(type(value), f"a {type(value).__name__}")


def _as_json(doc: dict, body_limit: int) -> tuple[dict, str | None]:
    """``doc`` as the apiserver would send it: JSON, YAML aliases expanded (kubectl expands
    them too), within the webhook's depth and body limits; or the reason it cannot be."""
    # Each JSON value takes at least two bytes: past this many, the object cannot fit the
    # body limit. Counting first bounds the work an alias bomb (a billion laughs) can make.
    budget = body_limit // 2
    stack, count = [doc], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > budget:
            return doc, f"more than {budget} values (YAML aliases expanded): too large to check"
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, float) and not math.isfinite(node):
            return doc, "not JSON: .inf or .nan"  # orjson would write null
    if review.path_past(doc, review.MAX_DEPTH) is not None:
        # The webhook refuses this where it walks (review.TooDeep); the check walks it all.
        return doc, review.TooDeep((), doc).reason
    try:
        text = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as err:  # orjson.JSONEncodeError: !!binary, !!set, ...
        return doc, f"not JSON: {err}"
    if len(text) > body_limit:
        return doc, f"{len(text)} bytes as JSON, over the webhook's {body_limit}-byte limit"
    return orjson.loads(text), None


def _denials(verdict: review.Verdict, subject: str) -> list[str]:
    """The denials in ``verdict``, one line each. The webhook's message joins them with
    "; " (dispatch.verdict), and each starts with the object's subject; a value quoted in
    one may hold "; " or a line break of its own."""
    first, *rest = verdict.message.split(f"; {subject}: ")
    return [" ".join(d.split()) for d in [first, *(f"{subject}: {r}" for r in rest)]]


def _settings(policy_file: str | None) -> Settings:
    """Settings from the environment, with --policy's file when given; PolicyError naming
    the file (or the environment) otherwise."""
    try:
        settings = from_env()
    except PolicyError as err:
        raise PolicyError(f"settings from the environment: {err}") from None
    if not policy_file:
        return settings
    try:
        policy, drain = load_policy_file(policy_file)
    except PolicyError as err:
        message = str(err)
        if not message.startswith(f"policy file {policy_file}"):
            message = f"policy file {policy_file}: {message}"
        raise PolicyError(message) from None
    return replace(settings, policy=policy, drain=drain, policyFile=policy_file)


def main(
    argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout
) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m webhooks check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML manifests, - for stdin")
    parser.add_argument("--diff", action="store_true", help="print a diff, not the manifest")
    parser.add_argument("--policy", help="policy file (default: STUNNER_GUARD_POLICY_FILE)")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args.policy)
    except PolicyError as err:
        print(f"error: {err}", file=sys.stderr)
        return UNREADABLE
    documents, errors = _load(args.files, stdin, settings.maxBodyBytes)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return UNREADABLE
    service = Service(settings, ManifestLookup([d.obj for d in documents]))
    denied = 0
    for document in documents:
        obj = document.obj
        subject = _request(obj, obj).describe()
        verdict, mutated, warnings = check_object(obj, service)
        changed = mutated != obj
        state = "DENIED" if not verdict.allowed else "allowed, mutated" if changed else "allowed"
        print(f"# {subject} ({document.path}): {state}", file=stdout)
        for warning in dict.fromkeys(warnings):
            print(f"#   warning: {warning}", file=stdout)
        if not verdict.allowed:
            denied += 1
            for reason in _denials(verdict, subject):
                print(f"#   denied: {reason}", file=stdout)
        if args.diff:
            if changed:
                stdout.writelines(
                    difflib.unified_diff(
                        _dump(obj).splitlines(keepends=True),
                        _dump(mutated).splitlines(keepends=True),
                        fromfile=f"{subject} (input)",
                        tofile=f"{subject} (admitted)",
                    )
                )
        else:
            print("---", file=stdout)
            print(_dump(mutated), end="", file=stdout)
    print(f"# {len(documents)} objects, {denied} denied", file=stdout)
    return DENIED if denied else 0
