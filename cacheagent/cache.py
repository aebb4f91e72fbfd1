"""The Python API: ``Cache(cache_dir).fetch(location) -> Snapshot``.

This module orchestrates the others in one direction: parse the location,
list it into a manifest, look the manifest's key up in the index, and on a
miss fetch only the blobs not already held, then publish the snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cacheagent.errors import (
    CacheAgentError,
    CacheFullError,
    RemoteChangedError,
    StorageUnavailableError,
)
from cacheagent.local.index import Index, LeaseRecord, SnapshotRecord, content_identity
from cacheagent.local.leases import HeldLeases
from cacheagent.local.locks import LockTimeoutError, file_lock
from cacheagent.local.store import Store
from cacheagent.remote.location import Location, parse_location
from cacheagent.remote.manifest import FileEntry, Manifest
from cacheagent.settings import (
    MAX_SIZE_ENV,
    Settings,
    default_cache_dir,
    effective_budget,
    node_budget,
)
from cacheagent.sizes import format_size

if TYPE_CHECKING:
    from cacheagent.remote.transfer import FetchSettings, ProgressFn
    from cacheagent.tier import Tier

_log = logging.getLogger(__name__)


# Storage clients (http.client, ssl, the signers) load only when a call needs
# them: a LOAD validated by the start listing and answered from the cache never does.
def list_manifest(*args: Any, **kwargs: Any) -> Manifest:
    """:func:`cacheagent.remote.listing.list_manifest`, imported on first use."""
    from cacheagent.remote.listing import list_manifest as listing

    return listing(*args, **kwargs)


def download(*args: Any, **kwargs: Any) -> dict[str, str]:
    """:func:`cacheagent.remote.transfer.download`, imported on first use."""
    from cacheagent.remote.transfer import download as transfer

    return transfer(*args, **kwargs)


# Publishing re-fetches blobs an eviction collected meanwhile; this bounds that.
_PUBLISH_ROUNDS = 3
# How long a fetch waits for another process building the same snapshot before
# it builds its own copy (correct either way: publishing is an atomic rename).
BUILD_WAIT_SECONDS = 900.0


@dataclass(frozen=True)
class _Call:
    """What one fetch works with: its settings, the budget they give, its selection,
    and whether a hit's bookkeeping may be written after it returns."""

    settings: Settings
    budget: int | None
    selection: str
    defer_bookkeeping: bool = False


@dataclass(frozen=True)
class LeaseSpec:
    """Who will use the snapshot a fetch returns: taken before any eviction can see it."""

    lease_id: str
    pid: int
    model: str = ""


@dataclass(frozen=True)
class Snapshot:
    """A local, complete copy of a model directory, ready to serve."""

    path: Path
    key: str
    source: str
    hit: bool
    bytes_fetched: int
    files: int
    size: int
    seconds: float
    stale: bool = False
    warning: str = ""
    files_fetched: int = 0
    lease_id: str | None = None
    bytes_from_tier: int = 0  # of bytes_fetched: from the shared tier; the rest from the origin

    @property
    def bytes_from_origin(self) -> int:
        """Of ``bytes_fetched``: the bytes that came from the origin."""
        return self.bytes_fetched - self.bytes_from_tier


@dataclass
class EvictionReport:
    """What an eviction removed (or, in a dry run, would remove)."""

    evicted: list[SnapshotRecord] = field(default_factory=list)
    freed_bytes: int = 0
    size_before: int = 0
    size_after: int = 0
    kept_leased: int = 0
    dry_run: bool = False
    max_size: int | None = None


@dataclass
class CacheStats:
    """Counters and sizes of the cache, shared by every process on the node."""

    counters: dict[str, int]
    size: int
    max_size: int | None
    snapshots: int
    blobs: int
    live_leases: int

    @property
    def hit_ratio(self) -> float:
        """Hits over all fetches that reached the index (0 when none)."""
        total = self.counters["hits"] + self.counters["misses"]
        return self.counters["hits"] / total if total else 0.0


@dataclass
class VerifyReport:
    """What a full verification found and repaired."""

    snapshots_checked: int = 0
    blobs_checked: int = 0
    corrupt_blobs: list[str] = field(default_factory=list)
    broken_snapshots: list[str] = field(default_factory=list)
    # Damaged snapshots a live process leases: never removed, reported.
    leased_left: list[str] = field(default_factory=list)
    relinked_blobs: list[str] = field(default_factory=list)
    repaired: bool = False


class Cache:
    """A content-addressed cache of model directories below ``cache_dir``.

    ``defaults`` are :class:`~cacheagent.settings.Settings` fields (``max_size``,
    ``verify``, ``concurrency``, ...) used by calls that pass no ``settings`` of
    their own. They are fixed at construction: a call that needs other values
    passes them, so callers sharing one cache never see each other's settings.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        **defaults: Any,
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(self.env)
        self.root = self.root.absolute()
        self.defaults = Settings(cache_dir=self.root, **defaults)
        self.store = Store(self.root)
        self.index = Index(self.root / "index")
        self._held_leases = HeldLeases()  # open lease tokens: a lease lives while held
        self.store.clean_tmp()

    def close(self) -> None:
        """Release the index's database handles and end the leases this object holds."""
        self._held_leases.close_all()
        self.index.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fetching ----------------------------------------------------------

    def parse(self, location: str | Location) -> Location:
        """Parse a location with this cache's environment (credentials)."""
        return location if isinstance(location, Location) else parse_location(location, self.env)

    def fetch(
        self,
        location: str | Location,
        *,
        select: Callable[[Iterable[str]], set[str]] | None = None,
        model: str = "",
        lease: LeaseSpec | None = None,
        progress: ProgressFn | None = None,
        on_plan: Callable[[int, int], None] | None = None,
        listed: Callable[[], Manifest] | None = None,
        started: float | None = None,
        settings: Settings | None = None,
        selection: str = "",
        defer_bookkeeping: bool = False,
    ) -> Snapshot:
        """Return a local snapshot of ``location``, downloading only what is missing.

        ``settings`` applies to this call only (default: the cache's ``defaults``).
        ``select`` keeps only some relative paths (version-aware fetch);
        ``selection`` names what it keeps (e.g. the version policy), so that
        stale-if-error serves only a snapshot of the same selection.
        ``lease`` is recorded before the snapshot can be evicted.
        ``on_plan(files, bytes)`` is told what a miss will download.
        ``listed`` is a listing of ``location`` with ``select`` already under way
        (:func:`cacheagent.remote.listing.start_listing`), used instead of listing again;
        ``started`` (a ``time.monotonic()`` stamp) is then when it started.
        With ``defer_bookkeeping`` a hit returns as soon as it holds its lease: its
        last use and counters are written on the index's thread (reads of them in
        this process wait for that; :meth:`close` does too).
        """
        started = time.monotonic() if started is None else started
        call = _Call(
            settings or self.defaults, self.budget(settings), selection or "all", defer_bookkeeping
        )
        loc = self.parse(location)
        model = model or os.path.basename(loc.root.rstrip("/"))
        try:
            manifest = (
                listed() if listed else list_manifest(loc, None, select, call.settings.timeout)
            )
        except StorageUnavailableError as exc:
            stale = self._stale_snapshot(loc, lease, started, exc, call)
            if stale is None:
                raise
            return stale
        self._check_budget(manifest, loc, call.budget)
        for attempt in range(2):
            snapshot = self._try_hit(manifest, lease, started, call)
            if snapshot:
                return snapshot
            with self._build_lock(manifest.key, loc):
                # Another process may have built it while we waited for the lock.
                snapshot = self._try_hit(manifest, lease, started, call)
                if snapshot:
                    return snapshot
                try:
                    return self._build(
                        loc, manifest, model, lease, started, progress, on_plan, call
                    )
                except RemoteChangedError:
                    if attempt == 1:
                        raise
            manifest = list_manifest(loc, None, select, call.settings.timeout)
            self._check_budget(manifest, loc, call.budget)
        raise AssertionError("unreachable")

    def holds(self, manifest: Manifest) -> bool:
        """True if a snapshot of ``manifest`` is cached (a lookup only: no lease, no counters)."""
        return self.index.get_snapshot(manifest.key) is not None and self.store.has_snapshot(
            manifest.key
        )

    def budget(self, settings: Settings | None = None) -> int | None:
        """The budget a call works to: the stricter of its ``max_size`` and the node's.

        The node-wide budget is ``$CACHEAGENT_MAX_SIZE`` (``cacheagent run --max-size``
        sets it for Triton); a model's or a call's ``max_size`` can only narrow it.
        """
        own = (settings or self.defaults).max_size
        return effective_budget(own, node_budget(self.env))

    @contextlib.contextmanager
    def _build_lock(self, key: str, loc: Location) -> Iterator[None]:
        """Hold the snapshot's build lock, so two processes download a model once.

        The wait is bounded: past it we build our own copy, which is correct
        (publishing is an atomic rename) and only costs bandwidth.
        """
        lock = self.store.locks_dir / f"snap-{key}.lock"
        try:
            with file_lock(lock, timeout=BUILD_WAIT_SECONDS, what=f"the download of {loc.url}"):
                yield
                return
        except LockTimeoutError:
            _log.warning(
                "another process has been downloading %s for over %.0f s; downloading it here too",
                loc.url,
                BUILD_WAIT_SECONDS,
            )
        yield

    def _check_budget(self, manifest: Manifest, loc: Location, budget: int | None) -> None:
        if budget is not None and manifest.total_size > budget:
            raise CacheFullError(
                f"model {loc.url} needs {format_size(manifest.total_size)} "
                f"({manifest.total_size} bytes) but the cache budget max_size is "
                f"{format_size(budget)} ({budget} bytes); raise max_size (the model's "
                f"parameter, or the node's {MAX_SIZE_ENV})"
            )

    def _gc_lock(self, *, shared: bool):  # type: ignore[no-untyped-def]
        return file_lock(self.store.locks_dir / "gc.lock", shared=shared)

    def _try_hit(
        self, manifest: Manifest, lease: LeaseSpec | None, started: float, call: _Call
    ) -> Snapshot | None:
        # The record file, not the database: a hit is served before a fresh process
        # has opened the index (see _note_hit).
        record = self.index.read_record(manifest.key)
        if record is None or not self.store.has_snapshot(manifest.key):
            return None
        with self._gc_lock(shared=True):
            if not self.store.has_snapshot(manifest.key):
                return None
            if not self._snapshot_intact(record, call.settings.verify):
                self._drop_corrupt(record, call.settings.verify)
                return None
            self._take_lease(lease, record)
        self._note_hit(record, call)
        return self._served(record, lease, started)

    def _note_hit(self, record: SnapshotRecord, call: _Call) -> None:
        # The lease already protects the snapshot; what is left is bookkeeping (its
        # last use for eviction, the hit counters), which a call that must answer
        # quickly (Triton's LOAD) leaves to the index's own thread.
        if call.defer_bookkeeping:
            self.index.note_hit_later(record.key, record.size)
        else:
            self.index.note_hit(record.key, record.size)

    def _served(
        self, record: SnapshotRecord, lease: LeaseSpec | None, started: float, warning: str = ""
    ) -> Snapshot:
        """A snapshot served from the cache (a hit, or stale when ``warning`` says so)."""
        return Snapshot(
            path=self.store.snapshot_path(record.key),
            key=record.key,
            source=record.source,
            hit=True,
            bytes_fetched=0,
            files=len(record.files),
            size=record.size,
            seconds=time.monotonic() - started,
            stale=bool(warning),
            warning=warning,
            lease_id=lease.lease_id if lease else None,
        )

    def _snapshot_intact(self, record: SnapshotRecord, verify: str) -> bool:
        if verify == "none":
            return True
        # Strings, not Paths: a hit checks every file, and a pathlib join costs more
        # than the lstat it is for (300 files: about 3 ms of a warm LOAD).
        base = str(self.store.snapshot_path(record.key))
        for relpath, size, _fp, _md5, digest in record.files:
            path = os.path.join(base, relpath)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                return False
            if not _is_regular(info.st_mode) or info.st_size != size:
                return False
            if verify == "hash" and self.store.hash_file(Path(path)) != digest:
                return False
        return True

    def _drop_corrupt(self, record: SnapshotRecord, verify: str) -> None:
        """Remove a damaged snapshot and the damaged blobs under it, so they are fetched anew."""
        base = self.store.snapshot_path(record.key)
        for relpath, size, _fp, _md5, digest in record.files:
            path = base / relpath
            try:
                intact = path.lstat().st_size == size and (
                    verify != "hash" or self.store.hash_file(path) == digest
                )
            except FileNotFoundError:
                intact = True  # the link is gone, the blob may be fine
            if not intact or not self.store.has_blob(digest, size):
                self.store.remove_blob(digest)
                self.index.forget_blob(digest)
        self.store.remove_snapshot(record.key)
        self.index.delete_snapshot(record.key)
        self.index.count("corrupt_repaired")

    def _take_lease(self, lease: LeaseSpec | None, record: SnapshotRecord) -> None:
        if lease is not None:
            taken = self.index.add_lease(lease.lease_id, record.key, lease.pid, lease.model)
            self._held_leases.keep(taken)

    def _build(
        self,
        loc: Location,
        manifest: Manifest,
        model: str,
        lease: LeaseSpec | None,
        started: float,
        progress: ProgressFn | None,
        on_plan: Callable[[int, int], None] | None,
        call: _Call,
    ) -> Snapshot:
        held, missing = self._split_held(loc, manifest)
        needed = sum(entry.size for entry in missing)
        warning = self._make_room_for(needed, call.budget)
        self._check_free_space(needed, loc)
        if on_plan:
            on_plan(len(missing), needed)
        digests, fetched_files, fetched_bytes = dict(held), 0, 0
        tier, from_tier = self._tier(call), 0  # the shared tier, when shared_cache names one
        # No lock is held while bytes move: evictions and other models' actions go on.
        # An eviction may collect a blob we hold but have not linked yet; publishing
        # checks under the (brief) gc lock and fetches such a blob again.
        for _round in range(_PUBLISH_ROUNDS):
            from cacheagent.remote.transfer import FetchSettings

            fetching = FetchSettings(
                call.settings.concurrency, call.settings.part_size, call.settings.timeout
            )
            if tier is None:
                fetched = download(loc, missing, self.store, fetching, progress)
            else:
                fetched, tier_bytes = self._fetch_with_tier(
                    tier, loc, manifest, missing, fetching, progress, call
                )
                from_tier += tier_bytes
            if missing:
                self._confirm_unchanged(loc, manifest, call.settings.timeout)
            self.index.remember_blobs(
                (_content_id(loc, entry), fetched[entry.path]) for entry in missing
            )
            digests.update(fetched)
            fetched_files += len(missing)
            fetched_bytes += sum(entry.size for entry in missing)
            with self._gc_lock(shared=True):
                missing = [
                    e for e in manifest.files if not self.store.has_blob(digests[e.path], e.size)
                ]
                if not missing:
                    record = self._publish(loc, manifest, model, digests, call)
                    self._take_lease(lease, record)
                    break
            _log.info(
                "%d blob(s) of %s were evicted before the snapshot was published; "
                "fetching them again",
                len(missing),
                loc.url,
            )
        else:
            raise CacheFullError(
                f"the blobs of {loc.url} kept being evicted before its snapshot could be "
                "published: the cache is too small for the models loading at once; raise "
                "max_size or load fewer models at a time"
            )
        if tier is not None:
            tier.publish_manifest(loc, manifest, digests, self.store)
        self.index.count("misses")
        self.index.count("bytes_fetched", fetched_bytes)
        if from_tier:
            self.index.count("bytes_from_tier", from_tier)
        self.index.count("bytes_from_origin", fetched_bytes - from_tier)
        self.index.count("bytes_served_from_cache", manifest.total_size - fetched_bytes)
        return Snapshot(
            path=self.store.snapshot_path(manifest.key),
            key=manifest.key,
            source=loc.url,
            hit=False,
            bytes_fetched=fetched_bytes,
            files=len(manifest.files),
            size=manifest.total_size,
            seconds=time.monotonic() - started,
            files_fetched=fetched_files,
            lease_id=lease.lease_id if lease else None,
            warning=warning,
            bytes_from_tier=from_tier,
        )

    def _tier(self, call: _Call) -> Tier | None:
        """The shared tier of this call (None without one, or when it cannot be opened)."""
        if not call.settings.shared_cache:
            return None
        from cacheagent.tier import open_tier

        try:
            return open_tier(call.settings.shared_cache, self.env)
        except CacheAgentError as exc:
            _log.warning("%s; fetching from the origin without the shared tier", exc)
            return None

    def _fetch_with_tier(
        self,
        tier: Tier,
        loc: Location,
        manifest: Manifest,
        missing: list[FileEntry],
        fetching: FetchSettings,
        progress: ProgressFn | None,
        call: _Call,
    ) -> tuple[dict[str, str], int]:
        """Fetch ``missing`` through the shared tier: (digests, bytes that came from it)."""

        def origin(entries: list[FileEntry]) -> dict[str, str]:
            return download(loc, entries, self.store, fetching, progress)

        got = tier.fetch(
            loc, manifest, missing, self.store, origin, progress, call.settings, self.index.count
        )
        return got.digests, got.tier_bytes

    def _make_room_for(self, needed: int, budget: int | None) -> str:
        """Evict to fit ``needed`` more bytes; a warning if leased snapshots keep us over."""
        if budget is None:
            return ""
        after = self._make_room(needed, budget).size_after + needed
        if after <= budget:
            return ""
        # Only leased snapshots can be left: going over beats failing a model
        # that fits on its own, but the operator must hear about it.
        return (
            f"the cache will hold {format_size(after)}, over its budget max_size="
            f"{format_size(budget)}, because snapshots in use by running "
            "servers cannot be evicted; raise max_size or unload models"
        )

    def _publish(
        self,
        loc: Location,
        manifest: Manifest,
        model: str,
        digests: dict[str, str],
        call: _Call,
    ) -> SnapshotRecord:
        """Link the snapshot into place and record it (under the gc lock, local I/O only)."""
        self.store.publish_snapshot(manifest.key, sorted(digests.items()), manifest.empty_dirs)
        record = SnapshotRecord(
            key=manifest.key,
            source=loc.url,
            model=model,
            size=manifest.total_size,
            files=[
                [e.path, e.size, e.fingerprint, e.content_md5, digests[e.path]]
                for e in manifest.files
            ],
            created=time.time(),
            last_used=time.time(),
            empty_dirs=list(manifest.empty_dirs),
            selection=call.selection,
        )
        self.index.put_snapshot(record)
        return record

    def _split_held(
        self, loc: Location, manifest: Manifest
    ) -> tuple[dict[str, str], list[FileEntry]]:
        held: dict[str, str] = {}
        missing: list[FileEntry] = []
        for entry in manifest.files:
            digest = self.index.blob_for(_content_id(loc, entry))
            if digest and self.store.has_blob(digest, entry.size):
                held[entry.path] = digest
            else:
                missing.append(entry)
        return held, missing

    def _confirm_unchanged(self, loc: Location, manifest: Manifest, timeout: float) -> None:
        # One more listing catches an object replaced while we downloaded it, so
        # a snapshot never mixes old and new files (or parts of them): a file
        # replaced after its own GETs, while others still downloaded (a multi-file
        # upload in progress), shows up only here. The ETag of each S3 answer
        # (transfer.py) catches what no listing can: A, B, then A again.
        before = manifest.by_path()
        now = list_manifest(loc, None, lambda paths: set(paths) & set(before), timeout)
        changed = sorted(
            path
            for path, entry in now.by_path().items()
            if before[path].fingerprint != entry.fingerprint
        )
        vanished = sorted(set(before) - set(now.by_path()))
        if changed or vanished:
            names = ", ".join((changed + vanished)[:5])
            raise RemoteChangedError(
                f"{loc.url} changed while it was being downloaded ({names}); nothing was "
                "published; load the model again once the upload has finished"
            )

    def _check_free_space(self, needed: int, loc: Location) -> None:
        free = self.store.free_bytes()
        if needed > free:
            raise CacheFullError(
                f"model {loc.url} needs {format_size(needed)} more but the disk holding "
                f"{self.root} has {format_size(free)} free; free space, lower max_size, "
                "or move cache_dir"
            )

    def _stale_snapshot(
        self,
        loc: Location,
        lease: LeaseSpec | None,
        started: float,
        error: StorageUnavailableError,
        call: _Call,
    ) -> Snapshot | None:
        if not call.settings.stale_if_error:
            return None
        # The last good snapshot of this source *and this selection*: a model that
        # loads version 1 must never be handed another model's version-2 snapshot.
        key = self.index.last_good(loc.url, call.selection)
        record = self.index.get_snapshot(key) if key else None
        if record is None or not self.store.has_snapshot(record.key):
            return None
        with self._gc_lock(shared=True):
            intact = self._snapshot_intact(record, call.settings.verify)
            if not self.store.has_snapshot(record.key) or not intact:
                return None
            self._take_lease(lease, record)
        self.index.touch_snapshot(record.key)
        self.index.count("stale_served")
        age = time.time() - record.created
        warning = (
            f"storage for {loc.url} is unreachable ({error}); serving the last good snapshot "
            f"{record.key[:12]}, cached {age:.0f} s ago, which may be stale; set "
            "stale_if_error=false to fail instead"
        )
        return self._served(record, lease, started, warning)

    # -- leases ------------------------------------------------------------

    def lease(
        self, key: str, lease_id: str, pid: int | None = None, model: str = ""
    ) -> LeaseRecord:
        """Lease snapshot ``key`` until :meth:`release` or :meth:`close` (or this process ends).

        ``pid`` is recorded for display only (default: this process's).
        """
        taken = self.index.add_lease(lease_id, key, pid or os.getpid(), model)
        return self._held_leases.keep(taken)

    def lease_token(self, lease_id: str) -> Path | None:
        """The token file of lease ``lease_id`` held by this object: whoever else holds it
        open with a shared flock (Triton's shim) keeps the lease alive too."""
        return self._held_leases.path_of(lease_id)

    def release(self, lease_id: str) -> LeaseRecord | None:
        """End a lease for every holder; return what it held, or None if it was not held."""
        self._held_leases.drop(lease_id)
        return self.index.remove_lease(lease_id)

    def leases(self) -> list[LeaseRecord]:
        """Every lease, live or not."""
        return self.index.leases()

    # -- eviction ----------------------------------------------------------

    def size(self) -> int:
        """Bytes the cache holds on disk (blobs; snapshots are hardlinks to them)."""
        return self.store.blob_bytes()

    def evict(self, max_size: int | None = None, *, dry_run: bool = False) -> EvictionReport:
        """Evict least-recently-used unleased snapshots until the cache fits ``max_size``.

        Then blobs that no snapshot references are deleted. A snapshot leased
        by a live process is never evicted.
        """
        budget = self.budget() if max_size is None else max_size
        with self._gc_lock(shared=False):
            if not dry_run:
                self.index.prune_dead_leases()
                self._drop_orphans()
            return self._evict_locked(budget, 0, dry_run)

    def _make_room(self, incoming: int, budget: int | None) -> EvictionReport:
        with self._gc_lock(shared=False):
            return self._evict_locked(budget, incoming, dry_run=False)

    def _evict_locked(self, budget: int | None, incoming: int, dry_run: bool) -> EvictionReport:
        records = self.index.snapshots()
        leased = self.index.live_leased_keys()
        blob_sizes = {row[4]: row[1] for r in records for row in r.files}
        users: dict[str, set[str]] = {}
        for record in records:
            for digest in record.blobs().values():
                users.setdefault(digest, set()).add(record.key)
        current = self.store.blob_bytes()
        report = EvictionReport(size_before=current, dry_run=dry_run, max_size=budget)
        report.kept_leased = sum(1 for r in records if r.key in leased)
        size = current
        if budget is not None:
            for record in sorted(records, key=lambda r: r.last_used):
                if size + incoming <= budget:
                    break
                if record.key in leased:
                    continue
                freed = 0
                for digest in set(record.blobs().values()):
                    users[digest].discard(record.key)
                    if not users[digest]:
                        freed += blob_sizes[digest]
                size -= freed
                report.evicted.append(record)
                report.freed_bytes += freed
        if not dry_run:
            for record in report.evicted:
                self.store.remove_snapshot(record.key)
                self.index.delete_snapshot(record.key)
                self.index.count("evictions")
                self.index.count("bytes_evicted", record.size)
            gc = self.store.gc_blobs()
            if gc.blobs:
                self.index.prune_contents({d for d, _ in self.store.iter_blobs()})
            size = self.store.blob_bytes()
            report.freed_bytes = max(report.freed_bytes, current - size)
        report.size_after = size
        return report

    def _drop_orphans(self) -> None:
        """Snapshots on disk with no index row, and rows with no directory (after a crash)."""
        known = {r.key for r in self.index.snapshots()}
        for key in self.store.snapshot_keys():
            if key not in known:
                self.store.remove_snapshot(key)
        for key in known:
            if not self.store.has_snapshot(key):
                self.index.delete_snapshot(key)

    def remove(self, key: str) -> bool:
        """Remove one snapshot now unless a live process leases it; return True if removed."""
        with self._gc_lock(shared=False):
            if key in self.index.live_leased_keys():
                return False
            self.store.remove_snapshot(key)
            self.index.delete_snapshot(key)
            if self.store.gc_blobs().blobs:
                self.index.prune_contents({d for d, _ in self.store.iter_blobs()})
            return True

    def purge(self) -> int:
        """Remove every snapshot and blob not leased by a live process; return bytes freed."""
        with self._gc_lock(shared=False):
            self.index.prune_dead_leases()
            self._drop_orphans()
            before = self.store.blob_bytes()
            leased = self.index.live_leased_keys()
            for record in self.index.snapshots():
                if record.key not in leased:
                    self.store.remove_snapshot(record.key)
                    self.index.delete_snapshot(record.key)
            self.store.gc_blobs()
            self.index.prune_contents({d for d, _ in self.store.iter_blobs()})
            self.store.clean_tmp()
            return before - self.store.blob_bytes()

    # -- inspection --------------------------------------------------------

    def snapshots(self) -> list[SnapshotRecord]:
        """Every snapshot the index knows, most recently used first."""
        return sorted(self.index.snapshots(), key=lambda r: r.last_used, reverse=True)

    def stats(self, max_size: int | None = None) -> CacheStats:
        """Counters and sizes, node-wide, against ``max_size`` (default: :meth:`budget`)."""
        blobs = list(self.store.iter_blobs())
        return CacheStats(
            counters=self.index.counters(),
            size=sum(info.st_size for _, info in blobs),
            max_size=self.budget() if max_size is None else max_size,
            snapshots=len(self.index.snapshots()),
            blobs=len(blobs),
            live_leases=sum(1 for lease in self.index.leases() if lease.is_live()),
        )

    def verify(self, *, repair: bool = True, keys: Iterable[str] | None = None) -> VerifyReport:
        """Re-hash blobs; report (and with ``repair`` fix) what is damaged.

        ``keys`` limits the check to those snapshots (default: all). A blob whose
        bytes are wrong is removed and every unleased snapshot using it is dropped,
        to be fetched again at its next load. A blob that is only missing from
        ``blobs/`` while the snapshot still holds intact bytes is linked back.
        A snapshot a live process leases is never removed: it is reported as left.
        """
        report = VerifyReport()
        wanted = set(keys) if keys is not None else None
        records = [r for r in self.index.snapshots() if wanted is None or r.key in wanted]
        # Hashing takes long on a big cache: do it with no lock held (blobs are
        # immutable files), then take the gc lock only to repair.
        report.corrupt_blobs = self._corrupt_blobs(records, report, everything=wanted is None)
        corrupt = set(report.corrupt_blobs)
        with self._gc_lock(shared=False):
            leased = self.index.live_leased_keys()
            for record in records:
                report.snapshots_checked += 1
                damaged, relinkable = self._inspect_snapshot(record, corrupt)
                if repair:
                    for relpath, digest in relinkable:
                        if self.store.restore_blob(
                            self.store.snapshot_path(record.key) / relpath, digest
                        ):
                            report.relinked_blobs.append(digest)
                            _log.info(
                                "verify: relinked blob %s from snapshot %s", digest, record.key
                            )
                        else:
                            damaged = True
                elif relinkable:
                    damaged = True
                if not damaged:
                    continue
                if record.key in leased:
                    report.leased_left.append(record.key)
                else:
                    report.broken_snapshots.append(record.key)
            if repair:
                self._repair(report, corrupt)
        return report

    def _corrupt_blobs(
        self, records: list[SnapshotRecord], report: VerifyReport, *, everything: bool
    ) -> list[str]:
        used = {digest for record in records for digest in record.blobs().values()}
        corrupt = []
        for digest, path, _info in list(self.store.blob_files()):
            if not everything and digest not in used:
                continue
            report.blobs_checked += 1
            try:
                actual = self.store.hash_file(path)
            except FileNotFoundError:  # collected by an eviction meanwhile
                continue
            if actual != digest:
                corrupt.append(digest)
        return corrupt

    def _inspect_snapshot(
        self, record: SnapshotRecord, corrupt: set[str]
    ) -> tuple[bool, list[tuple[str, str]]]:
        """(damaged, files whose blob is missing but whose snapshot copy may be intact)."""
        base = self.store.snapshot_path(record.key)
        damaged = False
        relinkable = []
        for relpath, size, _fp, _md5, digest in record.files:
            if digest in corrupt or not _is_regular_file(base / relpath):
                damaged = True
            elif not self.store.has_blob(digest, size):
                relinkable.append((relpath, digest))
        return damaged, relinkable

    def _repair(self, report: VerifyReport, corrupt: set[str]) -> None:
        for digest in corrupt:
            self.store.remove_blob(digest)
            self.index.forget_blob(digest)
        for key in report.broken_snapshots:
            self.store.remove_snapshot(key)
            self.index.delete_snapshot(key)
            self.index.count("corrupt_repaired")
            _log.warning(
                "verify: removed damaged snapshot %s; it is fetched again at its next load", key
            )
        for key in report.leased_left:
            _log.warning(
                "verify: snapshot %s is damaged but leased by a running server; unload the "
                "model and run verify again",
                key,
            )
        report.repaired = (
            bool(corrupt or report.broken_snapshots or report.relinked_blobs)
            and not report.leased_left
        )


def _content_id(loc: Location, entry: FileEntry) -> str:
    # One rule, kept by the index: it rebuilds these identities from records.
    return content_identity(loc.url, entry)


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _is_regular_file(path: Path) -> bool:
    # lstat: a symlink planted in a snapshot is damage, never something to follow.
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False
