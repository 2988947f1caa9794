"""The AdmissionReview encoder: the patch it writes turns the request's object into exactly
the desired object, whatever the trees look like."""

from __future__ import annotations

import copy
import json

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from webhooks.admission import review
from webhooks.admission.rules.common import copy_tree

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text("ab/~", max_size=3))
keys = st.text("ab/~.", min_size=0, max_size=3)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=25,
)


@st.composite
def edited(draw, tree):
    """``tree`` with a few edits of the kinds mutations make (and some they don't)."""
    result = copy.deepcopy(tree)
    for _ in range(draw(st.integers(0, 4))):
        node, containers = result, []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            containers.append(node)
            node = node[
                draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            ]
        target = node if isinstance(node, dict | list) else (containers[-1] if containers else None)
        if isinstance(target, dict):
            target[draw(keys)] = draw(trees)
            if target and draw(st.booleans()):
                del target[draw(st.sampled_from(sorted(target)))]
        elif isinstance(target, list):
            action = draw(st.sampled_from(["append", "replace", "insert", "pop"]))
            if action == "append" or not target:
                target.append(draw(trees))
            elif action == "replace":
                target[draw(st.integers(0, len(target) - 1))] = draw(trees)
            elif action == "insert":
                target.insert(draw(st.integers(0, len(target))), draw(trees))
            else:
                target.pop(draw(st.integers(0, len(target) - 1)))
    return result


@settings(max_examples=500, deadline=None)
@given(st.data(), st.dictionaries(keys, trees, max_size=5))
def test_the_patch_turns_the_original_into_the_desired_object(data, original):
    desired = data.draw(edited(original))
    before = as_json(original)
    verdict = review.patched(original, desired)
    # Compared as JSON text: in Python True == 1, so == alone would miss a lost change.
    assert as_json(jsonpatch.apply_patch(original, verdict.patch)) == as_json(desired)
    assert as_json(original) == before
    if as_json(original) == as_json(desired):
        assert verdict.patch == []


def test_a_patch_only_touches_what_changed_and_escapes_pointers():
    shared = {"managedFields": [{"manager": "kubectl"}]}
    original = {"metadata": shared, "spec": {"a/b": 1, "c~d": [1, 2], "gone": True, "x": 1}}
    desired = {
        "metadata": shared,
        "spec": {"a/b": 2, "c~d": [1, 2, 3], "x": True, "new": {"k": "v"}},
    }
    assert sorted(review.patched(original, desired).patch, key=lambda op: op["path"]) == [
        {"op": "replace", "path": "/spec/a~1b", "value": 2},
        {"op": "replace", "path": "/spec/c~0d", "value": [1, 2, 3]},
        {"op": "remove", "path": "/spec/gone"},
        {"op": "add", "path": "/spec/new", "value": {"k": "v"}},
        {"op": "replace", "path": "/spec/x", "value": True},
    ]


def as_json(value) -> str:
    return json.dumps(value, sort_keys=True)


@given(trees)
def test_copy_tree_is_an_equal_independent_copy(tree):
    copied = copy_tree(tree)
    assert copied == tree
    if isinstance(tree, dict | list) and tree:
        assert copied is not tree
