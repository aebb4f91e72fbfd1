"""Leases: which snapshots running processes use, as held tokens in ``<cache>/leases/``.

A lease is one token file (:mod:`cacheagent.local.liveness`) named
``<snapshot key>.<lease id>.<random>.lock``, held with a shared flock by every
process that serves the snapshot: the one that took it, and for Triton also
the C shim inside tritonserver, so a crashed worker does not drop the lease of
a model Triton still serves. A lease is live exactly while someone holds its
token; the kernel ends that at the holder's death, whatever pid namespace it
ran in. The token's content (lease id, key, model, the taker's pid) is there
for ``cacheagent ls``; nothing decides liveness from it.

The files are the whole truth: leases need no index row, so they survive a
rebuilt index.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cacheagent.local.liveness import (
    HeldToken,
    hold_token,
    is_held,
    random_name,
    read_token,
    remove_if_unheld,
)

_SUFFIX = ".lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_ID_CHARS = 96


@dataclass
class LeaseRecord:
    """A user of a snapshot: live while some process holds the lease's token file."""

    lease_id: str
    key: str
    pid: int  # the taker's pid as it saw itself (informational: may be another namespace's)
    model: str
    created: float
    path: Path | None = None
    # Set on the record returned by Leases.add: the taker's open, locked token.
    token: HeldToken | None = field(default=None, repr=False, compare=False)

    def is_live(self) -> bool:
        """True while a running process holds the lease (checked now, by the kernel)."""
        return self.path is not None and is_held(self.path)


class Leases:
    """The lease tokens of one cache directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, lease_id: str, key: str, pid: int, model: str) -> LeaseRecord:
        """Take a lease on snapshot ``key``; the returned record's ``token`` holds it.

        Raises CacheFullError when the disk has no room for the token.
        """
        self.directory.mkdir(mode=0o700, exist_ok=True)
        created = time.time()
        content = {"lease_id": lease_id, "key": key, "pid": pid, "model": model}
        data = json.dumps({**content, "created": created}, sort_keys=True).encode()
        name = f"{_safe(key)}.{_safe(lease_id)}.{random_name('')}{_SUFFIX}"
        token = hold_token(self.directory / name, shared=True, content=data)
        return LeaseRecord(lease_id, key, pid, model, created, token.path, token)

    def remove(self, lease_id: str) -> LeaseRecord | None:
        """End lease ``lease_id`` for every holder: remove its tokens; return one, or None.

        Holders that still have a token open keep only a nameless file: the
        lease no longer shows, so its snapshot may be evicted.
        """
        found = None
        for record in self._records(lease_id):
            if record.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record.path)
            found = record
        return found

    def all(self) -> list[LeaseRecord]:
        """Every lease token present, live or not."""
        return list(self._records())

    def live_keys(self) -> set[str]:
        """Keys of the snapshots that running processes hold leases on."""
        return {record.key for record in self._records() if record.is_live()}

    def prune_dead(self) -> int:
        """Remove the tokens nobody holds any more; return how many."""
        return sum(
            1
            for record in self._records()
            if record.path is not None and remove_if_unheld(record.path)
        )

    def _records(self, lease_id: str | None = None) -> list[LeaseRecord]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        wanted = None if lease_id is None else f".{_safe(lease_id)}."
        records = []
        for name in names:
            if not name.endswith(_SUFFIX) or (wanted is not None and wanted not in name):
                continue
            record = _parse(self.directory / name)
            if lease_id is None or record.lease_id == lease_id:
                records.append(record)
        return records


class HeldLeases:
    """The lease tokens one owner (a Cache object) holds open, by lease id.

    Thread-safe: prefetch threads and actions share one Cache in the worker.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, list[HeldToken]] = {}
        self._lock = threading.Lock()

    def keep(self, record: LeaseRecord) -> LeaseRecord:
        """Keep the token of a lease just taken open until :meth:`drop` or :meth:`close_all`."""
        if record.token is not None:
            with self._lock:
                self._tokens.setdefault(record.lease_id, []).append(record.token)
        return record

    def path_of(self, lease_id: str) -> Path | None:
        """The token file of the newest lease ``lease_id`` held here, or None."""
        with self._lock:
            tokens = self._tokens.get(lease_id) or []
            return tokens[-1].path if tokens else None

    def drop(self, lease_id: str) -> None:
        """Close the tokens of lease ``lease_id`` held here."""
        with self._lock:
            tokens = self._tokens.pop(lease_id, [])
        for token in tokens:
            token.close()

    def close_all(self) -> None:
        """Close every token held here: these leases end unless someone else holds them."""
        with self._lock:
            groups, self._tokens = list(self._tokens.values()), {}
        for tokens in groups:
            for token in tokens:
                token.close()


def _parse(path: Path) -> LeaseRecord:
    """A token's record: from its content, else (unreadable content) from its name."""
    key, _, rest = path.name.partition(".")
    raw: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        loaded = json.loads(read_token(path) or b"{}")
        raw = loaded if isinstance(loaded, dict) else {}
    try:
        return LeaseRecord(
            lease_id=str(raw.get("lease_id", rest.rsplit(".", 2)[0])),
            key=str(raw.get("key", key)),
            pid=int(raw.get("pid", 0)),
            model=str(raw.get("model", "")),
            created=float(raw.get("created", 0.0)),
            path=path,
        )
    except (TypeError, ValueError):
        return LeaseRecord(rest.rsplit(".", 2)[0], key, 0, "", 0.0, path)


def _safe(text: str) -> str:
    """``text`` usable in a file name: no separators, no dots (they delimit the parts)."""
    return _UNSAFE.sub("_", text)[:_MAX_ID_CHARS] or "_"
