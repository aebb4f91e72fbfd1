"""``cacheagent run``: start tritonserver so that Triton never touches the cloud.

::

    cacheagent run [--cache-dir DIR] [--max-size SIZE] [--param K=V ...] -- tritonserver ARGS...

For each ``--model-repository`` (or ``--model-store``) that is a cloud location,
the launcher keeps a stub repository current under ``DIR/stubs/`` and hands
Triton that local directory instead; local repositories and every other
argument pass through untouched. It adds ``--repoagent-directory`` for the agent
it installs under ``DIR/repoagents/`` unless the arguments name one, and sets
``CACHEAGENT_CACHE_DIR`` (and ``CACHEAGENT_MAX_SIZE`` from ``--max-size``, the
node's budget) in Triton's environment.

One listing per repository per start: the listing that updates the stub is also
handed to the agent (:mod:`cacheagent.triton.startlisting`), so each model's
LOAD validates its cache with a local file read. In poll mode the launcher
re-lists at Triton's ``--repository-poll-secs`` and keeps the stub (and that
listing) current; a model whose files changed gets a new stub config, which
makes Triton reload it.

The launcher stays Triton's parent (poll mode needs it; exec is not an option):
it forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT, leaves Triton's stdin, stdout
and stderr alone, and exits with Triton's status (128 + N when a signal N
killed it). Its own lines go to stderr, prefixed ``cacheagent run: ``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import xxhash

from cacheagent.errors import CacheAgentError, InvalidLocationError, InvalidParameterError
from cacheagent.local.atomic import write_atomically
from cacheagent.local.liveness import HeldToken, hold_token, remove_if_unheld
from cacheagent.local.store import ensure_private_dir
from cacheagent.remote.location import Location, parse_location
from cacheagent.settings import (
    CACHE_DIR_ENV,
    MAX_SIZE_ENV,
    SHARED_CACHE_ENV,
    default_cache_dir,
    parse_value,
)
from cacheagent.triton import tritonargs
from cacheagent.triton.config import AGENT_NAME
from cacheagent.triton.install import (
    LAUNCHER_NAME,
    LIBRARY_NAME,
    install_triton,
    launcher_script,
    shim_library,
)
from cacheagent.triton.params import parse_params
from cacheagent.triton.prestart import EarlyWorker, reap, spawn_worker
from cacheagent.triton.startlisting import (
    CLAIMED,
    PENDING,
    START_ALL_ENV,
    START_ENV,
    ModelRecord,
    record_name,
)

if TYPE_CHECKING:
    from cacheagent.triton.startfetch import StartFetcher
from cacheagent.triton.stubsync import (
    RepositoryListing,
    SyncReport,
    clean_work_dirs,
    list_repository,
    params_digest,
    sync_stub,
)

log = logging.getLogger(__name__)

PREFIX = "cacheagent run: "
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
EXIT_ERROR, EXIT_USAGE = 1, 2
EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND = 126, 127
STUBS_DIR, STARTS_DIR, REPOAGENTS_DIR = "stubs", "starts", "repoagents"
# Bounds on the launcher's own waits at exit; Triton's shutdown itself is never cut short.
POLL_STOP_TIMEOUT_S = 30.0
# How long Triton started on an outdated stub gets to stop before it is restarted.
RESTART_STOP_TIMEOUT_S = 60.0
# A worker started ahead of Triton ends on EOF once Triton is gone; this bounds the wait.
WORKER_EXIT_TIMEOUT_S = 10.0
#: Names a worker started ahead of Triton to the shim: "<pid>,<stdin fd>,<stdout fd>".
WORKER_FDS_ENV = "CACHEAGENT_WORKER_FDS"


class UsageError(CacheAgentError, ValueError):
    """The launcher's own arguments are wrong; the message says how to write them."""


class Interrupted(Exception):
    """A signal arrived before Triton was started: the launcher stops without starting it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class RunOptions:
    """What ``cacheagent run`` was asked to do."""

    cache_dir: Path
    command: list[str]  # the command after "--": tritonserver and its arguments
    max_size: str | None = None  # validated; Triton's $CACHEAGENT_MAX_SIZE
    shared_cache: str | None = None  # validated; Triton's $CACHEAGENT_SHARED_CACHE
    params: dict[str, str] = field(default_factory=dict)
    verbose: int = 0


EXAMPLE = (
    "cacheagent run --cache-dir /var/cache/cacheagent -- tritonserver "
    "--model-repository=s3://bucket/models"
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the launcher's own options (everything before ``--``)."""
    parser = argparse.ArgumentParser(
        prog="cacheagent run",
        usage="cacheagent run [--cache-dir DIR] [--max-size SIZE] [--shared-cache LOCATION] "
        "[--param K=V ...] [-v] "
        "-- tritonserver [ARGS ...]",
        description="Start tritonserver with every cloud --model-repository served from a "
        "stub repository kept current under the cache directory, so Triton never talks to "
        "cloud storage and each model's load is validated by one listing per repository.",
        epilog=f"example:\n  {EXAMPLE}\n\nThe exit status is the command's (128+N if signal "
        "N killed it); 1, 2, 126 or 127 when it could not be started.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cache-dir",
        type=_cache_dir_arg,
        default=None,
        help="the cache (default $CACHEAGENT_CACHE_DIR, else ~/.cache/cacheagent); stubs, "
        "the installed agent and each start's listing live below it",
    )
    parser.add_argument(
        "--max-size",
        type=_max_size_arg,
        default=None,
        help="the node-wide cache budget (500MB, 200GiB, bytes or none), given to Triton as "
        f"${MAX_SIZE_ENV}",
    )
    parser.add_argument(
        "--shared-cache",
        type=_shared_cache_arg,
        default=None,
        metavar="LOCATION",
        help="a shared tier every node reads and fills (s3://, gs://, as:// or an absolute "
        f"path on a shared filesystem), given to Triton as ${SHARED_CACHE_ENV}",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        type=_param_arg,
        help="an agent parameter for every model of the cloud repositories (a model's own "
        "cacheagent parameters win); repeat for more",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="also log what each refresh did"
    )
    return parser


def _cache_dir_arg(text: str) -> Path:
    try:
        return Path(parse_value("cache_dir", os.path.expanduser(text), where="--cache-dir"))
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_size_arg(text: str) -> str:
    try:
        parse_value("max_size", text, where="--max-size")
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _shared_cache_arg(text: str) -> str:
    try:
        value: str | None = parse_value("shared_cache", text, where="--shared-cache")
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value or ""


def _param_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"--param {text!r} is not KEY=VALUE; write e.g. --param verify=hash"
        )
    return key.strip(), value.strip()


def parse_run_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> RunOptions:
    """The launcher's options and command from ``argv``; raises :class:`UsageError`.

    ``--help`` prints the help and exits (SystemExit), as argparse does.
    """
    env = os.environ if env is None else env
    argv = list(argv)
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            build_parser().parse_args(argv)
        raise UsageError(f"give the command to run after '--', e.g. {EXAMPLE}")
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1 :]
    if not command:
        raise UsageError(f"no command after '--'; e.g. {EXAMPLE}")
    parser = build_parser()
    parser.error = _raise_usage  # type: ignore[method-assign,assignment]
    args = parser.parse_args(own)
    params = dict(args.param)
    if "source" in params:
        raise UsageError(
            "--param source=... cannot be given: the stub sets each model's source itself"
        )
    try:
        parse_params(params, "<cacheagent run --param>", env)
    except InvalidParameterError as exc:
        raise UsageError(str(exc)) from None
    return RunOptions(
        cache_dir=args.cache_dir or default_cache_dir(env),
        command=command,
        max_size=args.max_size,
        shared_cache=args.shared_cache or None,
        params=params,
        verbose=args.verbose,
    )


def _raise_usage(message: str) -> None:
    raise UsageError(message)


# --------------------------------------------------------------------------- repositories


@dataclass
class CloudRepository:
    """A cloud ``--model-repository`` and the stub that stands in for it."""

    text: str  # as written on the command line
    location: Location
    stub_dir: Path
    records: set[str] = field(default_factory=set)  # record files of this start
    failing: bool = False  # the last refresh failed (warned once until it recovers)


def cloud_repositories(
    args: Sequence[str], cache_dir: Path, params: Mapping[str, str], env: Mapping[str, str]
) -> list[CloudRepository]:
    """The distinct cloud repositories among Triton's ``args``, each with its stub directory."""
    found: dict[str, CloudRepository] = {}
    for text in tritonargs.repositories(args):
        if text in found:
            continue
        location = _cloud_location(text, env)
        if location is not None:
            found[text] = CloudRepository(text, location, stub_dir(cache_dir, location, params))
    return list(found.values())


def _cloud_location(text: str, env: Mapping[str, str]) -> Location | None:
    try:
        location = parse_location(text, env)
    except InvalidLocationError as exc:
        log.warning(
            "%s; passing --model-repository=%s to Triton unchanged, so Triton reads it itself",
            exc,
            text,
        )
        return None
    return location if location.is_remote else None


def stub_dir(cache_dir: Path, location: Location, params: Mapping[str, str]) -> Path:
    """Where the stub of ``location`` lives: one per repository and set of launcher parameters.

    Parameters are part of the name so that two launchers sharing a cache with
    different parameters never rewrite each other's stubs.
    """
    key = xxhash.xxh3_128_hexdigest(f"{location.url}\0{params_digest(params)}".encode())
    return cache_dir / STUBS_DIR / key


# --------------------------------------------------------------------------- this start's listing


class StartDir:
    """This start's directory of listing records (``DIR/starts/<id>/``), named to the agent.

    The launcher holds a token (``<id>.live``) while it runs; a directory whose
    token nobody holds is a leftover of a killed launcher, removed at the next start.
    """

    def __init__(self, starts_root: Path) -> None:
        starts_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_leftover_starts(starts_root)
        self.id = f"{os.getpid()}-{os.urandom(8).hex()}"
        # The token first, then the directory: a cleaner never sees the directory unowned.
        self._token: HeldToken | None = hold_token(starts_root / f"{self.id}.live", shared=False)
        self.path = starts_root / self.id
        self.path.mkdir(mode=0o700)

    def write(self, record: ModelRecord) -> str:
        """Write (or replace) one model's record atomically; return its file name."""
        name = record_name(record.source)
        # Not fsynced: a record matters only to this start, which a power cut ends anyway.
        write_atomically(self.path / name, record.to_json(), mode=0o600, durable=False)
        return name

    def mark_pending(self) -> None:
        """Say that this start's first listing is under way (LOADs wait for it)."""
        (self.path / PENDING).touch(mode=0o600)

    def clear_pending(self) -> None:
        """The first listing is written, or failed: LOADs stop waiting for records."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / PENDING).unlink()

    def rewrite_once_records(self) -> None:
        """Make the once-records a restarted Triton's LOADs will need usable again.

        A LOAD of the Triton being restarted may have claimed its record (renamed
        it to ``*.claimed``); the restarted Triton loads that model again and must
        find it.
        """
        for claimed in self.path.glob(f"*.json{CLAIMED}"):
            with contextlib.suppress(OSError):
                os.replace(claimed, claimed.with_name(claimed.name[: -len(CLAIMED)]))

    def remove(self, name: str) -> None:
        """Remove one record (its model left the repository)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / name).unlink()

    def close(self) -> None:
        """Remove the directory, then give up the token."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._token is not None:
            # The name goes while we still hold it: no cleaner can take it meanwhile.
            with contextlib.suppress(FileNotFoundError):
                self._token.path.unlink()
            self._token.close()
            self._token = None


def remove_leftover_starts(starts_root: Path) -> None:
    """Remove start directories (and tokens) of launchers that are gone."""
    with os.scandir(starts_root) as entries:
        names = [e.name for e in entries]
    for name in names:
        if name.endswith(".live"):
            if name[: -len(".live")] not in names:
                remove_if_unheld(starts_root / name)
            continue
        token = starts_root / f"{name}.live"
        if remove_if_unheld(token):
            shutil.rmtree(starts_root / name, ignore_errors=True)


@dataclass(frozen=True)
class RecordPolicy:
    """Which models get a start record, and how long it may serve (see startlisting)."""

    models: frozenset[str] | None  # None: every model
    fresh_for: float | None
    once: bool


def record_policy(args: Sequence[str]) -> RecordPolicy:
    """The records Triton's model-control mode calls for.

    - poll: every model, each record valid for one poll interval, replaced at each poll;
    - explicit: only the ``--load-model`` models (the only start-up loads), once each;
    - none: every model (all load at start-up), once each.
    """
    mode = tritonargs.control_mode(args)
    if mode == "poll":
        return RecordPolicy(None, float(max(tritonargs.poll_seconds(args), 1)), once=False)
    if mode == "explicit":
        names = tritonargs.load_models(args)
        return RecordPolicy(None if "*" in names else frozenset(names), None, once=True)
    return RecordPolicy(None, None, once=True)


# --------------------------------------------------------------------------- the launcher


class Launcher:
    """One ``cacheagent run``: stubs, this start's listing, and Triton as a child process."""

    def __init__(
        self,
        options: RunOptions,
        env: Mapping[str, str] | None = None,
        early: EarlyWorker | None = None,
    ) -> None:
        self.options = options
        self.env = dict(os.environ if env is None else env)
        self.command = list(options.command)
        self.triton_args = self.command[1:]
        self.repos = cloud_repositories(
            self.triton_args, options.cache_dir, options.params, self.env
        )
        self.policy = record_policy(self.triton_args)
        self.start: StartDir | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self._spawning = False
        self._pending: list[int] = []
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        self._fetcher: StartFetcher | None = None
        self._signalled = False
        self._workers: list[subprocess.Popen[bytes]] = []
        self._early = early
        self._structural: list[str] = []
        self._fetcher_lock = threading.Lock()

    # ---- the whole run ----

    def run(self) -> int:
        """Prepare the stubs, run the command to its end; return its exit status."""
        previous = self._install_signal_handlers()
        try:
            if self.can_start_early():
                argv, env = self.prepare(list_first=False)
                status = self.supervise(argv, env, list_after_start=True)
            else:
                argv, env = self.prepare()
                status = self.supervise(argv, env)
        except Interrupted as stop:  # only raised before the command is started
            log.info("stopped by signal %d before the command started", stop.signum)
            return 128 + stop.signum
        finally:
            self._stop_poller()
            self._reap_workers()
            if self.start is not None:
                self.start.close()
            self._restore_signal_handlers(previous)
        return status

    def can_start_early(self) -> bool:
        """True when Triton may start before this start's listing: every stub exists.

        Triton then reads the stubs of the last start while the launcher lists;
        each LOAD still waits for this start's listing (startlisting.PENDING), and
        if the listing changed a stub's models (added, removed, a new config),
        Triton is restarted on the current stub (see :meth:`supervise`). In poll
        mode Triton's next poll takes such a change instead.
        """
        return bool(self.repos) and all(repo.stub_dir.is_dir() for repo in self.repos)

    def prepare(self, *, list_first: bool = True) -> tuple[list[str], dict[str, str]]:
        """Everything before the command starts: the cache, the agent, every stub.

        The stubs must exist before Triton starts (it reads their configs at once),
        so on a first start the first listing of each repository happens first;
        what can overlap it does: the repositories are listed in parallel, and
        installing the agent (file copies, bytecode checks) runs beside the
        listings. With ``list_first=False`` (every stub exists) the listings are
        left to :meth:`list_after_start`, and the start directory says so.
        """
        ensure_private_dir(self.options.cache_dir)
        clean_work_dirs(self.options.cache_dir / STUBS_DIR)
        names_agent_dir = tritonargs.names_repoagent_directory(self.triton_args)
        jobs: list[Callable[[], object]] = []
        if not names_agent_dir:
            jobs.append(lambda: ensure_agent_installed(self.agent_dir))
        if self.repos:
            self.start = StartDir(self.options.cache_dir / STARTS_DIR)
            if list_first:
                jobs.extend(
                    functools.partial(self.refresh, repo, first=True) for repo in self.repos
                )
            else:
                self.start.mark_pending()
        run_in_parallel(jobs)
        agent_dir = None if names_agent_dir else self.agent_dir
        argv = [
            self.command[0],
            *tritonargs.rewrite(
                self.triton_args,
                {repo.text: str(repo.stub_dir) for repo in self.repos},
                str(agent_dir) if agent_dir is not None else None,
            ),
        ]
        return argv, self.triton_env()

    @property
    def agent_dir(self) -> Path:
        """Where the agent is installed for ``--repoagent-directory``."""
        return self.options.cache_dir / REPOAGENTS_DIR

    def triton_env(self) -> dict[str, str]:
        """Triton's environment: the launcher's, with the cache, budget and start named."""
        env = dict(self.env)
        env[CACHE_DIR_ENV] = str(self.options.cache_dir)
        if self.options.max_size is not None:
            env[MAX_SIZE_ENV] = self.options.max_size
        if self.options.shared_cache:
            env[SHARED_CACHE_ENV] = self.options.shared_cache
        env.pop(START_ALL_ENV, None)
        if self.start is not None:
            env[START_ENV] = str(self.start.path)
            if self.policy.models is None:
                env[START_ALL_ENV] = "1"
        else:
            env.pop(START_ENV, None)  # never an outer launcher's start
        return env

    # ---- stubs ----

    def refresh(self, repo: CloudRepository, *, first: bool = False) -> None:
        """List ``repo`` once, hand the listing to the agent, bring its stub up to date.

        When storage cannot be listed the last stub stays: Triton starts from it and
        the agent serves each model's cached snapshot (stale, with a WARN) or fails
        its load with the reason. Raises only on a first start with no stub at all.
        """
        try:
            listing = list_repository(repo.location)
        except CacheAgentError as exc:
            self._listing_failed(repo, exc, first)
            return
        if repo.failing:
            log.info("storage for %s answers again; refreshing its stub", repo.location.url)
            repo.failing = False
        self._write_records(repo, listing)
        report = sync_stub(listing, repo.stub_dir, self.options.params)
        # Changes a Triton already started on the last stub cannot have seen. Models
        # Triton does not load at start-up (explicit mode) read the stub when loaded.
        wanted = self.policy.models
        self._structural.extend(
            [f"{name}: new config" for name in report.written if wanted is None or name in wanted]
            + [f"{name}: removed" for name in report.removed if wanted is None or name in wanted]
        )
        self._log_sync(repo, listing, report, first)
        self._fetch_missing(repo, listing)

    # ---- the start fetch ----

    def _fetch_missing(self, repo: CloudRepository, listing: RepositoryListing) -> None:
        """Fetch the models of ``listing`` the cache lacks, at once, in the background.

        On a thread of its own, so Triton starts meanwhile: planning reads the stub
        configs with Triton's schema and opens the cache, work a warm start should
        not wait for. See :mod:`cacheagent.triton.startfetch`.
        """
        thread = threading.Thread(
            target=self._run_fetch,
            args=(repo, listing),
            name="cacheagent-run-fetch",
            daemon=True,  # never holds the launcher's exit: Triton's status is what counts
        )
        thread.start()

    def _run_fetch(self, repo: CloudRepository, listing: RepositoryListing) -> None:
        try:
            with self._fetcher_lock:
                if self._fetcher is None:
                    from cacheagent.triton.startfetch import StartFetcher

                    self._fetcher = StartFetcher(self.triton_env())
                fetcher = self._fetcher
            fetcher.fetch_missing(listing.models.values(), repo.stub_dir, self.policy.models)
        except Exception as exc:  # the fetch is a head start; each LOAD still fetches
            log.warning(
                "could not start fetching the models of %s (%s: %s); each model's LOAD "
                "fetches it instead",
                repo.location.url,
                type(exc).__name__,
                exc,
            )

    def _listing_failed(self, repo: CloudRepository, exc: CacheAgentError, first: bool) -> None:
        has_stub = repo.stub_dir.is_dir()
        if first and not has_stub:
            raise CacheAgentError(
                f"cannot list {repo.location.url} and no stub of it exists yet, so Triton "
                f"would have no models from it: {exc}"
            ) from None
        if first or not repo.failing:
            age = time.time() - repo.stub_dir.stat().st_mtime if has_stub else 0.0
            log.warning(
                "could not refresh the stub of %s (%s); keeping the last stub %s (updated "
                "%.0f s ago): its cached models load stale, with a WARN in Triton's log%s",
                repo.location.url,
                exc,
                repo.stub_dir,
                age,
                "" if first else "; retrying at each poll",
            )
        repo.failing = True

    def _write_records(self, repo: CloudRepository, listing: RepositoryListing) -> None:
        assert self.start is not None
        written: set[str] = set()
        for name, model in listing.models.items():
            if self.policy.models is not None and name not in self.policy.models:
                continue
            record = ModelRecord(
                start=self.start.id,
                source=model.location.url,
                entries=model.entries,
                listed_at=listing.listed_at,
                fresh_for=self.policy.fresh_for,
                once=self.policy.once,
            )
            written.add(self.start.write(record))
        for name in repo.records - written:
            self.start.remove(name)
        repo.records = written

    def _log_sync(
        self, repo: CloudRepository, listing: RepositoryListing, report: SyncReport, first: bool
    ) -> None:
        for name, reason in {**report.skipped, **report.kept}.items():
            kept = "keeping its last stub" if name in report.kept else "it gets no stub"
            log.warning(
                "model '%s' of %s: %s; %s: fix the model's config.pbtxt in the bucket",
                name,
                repo.location.url,
                reason,
                kept,
            )
        if first and listing.without_config:
            log.warning(
                "%s: %s hold(s) no config.pbtxt, so the stub cannot serve them; add a "
                "config.pbtxt to each",
                repo.location.url,
                ", ".join(repr(n) for n in listing.without_config),
            )
        if first or report.changed:
            log.info(
                "%s: %d model(s) -> %s (%d new config(s), %d content change(s), %d removed, "
                "%d unchanged)",
                repo.location.url,
                len(listing.models),
                repo.stub_dir,
                len(report.written),
                len(report.updated),
                len(report.removed),
                len(report.unchanged),
            )
        else:
            log.debug("%s: unchanged (%d model(s))", repo.location.url, len(listing.models))

    # ---- the child ----

    def supervise(
        self, argv: list[str], env: dict[str, str], *, list_after_start: bool = False
    ) -> int:
        """Start the command, poll if asked, forward signals; return its exit status.

        With ``list_after_start`` the first listing of each repository runs once the
        command has started; if it changed which models or configs a stub holds,
        the command (Triton, which read the old stub) is restarted on the new one.
        """
        failed = self._spawn(argv, env)
        if failed is not None:
            return failed
        if list_after_start and self.list_after_start() and self._restart_needed():
            failed = self._restart(argv, env)
            if failed is not None:
                return failed
        self._start_poller()
        assert self.child is not None
        status = self.child.wait()
        return 128 - status if status < 0 else status

    def _prestart_worker(self, env: dict[str, str]) -> tuple[dict[str, str], tuple[int, ...]]:
        """Start the agent's first worker now, beside Triton: (Triton's env, fds to pass).

        A worker started at Triton's first LOAD would cost that LOAD a Python start
        and its imports; started here it is READY by then, and the shim adopts it
        (``CACHEAGENT_WORKER_FDS``: its pid, its stdin's write end, its stdout's read
        end, inherited by Triton). It stays the launcher's child, reaped at exit, and
        ends on EOF on its stdin like any worker, when Triton closes it or exits.
        Only with the agent this launcher installed (another install may predate it).
        """
        early, self._early = self._early, None
        if not self.repos or tritonargs.names_repoagent_directory(self.triton_args):
            if early is not None:
                early.discard()
                early.reap(WORKER_EXIT_TIMEOUT_S)  # not a zombie for Triton's lifetime
            return env, ()
        if early is not None:  # started by 'cacheagent run' before anything else
            self._workers.append(early.process)
            try:
                req_w, resp_r = early.hand_over(env)
            except OSError as exc:
                log.debug("the worker started first is gone (%s); starting another", exc)
            else:
                return {**env, WORKER_FDS_ENV: f"{early.process.pid},{req_w},{resp_r}"}, (
                    req_w,
                    resp_r,
                )
        script = self.agent_dir / AGENT_NAME / LAUNCHER_NAME
        try:
            worker, req_w, resp_r = spawn_worker([str(script)], env)
        except OSError as exc:
            log.debug("no worker started ahead of Triton (%s); the agent starts its own", exc)
            return env, ()
        self._workers.append(worker)
        return {**env, WORKER_FDS_ENV: f"{worker.pid},{req_w},{resp_r}"}, (req_w, resp_r)

    def _spawn(self, argv: list[str], env: dict[str, str]) -> int | None:
        """Start the command; None, or the exit status to return when it cannot start."""
        env, worker_fds = self._prestart_worker(env)
        self._spawning = True
        try:
            self.child = subprocess.Popen(argv, env=env, pass_fds=worker_fds)
        except FileNotFoundError:
            log.error("cannot run %s: no such program; check the command and PATH", argv[0])
            return EXIT_NOT_FOUND
        except PermissionError:
            log.error("cannot run %s: it is not executable; check its permissions", argv[0])
            return EXIT_CANNOT_EXECUTE
        finally:
            self._spawning = False
            for fd in worker_fds:  # Triton holds them now: a worker's EOF is Triton's exit
                os.close(fd)
        for signum in self._pending:  # arrived while the child was being started
            self.child.send_signal(signum)
        self._pending.clear()
        return None

    def _reap_workers(self) -> None:
        """Reap the workers started ahead of Triton (they end once Triton is gone)."""
        for worker in self._workers:
            if reap(worker, WORKER_EXIT_TIMEOUT_S):
                log.warning(
                    "the worker %d started for Triton did not exit %.0f s after Triton; killed it",
                    worker.pid,
                    WORKER_EXIT_TIMEOUT_S,
                )

    def list_after_start(self) -> bool:
        """This start's first listing, with Triton already started; True if a stub's
        models changed in a way Triton cannot have seen (new, removed, a new config).

        Its failure (a full disk while writing a stub, say) never leaves Triton
        unsupervised: it is logged, and Triton runs on the last start's stub to its
        end as usual; its LOADs check storage themselves (no listing is pending any
        more, and a model without a record is listed by its own LOAD).
        """
        self._structural = []
        try:
            run_in_parallel(
                [functools.partial(self.refresh, repo, first=True) for repo in self.repos]
            )
        except (CacheAgentError, OSError) as exc:
            log.error(
                "updating the stubs failed after Triton started (%s); Triton keeps running "
                "on the last start's stub, and each model's load checks storage itself",
                exc,
            )
            return False
        finally:
            assert self.start is not None
            self.start.clear_pending()  # LOADs waiting for a record stop waiting
        return bool(self._structural)

    def _restart_needed(self) -> bool:
        if tritonargs.control_mode(self.triton_args) == "poll":
            log.info(
                "the repository changed since the last start (%s); Triton's next poll "
                "loads the updated stub",
                ", ".join(self._structural),
            )
            return False
        # A Triton that already exited (bad arguments, say) is not started again: its
        # status is the launcher's.
        return not self._signalled and self.child is not None and self.child.poll() is None

    def _restart(self, argv: list[str], env: dict[str, str]) -> int | None:
        """Stop the command started on the old stubs and start it again on the new."""
        assert self.child is not None
        log.info(
            "the repository changed since the last start (%s): restarting Triton, which "
            "started on the last start's stub, so it serves the current one",
            ", ".join(self._structural),
        )
        self.child.send_signal(signal.SIGTERM)
        try:
            self.child.wait(RESTART_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "Triton did not stop within %.0f s of SIGTERM; killing it to restart it",
                RESTART_STOP_TIMEOUT_S,
            )
            self.child.kill()
            self.child.wait()
        if self._signalled:  # the user stopped us meanwhile: do not start again
            return None
        assert self.start is not None
        self.start.rewrite_once_records()
        return self._spawn(argv, env)

    def _install_signal_handlers(self) -> dict[int, object]:
        previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # only the main thread can take signals (tests run otherwise)
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: Mapping[int, object]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True
        if self.child is not None:
            # Triton ignores a second SIGINT/SIGTERM while it shuts down, so one that
            # also reached it from the terminal (same process group) does no harm.
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)
        elif self._spawning:
            self._pending.append(signum)
        else:
            raise Interrupted(signum)

    # ---- poll mode ----

    def _start_poller(self) -> None:
        if tritonargs.control_mode(self.triton_args) != "poll" or not self.repos:
            return
        interval = tritonargs.poll_seconds(self.triton_args)
        if interval <= 0:
            return  # Triton does not poll either
        self._poller = threading.Thread(
            target=self._poll, args=(float(interval),), name="cacheagent-run-poll", daemon=True
        )
        self._poller.start()

    def _poll(self, interval: float) -> None:
        while not self._stop_polling.wait(interval):
            for repo in self.repos:
                try:
                    self.refresh(repo)
                except Exception as exc:  # the poller must outlive any one bad refresh
                    log.warning(
                        "refreshing the stub of %s failed (%s: %s); retrying at the next poll",
                        repo.location.url,
                        type(exc).__name__,
                        exc,
                    )

    def _stop_poller(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            # A refresh under way finishes first; its listing is bounded by the
            # storage timeouts, this wait by POLL_STOP_TIMEOUT_S.
            self._poller.join(POLL_STOP_TIMEOUT_S)


def run_in_parallel(jobs: Sequence[Callable[[], object]]) -> None:
    """Run ``jobs`` at once and wait for all; raise the first one's error, if any.

    Daemon threads, joined from the main thread: a signal that stops the launcher
    meanwhile (see ``Launcher._on_signal``) interrupts the wait, and a listing
    stuck on a dead endpoint cannot hold the launcher's exit.
    """
    errors: list[BaseException | None] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            jobs[i]()
        except BaseException as exc:  # re-raised in the caller
            errors[i] = exc

    threads = [
        threading.Thread(target=run, args=(i,), name=f"cacheagent-run-{i}", daemon=True)
        for i in range(len(jobs))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error


# --------------------------------------------------------------------------- the agent


def ensure_agent_installed(directory: Path) -> Path:
    """Install the agent into ``directory`` unless this very install is there; return it.

    Idempotent and atomic (``install_triton`` renames each file into place), so
    concurrent launchers sharing a cache agree; an unchanged install is left
    alone, which keeps a start from rewriting the shim a running Triton has mapped.
    """
    installed = directory / AGENT_NAME
    try:
        current = (installed / LIBRARY_NAME).read_bytes() == shim_library().read_bytes() and (
            installed / LAUNCHER_NAME
        ).read_text() == launcher_script(sys.executable)
    except OSError:
        current = False
    if not current:
        install_triton(directory)
    return directory


# --------------------------------------------------------------------------- entry point


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{PREFIX}{level}{record.getMessage()}"


@contextlib.contextmanager
def launcher_logging(verbosity: int) -> Iterator[None]:
    """The package's log records on stderr, each line prefixed ``cacheagent run: ``."""
    logger = logging.getLogger("cacheagent")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrefixFormatter())
    # Instead of the CLI's own handler, when run as 'cacheagent run': one line per record.
    saved = (logger.level, logger.propagate, list(logger.handlers))
    for other in saved[2]:
        logger.removeHandler(other)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbosity else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for other in saved[2]:
            logger.addHandler(other)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: Sequence[str] | None = None, early: EarlyWorker | None = None) -> int:
    """Run ``cacheagent run`` with ``argv`` (default: the process's); return the exit status.

    ``early`` is the worker ``cacheagent run`` started before anything else
    (:mod:`cacheagent.triton.prestart`): handed to Triton, or let go and reaped.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            options = parse_run_args(argv)
        except UsageError as exc:
            print(f"{PREFIX}error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        with launcher_logging(options.verbose):
            try:
                return Launcher(options, early=early).run()
            except (CacheAgentError, OSError) as exc:
                log.error("%s; Triton was not started", exc)
                return EXIT_ERROR
    finally:
        if early is not None:  # unused (a usage error, no cloud repository): it exits on EOF
            early.discard()
            early.reap(WORKER_EXIT_TIMEOUT_S)


if __name__ == "__main__":
    # Run the module under its package name, so its logger is the package's.
    from cacheagent.triton import launcher

    sys.exit(launcher.main())
