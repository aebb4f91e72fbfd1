"""The Python API: ``Cache(cache_dir).fetch(location) -> Snapshot``.

This module orchestrates the others in one direction: parse the location,
list it into a manifest, look the manifest's key up in the index, and on a
miss fetch only the blobs not already held, then publish the snapshot.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.errors import CacheFullError, RemoteChangedError, StorageUnavailableError
from cacheagent.local.index import Index, LeaseRecord, SnapshotRecord
from cacheagent.local.locks import file_lock
from cacheagent.local.store import Store
from cacheagent.remote.listing import list_manifest
from cacheagent.remote.location import Location, parse_location
from cacheagent.remote.manifest import FileEntry, Manifest, manifest_from_records
from cacheagent.remote.transfer import FetchSettings, ProgressFn, download
from cacheagent.sizes import format_size
from cacheagent.triton.params import default_cache_dir

VERIFY_MODES = ("size", "hash", "none")


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
    repaired: bool = False


class Cache:
    """A content-addressed cache of model directories below ``cache_dir``."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        max_size: int | None = None,
        verify: str = "size",
        stale_if_error: bool = True,
        fetch_settings: FetchSettings | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(self.env)
        self.root = self.root.absolute()
        self.max_size = max_size
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.verify_mode = verify
        self.stale_if_error = stale_if_error
        self.fetch_settings = fetch_settings or FetchSettings()
        self.store = Store(self.root)
        self.index = Index(self.root / "index")
        self.store.clean_tmp()

    def close(self) -> None:
        """Release the index's database handles."""
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
    ) -> Snapshot:
        """Return a local snapshot of ``location``, downloading only what is missing.

        ``select`` keeps only some relative paths (version-aware fetch).
        ``lease`` is recorded before the snapshot can be evicted.
        ``on_plan(files, bytes)`` is told what a miss will download.
        ``listed`` is a listing of ``location`` with ``select`` already under way
        (:func:`cacheagent.remote.listing.start_listing`), used instead of listing again;
        ``started`` (a ``time.monotonic()`` stamp) is then when it started.
        """
        started = time.monotonic() if started is None else started
        loc = self.parse(location)
        fs = None  # built on a miss only: a hit lists without importing the SDK
        model = model or os.path.basename(loc.root.rstrip("/"))
        try:
            manifest = listed() if listed else list_manifest(loc, fs, select)
        except StorageUnavailableError as exc:
            stale = self._stale_snapshot(loc, lease, started, exc)
            if stale is None:
                raise
            return stale
        self._check_budget(manifest, loc)
        for attempt in range(2):
            snapshot = self._try_hit(manifest, lease, started)
            if snapshot:
                return snapshot
            with file_lock(self.store.locks_dir / f"snap-{manifest.key}.lock"):
                # Another process may have built it while we waited for the lock.
                snapshot = self._try_hit(manifest, lease, started)
                if snapshot:
                    return snapshot
                try:
                    return self._build(loc, fs, manifest, model, lease, started, progress, on_plan)
                except RemoteChangedError:
                    if attempt == 1:
                        raise
            manifest = list_manifest(loc, fs, select)
            self._check_budget(manifest, loc)
        raise AssertionError("unreachable")

    def _check_budget(self, manifest: Manifest, loc: Location) -> None:
        if self.max_size is not None and manifest.total_size > self.max_size:
            raise CacheFullError(
                f"model {loc.url} needs {format_size(manifest.total_size)} "
                f"({manifest.total_size} bytes) but the cache budget max_size is "
                f"{format_size(self.max_size)} ({self.max_size} bytes); raise max_size"
            )

    def _gc_lock(self, *, shared: bool):  # type: ignore[no-untyped-def]
        return file_lock(self.store.locks_dir / "gc.lock", shared=shared)

    def _try_hit(
        self, manifest: Manifest, lease: LeaseSpec | None, started: float
    ) -> Snapshot | None:
        record = self.index.get_snapshot(manifest.key)
        if record is None or not self.store.has_snapshot(manifest.key):
            return None
        with self._gc_lock(shared=True):
            if not self.store.has_snapshot(manifest.key):
                return None
            if not self._snapshot_intact(record):
                self._drop_corrupt(record)
                return None
            self._take_lease(lease, record)
        self.index.touch_snapshot(record.key)
        self.index.count("hits")
        self.index.count("bytes_served_from_cache", record.size)
        return self._served(record, lease, started)

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

    def _snapshot_intact(self, record: SnapshotRecord) -> bool:
        if self.verify_mode == "none":
            return True
        base = self.store.snapshot_path(record.key)
        for relpath, size, _fp, _md5, digest in record.files:
            try:
                info = (base / relpath).lstat()
            except FileNotFoundError:
                return False
            if not _is_regular(info.st_mode) or info.st_size != size:
                return False
            if self.verify_mode == "hash" and self.store.hash_file(base / relpath) != digest:
                return False
        return True

    def _drop_corrupt(self, record: SnapshotRecord) -> None:
        """Remove a damaged snapshot and the damaged blobs under it, so they are fetched anew."""
        base = self.store.snapshot_path(record.key)
        for relpath, size, _fp, _md5, digest in record.files:
            path = base / relpath
            try:
                intact = path.lstat().st_size == size and (
                    self.verify_mode != "hash" or self.store.hash_file(path) == digest
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
            self.index.add_lease(lease.lease_id, record.key, lease.pid, lease.model)

    def _build(
        self,
        loc: Location,
        fs,  # type: ignore[no-untyped-def]
        manifest: Manifest,
        model: str,
        lease: LeaseSpec | None,
        started: float,
        progress: ProgressFn | None,
        on_plan: Callable[[int, int], None] | None,
    ) -> Snapshot:
        held, missing = self._split_held(loc, manifest)
        needed = sum(entry.size for entry in missing)
        warning = ""
        if self.max_size is not None:
            after = self._make_room(needed).size_after + needed
            if after > self.max_size:
                # Only leased snapshots can be left: going over beats failing a model
                # that fits on its own, but the operator must hear about it.
                warning = (
                    f"the cache will hold {format_size(after)}, over its budget max_size="
                    f"{format_size(self.max_size)}, because snapshots in use by running "
                    "servers cannot be evicted; raise max_size or unload models"
                )
        self._check_free_space(needed, loc)
        if on_plan:
            on_plan(len(missing), needed)
        with self._gc_lock(shared=True):
            # Blobs found above may have been collected before we took the lock.
            held, missing = self._split_held(loc, manifest)
            fetched = download(fs, loc, missing, self.store, self.fetch_settings, progress)
            if missing:
                self._confirm_unchanged(loc, fs, manifest)
            for entry in missing:
                self.index.remember_blob(_content_id(loc, entry), fetched[entry.path])
            digests = {**held, **fetched}
            path = self.store.publish_snapshot(
                manifest.key, sorted(digests.items()), manifest.empty_dirs
            )
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
                versions=_versions(manifest),
                empty_dirs=list(manifest.empty_dirs),
            )
            self.index.put_snapshot(record)
            self._take_lease(lease, record)
        fetched_bytes = sum(entry.size for entry in missing)
        self.index.count("misses")
        self.index.count("bytes_fetched", fetched_bytes)
        self.index.count("bytes_served_from_cache", manifest.total_size - fetched_bytes)
        return Snapshot(
            path=path,
            key=manifest.key,
            source=loc.url,
            hit=False,
            bytes_fetched=fetched_bytes,
            files=len(manifest.files),
            size=manifest.total_size,
            seconds=time.monotonic() - started,
            files_fetched=len(missing),
            lease_id=lease.lease_id if lease else None,
            warning=warning,
        )

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

    def _confirm_unchanged(self, loc: Location, fs, manifest: Manifest) -> None:  # type: ignore[no-untyped-def]
        # One more listing catches an object replaced while we downloaded it, so
        # a snapshot never mixes old and new files (or parts of them).
        before = manifest.by_path()
        now = list_manifest(loc, fs, lambda paths: set(paths) & set(before))
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
    ) -> Snapshot | None:
        if not self.stale_if_error:
            return None
        key = self.index.last_good(loc.url)
        record = self.index.get_snapshot(key) if key else None
        if record is None or not self.store.has_snapshot(record.key):
            return None
        with self._gc_lock(shared=True):
            if not self.store.has_snapshot(record.key) or not self._snapshot_intact(record):
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
        """Mark snapshot ``key`` as used by process ``pid`` (default: this one)."""
        return self.index.add_lease(lease_id, key, pid or os.getpid(), model)

    def release(self, lease_id: str) -> LeaseRecord | None:
        """Drop a lease; return what it held, or None if it was not held."""
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
        budget = self.max_size if max_size is None else max_size
        with self._gc_lock(shared=False):
            if not dry_run:
                self.index.prune_dead_leases()
                self._drop_orphans()
            return self._evict_locked(budget, 0, dry_run)

    def _make_room(self, incoming: int) -> EvictionReport:
        with self._gc_lock(shared=False):
            return self._evict_locked(self.max_size, incoming, dry_run=False)

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

    def stats(self) -> CacheStats:
        """Counters and sizes, node-wide."""
        blobs = list(self.store.iter_blobs())
        return CacheStats(
            counters=self.index.counters(),
            size=sum(info.st_size for _, info in blobs),
            max_size=self.max_size,
            snapshots=len(self.index.snapshots()),
            blobs=len(blobs),
            live_leases=sum(1 for lease in self.index.leases() if lease.is_live()),
        )

    def verify(self, *, repair: bool = True) -> VerifyReport:
        """Re-hash every blob; report (and with ``repair`` remove) corrupt ones and their snapshots.

        A removed snapshot is fetched again, whole, at its next load.
        """
        report = VerifyReport()
        with self._gc_lock(shared=False):
            for digest, _info in list(self.store.iter_blobs()):
                report.blobs_checked += 1
                if self.store.hash_file(self.store.blob_path(digest)) != digest:
                    report.corrupt_blobs.append(digest)
            corrupt = set(report.corrupt_blobs)
            for record in self.index.snapshots():
                report.snapshots_checked += 1
                base = self.store.snapshot_path(record.key)
                damaged = any(
                    digest in corrupt
                    or not self.store.has_blob(digest, size)
                    or not _is_regular_file(base / relpath)
                    for relpath, size, _fp, _md5, digest in record.files
                )
                if damaged:
                    report.broken_snapshots.append(record.key)
            if repair and (corrupt or report.broken_snapshots):
                for digest in corrupt:
                    self.store.remove_blob(digest)
                    self.index.forget_blob(digest)
                for key in report.broken_snapshots:
                    self.store.remove_snapshot(key)
                    self.index.delete_snapshot(key)
                    self.index.count("corrupt_repaired")
                report.repaired = True
        return report

    def manifest_of(self, key: str) -> Manifest | None:
        """The manifest a snapshot was built from."""
        record = self.index.get_snapshot(key)
        if record is None:
            return None
        return manifest_from_records(
            record.source, [row[:4] for row in record.files], record.empty_dirs
        )


def _content_id(loc: Location, entry: FileEntry) -> str:
    # A content hash names the bytes wherever they live; a version fingerprint
    # only names them at this exact object.
    return entry.content_key or f"obj:{loc.url}/{entry.path}@{entry.fingerprint}:{entry.size}"


def _versions(manifest: Manifest) -> list[str]:
    tops = {f.path.split("/", 1)[0] for f in manifest.files if "/" in f.path}
    tops |= {d.split("/", 1)[0] for d in manifest.empty_dirs}
    return sorted((t for t in tops if t.isdigit()), key=int)


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _is_regular_file(path: Path) -> bool:
    # lstat: a symlink planted in a snapshot is damage, never something to follow.
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False
