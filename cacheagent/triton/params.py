"""The agent parameters a model's config.pbtxt may set, validated.

Every error names the model, the parameter and the accepted values, because
Triton shows the message only in its log, as the reason the load failed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.errors import InvalidLocationError, InvalidParameterError
from cacheagent.remote.location import ACCEPTED_FORMS, parse_location
from cacheagent.remote.transfer import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from cacheagent.sizes import ACCEPTED_SIZE_FORMS, parse_size

CACHE_DIR_ENV = "CACHEAGENT_CACHE_DIR"

MIN_PART_SIZE = 1024 * 1024
MAX_PART_SIZE = 1024**3
MAX_CONCURRENCY = 64
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

PARAMETERS: dict[str, str] = {
    "cache_dir": "absolute path of the cache directory (default $CACHEAGENT_CACHE_DIR, "
    "else ~/.cache/cacheagent)",
    "max_size": f"cache budget: {ACCEPTED_SIZE_FORMS}, or 'none' (default none)",
    "verify": "check of a cached snapshot on each load: size (default), hash, or none",
    "stale_if_error": "serve the last good snapshot when storage is unreachable: "
    "true (default) or false",
    "concurrency": f"parallel requests while fetching: 1 to {MAX_CONCURRENCY} "
    f"(default {DEFAULT_CONCURRENCY})",
    "part_size": f"bytes per ranged request: 1MiB to 1GiB (default {DEFAULT_PART_SIZE >> 20}MiB)",
    "versions": "which version directories to fetch: policy (default: those the model's "
    "version_policy loads) or all",
    "on_unload": "what UNLOAD_COMPLETE does with the model's snapshot: keep (default; it "
    "stays cached across restarts until evicted for space) or evict",
    "prefetch": "on the first LOAD of a repository, fetch its other cacheagent models in the "
    "background: true (default) or false",
    "source": f"fetch the model from this location instead of Triton's ({ACCEPTED_FORMS})",
}


@dataclass(frozen=True)
class AgentParams:
    """Validated agent parameters, with defaults filled in."""

    cache_dir: Path
    max_size: int | None = None
    verify: str = "size"
    stale_if_error: bool = True
    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE
    versions: str = "policy"
    on_unload: str = "keep"
    prefetch: bool = True
    source: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """$CACHEAGENT_CACHE_DIR, else $XDG_CACHE_HOME/cacheagent, else ~/.cache/cacheagent."""
    env = os.environ if env is None else env
    if env.get(CACHE_DIR_ENV):
        return Path(env[CACHE_DIR_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cacheagent"


def parse_params(
    raw: Mapping[str, str], model: str, env: Mapping[str, str] | None = None
) -> AgentParams:
    """Validate the raw key/value pairs from config.pbtxt; raise InvalidParameterError."""
    env = os.environ if env is None else env
    unknown = sorted(set(raw) - set(PARAMETERS))
    if unknown:
        raise InvalidParameterError(
            f"model '{model}': unknown cacheagent parameter '{unknown[0]}'; accepted parameters: "
            + "; ".join(f"{k} ({v})" for k, v in PARAMETERS.items())
        )
    values: dict[str, object] = {"cache_dir": default_cache_dir(env)}
    for key, text in raw.items():
        values[key] = _parse_one(key, str(text).strip(), model, env)
    return AgentParams(**values)  # type: ignore[arg-type]


def _bad(model: str, key: str, text: str, why: str = "") -> InvalidParameterError:
    reason = f" ({why})" if why else ""
    return InvalidParameterError(
        f"model '{model}': cacheagent parameter '{key}' = {text!r} is not valid{reason}; "
        f"accepted: {PARAMETERS[key]}"
    )


def _parse_one(key: str, text: str, model: str, env: Mapping[str, str]) -> object:
    if key == "cache_dir":
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~user" naming no user
            raise _bad(model, key, text, "'~' names no known user") from None
        if not text or not path.is_absolute():
            raise _bad(model, key, text, "it must be an absolute path")
        return path
    if key in ("max_size", "part_size"):
        if key == "max_size" and text.lower() in ("none", "unlimited", ""):
            return None
        try:
            size = parse_size(text, name=key)
        except InvalidParameterError:
            raise _bad(model, key, text) from None
        if key == "part_size" and not MIN_PART_SIZE <= size <= MAX_PART_SIZE:
            raise _bad(model, key, text, "out of range")
        return size
    if key == "concurrency":
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_CONCURRENCY:
            raise _bad(model, key, text)
        return int(text)
    if key in ("stale_if_error", "prefetch"):
        if text.lower() not in _BOOLS:
            raise _bad(model, key, text)
        return _BOOLS[text.lower()]
    choices = {
        "verify": ("size", "hash", "none"),
        "versions": ("policy", "all"),
        "on_unload": ("keep", "evict"),
    }
    if key in choices:
        if text.lower() not in choices[key]:
            raise _bad(model, key, text)
        return text.lower()
    if key == "source":
        try:
            location = parse_location(text, env)
        except InvalidLocationError as exc:
            raise _bad(model, key, text, str(exc).split(";")[0]) from None
        return location.url
    raise AssertionError(f"parameter {key} has no parser")
