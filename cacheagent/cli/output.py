"""How the CLI prints data: one ``--format`` convention, tables, CSV, JSON, and prompts.

Every command that prints data takes ``--format`` (its first choice, ``text`` or
``table``, is for people; ``json`` and ``csv`` are for programs) and ``--json``
as a short alias of ``--format json``.
"""

from __future__ import annotations

import csv
import io
import json
import select
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

# How long a confirmation prompt waits for an answer before giving up (and
# removing nothing): a forgotten terminal must not hold the cache's lock for ever.
PROMPT_TIMEOUT_S = 300.0


def emit(fmt: str, data: Any, text: str, stream: TextIO | None = None) -> None:
    """Print ``data`` as JSON when ``fmt`` is json, else the human-readable ``text``."""
    out = stream or sys.stdout
    print(json.dumps(data, default=str) if fmt == "json" else text, file=out)


def when(timestamp: float) -> str:
    """A local time for people: ``2026-01-31 12:00:00``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def iso_time(timestamp: float) -> str:
    """A UTC time for programs (CSV): ``2026-01-31T12:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@dataclass(frozen=True)
class Column:
    """One column of a table: its heading, width (0: as wide as needed) and alignment."""

    heading: str
    width: int = 0
    right: bool = False


def table(columns: Sequence[Column], rows: Iterable[Sequence[str]]) -> str:
    """Fixed-width columns separated by two spaces; a cell wider than its column is cut."""
    lines = []
    for cells in [[c.heading for c in columns], *rows]:
        parts = []
        for column, cell in zip(columns, cells, strict=True):
            if column.width:
                cell = cell[: column.width]
                cell = cell.rjust(column.width) if column.right else cell.ljust(column.width)
            parts.append(cell)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """RFC 4180 CSV with a header row (no trailing newline)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().rstrip("\n")


def stdin_is_terminal() -> bool:
    """True when a person can answer a prompt on standard input."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):  # closed or replaced stdin
        return False


def confirm(question: str, timeout: float = PROMPT_TIMEOUT_S) -> bool:
    """Ask ``question [y/N]`` on stderr; True only for an answer of y or yes in time."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        sys.stderr.write(f"\nno answer in {timeout:.0f} s\n")
        return False
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")
