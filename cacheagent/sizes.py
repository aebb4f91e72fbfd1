"""Human-readable byte sizes: parse ``500MB``, ``200GiB`` or ``1048576``; format for display."""

from __future__ import annotations

import re

from cacheagent.errors import InvalidParameterError

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
MAX_SIZE = 2**62  # far beyond any disk, and still exact in SQLite's 64-bit integers
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)
ACCEPTED_SIZE_FORMS = "a byte count (1048576) or a number with a unit: 500MB, 1.5GB, 200GiB, 64KiB"


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
    try:
        value = int(float(match.group(1)) * _UNITS[unit])
    except (OverflowError, ValueError):
        raise InvalidParameterError(
            f"{name}: {text!r} is too large to be a size; use {ACCEPTED_SIZE_FORMS}"
        ) from None
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
