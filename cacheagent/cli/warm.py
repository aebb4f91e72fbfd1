"""``cacheagent warm``: fetch a model directory the way Triton's first LOAD will look it up.

The agent's LOAD keeps only the version directories the model's
``version_policy`` loads (issue 10), and the snapshot key depends on what is
kept. So ``warm`` reads the model's config.pbtxt from the location, the way
the background prefetch reads a sibling's (:mod:`cacheagent.triton.config`,
Triton's own schema), and selects with the function LOAD uses
(:func:`cacheagent.triton.layout.version_selection`): a node warmed here gets a
hit, with the same key, at Triton's first LOAD.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cacheagent.cli.commands import cache_root
from cacheagent.cli.output import emit
from cacheagent.cli.parser import EXIT_OK
from cacheagent.errors import StorageUnavailableError
from cacheagent.settings import DEFAULT_TIMEOUT, Settings

if TYPE_CHECKING:
    from cacheagent.cache import Cache, Snapshot
    from cacheagent.remote.location import Location

log = logging.getLogger("cacheagent.cli.warm")

# What a fetch keeps of a model directory: a selector (None: everything) and its name.
Selection = tuple[Callable[[Iterable[str]], set[str]] | None, str]


def warm(args: argparse.Namespace) -> int:
    """Fetch LOCATION into the cache (created if missing); print the snapshot path or JSON."""
    from cacheagent.cache import Cache
    from cacheagent.cli.progress import Progress
    from cacheagent.remote.location import parse_location

    settings = fetch_settings(args)
    model = parse_location(args.location)
    with Cache(settings.cache_dir) as cache:
        select, name = version_selection(cache, model, args.versions, settings.timeout)
        bar = Progress(sys.stderr, enabled=not args.no_progress and sys.stderr.isatty())
        try:
            snapshot = cache.fetch(
                model,
                select=select,
                selection=name,
                settings=settings,
                progress=bar.advance,
                on_plan=bar.plan,
            )
        finally:
            bar.close()
    if snapshot.warning:
        print(f"cacheagent: warning: {snapshot.warning}", file=sys.stderr)
    emit(args.format, snapshot_json(snapshot), str(snapshot.path))
    return EXIT_OK


def fetch_settings(args: argparse.Namespace) -> Settings:
    """The settings ``warm`` fetches with: its flags, else the agent's defaults."""
    values: dict[str, Any] = {"cache_dir": cache_root(args), "verify": args.verify}
    # The node's $CACHEAGENT_MAX_SIZE still applies: the cache takes the stricter.
    values["max_size"] = getattr(args, "max_size", None)
    values["stale_if_error"] = not args.no_stale
    if args.concurrency is not None:
        values["concurrency"] = args.concurrency
    if args.part_size is not None:
        values["part_size"] = args.part_size
    if args.timeout is not None:
        values["timeout"] = args.timeout
    values["shared_cache"] = getattr(args, "shared_cache", None) or _shared_cache_from_env()
    return Settings(**values)


def _shared_cache_from_env() -> str | None:
    """$CACHEAGENT_SHARED_CACHE, validated like the agent parameter (None when unset)."""
    import os

    from cacheagent.settings import SHARED_CACHE_ENV, parse_value

    text = os.environ.get(SHARED_CACHE_ENV, "")
    if not text.strip():
        return None
    value: str | None = parse_value("shared_cache", text, where=f"${SHARED_CACHE_ENV}")
    return value


def version_selection(
    cache: Cache, model: Location, versions: str, timeout: float | None = None
) -> Selection:
    """The selection the agent's LOAD would make of ``model``: its config's version policy.

    ``--versions all``, or ``versions: all`` in the config's cacheagent parameters,
    selects every version. A config that is missing or that Triton could not parse
    leaves Triton's default (``latest 1``). When storage is unreachable, the
    selection of the source's newest snapshot is kept, so stale-if-error can serve it.
    """
    from cacheagent.remote.listing import read_file
    from cacheagent.triton import layout
    from cacheagent.triton.config import CONFIG_FILE, ConfigError, parse_config

    if versions == "all":
        return layout.version_selection(None, "all")
    previous = _previous_selection(cache, model.url)
    try:
        # One attempt when a snapshot could be served instead: an outage then costs
        # one round of the fetch's own retries, not two.
        text = read_file(
            model, CONFIG_FILE, delays=() if previous else None, timeout=timeout or DEFAULT_TIMEOUT
        )
    except FileNotFoundError:  # RemoteNotFoundError too
        log.info("%s has no %s: Triton's default policy (latest 1)", model.url, CONFIG_FILE)
        return layout.version_selection(None, "policy")
    except StorageUnavailableError:
        if previous is None:
            raise
        log.warning(
            "cannot read %s/%s (storage unreachable); keeping the versions of its last "
            "snapshot (%s)",
            model.url,
            CONFIG_FILE,
            previous[1],
        )
        return previous
    try:
        config = parse_config(text)
    except ConfigError as exc:
        log.warning(
            "%s/%s does not parse (%s): Triton would refuse to load this model; fetching "
            "the versions of Triton's default policy (latest 1)",
            model.url,
            CONFIG_FILE,
            exc,
        )
        return layout.version_selection(None, "policy")
    return _config_selection(config, model)


def _config_selection(config: Any, model: Location) -> Selection:
    from cacheagent.triton import layout
    from cacheagent.triton.config import agent_parameters, config_json

    raw = agent_parameters(config)
    mode = "policy"
    if raw is not None:
        from cacheagent.triton.params import parse_params

        # Validated as LOAD validates them: a bad parameter fails here as it would there.
        mode = parse_params(raw, model.url.rstrip("/").rsplit("/", 1)[-1]).versions
    shaped = config_json(config)
    log.info(
        "%s: versions=%s, version_policy %s",
        model.url,
        mode,
        shaped.get("version_policy", "(default: latest 1)"),
    )
    return layout.version_selection(shaped, mode)


_LATEST = re.compile(r"^policy:latest:(\d+)$")
_SPECIFIC = re.compile(r"^policy:specific:(\d+(?:,\d+)*)$")


def _previous_selection(cache: Cache, source: str) -> Selection | None:
    """The selection of the newest snapshot of ``source``, rebuilt; None if none or unknown."""
    from cacheagent.triton import layout

    records = [r for r in cache.snapshots() if r.source == source]
    if not records:
        return None
    name = max(records, key=lambda r: r.created).selection
    policy: dict[str, Any] | None = None
    if name == "policy:all":
        policy = {"all": {}}
    elif match := _LATEST.match(name):
        policy = {"latest": {"num_versions": int(match.group(1))}}
    elif match := _SPECIFIC.match(name):
        policy = {"specific": {"versions": [int(v) for v in match.group(1).split(",")]}}
    rebuilt = (
        layout.version_selection(None, "all")
        if name == "all"
        else layout.version_selection({"version_policy": policy}, "policy")
    )
    # The names are layout's: accept the rebuilt selection only if it names itself alike.
    return rebuilt if rebuilt[1] == name else None


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The JSON form of a fetch result."""
    return {
        "path": str(snapshot.path),
        "key": snapshot.key,
        "source": snapshot.source,
        "hit": snapshot.hit,
        "stale": snapshot.stale,
        "bytes_fetched": snapshot.bytes_fetched,
        "bytes_from_tier": snapshot.bytes_from_tier,
        "bytes_from_origin": snapshot.bytes_from_origin,
        "files_fetched": snapshot.files_fetched,
        "files": snapshot.files,
        "size": snapshot.size,
        "seconds": round(snapshot.seconds, 4),
        **({"warning": snapshot.warning} if snapshot.warning else {}),
    }
