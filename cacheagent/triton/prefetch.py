"""Background prefetch: fetch a repository's other cacheagent models while Triton is busy.

Triton calls LOAD for one model after another on its main thread, and does
its own listing of each model in between, so an agent that only fetches
inside LOAD makes a cold start of N models cost the sum of N downloads.
When the worker has answered the first LOAD of a repository, it lists that
repository's other model directories, reads their config.pbtxt, and fetches
those that name cacheagent (with their own parameters and version policy),
a few at a time. Their own LOADs then find the snapshot ready, or wait on the
snapshot lock for the download already under way instead of starting another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cacheagent.cache import Cache
from cacheagent.errors import CacheAgentError
from cacheagent.remote.listing import list_model_names, read_file
from cacheagent.remote.location import Location, parse_location
from cacheagent.triton.config import CONFIG_FILE, agent_parameters, config_json, parse_config
from cacheagent.triton.layout import Selector, version_selection
from cacheagent.triton.params import AgentParams, parse_params
from cacheagent.triton.startlisting import claimed_at_start, listed_at_start

_log = logging.getLogger(__name__)
DEFAULT_PARALLEL_MODELS = 2


class Prefetcher:
    """Starts at most one background prefetch per repository for the worker's lifetime."""

    def __init__(
        self,
        cache_for: Callable[[Path], Cache],
        parallel_models: int = DEFAULT_PARALLEL_MODELS,
    ) -> None:
        self._cache_for = cache_for
        self._slots = threading.Semaphore(parallel_models)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def after_load(self, model_location: str, model: str) -> bool:
        """Prefetch the siblings of ``model`` unless its repository was seen; True if started."""
        repository = model_location.rstrip("/").rsplit("/", 1)[0]
        with self._lock:
            if not repository or repository in self._seen:
                return False
            self._seen.add(repository)
        thread = threading.Thread(
            target=self._prefetch_repository,
            args=(repository, model),
            name=f"cacheagent-prefetch-{model}",
            daemon=True,  # never keeps a worker alive that Triton has let go
        )
        self.threads.append(thread)
        thread.start()
        return True

    def _prefetch_repository(self, repository: str, loaded: str) -> None:
        try:
            repo = parse_location(repository)
            names = list_model_names(repo, delays=())  # one attempt: a background nicety
        except Exception as exc:  # ... that must never take the worker down
            _note(f"prefetch: cannot list {repository}: {exc}")
            return
        workers = []
        for name in names:
            if name == loaded:
                continue
            worker = threading.Thread(target=self._prefetch_model, args=(repo, name), daemon=True)
            workers.append(worker)
            worker.start()
        for worker in workers:
            worker.join()

    def _prefetch_model(self, repo: Location, name: str) -> None:
        with self._slots:
            try:
                self._fetch_sibling(repo, name)
            except CacheAgentError as exc:
                # The model's own LOAD will report this properly, in Triton's log.
                _note(f"prefetch of model '{name}' skipped: {exc}")
            except Exception as exc:
                _note(f"prefetch of model '{name}' failed: {type(exc).__name__}: {exc}")

    def _fetch_sibling(self, repo: Location, name: str) -> None:
        model = repo.child(name)
        try:
            text = read_file(model, CONFIG_FILE, delays=())
        except FileNotFoundError:
            return
        plan = plan_fetch(text, name, model)
        if plan is None:
            return
        if claimed_at_start(plan.location):
            return  # its own LOAD of this start came first and validated it
        listed = listed_at_start(plan.location, plan.select, claim=False)
        if listed is not None:
            # cacheagent run wrote this start's record of it, and fetches every model
            # it writes a record for as soon as it has listed (startfetch): nothing to add.
            return
        snapshot = self._cache_for(plan.params.cache_dir).fetch(
            plan.location,
            select=plan.select,
            model=name,
            settings=plan.params.settings,
            selection=plan.selection,
        )
        _note(
            f"prefetched model '{name}': {'hit' if snapshot.hit else 'miss'}, "
            f"{snapshot.bytes_fetched} bytes in {snapshot.seconds:.3f} s"
        )


@dataclass(frozen=True)
class FetchPlan:
    """What a model's LOAD would fetch, derived from its config.pbtxt alone."""

    location: Location  # where its files are (the ``source`` parameter, or the model dir)
    params: AgentParams
    select: Selector | None
    selection: str


def plan_fetch(
    config_text: str | bytes,
    name: str,
    model: Location,
    env: Mapping[str, str] | None = None,
) -> FetchPlan | None:
    """What the agent's LOAD of model ``name`` would fetch, or None if it fetches nothing.

    None when the config names no cacheagent, turns ``prefetch`` off, or is a
    local model without a ``source``. The one rule shared by the worker's prefetch
    and ``cacheagent run``'s start fetch: both fetch exactly what the LOAD will look up.
    Raises the config's or the parameters' errors.
    """
    # Triton's schema loads here, in the background: never on a LOAD's path.
    config = parse_config(config_text)
    raw = agent_parameters(config)
    if raw is None:
        return None
    params = parse_params(raw, name, env)
    if not params.prefetch:
        return None
    if params.source is None and not model.is_remote:
        return None  # a local model without a source is served untouched
    select, selection = version_selection(config_json(config), params.versions)
    return FetchPlan(parse_location(params.source or model.url, env), params, select, selection)


def _note(message: str) -> None:
    # Background work runs while no request is in flight; the worker's log handler
    # then sends it to Triton's console (stderr), not to its log.
    _log.info("%s", message)
