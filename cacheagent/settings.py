"""Settings: one value type, one validator, for agent parameters, CLI flags and the Python API.

A :class:`Settings` is immutable and travels with each call (``Cache.fetch(...,
settings=...)``); nothing is ever written onto a shared object, so two models
with different parameters on one cache never see each other's settings.

Every setting has one :class:`Field` in :data:`FIELDS`: its parser, its default
and the sentence that documents it. ``config.pbtxt`` parameters
(:func:`cacheagent.triton.params.parse_params`), the CLI's flags and the API all
validate through :func:`parse_value`, so a value accepted in one place is
accepted in all of them, with the same words when it is not.

The budget is the cache directory's, not a model's: the node-wide budget comes
from ``CACHEAGENT_MAX_SIZE`` (``cacheagent run --max-size`` sets it for Triton),
and a model's own ``max_size`` can only narrow it for that model's loads. The
stricter of the two wins (:func:`effective_budget`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheagent.errors import InvalidParameterError
from cacheagent.sizes import ACCEPTED_SIZE_FORMS, parse_size

CACHE_DIR_ENV = "CACHEAGENT_CACHE_DIR"
MAX_SIZE_ENV = "CACHEAGENT_MAX_SIZE"
SHARED_CACHE_ENV = "CACHEAGENT_SHARED_CACHE"

# Parallelism adapts to the link (see cacheagent.remote.transfer); ``concurrency``
# is its cap. 8 MiB parts amortise a request's latency on any link while a part
# still arrives within seconds on a slow one.
DEFAULT_CONCURRENCY = 128
MAX_CONCURRENCY = 256
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 1024 * 1024
MAX_PART_SIZE = 1024**3
# One end-to-end bound per storage operation (a listing, one ranged read), so a
# black-holed endpoint answers a LOAD, stale or failed, within about a minute.
DEFAULT_TIMEOUT = 60.0
MIN_TIMEOUT = 1.0
MAX_TIMEOUT = 3600.0

VERIFY_MODES = ("size", "hash", "none")
VERSION_MODES = ("policy", "all")
UNLOAD_MODES = ("keep", "evict")
_BOOLS = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """$CACHEAGENT_CACHE_DIR, else $XDG_CACHE_HOME/cacheagent, else ~/.cache/cacheagent."""
    env = os.environ if env is None else env
    if env.get(CACHE_DIR_ENV):
        return Path(env[CACHE_DIR_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cacheagent"


class BadValue(ValueError):
    """Raised by a field's parser; :func:`parse_value` words it for the user."""


def _path(text: str) -> Path:
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~user" naming no user
        raise BadValue("'~' names no known user") from None
    if not text or not path.is_absolute():
        raise BadValue("it must be an absolute path")
    return path


def _budget(text: str) -> int | None:
    if text.lower() in ("none", "unlimited", ""):
        return None
    return _size(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidParameterError:
        raise BadValue("") from None


def _ranged(parse: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def parse_in_range(text: str) -> Any:
        value = parse(text)
        if not low <= value <= high:
            raise BadValue("out of range")
        return value

    return parse_in_range


def _int(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise BadValue("")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text.lower().removesuffix("s"))
    except ValueError:
        raise BadValue("") from None
    if value != value:  # NaN
        raise BadValue("")
    return value


def _bool(text: str) -> bool:
    if text.lower() not in _BOOLS:
        raise BadValue("")
    return _BOOLS[text.lower()]


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse_choice(text: str) -> str:
        if text.lower() not in choices:
            raise BadValue("")
        return text.lower()

    return parse_choice


def _shared_tier(text: str) -> str | None:
    if text.lower() in ("", "none"):
        return None
    if text.startswith("/"):
        return text
    # Imported here: settings are plain values below every room, and only this
    # field needs the location grammar.
    from cacheagent.errors import InvalidLocationError
    from cacheagent.remote.location import parse_location

    try:
        location = parse_location(text)
    except InvalidLocationError as exc:
        raise BadValue(str(exc).split(";")[0]) from exc
    if not location.is_remote:
        raise BadValue("a shared filesystem path must be absolute")
    return location.url


@dataclass(frozen=True)
class Field:
    """One setting: how to read it from text, and what it means."""

    parse: Callable[[str], Any]
    doc: str


FIELDS: dict[str, Field] = {
    "cache_dir": Field(
        _path,
        "absolute path of the cache directory (default $CACHEAGENT_CACHE_DIR, "
        "else ~/.cache/cacheagent)",
    ),
    "max_size": Field(
        _budget,
        f"cache budget: {ACCEPTED_SIZE_FORMS}, or 'none' (default: $CACHEAGENT_MAX_SIZE, "
        "else none); a model's value can only narrow the node's budget",
    ),
    "verify": Field(
        _choice(VERIFY_MODES),
        "check of a cached snapshot on each load: size (default), hash, or none",
    ),
    "stale_if_error": Field(
        _bool,
        "serve the last good snapshot when storage is unreachable (an outage, never a "
        "configuration error): true (default) or false",
    ),
    "concurrency": Field(
        _ranged(_int, 1, MAX_CONCURRENCY),
        f"most parallel requests while fetching; parallelism adapts to the link up to it: "
        f"1 to {MAX_CONCURRENCY} (default {DEFAULT_CONCURRENCY})",
    ),
    "part_size": Field(
        _ranged(_size, MIN_PART_SIZE, MAX_PART_SIZE),
        f"bytes per ranged request: 1MiB to 1GiB (default {DEFAULT_PART_SIZE >> 20}MiB)",
    ),
    "shared_cache": Field(
        _shared_tier,
        "a shared tier every node of a fleet reads and fills: a bucket location (s3://, gs://, "
        "as://) or an absolute path on a shared filesystem (default: $CACHEAGENT_SHARED_CACHE, "
        "else none)",
    ),
    "timeout": Field(
        _ranged(_seconds, MIN_TIMEOUT, MAX_TIMEOUT),
        f"seconds one storage operation (a listing, a ranged read) may take in all, retries "
        f"included: {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g} (default {DEFAULT_TIMEOUT:g})",
    ),
}


@dataclass(frozen=True)
class Settings:
    """How one call uses the cache. Immutable: derive a variant with :meth:`replace`."""

    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    max_size: int | None = None
    verify: str = "size"
    stale_if_error: bool = True
    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE
    timeout: float = DEFAULT_TIMEOUT
    shared_cache: str | None = None

    def __post_init__(self) -> None:
        # Values built in Python (the API) get the same checks as text from a config.
        for name in FIELDS:
            value = getattr(self, name)
            check_value(name, value)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated like any other value)."""
        return dataclasses.replace(self, **changes)


def check_value(name: str, value: Any) -> None:
    """Check an already-typed value against its field; raise InvalidParameterError."""
    if name == "cache_dir":
        if not Path(value).is_absolute():
            raise _error(name, str(value), "it must be an absolute path")
        return
    if name in ("max_size", "shared_cache") and value is None:
        return
    text = str(value).lower()
    parse_value(name, text)


def parse_value(name: str, text: str, *, where: str = "") -> Any:
    """The value of setting ``name`` written as ``text``; raise InvalidParameterError.

    ``where`` prefixes the message (``"model 'resnet': cacheagent parameter"`` or
    ``"--max-size"``), so an error names what the user wrote.
    """
    field = FIELDS[name]
    try:
        return field.parse(str(text).strip())
    except BadValue as exc:
        raise _error(name, text, str(exc), where) from exc


def _error(name: str, text: str, why: str, where: str = "") -> InvalidParameterError:
    reason = f" ({why})" if why else ""
    subject = where or f"setting '{name}'"
    return InvalidParameterError(
        f"{subject} = {text!r} is not valid{reason}; accepted: {FIELDS[name].doc}"
    )


def settings_from(
    raw: Mapping[str, str],
    *,
    env: Mapping[str, str] | None = None,
    where: Callable[[str], str] | None = None,
) -> Settings:
    """Settings from text values (unknown names are the caller's to reject), env defaults.

    ``where(name)`` words the subject of an error about setting ``name``.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {"cache_dir": default_cache_dir(env)}
    if env.get(SHARED_CACHE_ENV, "").strip():
        values["shared_cache"] = parse_value(
            "shared_cache", env[SHARED_CACHE_ENV], where=f"${SHARED_CACHE_ENV}"
        )
    for name, text in raw.items():
        values[name] = parse_value(name, text, where=where(name) if where else "")
    return Settings(**values)


def node_budget(env: Mapping[str, str] | None = None) -> int | None:
    """The node-wide budget from $CACHEAGENT_MAX_SIZE, or None (unlimited)."""
    env = os.environ if env is None else env
    text = env.get(MAX_SIZE_ENV, "")
    return parse_value("max_size", text, where=f"${MAX_SIZE_ENV}") if text.strip() else None


def effective_budget(model_max: int | None, node_max: int | None) -> int | None:
    """The stricter of a model's ``max_size`` and the node's budget (None: unlimited)."""
    limits = [b for b in (model_max, node_max) if b is not None]
    return min(limits) if limits else None
