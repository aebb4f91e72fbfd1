"""The index: what the cache holds, in ONE diskcache (SQLite) database, rebuildable.

One database, ``<cache_dir>/index/cache.db``, with diskcache's own eviction
off (its culling would drop rows while leaving our directories behind). Its
"tables" are key prefixes:

- ``snapshot:<key>`` -> record (source, model, files, size, last use)
- ``source:<url>\\n<selection>`` -> key of the source's newest good snapshot
  (for stale-if-error)
- ``content:<identity>`` -> blob digest (identity: MD5 or object version)
- ``counter:<name>`` -> hits, misses, bytes fetched, bytes served, evictions

Writes that belong together run in one transaction.

The store holds the truth; this is an index of it. Every published snapshot
also has its record as ``<cache_dir>/records/<key>.json``, written atomically
at publish, and leases are token files (:mod:`cacheagent.local.leases`). So
when the database is damaged (unreadable, "file is not a database"), it is
moved aside as ``index.corrupt-<time>``, a WARNING names it, and snapshots,
sources and contents are rebuilt from the records; counters restart at zero,
and the log says so. Nothing a user runs ends in a traceback for it.

Every process on the node shares these rows, so counters are node-wide.
Static state in the worker would not survive Triton unloading the agent
library; this does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from cacheagent.errors import CacheFullError
from cacheagent.local.atomic import write_atomically
from cacheagent.local.leases import LeaseRecord, Leases
from cacheagent.local.locks import file_lock
from cacheagent.remote.manifest import FileEntry

__all__ = ["COUNTERS", "Index", "LeaseRecord", "SnapshotRecord", "content_identity", "source_key"]

_log = logging.getLogger(__name__)

COUNTERS = (
    "hits",
    "misses",
    "stale_served",
    "bytes_fetched",
    "bytes_served_from_cache",
    "evictions",
    "bytes_evicted",
    "corrupt_repaired",
    # Bytes of misses by source (bytes_served_from_cache is the local hits'), and
    # what the shared tier did (cacheagent.tier): blobs read whole from it, followed
    # while another node downloaded them, led (downloaded from the origin for the
    # fleet), taken over from a dead leader, found damaged, and fetched from the
    # origin because the tier was down, slow or read-only.
    "bytes_from_tier",
    "bytes_from_origin",
    "tier_blobs_read",
    "tier_blobs_followed",
    "tier_blobs_led",
    "tier_takeovers",
    "tier_corrupt",
    "tier_fallbacks",
)
# Values stay inside the one database file (diskcache would put large ones, such as
# the record of a 300-file snapshot, in files of their own beside it).
_SETTINGS = {
    "eviction_policy": "none",
    "size_limit": 2**62,
    "statistics": False,
    "disk_min_file_size": 2**31 - 1,
}
DB_NAME = "cache.db"
_SNAPSHOT, _SOURCE, _CONTENT, _COUNTER = "snapshot:", "source:", "content:", "counter:"
# The layout before one database: one diskcache directory per table.
_OLD_TABLES = ("snapshots", "sources", "contents", "leases", "counters")
REPAIR_WAIT = 120.0
#: How long a read waits for this process's queued bookkeeping (note_hit_later).
SETTLE_TIMEOUT_S = 10.0

T = TypeVar("T")


@dataclass
class SnapshotRecord:
    """One published snapshot, as the index remembers it."""

    key: str
    source: str
    model: str
    size: int
    files: list[list[Any]]  # [relpath, size, fingerprint, md5, blob digest]
    created: float
    last_used: float
    # Read from records written before 0.2; the CLI derives versions from ``files``.
    versions: list[str] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    # What the fetch kept of the source (e.g. its version policy): stale-if-error
    # serves a snapshot only to a fetch of the same source and selection.
    selection: str = "all"

    def blobs(self) -> dict[str, str]:
        """Map each relative path to its blob digest."""
        return {row[0]: row[4] for row in self.files}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SnapshotRecord:
        """A record from its stored form; fields unknown to this version are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def source_key(source: str, selection: str) -> str:
    """The sources-table key of a source URL fetched with one selection."""
    return f"{source}\n{selection}"


def content_identity(source: str, entry: FileEntry) -> str:
    """The contents-table identity of a remote file: its content hash, else its version.

    A content hash names the bytes wherever they live; a version fingerprint
    only names them at this exact object.
    """
    return entry.content_key or f"obj:{source}/{entry.path}@{entry.fingerprint}:{entry.size}"


def _repairing(method: Callable[..., T]) -> Callable[..., T]:
    """Run an Index method; if the database turns out damaged, repair it and run it again."""

    @functools.wraps(method)
    def run(self: Index, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            self.repair(exc)
            return method(self, *args, **kwargs)

    return run


class Index:
    """Typed access to the index database below ``<cache_dir>/index``.

    ``records_dir`` and ``leases_dir`` default to the cache directory's
    ``records/`` and ``leases/`` (siblings of ``root``).
    """

    def __init__(
        self, root: Path, *, records_dir: Path | None = None, leases_dir: Path | None = None
    ) -> None:
        self.root = root
        self.db_path = root / DB_NAME
        self.records_dir = records_dir or root.parent / "records"
        self.lease_tokens = Leases(leases_dir or root.parent / "leases")
        self._db_handle: diskcache.Cache | None = None
        self._open_lock = threading.RLock()  # prefetch threads share the index
        # Rows of removed snapshots not deleted yet because the disk was full (see
        # delete_snapshot); hidden from every read until a later write deletes them.
        self._pending_deletes: set[str] = set()
        self._pending_lock = threading.Lock()
        self._later = _Later()

    # The database is opened on first use: every SQLite open (connect, pragmas,
    # schema check) costs a fresh worker milliseconds, and leases need none.
    @property
    def _db(self) -> diskcache.Cache:
        handle = self._db_handle
        if handle is None:
            with self._open_lock:
                handle = self._db_handle
                if handle is None:
                    handle = self._open()
                    self._db_handle = handle
        return handle

    def _open(self) -> diskcache.Cache:
        fresh = not self.db_path.exists()
        try:
            with self._disk_full():
                db = diskcache.Cache(str(self.root), **_SETTINGS)
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            return self._repaired(exc)
        if fresh and (self.root / "snapshots" / DB_NAME).exists():
            self._migrate_tables(db)
        return db

    def open(self) -> None:
        """Open the database now, for this and later threads (else the first use opens it)."""
        self._db  # noqa: B018  (the property opens it)

    def close(self) -> None:
        """Close the database connection (of the calling thread; others close with it).

        Bookkeeping queued by :meth:`note_hit_later` is written first (bounded wait).
        """
        self.settle()
        with self._open_lock:
            handle, self._db_handle = self._db_handle, None
        if handle is not None:
            handle.close()

    # -- snapshots ---------------------------------------------------------

    def read_record(self, key: str) -> SnapshotRecord | None:
        """The record of a published snapshot from its record file, without the database.

        The record file is the store's truth (written before the row at publish,
        removed before it at delete), so a hit can be found and served by a fresh
        process before it has opened the database. An unreadable one is logged and
        treated as none, so the snapshot is fetched and published again. Without a
        record file the database decides (a cache of the layout before record files
        gets them when the database is first opened).
        """
        if key in self._pending_deletes:
            return None
        path = self._record_path(key)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            return SnapshotRecord.from_dict(raw)
        except FileNotFoundError:
            return self.get_snapshot(key)
        except (OSError, ValueError, TypeError) as exc:
            _log.warning(
                "the snapshot record %s is unreadable (%s); treating the snapshot as not "
                "cached, so it is fetched and published again",
                path,
                exc,
            )
            return None

    def note_hit_later(self, key: str, size: int) -> None:
        """Record a hit on snapshot ``key`` (last use, hit and byte counters) in the background.

        The caller has a lease already and answers at once: the database is opened
        and written on the index's own thread, in order with other such writes.
        :meth:`settle` (and every read of what it writes) waits for them.
        """
        self._later.submit(functools.partial(self.note_hit, key, size))

    @_repairing
    def note_hit(self, key: str, size: int) -> None:
        """Record a hit on snapshot ``key`` now: its last use and the counters, in one commit."""
        with _best_effort(self.root), self._db.transact():
            self._mark_used(key)
            self._db.incr(_COUNTER + "hits", 1, default=0)
            self._db.incr(_COUNTER + "bytes_served_from_cache", size, default=0)

    def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait (at most ``timeout`` s, then warn) for writes queued by :meth:`note_hit_later`."""
        if not self._later.wait(timeout):
            _log.warning(
                "the cache index %s has not written this process's last hits after %.0f s; "
                "reading it without them (counters and last use may lag)",
                self.root,
                timeout,
            )

    @_repairing
    def get_snapshot(self, key: str) -> SnapshotRecord | None:
        """The record of a snapshot, or None."""
        self.settle()
        if key in self._pending_deletes:
            return None
        raw = self._db.get(_SNAPSHOT + key)
        return SnapshotRecord.from_dict(raw) if raw else None

    @_repairing
    def put_snapshot(self, record: SnapshotRecord) -> None:
        """Record a published snapshot and make it its source's newest good one.

        The record is first written beside the snapshot (``records/<key>.json``),
        so the store can always rebuild the index.
        """
        self._write_record_file(record)
        with self._pending_lock:
            self._pending_deletes.discard(record.key)
        self._flush_deletes()
        with self._disk_full(), self._db.transact():
            self._db.set(_SNAPSHOT + record.key, asdict(record))
            self._db.set(_SOURCE + source_key(record.source, record.selection), record.key)

    @_repairing
    def touch_snapshot(self, key: str) -> None:
        """Mark a snapshot as used now (for LRU eviction); best effort on a full disk."""
        with _best_effort(self.root), self._db.transact():
            self._mark_used(key)

    def _mark_used(self, key: str) -> None:
        """Set a snapshot row's last use to now (inside the caller's transaction)."""
        raw = self._db.get(_SNAPSHOT + key)
        if raw:
            raw["last_used"] = time.time()
            self._db.set(_SNAPSHOT + key, raw)

    @_repairing
    def delete_snapshot(self, key: str) -> None:
        """Forget a snapshot (and its source pointer if it pointed here).

        Works on a full disk too, where SQLite cannot write: the row is then
        hidden and deleted by a later write (eviction frees space first). That
        is safe because the store is the truth: the snapshot's directory and
        record are gone already, and an index rebuild would not bring it back.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(key))
        with self._pending_lock:
            self._pending_deletes.add(key)
        self._flush_deletes()

    def _flush_deletes(self) -> None:
        with self._pending_lock:
            keys = sorted(self._pending_deletes)
        if not keys:
            return
        deleted = False
        with _best_effort(self.root):
            with self._db.transact():
                for key in keys:
                    raw = self._db.pop(_SNAPSHOT + key, None)
                    if raw:
                        source = _SOURCE + source_key(raw["source"], raw.get("selection", "all"))
                        if self._db.get(source) == key:
                            self._db.delete(source)
            deleted = True  # committed
        if deleted:
            with self._pending_lock:
                self._pending_deletes.difference_update(keys)

    @_repairing
    def snapshots(self) -> list[SnapshotRecord]:
        """All snapshot records."""
        self.settle()
        records = []
        for key in self._keys(_SNAPSHOT):
            raw = self._db.get(key)
            if raw and key.removeprefix(_SNAPSHOT) not in self._pending_deletes:
                records.append(SnapshotRecord.from_dict(raw))
        return records

    @_repairing
    def last_good(self, source: str, selection: str = "all") -> str | None:
        """Key of the newest snapshot published for ``source`` with ``selection``."""
        value = self._db.get(_SOURCE + source_key(source, selection))
        return str(value) if value else None

    # -- content identities -> blobs ----------------------------------------

    @_repairing
    def blob_for(self, content_id: str) -> str | None:
        """The blob digest already holding this content identity, if known."""
        value = self._db.get(_CONTENT + content_id)
        return str(value) if value else None

    def remember_blobs(self, blobs: Iterable[tuple[str, str]]) -> None:
        """Record that each ``(content_id, digest)``'s content is stored as that blob.

        One transaction for all: a model of many small files costs one commit.
        """
        # A list: a retry after the index was repaired must record every one again.
        self._remember_blobs(list(blobs))

    @_repairing
    def _remember_blobs(self, blobs: list[tuple[str, str]]) -> None:
        with self._disk_full(), self._db.transact():
            for content_id, digest in blobs:
                self._db.set(_CONTENT + content_id, digest)

    @_repairing
    def forget_blob(self, digest: str) -> int:
        """Drop every content identity that points at ``digest``; return how many."""
        return self._drop_contents(lambda value: value == digest)

    @_repairing
    def prune_contents(self, live_digests: set[str]) -> int:
        """Drop content identities whose blob is gone; return how many."""
        return self._drop_contents(lambda value: value not in live_digests)

    def _drop_contents(self, doomed: Callable[[Any], bool]) -> int:
        # Best effort on a full disk: an identity whose blob is gone is harmless,
        # since a fetch checks that the blob exists before it relies on one.
        self._flush_deletes()
        dropped = 0
        with _best_effort(self.root):
            with self._db.transact():
                keys = [k for k in self._keys(_CONTENT) if doomed(self._db.get(k))]
                for key in keys:
                    self._db.delete(key)
            dropped = len(keys)  # committed
        return dropped

    # -- leases (token files, see cacheagent.local.leases) ------------------

    def add_lease(self, lease_id: str, key: str, pid: int, model: str) -> LeaseRecord:
        """Lease snapshot ``key``: the returned record's ``token`` holds it until closed.

        ``pid`` is recorded for display only; the lease lives as long as some
        process holds its token.
        """
        return self.lease_tokens.add(lease_id, key, pid, model)

    def remove_lease(self, lease_id: str) -> LeaseRecord | None:
        """End a lease for all its holders; return it, or None if there was none."""
        return self.lease_tokens.remove(lease_id)

    def leases(self) -> list[LeaseRecord]:
        """All lease records, live or not."""
        return self.lease_tokens.all()

    def prune_dead_leases(self) -> int:
        """Drop leases no running process holds; return how many."""
        return self.lease_tokens.prune_dead()

    def live_leased_keys(self) -> set[str]:
        """Keys of snapshots that a running process holds a lease on."""
        return self.lease_tokens.live_keys()

    # -- counters ----------------------------------------------------------

    @_repairing
    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to a node-wide counter (atomic across processes); best effort."""
        with _best_effort(self.root):
            self._db.incr(_COUNTER + name, amount, default=0)

    @_repairing
    def counters(self) -> dict[str, int]:
        """Every counter, zero when never counted."""
        self.settle()
        return {name: int(self._db.get(_COUNTER + name, 0)) for name in COUNTERS}

    @_repairing
    def clear(self) -> None:
        """Forget every snapshot, source, content identity and counter (leases stay)."""
        self._db.clear()
        for path in self._record_files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- repair --------------------------------------------------------------

    def repair(self, error: BaseException | None = None) -> None:
        """Replace a damaged database by one rebuilt from the store's records.

        Safe to call from several processes at once: under the repair lock, a
        database that another process has already repaired is kept.
        """
        with self._open_lock:
            self.close()
            self._db_handle = self._repaired(error)

    def _repaired(self, error: BaseException | None) -> diskcache.Cache:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self.root / "repair.lock"
        with file_lock(
            lock, timeout=REPAIR_WAIT, what=f"the repair of the cache index {self.root}"
        ):
            if self._database_is_sound():
                # Another process repaired it while we waited, or our handle was stale.
                return diskcache.Cache(str(self.root), **_SETTINGS)
            aside = self._move_aside()
            _log.warning(
                "the cache index %s is damaged (%s); moved it aside to %s and rebuilding it "
                "from the snapshot records in %s",
                self.db_path,
                error or "failed its integrity check",
                aside,
                self.records_dir,
            )
            with self._disk_full():
                db = diskcache.Cache(str(self.root), **_SETTINGS)
                rebuilt = self._rebuild(db)
        _log.warning(
            "rebuilt the cache index from %d snapshot record(s); its counters (hits, misses, "
            "bytes fetched, evictions) were lost and start again from zero; the damaged "
            "file %s can be deleted",
            rebuilt,
            aside,
        )
        return db

    def _database_is_sound(self) -> bool:
        if not self.db_path.exists():
            return False
        try:
            connection = sqlite3.connect(str(self.db_path), timeout=REPAIR_WAIT)
            try:
                (result,) = connection.execute("PRAGMA quick_check").fetchone()
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            finally:
                connection.close()
        except sqlite3.DatabaseError as exc:
            if _is_corrupt(exc):
                return False
            raise
        return result == "ok" and {"Cache", "Settings"} <= tables

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(2).hex()
        aside = self.root / f"index.corrupt-{stamp}"
        # The write-ahead log and shared memory belong to the damaged file: a WAL
        # left beside a new database could be replayed into it.
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.db_path}{suffix}", f"{aside}{suffix}")
        return aside

    def _rebuild(self, db: diskcache.Cache) -> int:
        """Fill an empty database from ``records/*.json``; return how many snapshots."""
        records = self._stored_records()
        newest: dict[str, SnapshotRecord] = {}
        with db.transact():
            for record in records:
                db.set(_SNAPSHOT + record.key, asdict(record))
                for relpath, size, fingerprint, md5, digest in record.files:
                    entry = FileEntry(str(relpath), int(size), str(fingerprint), md5)
                    db.set(_CONTENT + content_identity(record.source, entry), digest)
                source = source_key(record.source, record.selection)
                if source not in newest or newest[source].created < record.created:
                    newest[source] = record
            for source, record in newest.items():
                db.set(_SOURCE + source, record.key)
        return len(records)

    def _migrate_tables(self, db: diskcache.Cache) -> None:
        """Bring rows over from the old one-database-per-table layout, then drop it."""
        try:
            old = diskcache.Cache(str(self.root / "snapshots"), **_SETTINGS)
            try:
                for key in list(old.iterkeys()):
                    raw = old.get(key)
                    if raw:
                        self._write_record_file(SnapshotRecord.from_dict(raw))
            finally:
                old.close()
            counters = diskcache.Cache(str(self.root / "counters"), **_SETTINGS)
            try:
                for name in COUNTERS:
                    db.set(_COUNTER + name, int(counters.get(name, 0)))
            finally:
                counters.close()
            migrated = self._rebuild(db)
        except (sqlite3.Error, OSError, TypeError, ValueError) as exc:
            _log.warning(
                "could not bring the old cache index in %s over (%s); snapshots cached by the "
                "old version will be fetched again",
                self.root,
                exc,
            )
            return
        for table in _OLD_TABLES:
            shutil.rmtree(self.root / table, ignore_errors=True)
        _log.info("moved the cache index %s to one database (%d snapshots)", self.root, migrated)

    # -- records beside the snapshots -------------------------------------

    def _record_path(self, key: str) -> Path:
        return self.records_dir / f"{key}.json"

    def _write_record_file(self, record: SnapshotRecord) -> None:
        write_atomically(
            self._record_path(record.key),
            json.dumps(asdict(record), sort_keys=True),
            mode=0o600,
        )

    def _record_files(self) -> list[Path]:
        try:
            return [
                self.records_dir / n for n in os.listdir(self.records_dir) if n.endswith(".json")
            ]
        except FileNotFoundError:
            return []

    def _stored_records(self) -> list[SnapshotRecord]:
        records = []
        for path in self._record_files():
            try:
                raw = json.loads(path.read_text())
                record = SnapshotRecord.from_dict(raw)
                if record.key != path.stem:
                    raise ValueError(f"it names snapshot {record.key}")
            except (OSError, ValueError, TypeError) as exc:
                _log.warning("skipping the unreadable snapshot record %s: %s", path, exc)
                continue
            records.append(record)
        return records

    # -- helpers -------------------------------------------------------------

    def _keys(self, prefix: str) -> list[str]:
        return [k for k in self._db.iterkeys() if isinstance(k, str) and k.startswith(prefix)]

    @contextlib.contextmanager
    def _disk_full(self) -> Iterator[None]:
        """Turn SQLite's "database or disk is full" into a CacheFullError that says what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc, self.root):
                raise
            full = CacheFullError(
                f"the disk holding the cache index {self.root} is full (no bytes or inodes "
                "left), so the cache cannot record what it holds; free space on that disk, "
                "lower max_size, or move cache_dir"
            )
            raise full from None


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """True for a damaged database file ("file is not a database", "malformed")."""
    if isinstance(exc, sqlite3.OperationalError):
        return False  # locked, busy, I/O, full: a problem of the moment, not of the file
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text or "corrupt" in text


def _is_disk_full(exc: sqlite3.OperationalError, root: Path) -> bool:
    text = str(exc).lower()
    if "full" in text:
        return True
    # Out of inodes, SQLite cannot create its journal or WAL and says only this.
    if "unable to open" in text:
        with contextlib.suppress(OSError):
            info = os.statvfs(root if root.exists() else root.parent)
            return info.f_favail == 0 or info.f_bavail == 0
    return False


@contextlib.contextmanager
def _best_effort(root: Path) -> Iterator[None]:
    # Bookkeeping (last use, counters) must not fail a load that needs no new
    # space, such as a hit on a full disk: skip it when SQLite cannot write.
    try:
        yield
    except sqlite3.OperationalError as exc:
        if not _is_disk_full(exc, root):
            raise


class _Later:
    """Writes that may come after the caller has answered: one daemon thread, in order.

    The thread starts with the first job and waits for more after it; a job that
    fails is logged, never raised (what it writes is bookkeeping).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued = 0
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job`` on the thread, after the jobs already queued."""
        with self._lock:
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cacheagent-index-later", daemon=True
                )
                self._thread.start()
        self._jobs.put(job)

    def wait(self, timeout: float) -> bool:
        """Wait until every queued job has run; False if ``timeout`` s passed first."""
        if threading.current_thread() is self._thread:
            return True  # a job reading the index must not wait for itself
        with self._lock:
            return self._idle.wait_for(lambda: self._queued == 0, timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as exc:  # bookkeeping only: the hit it records was served
                _log.warning("could not record a cache hit in the index: %s", exc)
            finally:
                with self._lock:
                    self._queued -= 1
                    if self._queued == 0:
                        self._idle.notify_all()
