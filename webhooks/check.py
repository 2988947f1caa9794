"""Offline check for GitOps pipelines: run the webhook's own code on manifests.

    python -m webhooks check [--diff] [--policy FILE] FILE... (or - for stdin)

Each object in the (multi-document) YAML goes through the mutating webhook as a CREATE,
then the validating webhook on the mutated object, exactly as the apiserver would call
them. HPAs are checked against the Deployments and the Dataplane found in the same input
(no cluster is contacted). Prints per object the verdict, the warnings and the mutated
manifest (or a unified diff with --diff). Exit status: 0 all allowed, 1 any denied,
2 unreadable input or policy.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import jsonpatch
import yaml

from webhooks.admission import dispatch, review
from webhooks.service import Service
from webhooks.settings import PolicyError, from_env, load_policy_file

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


def _load(paths: list[str], stdin: TextIO) -> list[tuple[str, dict]]:
    docs = []
    for path in paths:
        try:
            text = stdin.read() if path == "-" else Path(path).read_text()
            loaded = list(yaml.safe_load_all(text))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: {err}") from err
        except RecursionError:
            # PyYAML composes nodes recursively: a few hundred levels exhaust the stack.
            raise ValueError(f"{path}: nested too deeply to read") from None
        for doc in loaded:
            if doc is None:
                continue
            # The webhook refuses deeper objects where it walks them (review.TooDeep); the
            # check walks all of it (the YAML dump, the diff), so it refuses any part.
            deep = review.path_past(doc, review.MAX_DEPTH)
            if deep is not None:
                raise ValueError(f"{path}: {review.TooDeep((), doc).reason}")
            if not isinstance(doc, dict) or "kind" not in doc:
                raise ValueError(f"{path}: a document is not a Kubernetes object (no kind)")
            items = doc.get("items") if doc.get("kind", "").endswith("List") else None
            docs += [(path, item) for item in items or [doc] if isinstance(item, dict)]
    return docs


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
        settings = from_env()
        if args.policy:
            policy, drain = load_policy_file(args.policy)
            settings = replace(settings, policy=policy, drain=drain, policyFile=args.policy)
        docs = _load(args.files, stdin)
    except (PolicyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    service = Service(settings, ManifestLookup([obj for _, obj in docs]))
    denied = 0
    for path, obj in docs:
        subject = _request(obj, obj).describe()
        verdict, mutated, warnings = check_object(obj, service)
        changed = mutated != obj
        state = "DENIED" if not verdict.allowed else "allowed, mutated" if changed else "allowed"
        print(f"# {subject} ({path}): {state}", file=stdout)
        for warning in dict.fromkeys(warnings):
            print(f"#   warning: {warning}", file=stdout)
        if not verdict.allowed:
            denied += 1
            for reason in verdict.message.split("; "):
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
    print(f"# {len(docs)} objects, {denied} denied", file=stdout)
    return 1 if denied else 0
