"""Kubernetes quantities (``500m``, ``0.5``, ``1Gi``, ``2``, ``1e3``), parsed with the
kubernetes client's parser, for the policy file and for request objects alike."""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

# The CRD's quantity pattern admits "1e999999999"; nothing real is above 2^63 (the
# apiserver's own int64 bound), and bounding it keeps arithmetic on it cheap.
MAX_QUANTITY = Decimal(2**63 - 1)


def quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity (``500m``, ``0.5``, ``1Gi``, ``2``, ``1e3``) as a Decimal;
    None when it does not parse, is negative, or is absurdly large."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return _quantity_text(value)
    return _quantity(value)


def _quantity(value: Any) -> Decimal | None:
    try:
        parsed = parse_quantity(value)
    except (ValueError, TypeError, ArithmeticError):
        return None
    return parsed if parsed.is_finite() and 0 <= parsed <= MAX_QUANTITY else None


# The same few texts (the policy's, "500m", "1Gi") come in every request; a Decimal is
# immutable, so parsed ones are shared. Bounded: hostile texts only evict each other.
_quantity_text = functools.lru_cache(maxsize=1024)(_quantity)
