"""Agent actions: what cacheagent does for each Triton repository-agent action.

The worker bridge calls :func:`handle` once per action. Nothing here lives
only in memory that matters later: leases and snapshots are in the cache
directory, because Triton may unload the agent (and so the worker) at any
time.

- LOAD of a cloud model (or of any model with a ``source`` parameter): fetch
  through the cache, lease the snapshot for this Triton process, and answer
  with its directory and the lease's token file, which the shim holds too: the
  lease lives while Triton serves the model, even if this worker crashes
  (:mod:`cacheagent.local.leases`). LOAD of a local model: leave it untouched.
- LOAD_FAIL: release the lease (by its id, so a restarted worker can too).
- UNLOAD_COMPLETE: release the lease and run eviction. It also fires at every
  shutdown, so by default the snapshot stays cached for the next start.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cacheagent.remote.location import parse_location
from cacheagent.sizes import format_size
from cacheagent.triton.layout import version_selection
from cacheagent.triton.params import AgentParams, parse_params
from cacheagent.triton.startlisting import listed_at_start, start_covers_every_model
from cacheagent.triton.stubmark import remote_config_changed
from cacheagent.triton.worker import LeasedPath

if TYPE_CHECKING:
    from cacheagent.cache import Cache, Snapshot
    from cacheagent.triton.prefetch import Prefetcher

LogFn = Callable[[str, str], None]

# The worker is long-lived: reuse open caches (their SQLite handles) across actions.
# A cache holds no per-model settings: each call passes its model's own.
_CACHES: dict[Path, Cache] = {}
_CACHES_LOCK = threading.Lock()


def handle(request: dict[str, Any], log: LogFn) -> str | None:
    """Run one agent action; return the local directory Triton must load from, or None."""
    action = str(request.get("action", ""))
    model = model_name(request)
    params = parse_params(request.get("params") or {}, model)
    if action == "LOAD":
        return _load(request, params, model, log)
    if action == "LOAD_FAIL":
        _release(request, params, log, evict=False)
    elif action == "UNLOAD_COMPLETE":
        _release(request, params, log, evict=True)
    return None


def model_name(request: dict[str, Any]) -> str:
    """The model's name: from its config when Triton sent it, else the location's last part."""
    config = request.get("config") or {}
    name = config.get("name") if isinstance(config, dict) else None
    return str(name or os.path.basename(str(request.get("location", "")).rstrip("/")) or "?")


def lease_id(request: dict[str, Any]) -> str:
    """The lease of one Triton model lifecycle: its server process and agent-model handle."""
    return f"triton-{request.get('server_pid', 0)}-{request.get('handle', '')}"


def cache_for(cache_dir: Path) -> Cache:
    """The worker's open cache of ``cache_dir`` (one per directory, shared by threads)."""
    # The cache and its index (diskcache, SQLite) are imported on first use, not
    # with this module: a fresh worker's first LOAD starts its listing first, so
    # the storage round trip overlaps these imports (see _load).
    from cacheagent.cache import Cache

    with _CACHES_LOCK:
        cache = _CACHES.get(cache_dir)
        if cache is None:
            cache = Cache(cache_dir)
            _CACHES[cache_dir] = cache
        return cache


def settle_open_caches(timeout: float) -> None:
    """Let each open cache's queued bookkeeping (a hit's counters) reach its index, within
    ``timeout`` seconds in all: the worker calls this before it exits."""
    deadline = time.monotonic() + timeout
    with _CACHES_LOCK:
        caches = list(_CACHES.values())
    for cache in caches:
        cache.index.settle(max(0.0, deadline - time.monotonic()))


def preload(*, prefetch: bool = True) -> None:
    """Import what a LOAD's hit path needs (the cache, its index, diskcache, SQLite).

    A fresh worker runs this on a thread as soon as it has imported this module:
    the imports then overlap the wait for Triton's first request and for this
    start's listing, instead of lengthening the first LOAD. ``prefetch`` adds the
    prefetcher (and the storage clients it imports), which a LOAD asks for only
    when no start listing covers every model. Never raises: a broken import is
    the LOAD's to report.
    """
    try:
        import cacheagent.cache

        if prefetch:
            import cacheagent.triton.prefetch  # noqa: F401
    except Exception as exc:  # the LOAD that needs it raises it properly
        logging.getLogger(__name__).debug("preloading the cache failed: %s", exc)


def open_cache(env: Mapping[str, str]) -> None:
    """Get the cache ``env`` names (``$CACHEAGENT_CACHE_DIR``) ready for the first LOAD.

    The first worker of ``cacheagent run`` runs this on a thread as soon as it has
    Triton's environment. It builds the cache object (its store and its index,
    not yet the database: a hit needs none, see :meth:`Cache.fetch`'s
    ``defer_bookkeeping``), and imports the prefetcher only when this start's
    listing does not cover every model (then each LOAD asks for it). Never
    raises: what fails here fails again in the LOAD, which reports it.
    """
    try:
        from cacheagent.settings import default_cache_dir

        preload(prefetch=not start_covers_every_model(env))
        cache_for(default_cache_dir(env))
    except Exception as exc:
        logging.getLogger(__name__).debug(
            "preparing the cache ahead of the first LOAD failed: %s", exc
        )


@functools.cache
def prefetcher() -> Prefetcher:
    """The worker's one prefetcher (built on first use, like the cache)."""
    from cacheagent.triton.prefetch import Prefetcher

    return Prefetcher(cache_for)


def _load(request: dict[str, Any], params: AgentParams, model: str, log: LogFn) -> str | None:
    if params.source is None and request.get("artifact_type") != "REMOTE_FILESYSTEM":
        log("VERBOSE", f"cacheagent: model '{model}' is local; loading it untouched")
        return None
    started = time.monotonic()
    location = parse_location(params.source or str(request.get("location", "")))
    config = request.get("config") if isinstance(request.get("config"), dict) else None
    select, selection = version_selection(config, params.versions)
    # Under 'cacheagent run' this start's one listing of the repository validates the model.
    listed = listed_at_start(location, select)
    # Under 'cacheagent run' the launcher fetches every model of the start's listing
    # itself (startfetch), so a sibling prefetch would only repeat its work; not in
    # explicit mode, where it fetches the --load-model models alone.
    covered = listed is not None and start_covers_every_model()
    if listed is None:
        from cacheagent.remote.listing import start_listing  # only when storage is listed

        listed = start_listing(location, select, params.settings.timeout)
    else:
        log("VERBOSE", f"cacheagent: model '{model}': validated by this start's listing")
    cache = cache_for(params.cache_dir)
    from cacheagent.cache import LeaseSpec  # already imported by cache_for

    pid = int(request.get("server_pid") or os.getppid())
    snapshot = cache.fetch(
        location,
        select=select,
        model=model,
        lease=LeaseSpec(lease_id(request), pid, model),
        listed=listed,
        started=started,
        settings=params.settings,
        selection=selection,
        # Triton waits for this answer; the hit's counters can be written after it.
        defer_bookkeeping=True,
    )
    log("INFO", load_line(model, snapshot, tiered=bool(params.settings.shared_cache)))
    if snapshot.warning:
        log("WARN", f"cacheagent: model '{model}': {snapshot.warning}")
    if params.source and request.get("artifact_type") == "FILESYSTEM":
        _warn_if_stub_outdated(str(request.get("location", "")), snapshot, model, log)
    if params.prefetch and not covered:
        prefetcher().after_load(str(request.get("location", "")), model)
    # The shim holds the lease token too, so the lease outlives this worker.
    token = cache.lease_token(lease_id(request))
    return LeasedPath(str(snapshot.path), str(token)) if token else str(snapshot.path)


def _warn_if_stub_outdated(stub_dir: str, snapshot: Snapshot, model: str, log: LogFn) -> None:
    try:
        stub_text = (Path(stub_dir) / "config.pbtxt").read_text()
    except (OSError, UnicodeDecodeError):
        return
    warning = remote_config_changed(stub_text, snapshot.path)
    if warning:
        log("WARN", f"cacheagent: model '{model}': {warning}")


def load_line(model: str, snapshot: Snapshot, *, tiered: bool = False) -> str:
    """The one log line per LOAD: model, outcome, bytes fetched, seconds.

    With a shared tier (``tiered``) it also says how many of the bytes came from
    the tier and how many from the origin.
    """
    outcome = "STALE" if snapshot.stale else "HIT" if snapshot.hit else "MISS"
    sources = (
        f"tier {format_size(snapshot.bytes_from_tier)}, "
        f"origin {format_size(snapshot.bytes_from_origin)}; "
        if tiered
        else ""
    )
    return (
        f"cacheagent: model '{model}' {outcome}: {format_size(snapshot.bytes_fetched)} fetched "
        f"({sources}{snapshot.files_fetched} of {snapshot.files} files, "
        f"{format_size(snapshot.size)} total) "
        f"in {snapshot.seconds:.3f} s from {snapshot.source} -> {snapshot.path}"
    )


def _release(request: dict[str, Any], params: AgentParams, log: LogFn, *, evict: bool) -> None:
    cache = cache_for(params.cache_dir)
    released = cache.release(lease_id(request))
    if not evict:
        return
    if released is not None and params.on_unload == "evict":
        cache.remove(released.key)
    budget = cache.budget(params.settings)
    report = cache.evict(budget)
    if report.evicted:
        log(
            "INFO",
            f"cacheagent: evicted {len(report.evicted)} snapshot(s), freed "
            f"{format_size(report.freed_bytes)}; cache now {format_size(report.size_after)}"
            + (f" of {format_size(budget)}" if budget is not None else ""),
        )
