"""Which snapshots a command acts on: TARGET arguments, ``ls --filter`` and ``--sort``.

A TARGET (``rm``, ``verify``) is a snapshot key or a unique prefix of one (as
``ls`` shows it), a model name, or a source location. A filter is
``FIELD OP VALUE``: ``size>1GB``, ``size<=10MiB``, ``accessed>30d`` (last used
more than 30 days ago), ``accessed<2h``, ``model=resnet``, ``source=s3://bucket/*``
(``=`` and ``!=`` match globs).
"""

from __future__ import annotations

import fnmatch
import operator
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cacheagent.errors import InvalidLocationError, InvalidParameterError
from cacheagent.sizes import parse_size


class Record(Protocol):
    """What the index knows of a snapshot (``cacheagent.local.index.SnapshotRecord``)."""

    key: str
    model: str
    source: str
    size: int
    last_used: float


R = TypeVar("R", bound=Record)


class TargetError(InvalidParameterError):
    """A TARGET matches no snapshot, or a key prefix matches several."""


# Shorter prefixes than this are too likely to be typos to remove things by.
MIN_KEY_PREFIX = 4


def resolve_targets(records: Sequence[R], targets: Iterable[str]) -> list[R]:
    """The snapshots ``targets`` name, each once, in the order first named."""
    chosen: dict[str, R] = {}
    for target in targets:
        for record in resolve_target(records, target):
            chosen.setdefault(record.key, record)
    return list(chosen.values())


def resolve_target(records: Sequence[R], target: str) -> list[R]:
    """The snapshots one TARGET names; raise TargetError if none or ambiguous."""
    text = target.strip()
    exact = [r for r in records if r.key == text]
    if exact:
        return exact
    by_model = [r for r in records if r.model == text]
    if by_model:
        return by_model
    by_prefix = [r for r in records if len(text) >= MIN_KEY_PREFIX and r.key.startswith(text)]
    if len(by_prefix) > 1:
        keys = ", ".join(r.key[:16] for r in by_prefix[:5])
        raise TargetError(
            f"key prefix {text!r} matches {len(by_prefix)} snapshots ({keys}); "
            "give more characters of the key"
        )
    if by_prefix:
        return by_prefix
    source = _normalized_source(text)
    by_source = [r for r in records if source and r.source.rstrip("/") == source]
    if by_source:
        return by_source
    raise TargetError(
        f"no snapshot matches {text!r}: it is neither a key (or a prefix of at least "
        f"{MIN_KEY_PREFIX} characters), a model name nor a source; see `cacheagent ls`"
    )


def _normalized_source(text: str) -> str:
    # The index stores Location.url: parse the same way (without credentials,
    # which never appear in a URL) so that "s3://b/m/" or "./m" find their snapshot.
    from cacheagent.remote.location import parse_location  # not needed to build the parser

    try:
        return parse_location(text, env={}).url.rstrip("/")
    except InvalidLocationError:
        return ""


# -- filters -----------------------------------------------------------------

FILTER_FIELDS = ("size", "accessed", "model", "source")
FILTER_EXAMPLES = "size>1GB, size<=10MiB, accessed>30d, accessed<2h, model=resnet, source=s3://b/*"
_FILTER_RE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|!=|=|<|>)\s*(.*?)\s*$")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "=": operator.eq,
    "!=": operator.ne,
}
_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhdw])$", re.ASCII)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Filter:
    """One ``--filter``: keeps the snapshots for which ``test(record, now)`` holds."""

    text: str
    test: Callable[[Record, float], bool]

    def __call__(self, record: Record, now: float) -> bool:
        return self.test(record, now)


def parse_filter(text: str) -> Filter:
    """Parse ``FIELD OP VALUE``; raise InvalidParameterError saying what is accepted."""
    match = _FILTER_RE.match(text)
    if not match:
        raise _filter_error(text, "use FIELD OP VALUE")
    name, op, value = match.groups()
    if name not in FILTER_FIELDS:
        raise _filter_error(text, f"unknown field {name!r}; fields: {', '.join(FILTER_FIELDS)}")
    if not value:
        raise _filter_error(text, "the value is missing")
    if name in ("model", "source"):
        return _glob_filter(text, name, op, value)
    compare = _COMPARE[op]
    if name == "size":
        try:
            limit = parse_size(value, name="size")
        except InvalidParameterError as exc:
            raise _filter_error(text, str(exc)) from None
        return Filter(text, lambda r, _now: compare(r.size, limit))
    age = parse_duration(value)
    if age is None:
        raise _filter_error(text, f"{value!r} is not a duration; use 90s, 30m, 2h, 30d or 1w")
    # accessed>30d: last used more than 30 days ago, i.e. its age is over 30 days.
    return Filter(text, lambda r, now: compare(now - r.last_used, age))


def _glob_filter(text: str, name: str, op: str, pattern: str) -> Filter:
    if op not in ("=", "!="):
        raise _filter_error(text, f"{name} takes = or != (a glob such as {name}=res*)")
    wanted = op == "="

    def test(record: Record, _now: float) -> bool:
        value = str(getattr(record, name))
        matched = fnmatch.fnmatchcase(value, pattern) or (
            name == "source" and fnmatch.fnmatchcase(value, pattern.rstrip("/"))
        )
        return matched is wanted

    return Filter(text, test)


def parse_duration(text: str) -> float | None:
    """Seconds in ``90s``, ``30m``, ``2h``, ``30d`` or ``1w``; None if unreadable."""
    match = _DURATION_RE.match(text.strip().lower())
    if not match or len(match.group(1)) > 12:
        return None
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _filter_error(text: str, why: str) -> InvalidParameterError:
    return InvalidParameterError(f"--filter {text!r}: {why}; e.g. {FILTER_EXAMPLES}")


def apply_filters(
    records: Iterable[R], filters: Sequence[Filter], now: float | None = None
) -> list[R]:
    """The records every filter keeps (all of them, when there is no filter)."""
    moment = time.time() if now is None else now
    return [r for r in records if all(f(r, moment) for f in filters)]


# -- sorting -----------------------------------------------------------------

SORT_KEYS: dict[str, Callable[[Record], Any]] = {
    "size": lambda r: r.size,
    "accessed": lambda r: r.last_used,
    "model": lambda r: (r.model, r.source),
    "source": lambda r: (r.source, r.model),
}
SORT_CHOICES = (*SORT_KEYS, *(f"-{k}" for k in SORT_KEYS))
DEFAULT_SORT = "-accessed"  # most recently used first, as `ls` always listed them


def sort_records(records: Iterable[R], sort: str, reverse: bool = False) -> list[R]:
    """Sort ascending by ``sort`` (``-`` in front: descending); ``reverse`` flips it."""
    descending = sort.startswith("-")
    key = SORT_KEYS[sort.removeprefix("-")]
    return sorted(records, key=key, reverse=descending != reverse)
