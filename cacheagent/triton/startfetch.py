"""The start fetch: ``cacheagent run`` fetches every model missing from the cache at once.

Without it, a cold start of N models costs Triton's own pace: Triton calls the
agent's LOAD for one model after another, each LOAD downloads its model, and
the first byte moves only once Triton has started its backends. The launcher
knows every model of the start as soon as it has listed the repository, so it
fetches all the missing ones itself, right then, while Triton starts:

- **one transfer budget.** Every download runs in the launcher's process and
  so shares one :class:`~cacheagent.remote.pacing.Link` per endpoint: one
  adaptive number of requests in flight, one memory bound, one thread pool;
- **exactly what the LOADs will look up.** Each model's plan comes from its
  stub config by the rule the worker's prefetch uses
  (:func:`cacheagent.triton.prefetch.plan_fetch`: its parameters, its version
  policy) and its manifest from this start's own listing, so the LOAD's
  lookup finds the snapshot; a LOAD that comes while its model is still on the
  way waits on that snapshot's build lock (bounded, and logged) instead of
  downloading it again;
- **within the budget.** Models are taken in name order while their sizes fit
  the cache budget together; the rest are left to their own LOADs, so a start
  never evicts what it has just fetched;
- **best effort.** A failure is logged and left to the model's LOAD, which
  reports it in Triton's log (or serves stale, as its parameters say).

Nothing here is a hit or a miss of its own: a model found cached is skipped
without touching the index's counters; one fetched counts as the miss it is,
and its LOAD then counts the hit.

A warm start must cost Triton nothing here (this runs beside its start, on the
same cores), so the snapshot each model's content led to is remembered beside
its stub (``<stub>.known.json``: content key -> cache and snapshot key): a model
whose content is unchanged and whose snapshot directory exists is skipped with
one ``stat``, without Triton's schema, the parameters or the index. A snapshot
found there but damaged is the LOAD's to repair, as it always is.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cacheagent.errors import CacheAgentError
from cacheagent.local.atomic import write_atomically
from cacheagent.local.store import Store
from cacheagent.remote.manifest import Manifest, build_manifest
from cacheagent.sizes import format_size
from cacheagent.triton.config import CONFIG_FILE
from cacheagent.triton.stubsync import ModelListing

if TYPE_CHECKING:  # loaded only when a model must be planned: never on a warm start
    from cacheagent.cache import Cache
    from cacheagent.triton.prefetch import FetchPlan

_log = logging.getLogger(__name__)
# Models downloading at once. They share one link, so more would add threads,
# not bytes per second; the rest wait their turn.
MODELS_AT_ONCE = 32


@dataclass(frozen=True)
class _Job:
    name: str
    plan: FetchPlan
    manifest: Manifest


class StartFetcher:
    """Fetches the models of a start that the cache is missing, in the background.

    ``env`` is Triton's environment (the cache, the node budget, the shared tier),
    so plans and budgets are those the agent inside Triton will work with.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._caches: dict[Path, Cache] = {}
        self._tried: set[str] = set()  # manifest keys already fetched (or tried) by this run
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(MODELS_AT_ONCE)
        self.threads: list[threading.Thread] = []

    def fetch_missing(
        self, models: Iterable[ModelListing], stub_dir: Path, only: frozenset[str] | None
    ) -> list[str]:
        """Start fetching those of ``models`` (``only`` these names) the cache lacks.

        Returns the names being fetched. Reads each stub config in ``stub_dir``;
        never raises for one model (the reason is logged, its LOAD tells it again).
        """
        known = _read_known(stub_dir)
        jobs: list[_Job] = []
        for model in sorted(models, key=lambda m: m.name):
            if only is not None and model.name not in only:
                continue
            if _still_cached(known.get(model.name), model):
                continue
            job = self._job(model, stub_dir / model.name / CONFIG_FILE, known)
            if job is not None:
                jobs.append(job)
        _write_known(stub_dir, known)
        started = self._within_budget(jobs)
        if started:
            total = sum(job.manifest.total_size for job in started)
            _log.info(
                "fetching %d model(s) missing from the cache (%s) while Triton starts: %s",
                len(started),
                format_size(total),
                ", ".join(job.name for job in started),
            )
        for job in started:
            thread = threading.Thread(
                target=self._fetch, args=(job,), name=f"cacheagent-start-{job.name}", daemon=True
            )
            self.threads.append(thread)
            thread.start()
        return [job.name for job in started]

    def join(self, timeout: float | None = None) -> None:
        """Wait for the fetches started so far (for tests; Triton never waits for them)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self.threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _job(self, model: ModelListing, stub_config: Path, known: dict[str, Known]) -> _Job | None:
        try:
            text = stub_config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None  # no stub for it (its config was refused): Triton will not load it
        from cacheagent.triton.prefetch import plan_fetch

        try:
            plan = plan_fetch(text, model.name, model.location, self._env)
            if plan is None:
                return None
            if plan.location.url != model.location.url:
                return None  # a source elsewhere: this listing does not cover it
            manifest = build_manifest(
                plan.location.url, plan.location.root, model.entries, plan.select
            )
        except CacheAgentError as exc:
            _log.debug("not fetching model '%s' at start: %s", model.name, exc)
            return None
        if not manifest.files:
            return None
        known[model.name] = Known(model.content_key, str(plan.params.cache_dir), manifest.key)
        with self._lock:
            if manifest.key in self._tried:
                return None
        if self._cache(plan).holds(manifest):
            return None
        return _Job(model.name, plan, manifest)

    def _within_budget(self, jobs: list[_Job]) -> list[_Job]:
        chosen: list[_Job] = []
        planned: dict[Path, int] = {}
        for job in jobs:
            cache = self._cache(job.plan)
            budget = cache.budget(job.plan.params.settings)
            size = job.manifest.total_size
            used = planned.get(cache.root, 0)
            if budget is not None and used + size > budget:
                _log.info(
                    "not fetching model '%s' (%s) at start: with the models before it, it "
                    "exceeds the cache budget of %s; its own LOAD fetches it",
                    job.name,
                    format_size(size),
                    format_size(budget),
                )
                continue
            planned[cache.root] = used + size
            with self._lock:
                if job.manifest.key in self._tried:
                    continue
                self._tried.add(job.manifest.key)
            chosen.append(job)
        return chosen

    def _cache(self, plan: FetchPlan) -> Cache:
        from cacheagent.cache import Cache

        root = plan.params.cache_dir
        with self._lock:
            cache = self._caches.get(root)
            if cache is None:
                cache = self._caches[root] = Cache(root, env=self._env)
            return cache

    def _fetch(self, job: _Job) -> None:
        with self._slots:
            try:
                snapshot = self._cache(job.plan).fetch(
                    job.plan.location,
                    select=job.plan.select,
                    model=job.name,
                    settings=job.plan.params.settings,
                    selection=job.plan.selection,
                    listed=lambda: job.manifest,
                )
            except CacheAgentError as exc:
                _log.warning(
                    "fetching model '%s' at start failed (%s); its own LOAD tries again",
                    job.name,
                    exc,
                )
                return
            except Exception as exc:  # a background nicety must never take the launcher down
                _log.warning(
                    "fetching model '%s' at start failed (%s: %s); its own LOAD tries again",
                    job.name,
                    type(exc).__name__,
                    exc,
                )
                return
        rate = snapshot.bytes_fetched / max(snapshot.seconds, 1e-6) / 1e6
        _log.info(
            "model '%s': %s in %.2f s (%.0f MB/s)%s",
            job.name,
            format_size(snapshot.bytes_fetched),
            snapshot.seconds,
            rate,
            "" if not snapshot.hit else ", cached meanwhile",
        )


@dataclass(frozen=True)
class Known:
    """The snapshot a model's content led to at an earlier start."""

    content_key: str  # the model's content key (every file, every version)
    cache_dir: str
    snapshot_key: str


def known_path(stub_dir: Path) -> Path:
    """Where the snapshots known for a stub's models are remembered: beside the stub.

    Not inside it: a new file in a model directory would make Triton's poll mode
    reload the model.
    """
    return stub_dir.with_name(stub_dir.name + ".known.json")


def _read_known(stub_dir: Path) -> dict[str, Known]:
    try:
        raw = json.loads(known_path(stub_dir).read_text(encoding="utf-8"))
        return {name: Known(**fields) for name, fields in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}  # none yet, or unreadable: every model is planned once more


def _write_known(stub_dir: Path, known: Mapping[str, Known]) -> None:
    text = json.dumps({name: vars(k) for name, k in sorted(known.items())}, indent=1)
    path = known_path(stub_dir)
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    try:
        # Not fsynced: losing it costs one more planning, never a wrong answer.
        write_atomically(path, text, mode=0o600, durable=False)
    except OSError as exc:
        _log.debug("cannot remember the start's snapshots in %s: %s", path, exc)


def _still_cached(known: Known | None, model: ModelListing) -> bool:
    """True if ``model``'s content is what led to a snapshot that is still cached."""
    if known is None or known.content_key != model.content_key:
        return False
    return Store(Path(known.cache_dir)).has_snapshot(known.snapshot_key)
