"""The start listing: one listing of a repository, handed from ``cacheagent run`` to the agent.

``cacheagent run`` lists each cloud repository once per start (one recursive,
paginated listing of the repository prefix) to keep its stub current. The same
listing then validates every model's cache on LOAD: the launcher writes, per
model, the listing entries below the model directory into a *start directory*,
and names that directory in Triton's environment (``CACHEAGENT_START``); the
worker inherits it. The agent builds the model's manifest from those entries,
with its own version selection, exactly as it would from a listing of its own,
so a LOAD costs a local file read instead of a round trip to storage.

Freshness stays exact, by these rules:

- Only this start's listing is used. The start directory carries a unique id
  (``<cache>/starts/<id>/``) and every record repeats it; a record whose id
  differs from the directory Triton was started with is ignored. The launcher
  removes its directory when it exits; a leftover of a killed launcher is never
  named by a later start, and the next launcher removes it.
- Without poll mode a record serves one LOAD, once: the model's start-up LOAD
  (``once``). The agent claims it by renaming it away before reading it, so a
  later load (explicit mode's load API, an hour on) lists storage itself. In
  explicit mode the launcher writes records only for the ``--load-model``
  models, the only ones loaded at start-up.
- In poll mode the launcher re-lists at Triton's poll interval and replaces the
  records in place (the path in the environment cannot change). A record is
  used only while it is younger than that interval (``fresh_for``): an older
  one means the launcher could not refresh it (storage down, launcher gone),
  and the agent lists storage itself, as it would without the launcher.

A start whose stubs exist from an earlier start does not wait for its listing:
``cacheagent run`` starts Triton at once and lists meanwhile (overlapping
Triton's own start-up). Until the first listing of the start is written, the
start directory holds :data:`PENDING`; a LOAD that finds no record while it is
there waits for the record (bounded by :data:`PENDING_WAIT_S`, and logged past
a second), so it is validated by this start's listing all the same.

This module is on the worker's hit path: it imports only the standard library
and the manifest builder.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from cacheagent.errors import CacheAgentError, RemoteNotFoundError
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import Manifest, build_manifest

START_ENV = "CACHEAGENT_START"
#: Set ("1") when this start's records cover every model of its listings (not in
#: explicit mode, where only the --load-model models get one).
START_ALL_ENV = "CACHEAGENT_START_ALL"
RECORD_FORMAT = 1
#: The suffix of a once-record its LOAD has claimed.
CLAIMED = ".claimed"
#: In a start directory while the launcher's first listing of the start is under way.
PENDING = "listing.pending"
# The launcher's listing is bounded by its storage timeout (60 s by default) and one
# retry; past this the LOAD stops waiting and lists storage itself.
PENDING_WAIT_S = 150.0
_PENDING_POLL_S = 0.005
# A listing stamped this far in the future was not made on this host's clock.
_CLOCK_SLACK_S = 1.0

Selector = Callable[[Iterable[str]], set[str]]
_log = logging.getLogger(__name__)

# The listing fields the manifest reads (see cacheagent.remote.manifest): a record
# keeps only these, so it stays small and plain JSON whatever the SDK returned.
_MANIFEST_FIELDS = (
    "name",
    "type",
    "size",
    "Size",
    "ETag",
    "etag",
    "md5Hash",
    "generation",
    "VersionId",
    "version_id",
    "mtime",
    "LastModified",
    "last_modified",
    "ino",
    "metadata",
)


@dataclass(frozen=True)
class ModelRecord:
    """The start listing of one model directory, as the launcher writes it."""

    start: str  # the start id
    source: str  # the model directory's location URL
    entries: Mapping[str, Mapping[str, Any]]  # listing name -> portable info
    listed_at: float  # wall-clock time the listing was sent (time.time())
    fresh_for: float | None  # seconds it may serve LOADs; None: this start's whole life
    once: bool  # True: it serves one LOAD, then is gone

    def to_json(self) -> str:
        """The record file's text."""
        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "start": self.start,
                "source": self.source,
                "listed_at": self.listed_at,
                "fresh_for": self.fresh_for,
                "once": self.once,
                "entries": self.entries,
            },
            separators=(",", ":"),
        )


def record_name(source: str) -> str:
    """The file name of a model's record in a start directory: a hash of its source URL."""
    return xxhash.xxh3_128_hexdigest(source.encode()) + ".json"


def portable_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one listing entry the manifest reads, as plain JSON values.

    ``build_manifest`` gives the same manifest for the result as for ``info``:
    timestamps become their ``str()`` (the form the manifest formats them in),
    and Azure's ``content_settings`` keeps only its ``content_md5``, base64-encoded.
    """
    out: dict[str, Any] = {}
    for field in _MANIFEST_FIELDS:
        if field in info:
            out[field] = _plain(info[field])
    if "content_settings" in info:
        settings = info["content_settings"]
        raw = getattr(settings, "content_md5", None)
        if raw is None and isinstance(settings, Mapping):
            raw = settings.get("content_md5")
        if isinstance(raw, (bytes, bytearray)):
            raw = base64.b64encode(bytes(raw)).decode()
        out["content_settings"] = {"content_md5": raw}
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def listed_at_start(
    location: Location,
    select: Selector | None = None,
    env: Mapping[str, str] | None = None,
    *,
    claim: bool = True,
) -> Callable[[], Manifest] | None:
    """The manifest of ``location`` from this start's listing, or None to list storage.

    The returned call is what ``Cache.fetch(listed=...)`` takes: it returns the
    manifest (built with ``select``), or raises what building it raised. None
    when Triton was not started by ``cacheagent run``, or when no record of this
    start may validate this model now (see the module's rules).

    A LOAD claims a once-record (uses it up). Work that answers no LOAD, such as
    prefetching a sibling during start-up, passes ``claim=False``: it uses the
    record and leaves it for the model's own LOAD.
    """
    start_dir = (os.environ if env is None else env).get(START_ENV, "")
    if not start_dir:
        return None
    record = _take_record(Path(start_dir), location.url, claim)
    if record is None:
        return None
    try:
        manifest = build_manifest(location.url, location.root, record.entries, select)
        if not manifest.files and not manifest.empty_dirs:
            raise RemoteNotFoundError(
                f"no model files under {location.url} in this start's listing: the directory "
                "is empty or holds no file the model's version policy loads; check the "
                "repository and the model's version_policy"
            )
    except CacheAgentError as exc:
        error = exc

        def fail() -> Manifest:
            raise error

        return fail
    return lambda: manifest


def start_covers_every_model(env: Mapping[str, str] | None = None) -> bool:
    """True when ``cacheagent run`` wrote a record for, and fetches, every model of this
    start's listings: a sibling prefetch would then only repeat its work."""
    env = os.environ if env is None else env
    return bool(env.get(START_ENV)) and env.get(START_ALL_ENV) == "1"


def record_age(record: ModelRecord, now: float | None = None) -> float:
    """Seconds since the record's listing was sent."""
    return (time.time() if now is None else now) - record.listed_at


def _take_record(start_dir: Path, source: str, claim: bool) -> ModelRecord | None:
    path = start_dir / record_name(source)
    text = _read_when_listed(path, start_dir / PENDING, source)
    if text is None:
        return None
    record = parse_record(text)
    if record is None or record.start != start_dir.name or record.source != source:
        return None
    if not _fresh(record):
        return None
    if record.once and claim and not _claim(path):
        return None
    return record


def _read_when_listed(path: Path, pending: Path, source: str) -> str | None:
    """The record's text; while the start's listing is pending, wait for it (bounded)."""
    started = time.monotonic()
    said = False
    while True:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return None
        except OSError:
            pass
        waited = time.monotonic() - started
        if not pending.exists() or waited > PENDING_WAIT_S:
            # Listed without this model (or the listing failed): no record to use.
            # Read once more: the record may have landed just before the marker went.
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                if waited > PENDING_WAIT_S:
                    _log.warning(
                        "cacheagent run's listing of %s has not come after %.0f s; "
                        "listing storage here instead",
                        source,
                        waited,
                    )
                return None
        if waited > 1.0 and not said:
            said = True
            _log.info("waiting for cacheagent run's listing to validate %s", source)
        time.sleep(_PENDING_POLL_S)


def _fresh(record: ModelRecord) -> bool:
    age = record_age(record)
    if age < -_CLOCK_SLACK_S:
        return False
    return record.fresh_for is None or age <= record.fresh_for


def _claim(path: Path) -> bool:
    # Whoever renames the record away owns it: two LOADs of one model at once
    # (explicit mode) cannot both take it. A once-record is never rewritten, so
    # the file renamed is the one just read. The claimed file stays (it goes with
    # the start directory): it tells a prefetch that the model's LOAD came first.
    claimed = path.with_name(f"{path.name}{CLAIMED}")
    try:
        os.rename(path, claimed)
    except OSError:
        return False
    return True


def claimed_at_start(location: Location, env: Mapping[str, str] | None = None) -> bool:
    """True when this start's record of ``location`` was already used by its LOAD.

    A prefetch of that model has nothing left to do: its own LOAD validated it.
    """
    start_dir = (os.environ if env is None else env).get(START_ENV, "")
    if not start_dir:
        return False
    return (Path(start_dir) / f"{record_name(location.url)}{CLAIMED}").exists()


def parse_record(text: str) -> ModelRecord | None:
    """A record from its file's text; None for anything not in this format."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            return None
        entries = data["entries"]
        fresh_for = data["fresh_for"]
        if not isinstance(entries, dict):
            return None
        return ModelRecord(
            start=str(data["start"]),
            source=str(data["source"]),
            entries=entries,
            listed_at=float(data["listed_at"]),
            fresh_for=None if fresh_for is None else float(fresh_for),
            once=bool(data["once"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
