"""Quantities read exactly as k8s.io/apimachinery reads them from JSON (issue 9, item 6).

Every accepted value and every refusal below was checked against apimachinery's own
ParseQuantity via Quantity.UnmarshalJSON, except the guard's deliberate refusals
(negative, above 2^63-1, an exponent of 2^30 or more), which say so in their id.
"""

from __future__ import annotations

import json
import math
import sys
import tracemalloc
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import create_review, stunnerd_pod
from webhooks.admission.quantities import MAX_QUANTITY, quantity

GI = 2**30

ACCEPTED = [
    pytest.param("1", Decimal(1), id="one"),
    pytest.param("500m", Decimal("0.5"), id="milli"),
    pytest.param("0.5", Decimal("0.5"), id="decimal-point"),
    pytest.param("1E3", Decimal(1000), id="capital-exponent"),
    pytest.param("1e-3", Decimal("0.001"), id="negative-exponent"),
    pytest.param("1E+3", Decimal(1000), id="signed-exponent"),
    pytest.param("1e00000000000000000003", Decimal(1000), id="exponent-leading-zeros"),
    pytest.param(".5", Decimal("0.5"), id="no-whole-part"),
    pytest.param("5.", Decimal(5), id="no-fraction-digits"),
    pytest.param("1.e3", Decimal(1000), id="point-then-exponent"),
    pytest.param("1Ki", Decimal(1024), id="kibi"),
    pytest.param("1.5Gi", Decimal(3 * GI // 2), id="fractional-gibi"),
    pytest.param("1.Pi", Decimal(2**50), id="point-then-binary-suffix"),
    pytest.param("7Ei", Decimal(7 * 2**60), id="exbi-below-the-bound"),
    pytest.param("1E", Decimal(10**18), id="capital-e-alone-is-exa"),
    pytest.param("1n", Decimal("1e-9"), id="nano"),
    pytest.param("+1", Decimal(1), id="plus-sign"),
    pytest.param("-0", Decimal(0), id="minus-zero-is-zero"),
    pytest.param("9223372036854775807", MAX_QUANTITY, id="int64-max"),
    pytest.param(" 1 ", Decimal(1), id="spaces-trimmed"),
    pytest.param("\u00a0500m\u3000", Decimal("0.5"), id="unicode-spaces-trimmed"),
    pytest.param("0.0000000001", Decimal("1e-9"), id="below-a-nano-rounds-up-to-one"),
    pytest.param("1e-999999999", Decimal("1e-9"), id="tiny-rounds-up-to-a-nano"),
    pytest.param(
        "1.0000000000000000000000000001Gi",
        Decimal("1073741824.000000001"),
        id="29-digits-round-up-to-the-next-nano",
    ),
    # apimachinery's int64 fast path reads a number without digits as 0.
    pytest.param("m", Decimal(0), id="suffix-alone-is-zero"),
    pytest.param(".", Decimal(0), id="point-alone-is-zero"),
    pytest.param("+", Decimal(0), id="sign-alone-is-zero"),
    pytest.param("Ti", Decimal(0), id="tebi-alone-is-zero"),
    pytest.param("e-9", Decimal(0), id="nano-exponent-alone-is-zero"),
    # JSON numbers: the apiserver parses the number's own text.
    pytest.param(2, Decimal(2), id="json-integer"),
    pytest.param(0.5, Decimal("0.5"), id="json-float"),
    pytest.param(0.1, Decimal("0.1"), id="json-float-as-written-not-its-binary-value"),
    pytest.param(1e3, Decimal(1000), id="json-float-with-exponent"),
]


@pytest.mark.parametrize(("given", "value"), ACCEPTED)
def test_kubernetes_spellings_are_read_as_apimachinery_reads_them(given, value):
    parsed = quantity(given)
    assert parsed == value
    assert parsed.is_finite()


REFUSED = [
    pytest.param("\u0661", id="arabic-indic-digit"),
    pytest.param("\uff11", id="fullwidth-digit"),
    pytest.param("\U0001d7cf", id="mathematical-bold-digit"),
    pytest.param("0_1", id="underscore-between-digits"),
    pytest.param("1e3m", id="exponent-and-suffix"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="only-spaces"),
    pytest.param("1e", id="exponent-without-digits"),
    pytest.param("e", id="e-alone"),
    pytest.param("1ki", id="lowercase-kibi"),
    pytest.param("1K", id="capital-k"),
    pytest.param("1KiB", id="bytes-unit"),
    pytest.param("1 Gi", id="space-before-suffix"),
    pytest.param("1..5", id="two-points"),
    pytest.param("--1", id="two-signs"),
    pytest.param("1e+-3", id="two-exponent-signs"),
    pytest.param("1.5e3.5", id="fractional-exponent"),
    pytest.param("0x10", id="hexadecimal"),
    pytest.param("NaN", id="nan"),
    pytest.param("Infinity", id="infinity"),
    pytest.param("\t1", id="tab-json-escapes-it"),
    pytest.param("1\n", id="newline-json-escapes-it"),
    pytest.param("\u20281", id="line-separator-go-escapes-it"),
    pytest.param("\u200b1", id="zero-width-space-is-not-space"),
    # A number without digits on apimachinery's big-decimal path.
    pytest.param("Pi", id="pebi-alone"),
    pytest.param("e-10", id="exponent-below-nano-alone"),
    # The guard's own bounds: no resource is negative or above int64.
    pytest.param("-1", id="guard-negative"),
    pytest.param("-.5m", id="guard-negative-fraction"),
    pytest.param("8Ei", id="guard-above-int64-binary"),
    pytest.param("9223372036854775808", id="guard-above-int64"),
    pytest.param("1e19", id="guard-above-int64-exponent"),
    pytest.param("1e999999999", id="guard-huge-exponent"),
    pytest.param("9" * 100_000, id="guard-long-digits"),
    # Kubernetes keeps the exponent in 32 bits: it reads these as other numbers.
    pytest.param("1e4294967296", id="guard-exponent-wraps-to-one"),
    pytest.param("1e-1073741824", id="guard-exponent-2-to-the-30"),
    pytest.param("0e1073741824", id="guard-exponent-bound-even-for-zero"),
    # Not strings or numbers.
    pytest.param(-1, id="json-negative-integer"),
    pytest.param(2**63, id="json-integer-above-int64"),
    pytest.param(10**5000, id="yaml-integer-of-5000-digits"),
    pytest.param(-0.5, id="json-negative-float"),
    pytest.param(float("inf"), id="float-infinity"),
    pytest.param(float("nan"), id="float-nan"),
    pytest.param(True, id="bool"),
    pytest.param(None, id="null"),
    pytest.param({"cpu": "1"}, id="object"),
    pytest.param(["1"], id="list"),
]


@pytest.mark.parametrize("given", REFUSED)
def test_spellings_kubernetes_refuses_or_the_guard_bounds_are_refused(given):
    assert quantity(given) is None


def test_a_value_finer_than_the_28_digit_decimal_default_is_not_rounded_into_another():
    assert quantity("1.0000000000000000000000000001Gi") > quantity("1Gi")
    assert quantity("1.00000000000000000000000000001") > quantity("1")


NANO = Decimal("1e-9")


@pytest.mark.parametrize(
    ("hostile", "value"),
    [
        pytest.param("1e999999999", None, id="huge-exponent"),
        pytest.param("1.5e1073741823", None, id="exponent-just-below-the-bound"),
        pytest.param("1e-1073741823", NANO, id="tiny-exponent-just-below-the-bound"),
        pytest.param("9" * 100_000, None, id="long-digits"),
        pytest.param("0." + "0" * 100_000 + "1Gi", NANO, id="long-fraction"),
        pytest.param("1" + "0" * 100_000 + "e-100000", Decimal(1), id="long-digits-scaled-back"),
        pytest.param("1e" + "9" * 100_000, None, id="long-exponent"),
    ],
)
def test_hostile_spellings_parse_without_allocating_by_the_exponent(hostile, value):
    tracemalloc.start()
    try:
        parsed = quantity(hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed == value
    # The text itself is up to 100 kB; 10^999999999 as digits would be ~400 MB.
    assert peak < 2 * 1024 * 1024


def test_a_long_text_is_not_kept_alive_by_the_parse_cache():
    # 1024 cached multi-megabyte texts from hostile requests would stay in memory.
    text = "1" + "0" * 1000 + "e-1000"
    before = sys.getrefcount(text)
    assert quantity(text) == 1
    assert sys.getrefcount(text) == before


# ---------------------------------------------------------------- properties

_POWERS = {"": 0, "n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_SHIFTS = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
DIGITS = st.text("0123456789", max_size=25)
SUFFIX = st.one_of(
    st.sampled_from(sorted(_POWERS) + sorted(_SHIFTS)),
    st.tuples(st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), st.integers(0, 40)).map(
        lambda t: f"{t[0]}{t[1]}{t[2]}"
    ),
)


def _expected(whole: str, fraction: str, suffix: str) -> Decimal | None:
    """The same number through fractions: exact, then up to a whole nano."""
    number = Fraction(int(whole or 0)) + Fraction(int(fraction or 0), 10 ** len(fraction))
    if suffix in _SHIFTS:
        number *= 2 ** _SHIFTS[suffix]
    elif suffix in _POWERS:
        number *= Fraction(10) ** _POWERS[suffix]
    else:
        number *= Fraction(10) ** int(suffix[1:])
    if number > 2**63 - 1:
        return None
    return Decimal(math.ceil(number * 10**9)) / Decimal(10**9)


@given(whole=DIGITS, fraction=DIGITS, point=st.booleans(), suffix=SUFFIX)
def test_every_grammatical_spelling_has_its_exact_value_rounded_up_to_a_nano(
    whole, fraction, point, suffix
):
    fraction = fraction if point else ""
    text = f"{whole}{'.' if point else ''}{fraction}{suffix}"
    if not whole and not fraction:
        return  # apimachinery's digitless quirk, in the tables above
    assert quantity(text) == _expected(whole, fraction, suffix)


GRAMMAR_CHARACTERS = "0123456789.+-eEinumkKMGTP"


@given(
    # At least two characters each, so that there is an inside: before the first or after
    # the last, a space Kubernetes trims (U+0085 among them) is not an intruder.
    valid=st.sampled_from(["500m", "1.5Gi", "1e3", "12", "0.25", "128Mi"]),
    where=st.integers(1, 5),
    intruder=st.characters(exclude_characters=GRAMMAR_CHARACTERS),
)
def test_any_other_character_inside_a_quantity_is_refused(valid, where, intruder):
    where = min(where, len(valid) - 1)
    assert quantity(valid[:where] + intruder + valid[where:]) is None


# ---------------------------------------------------------------- through the webhook


@pytest.mark.parametrize("lookalike", ["\uff11", "\u0661", "0_1", "1e3m"])
def test_a_pod_with_a_lookalike_cpu_limit_is_denied_naming_the_field_and_value(client, lookalike):
    body = create_review(stunnerd_pod(resources={"limits": {"cpu": lookalike}}))
    response = client.post("/mutate", data=json.dumps(body), content_type="application/json")
    answer = response.get_json()["response"]
    assert answer["allowed"] is False
    assert answer["status"]["message"] == (
        f"Pod media/udp-gateway-<generated>: spec.containers[stunner-daemon].resources.limits.cpu is {lookalike!r}: "
        "not a non-negative Kubernetes quantity (rule quantity syntax)"
    )
