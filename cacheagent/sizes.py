"""Human-readable byte sizes: parse ``500MB``, ``200GiB``, ``200Gi`` or ``1048576``; format them.

Besides the usual ``KB``/``KiB`` spellings, Kubernetes quantities are accepted
(``200Gi``, ``500Mi``, ``1G``, ``1.5Ti``), because the same budget is often
written once in a pod spec and once in a model's config. Units are read
case-insensitively, so ``m`` is mega, never Kubernetes' milli: a fraction of a
byte is not a size.
"""

from __future__ import annotations

import re

from cacheagent.errors import InvalidParameterError

_PREFIXES = "kmgtp"  # kilo .. peta; exa would exceed MAX_SIZE already at 5E


def _units() -> dict[str, int]:
    """Every accepted unit spelling (lower case) and its bytes."""
    units = {"": 1, "b": 1}
    for power, prefix in enumerate(_PREFIXES, start=1):
        units[prefix] = units[f"{prefix}b"] = 1000**power  # 1G, 1GB: decimal
        units[f"{prefix}i"] = units[f"{prefix}ib"] = 1024**power  # 1Gi, 1GiB: binary
    return units


_UNITS: dict[str, int] = _units()
MAX_SIZE = 2**62  # far beyond any disk, and still exact in SQLite's 64-bit integers
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)
ACCEPTED_SIZE_FORMS = (
    "a byte count (1048576) or a number with a unit: 500MB, 1.5GB, 200GiB, 64KiB, "
    "or a Kubernetes quantity: 200Gi, 500Mi, 1G"
)


def parse_size(text: str | int, *, name: str = "size") -> int:
    """Return the bytes ``text`` denotes; raise InvalidParameterError if unreadable."""
    if isinstance(text, bool):
        raise InvalidParameterError(f"{name}: {text!r} is not a size; use {ACCEPTED_SIZE_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidParameterError(f"{name}: {text} is negative; use {ACCEPTED_SIZE_FORMS}")
        return text
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise InvalidParameterError(f"{name}: {text!r} is not a size; use {ACCEPTED_SIZE_FORMS}")
    whole, _, fraction = match.group(1).partition(".")
    # Exact integer arithmetic: a float would round large byte counts. Past 20 digits the
    # value is over MAX_SIZE anyway, and Python refuses to convert huge digit strings;
    # 30 decimals are finer than a byte even in PiB.
    digits = fraction[:30]
    value = (
        int(whole + digits) * _UNITS[unit] // 10 ** len(digits)
        if len(whole) <= 20
        else MAX_SIZE + 1
    )
    if value > MAX_SIZE:
        raise InvalidParameterError(
            f"{name}: {text!r} is larger than any disk ({MAX_SIZE} bytes at most)"
        )
    return value


def format_size(n: int | float) -> str:
    """Format a byte count for people: ``1.5 GiB``, ``12 KiB``, ``512 B``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
