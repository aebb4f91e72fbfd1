"""The index: what the cache holds and who uses it, in diskcache (SQLite).

Tables (one diskcache directory each, all with diskcache's own eviction off,
since its culling would drop rows while leaving our directories behind):

- ``snapshots``: snapshot key -> record (source, model, files, size, last use)
- ``sources``: source URL -> key of its newest good snapshot (for stale-if-error)
- ``contents``: content identity (MD5 or object version) -> blob digest
- ``leases``: lease id -> (snapshot key, holder pid, holder start time)
- ``counters``: hits, misses, bytes fetched, bytes served from cache, evictions

Every process on the node shares these rows, so counters and leases are
node-wide. Static state in the worker would not survive Triton unloading the
agent library; this does.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diskcache

from cacheagent.errors import CacheFullError

COUNTERS = (
    "hits",
    "misses",
    "stale_served",
    "bytes_fetched",
    "bytes_served_from_cache",
    "evictions",
    "bytes_evicted",
    "corrupt_repaired",
)
_SETTINGS = {"eviction_policy": "none", "size_limit": 2**62, "statistics": False}


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
    versions: list[str] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)

    def blobs(self) -> dict[str, str]:
        """Map each relative path to its blob digest."""
        return {row[0]: row[4] for row in self.files}


@dataclass
class LeaseRecord:
    """A live user of a snapshot: a process, identified by pid and start time."""

    lease_id: str
    key: str
    pid: int
    start_time: str
    model: str
    created: float

    def is_live(self) -> bool:
        """True while the holding process runs (a reused pid has another start time)."""
        return bool(self.start_time) and process_start_time(self.pid) == self.start_time


def process_start_time(pid: int) -> str:
    """A token for when ``pid`` started: '' if it does not run (Linux: /proc stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
        fields = raw.rsplit(")", 1)[1].split()
        # A zombie (killed, not yet reaped by its parent) uses nothing any more.
        return "" if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        return ""
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            return "alive"
        return "alive"


class Index:
    """Typed access to the index tables below ``<cache_dir>/index``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tables: dict[str, diskcache.Cache] = {}
        self._open_lock = threading.Lock()  # prefetch threads share the index

    # Each table is opened on first use: a hit touches three of the five, and every
    # SQLite open (connect, pragmas, schema check) costs a fresh worker milliseconds.
    def _table(self, name: str) -> diskcache.Cache:
        table = self._tables.get(name)
        if table is None:
            with self._open_lock:
                table = self._tables.get(name)
                if table is None:
                    table = diskcache.Cache(str(self.root / name), **_SETTINGS)
                    self._tables[name] = table
        return table

    @property
    def _snapshots(self) -> diskcache.Cache:
        return self._table("snapshots")

    @property
    def _sources(self) -> diskcache.Cache:
        return self._table("sources")

    @property
    def _contents(self) -> diskcache.Cache:
        return self._table("contents")

    @property
    def _leases(self) -> diskcache.Cache:
        return self._table("leases")

    @property
    def _counters(self) -> diskcache.Cache:
        return self._table("counters")

    def close(self) -> None:
        """Close the SQLite connections opened so far."""
        with self._open_lock:
            tables, self._tables = list(self._tables.values()), {}
        for table in tables:
            table.close()

    # -- snapshots ---------------------------------------------------------

    def get_snapshot(self, key: str) -> SnapshotRecord | None:
        """The record of a snapshot, or None."""
        raw = self._snapshots.get(key)
        return SnapshotRecord(**raw) if raw else None

    def put_snapshot(self, record: SnapshotRecord) -> None:
        """Record a published snapshot and make it its source's newest good one."""
        with self._disk_full():
            self._snapshots.set(record.key, asdict(record))
            self._sources.set(record.source, record.key)

    def touch_snapshot(self, key: str) -> None:
        """Mark a snapshot as used now (for LRU eviction); best effort on a full disk."""
        with _best_effort(), self._snapshots.transact():
            raw = self._snapshots.get(key)
            if raw:
                raw["last_used"] = time.time()
                self._snapshots.set(key, raw)

    def delete_snapshot(self, key: str) -> None:
        """Forget a snapshot (and its source pointer if it pointed here)."""
        raw = self._snapshots.pop(key, None)
        if raw and self._sources.get(raw["source"]) == key:
            self._sources.delete(raw["source"])

    def snapshots(self) -> list[SnapshotRecord]:
        """All snapshot records."""
        records = []
        for key in list(self._snapshots.iterkeys()):
            raw = self._snapshots.get(key)
            if raw:
                records.append(SnapshotRecord(**raw))
        return records

    def last_good(self, source: str) -> str | None:
        """Key of the newest snapshot published for ``source``."""
        value = self._sources.get(source)
        return str(value) if value else None

    # -- content identities -> blobs ----------------------------------------

    def blob_for(self, content_id: str) -> str | None:
        """The blob digest already holding this content identity, if known."""
        value = self._contents.get(content_id)
        return str(value) if value else None

    def remember_blob(self, content_id: str, digest: str) -> None:
        """Record that ``content_id`` is stored as blob ``digest``."""
        with self._disk_full():
            self._contents.set(content_id, digest)

    def forget_blob(self, digest: str) -> int:
        """Drop every content identity that points at ``digest``; return how many."""
        doomed = [k for k in list(self._contents.iterkeys()) if self._contents.get(k) == digest]
        for key in doomed:
            self._contents.delete(key)
        return len(doomed)

    def prune_contents(self, live_digests: set[str]) -> int:
        """Drop content identities whose blob is gone; return how many."""
        doomed = [
            k for k in list(self._contents.iterkeys()) if self._contents.get(k) not in live_digests
        ]
        for key in doomed:
            self._contents.delete(key)
        return len(doomed)

    # -- leases ------------------------------------------------------------

    def add_lease(self, lease_id: str, key: str, pid: int, model: str) -> LeaseRecord:
        """Record that process ``pid`` uses snapshot ``key``."""
        record = LeaseRecord(lease_id, key, pid, process_start_time(pid), model, time.time())
        with self._disk_full():
            self._leases.set(lease_id, asdict(record))
        return record

    def remove_lease(self, lease_id: str) -> LeaseRecord | None:
        """Drop a lease; return it, or None if there was none."""
        raw = self._leases.pop(lease_id, None)
        return LeaseRecord(**raw) if raw else None

    def leases(self) -> list[LeaseRecord]:
        """All lease records, live or not."""
        records = []
        for key in list(self._leases.iterkeys()):
            raw = self._leases.get(key)
            if raw:
                records.append(LeaseRecord(**raw))
        return records

    def prune_dead_leases(self) -> int:
        """Drop leases whose process is gone; return how many."""
        dead = [lease for lease in self.leases() if not lease.is_live()]
        for lease in dead:
            self._leases.delete(lease.lease_id)
        return len(dead)

    def live_leased_keys(self) -> set[str]:
        """Keys of snapshots that a running process holds."""
        return {lease.key for lease in self.leases() if lease.is_live()}

    # -- counters ----------------------------------------------------------

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to a node-wide counter (atomic across processes); best effort."""
        with _best_effort():
            self._counters.incr(name, amount, default=0)

    def counters(self) -> dict[str, int]:
        """Every counter, zero when never counted."""
        return {name: int(self._counters.get(name, 0)) for name in COUNTERS}

    @contextlib.contextmanager
    def _disk_full(self) -> Iterator[None]:
        """Turn SQLite's "database or disk is full" into a CacheFullError that says what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            raise CacheFullError(
                f"the disk holding the cache index {self.root} is full, so the cache cannot "
                "record what it holds; free space on that disk, lower max_size, or move cache_dir"
            ) from None

    def clear(self) -> None:
        """Forget everything (used by purge)."""
        for table in (self._snapshots, self._sources, self._contents, self._leases, self._counters):
            table.clear()


def _is_disk_full(exc: sqlite3.OperationalError) -> bool:
    return "full" in str(exc).lower()


@contextlib.contextmanager
def _best_effort() -> Iterator[None]:
    # Bookkeeping (last use, counters) must not fail a load that needs no new
    # space, such as a hit on a full disk: skip it when SQLite cannot write.
    try:
        yield
    except sqlite3.OperationalError as exc:
        if not _is_disk_full(exc):
            raise
