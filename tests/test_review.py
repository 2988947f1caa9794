"""The AdmissionReview encoder: the patch it writes turns the request's object into exactly
the desired object, whatever the trees look like."""

from __future__ import annotations

import copy
import json

import jsonpatch
import pytest
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


def chain(levels: int, key: str = "a/b", bottom="x"):
    """``levels`` maps one inside the other: {"a/b": {"a/b": ... bottom}}."""
    tree = bottom
    for _ in range(levels):
        tree = {key: tree}
    return tree


def test_copying_a_tree_nested_past_the_limit_is_refused_with_its_path():
    """A 500-level Dataplane spec exhausted Python's stack in copy_tree (RecursionError)."""
    with pytest.raises(review.TooDeep) as refused:
        copy_tree(chain(500), ("spec", "containers", 0, "resources"))
    assert refused.value.status == 400
    assert refused.value.reason.startswith(
        f"request.object nests more than {review.MAX_DEPTH} levels of maps and lists"
    )
    # The path the reason names: the object's path, then the first keys down the chain.
    assert "at request.object.spec.containers[0].resources.a/b.a/b.a/b.a/b..." in str(refused.value)
    assert f"({review.MAX_DEPTH} levels down)" in str(refused.value)


@pytest.mark.parametrize("where", [(), ("spec",), ("spec", "template", "spec")])
def test_the_copy_limit_counts_levels_from_the_object(where):
    fits = review.MAX_DEPTH - len(where)
    assert copy_tree(chain(fits), where) == chain(fits)
    with pytest.raises(review.TooDeep):
        copy_tree(chain(fits + 1), where)


def test_diffing_trees_nested_past_the_limit_is_refused_not_a_recursion_error():
    """_diff walks where the trees differ: two deep trees that differ at the bottom."""
    original, desired = chain(2_000, bottom="x"), chain(2_000, bottom="y")
    with pytest.raises(review.TooDeep) as refused:
        review.patched(original, desired)
    assert "at request.object.a/b.a/b" in str(refused.value)
    # Identical members are skipped without looking inside, however deep.
    shared = chain(500)
    assert review.patched({"deep": shared, "n": 1}, {"deep": shared, "n": 2}).patch == [
        {"op": "replace", "path": "/n", "value": 2}
    ]


def test_finding_the_deep_path_ends_on_a_cycle():
    """YAML anchors can make a tree that contains itself (the offline check reads YAML)."""
    loop: list = []
    loop.append({"again": loop})
    path = review.path_past(loop, 10)
    assert path is not None and len(path) == 10
    assert review.path_past(chain(10), 10) is None
    assert review.path_past(chain(11), 10) == ("a/b",) * 10


def test_a_long_path_is_shown_cut():
    shown = review.show_path(("k" * 1000, 0, *["a"] * 200))
    assert len(shown) < 200
    assert shown.startswith("request.object." + "k" * review.SHOWN_KEY_CHARS + "...[0].a.a")
    assert shown.endswith("(202 levels down)")
