"""The agent parameters a model's config.pbtxt may set, validated.

Every error names the model, the parameter and the accepted values, because
Triton shows the message only in its log, as the reason the load failed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheagent.errors import InvalidLocationError, InvalidParameterError
from cacheagent.remote.location import ACCEPTED_FORMS, parse_location
from cacheagent.settings import FIELDS, Settings, settings_from

# The parameters that exist only for Triton models, beside the Settings fields.
_TRITON_ONLY: dict[str, str] = {
    "versions": "which version directories to fetch: policy (default: those the model's "
    "version_policy loads) or all",
    "on_unload": "what UNLOAD_COMPLETE does with the model's snapshot: keep (default; it "
    "stays cached across restarts until evicted for space) or evict",
    "prefetch": "on the first LOAD of a repository, fetch its other cacheagent models in the "
    "background: true (default) or false",
    "source": f"fetch the model from this location instead of Triton's ({ACCEPTED_FORMS})",
}
_CHOICES = {"versions": ("policy", "all"), "on_unload": ("keep", "evict")}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLS |= {"false": False, "0": False, "no": False, "off": False}

PARAMETERS: dict[str, str] = {name: field.doc for name, field in FIELDS.items()} | _TRITON_ONLY


@dataclass(frozen=True)
class AgentParams:
    """Validated agent parameters: the cache :class:`Settings` plus Triton-only choices."""

    settings: Settings
    versions: str = "policy"
    on_unload: str = "keep"
    prefetch: bool = True
    source: str | None = None

    @property
    def cache_dir(self) -> Path:
        """The cache directory these parameters name."""
        return self.settings.cache_dir

    @property
    def max_size(self) -> int | None:
        """The model's own budget (None: only the node's applies)."""
        return self.settings.max_size

    @property
    def verify(self) -> str:
        """The check of a cached snapshot on each load."""
        return self.settings.verify

    @property
    def stale_if_error(self) -> bool:
        """Whether an outage may be answered with the last good snapshot."""
        return self.settings.stale_if_error

    @property
    def concurrency(self) -> int:
        """The cap on parallel requests while fetching."""
        return self.settings.concurrency

    @property
    def part_size(self) -> int:
        """Bytes per ranged request."""
        return self.settings.part_size


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
    settings = settings_from(
        {k: str(v) for k, v in raw.items() if k in FIELDS},
        env=env,
        where=lambda name: f"model '{model}': cacheagent parameter '{name}'",
    )
    triton: dict[str, Any] = {
        key: _parse_triton_only(key, str(text).strip(), model, env)
        for key, text in raw.items()
        if key in _TRITON_ONLY
    }
    return AgentParams(settings, **triton)


def _bad(model: str, key: str, text: str, why: str = "") -> InvalidParameterError:
    reason = f" ({why})" if why else ""
    return InvalidParameterError(
        f"model '{model}': cacheagent parameter '{key}' = {text!r} is not valid{reason}; "
        f"accepted: {PARAMETERS[key]}"
    )


def _parse_triton_only(key: str, text: str, model: str, env: Mapping[str, str]) -> object:
    if key == "prefetch":
        if text.lower() not in _BOOLS:
            raise _bad(model, key, text)
        return _BOOLS[text.lower()]
    if key in _CHOICES:
        if text.lower() not in _CHOICES[key]:
            raise _bad(model, key, text)
        return text.lower()
    if key == "source":
        try:
            location = parse_location(text, env)
        except InvalidLocationError as exc:
            raise _bad(model, key, text, str(exc).split(";")[0]) from exc
        return location.url
    raise AssertionError(f"parameter {key} has no parser")
