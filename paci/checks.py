"""Reading what users give, the same way at every layer (the ground floor: imports nothing of
paci's): counts and byte sizes.

One rule for "a whole number of at least N", wherever a count comes from: a CLI flag, a config
file, the API, a schedule builder. A bool is refused although Python counts it as an int (`True`
steps once by accident), numpy's integers are accepted (an index from an array is a count too).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any


def is_integer(value: Any, minimum: int = 1) -> bool:
    """Is `value` an integer (not a bool) of at least `minimum`?"""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def check_integer(name: str, value: Any, minimum: int = 1, note: str = "") -> int:
    """`value` as an int, or ValueError("NAME must be an integer >= MINIMUM (NOTE), got VALUE")."""
    if not is_integer(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}{f' ({note})' if note else ''}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# byte sizes


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"24GiB", "512MiB", "1.5GB", "1000000" (bytes) -> bytes; ValueError if malformed or not > 0."""
    match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match[2].lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write a number with an optional unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB or 1.5GB")
    value = float(match[1]) * _BYTE_UNITS[unit]
    if not value >= 1 or math.isinf(value):
        raise ValueError(f"a memory size must be positive (at least one byte), got {text!r}; e.g. 24GiB")
    return int(value)


def format_bytes(n: float | None) -> str:
    """1536 -> "1.50 KiB" (binary units); None -> "none"."""
    if n is None:
        return "none"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
