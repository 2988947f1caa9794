"""Kubernetes quantities (``500m``, ``0.5``, ``1Gi``, ``2``, ``1e3``) read exactly as the
apiserver reads them, for the policy file and for request objects alike.

The reference is k8s.io/apimachinery ``pkg/api/resource``: ``Quantity.UnmarshalJSON``,
``ParseQuantity`` and ``parseQuantityString`` in quantity.go, the suffix table in
suffix.go. What it accepts from JSON, and so what this module accepts:

    text      ::= <trimmed space> sign? digits? ("." digits?)? suffix <trimmed space>
    digits    ::= ASCII 0-9 only (no other Unicode digit, no "_")
    suffix    ::= "" | n | u | m | k | M | G | T | P | E      (powers of 1000)
                | Ki | Mi | Gi | Ti | Pi | Ei                (powers of 1024)
                | ("e" | "E") sign? digits                   (a power of ten)

- Trimmed space: UnmarshalJSON applies strings.TrimSpace to the JSON text between the
  quotes, before any unescaping. A tab, a newline (JSON always escapes control
  characters) or U+2028/U+2029 (Go's encoder escapes them) arrive as a backslash
  escape, which the grammar refuses; a space and the other Unicode spaces are trimmed.
- "" is refused; a number without digits is 0 ("m", ".", "+", "Ki", "e3") when
  ParseQuantity's int64 fast path takes it, and refused on its big-decimal path, which
  needs a digit ("Pi", "Ei", an exponent below -9).
- The value is exact, then rounded up to a whole nano (10^-9), as ParseQuantity does;
  so ``1.0000000000000000000000000001Gi`` is 1073741824.000000001, above ``1Gi``.

Where the guard deliberately refuses what Kubernetes accepts:
- a negative quantity (it parses; no resource may be negative);
- a value above 2^63-1 (apimachinery caps a binary one there and keeps a decimal one);
- an exponent of 2^30 or more in magnitude: suffix.go truncates it to 32 bits and
  ParseQuantity shifts it in 32 bits, so Kubernetes reads another number than was
  written ("1e4294967296" is 1, "1.5e-2147483648" is 15e2147483647).

A JSON number reaches UnmarshalJSON as its own text. A Python int (orjson, YAML) is
that text exactly. A float's text is gone once decoded; its repr is the shortest text
that reads back as the same float, the digits Go's encoding/json writes when the
apiserver re-encodes an unstructured object (a Dataplane). true/false do not parse.
"""

from __future__ import annotations

import decimal
import functools
import re
from decimal import Decimal
from typing import Any

# Nothing real is above 2^63-1 (apimachinery's int64 bound); bounding it keeps
# arithmetic on quantities cheap.
MAX_QUANTITY = Decimal(2**63 - 1)

_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<whole>[0-9]*)(?:\.(?P<fraction>[0-9]*))?"
    r"(?:(?P<binary>[KMGTPE])i|(?P<decimal>[numkMGTPE])|[eE](?P<exp_sign>[+-]?)(?P<exp>[0-9]+))?",
    re.ASCII,
)
# suffix.go: n u m "" k M G T P E are 10^-9 ... 10^18; Ki ... Ei are 2^10 ... 2^60.
_DECIMAL_SUFFIXES = ["n", "u", "m", "", "k", "M", "G", "T", "P", "E"]
_DECIMAL_POWER = dict(zip(_DECIMAL_SUFFIXES, range(-9, 19, 3), strict=True))
_BINARY_SHIFT = dict(zip("KMGTPE", range(10, 61, 10), strict=True))
# A number without digits is 0 where ParseQuantity's int64 fast path handles it: any
# decimal power from nano up, binary up to Ti (its precision estimate turns negative
# from Pi on and sends it to inf.Dec, which refuses a number without digits).
_LOWEST_FAST_POWER = -9
_FAST_BINARY = frozenset("KMGT")
# unicode.IsSpace that JSON carries unescaped (see the module docstring).
_TRIMMED = "".join([" \u0085\u00a0\u1680", *map(chr, range(0x2000, 0x200B)), "\u202f\u205f\u3000"])
_EXPONENT_BOUND = 2**30
_NANO = Decimal("1e-9")
_ZERO = Decimal(0)
# Exact: a product with 2^60 or a rounding to nanos never loses a digit (the operands'
# size is bounded by the text, the result by MAX_QUANTITY).
_EXACT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, rounding=decimal.ROUND_UP
)


def quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity (``500m``, ``0.5``, ``1Gi``, ``2``, ``1e3``) as a Decimal;
    None when it does not parse, is negative, or is absurdly large."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return _cached_text(value) if len(value) <= _CACHED_CHARS else _text(value)
    if isinstance(value, int):
        return Decimal(value) if 0 <= value <= MAX_QUANTITY else None
    if isinstance(value, float):
        return _text(repr(value))  # "inf" and "nan" do not parse
    return None


def _text(text: str) -> Decimal | None:
    text = text.strip(_TRIMMED)
    match = _QUANTITY.fullmatch(text)
    if not text or match is None:
        return None
    whole, fraction = match["whole"], match["fraction"] or ""
    binary = match["binary"]
    if match["exp"] is not None:
        power = _power(match["exp_sign"], match["exp"])
        if power is None:
            return None
    else:
        power = 0 if binary else _DECIMAL_POWER[match["decimal"] or ""]
    if not whole and not fraction:
        fast = binary in _FAST_BINARY if binary else power >= _LOWEST_FAST_POWER
        return _ZERO if fast else None
    value = Decimal(f"{whole or 0}.{fraction}E{power}")
    if binary:
        value = _EXACT.multiply(value, Decimal(1 << _BINARY_SHIFT[binary]))
    if value == 0:
        return _ZERO  # one zero, however written: 0.000, 0E+1073741823
    if match["sign"] == "-":
        return None
    if value > MAX_QUANTITY:
        return None
    if power - len(fraction) < -9:
        # Finer than a nano: ParseQuantity rounds up, "if you want some resources, you
        # should get some resources".
        value = _EXACT.quantize(value, _NANO)
    return value


def _power(sign: str, digits: str) -> int | None:
    """The integer after e/E; None from 2^30 on (see the module docstring)."""
    digits = digits.lstrip("0")
    if len(digits) > 10:  # past the bound; and int() of a long text is slow
        return None
    power = int(digits or 0)
    if power >= _EXPONENT_BOUND:
        return None
    return -power if sign == "-" else power


# The same few texts (the policy's, "500m", "1Gi") come in every request; a Decimal is
# immutable, so parsed ones are shared. Bounded in entries, and only short texts are
# kept: 1024 hostile multi-megabyte texts would otherwise stay in memory.
_CACHED_CHARS = 64
_cached_text = functools.lru_cache(maxsize=1024)(_text)
