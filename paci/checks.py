"""Argument checks every layer shares (the ground floor: imports nothing of paci's).

One rule for "a whole number of at least N", wherever a count comes from: a CLI flag, a config
file, the API, a schedule builder. A bool is refused although Python counts it as an int (`True`
steps once by accident), numpy's integers are accepted (an index from an array is a count too).
"""

from __future__ import annotations

import numbers
from typing import Any


def is_integer(value: Any, minimum: int = 1) -> bool:
    """Is `value` an integer (not a bool) of at least `minimum`?"""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def check_integer(name: str, value: Any, minimum: int = 1, note: str = "") -> int:
    """`value` as an int, or ValueError("NAME must be an integer >= MINIMUM (NOTE), got VALUE")."""
    if not is_integer(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}{f' ({note})' if note else ''}, got {value!r}")
    return int(value)
