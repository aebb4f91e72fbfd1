"""A miss with a shared tier: what the tier holds comes from it, the rest from the origin once.

:meth:`Tier.fetch` gets the files a snapshot lacks locally (the origin has
been listed already: it alone says what the model is). It reads the
snapshot's manifest from the tier, then for each file, in one job per blob:

1. **finished in the tier** (its record under its SHA-256 or its identity):
   read the chunks, in parallel, hashing SHA-256 (and the origin's MD5) as
   they stream; a chunk the tier cannot give comes from the origin instead; a
   blob that hashes wrong is logged, counted and fetched from the origin
   (and its chunks rewritten when they are this identity's): a miss for that
   blob, never a wrong model;
2. **being downloaded by another node** (a live claim): follow it, reading
   each chunk as soon as its leader has published it; if the claim goes stale,
   take it over and go on from the first chunk the tier lacks;
3. **nobody has it**: claim it and lead: fetch it from the origin in ranged
   chunks, publish each chunk as it arrives, check the origin's MD5 where it
   gave one, then publish the blob's record. The snapshot's manifest is
   published last (:meth:`Tier.publish_manifest`, after the local publish).

Whenever the tier fails (down, denied, slow), blobs fall back to the origin:
all of them through the ordinary download when the tier is down, one by one
through a few fleet-wide slots when a leader is too slow to follow. A tier
that failed is left alone for :data:`DOWN_FOR_S` before it is tried again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from cacheagent.errors import RemoteChangedError
from cacheagent.local.index import content_identity
from cacheagent.local.store import Store
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import FileEntry, Manifest
from cacheagent.settings import Settings
from cacheagent.tier import layout
from cacheagent.tier.backend import Backend
from cacheagent.tier.claims import (
    CLAIM_TTL_S,
    MAX_GENERATIONS,
    ClaimView,
    FallbackGate,
    Heartbeats,
    HeldClaim,
    TierError,
    try_claim,
)
from cacheagent.tier.errors import TierAccessDeniedError
from cacheagent.tier.hashing import HashingWriter
from cacheagent.tier.layout import BlobRecord, ClaimRecord, TierManifest

_log = logging.getLogger(__name__)

OriginFetch = Callable[[list[FileEntry]], dict[str, str]]
ProgressFn = Callable[[int], None]
CountFn = Callable[[str, int], None]

# Blobs handled at once by one node (each job may have many chunks in flight).
MAX_BLOB_JOBS = 8
# Bytes of chunks in flight or waiting to be hashed, across all blobs of a fetch.
WINDOW_BYTES = 256 * 1024 * 1024
# A follower whose leader published nothing for this long uses the origin instead.
FOLLOW_STALL_S = 60.0
# How long a follower waits for an origin fallback slot before going anyway.
SLOT_WAIT_S = 30.0
# After the tier failed, it is not tried again for this long (a dead endpoint
# would cost every LOAD its timeouts).
DOWN_FOR_S = 30.0
# Polling for a leader's next chunk: from quick to patient; its claim is read less often.
POLL_MIN_S, POLL_MAX_S = 0.02, 0.5
CLAIM_CHECK_S = 1.0
# A follower asks for this many of the next chunks at once.
FOLLOW_AHEAD = 4
# The longest wait for one tier request on the pool (each is bounded by its own
# timeout; this is the bound on top, should a pool be saturated).
WAIT_S = 120.0
_SHA_MEMORY = 100_000


@dataclass
class Fetched:
    """What :meth:`Tier.fetch` got: each path's local blob digest, and bytes by source."""

    digests: dict[str, str] = field(default_factory=dict)
    tier_bytes: int = 0
    origin_bytes: int = 0


class _Corrupt(Exception):
    """A blob read from the tier hashed wrong (handled inside a job)."""


class _Unavailable(Exception):
    """The tier failed for this blob: the ordinary origin download takes it."""


class Tier:
    """A shared tier: a backend plus this process's claims, heartbeats and memory."""

    def __init__(self, backend: Backend, node: str | None = None) -> None:
        self.backend = backend
        self.node = node or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.heartbeats = Heartbeats(backend)
        self.gate = FallbackGate(backend, self.heartbeats, self.node)
        self._sha: dict[str, str] = {}  # local xxh3 digest -> SHA-256, as learned here
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.read_only = False

    @property
    def url(self) -> str:
        """The tier's location (no secrets)."""
        return self.backend.url

    # -- fetching ------------------------------------------------------------------

    def fetch(
        self,
        loc: Location,
        manifest: Manifest,
        missing: list[FileEntry],
        store: Store,
        origin: OriginFetch,
        progress: ProgressFn | None,
        settings: Settings,
        count: CountFn,
    ) -> Fetched:
        """Fetch ``missing`` (entries of ``manifest``) into ``store``, from the tier where
        it can, else from the origin (``origin`` downloads entries the ordinary way).

        Raises what the origin download raises; tier failures are fallbacks, logged.
        """
        if not missing:
            return Fetched()
        if self.down():
            count("tier_fallbacks", len(missing))
            return _all_from_origin(missing, origin)
        try:
            known = self._manifest(manifest)
        except TierError as exc:
            self.note_failure(exc)
            count("tier_fallbacks", len(missing))
            return _all_from_origin(missing, origin)
        run = _Run(self, loc, store, settings, progress, count, known)
        return run.go(missing, origin)

    def down(self) -> bool:
        """True while a recent failure keeps this process off the tier."""
        return time.monotonic() < self._down_until

    def note_failure(self, exc: Exception) -> None:
        """Take a tier failure into account: a denied write makes this node read-only, an
        outage keeps it off the tier for a while (both logged once)."""
        if isinstance(exc, TierAccessDeniedError):
            # Often a read-only tier by design: reads go on, this node never leads.
            if not self.read_only:
                _log.warning("%s; this node only reads the tier from now on", exc)
            self.read_only = True
            return
        if not self.down():
            _log.warning("%s; not using the tier for %.0f s", exc, DOWN_FOR_S)
        self._down_until = time.monotonic() + DOWN_FOR_S

    def _manifest(self, manifest: Manifest) -> dict[str, str]:
        """``{relpath: sha256}`` from the tier's manifest of this snapshot (sizes checked)."""
        raw = self.backend.get(layout.manifest_key(manifest.key))
        found = TierManifest.parse(raw, manifest.key)
        if found is None:
            return {}
        sizes = {e.path: e.size for e in manifest.files}
        return {p: sha for p, (sha, size) in found.files.items() if sizes.get(p) == size}

    def remember(self, digest: str, sha256: str) -> None:
        """Record that local blob ``digest`` has this SHA-256 (for the manifest)."""
        with self._lock:
            if len(self._sha) >= _SHA_MEMORY:
                self._sha.clear()
            self._sha[digest] = sha256

    # -- publishing the manifest ------------------------------------------------------

    def publish_manifest(
        self, loc: Location, manifest: Manifest, digests: dict[str, str], store: Store
    ) -> None:
        """Write the snapshot's manifest to the tier unless it is there (after the local
        publish: every blob record it names is in the tier by then). Never raises."""
        if self.down() or self.read_only or not manifest.files:
            return
        key = layout.manifest_key(manifest.key)
        try:
            if self.backend.get(key) is not None:
                return
            files = {
                e.path: (self._sha256_of(loc, e, digests[e.path], store), e.size)
                for e in manifest.files
            }
            self.backend.create(key, TierManifest(manifest.key, loc.url, files).to_json())
        except TierError as exc:
            self.note_failure(exc)
        except OSError as exc:  # a local blob evicted meanwhile: no manifest this time
            _log.info("manifest of %s not published to the tier: %s", loc.url, exc)

    def _sha256_of(self, loc: Location, entry: FileEntry, digest: str, store: Store) -> str:
        with self._lock:
            known = self._sha.get(digest)
        if known:
            return known
        # A blob held locally before: the tier may know it by its identity...
        ident = layout.identity_key(content_identity(loc.url, entry))
        record = BlobRecord.parse(self.backend.get(layout.done_key(ident)))
        if record is not None and record.size == entry.size:
            return record.sha256
        # ...else hash the local copy (once: it is remembered).
        sha = _hash_file(store.blob_path(digest))
        self.remember(digest, sha)
        return sha


def _all_from_origin(entries: list[FileEntry], origin: OriginFetch) -> Fetched:
    digests = origin(entries)
    return Fetched(digests, 0, sum(e.size for e in entries))


def _hash_file(path: os.PathLike[str] | str) -> str:
    import hashlib

    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * 1024 * 1024):
            sha.update(block)
    return sha.hexdigest()


def origin_range(loc: Location, relpath: str, start: int, end: int, timeout: float) -> bytes:
    """Bytes [start, end) of ``relpath`` from the origin (the remote room's ranged read)."""
    from cacheagent.remote.listing import read_range

    return read_range(loc, relpath, start, end, timeout)


class _Run:
    """One :meth:`Tier.fetch`: its pools, its memory window, its byte counts."""

    def __init__(
        self,
        tier: Tier,
        loc: Location,
        store: Store,
        settings: Settings,
        progress: ProgressFn | None,
        count: CountFn,
        known: dict[str, str],
    ) -> None:
        self.tier, self.backend = tier, tier.backend
        self.loc, self.store, self.settings = loc, store, settings
        self.progress, self.count, self.known = progress, count, known
        window = max(1, min(2 * settings.concurrency, WINDOW_BYTES // layout.CHUNK))
        self.tokens = threading.Semaphore(window)
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self.tier_bytes = self.origin_bytes = 0
        self.chunks: ThreadPoolExecutor | None = None

    def go(self, missing: list[FileEntry], origin: OriginFetch) -> Fetched:
        ordered = sorted(missing, key=lambda e: e.size, reverse=True)
        digests: dict[str, str] = {}
        leftovers: list[FileEntry] = []
        jobs = min(MAX_BLOB_JOBS, len(ordered))
        with (
            ThreadPoolExecutor(self.settings.concurrency, "cacheagent-tier-chunk") as chunks,
            ThreadPoolExecutor(jobs, "cacheagent-tier-blob") as pool,
        ):
            self.chunks = chunks
            futures = {pool.submit(self._job, e, origin): e for e in ordered}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                self.failed.set()  # the other jobs stop at their next step
                wait(futures)
            errors = [f.exception() for f in futures if f.exception()]
            if errors:
                raise errors[0]  # type: ignore[misc]
            for future, entry in futures.items():
                digest = future.result()
                if digest is None:
                    leftovers.append(entry)
                else:
                    digests[entry.path] = digest
        if leftovers:
            self.count("tier_fallbacks", sum(1 for e in leftovers if e.size))
            got = _all_from_origin(leftovers, origin)
            digests.update(got.digests)
            self.origin_bytes += got.origin_bytes
        return Fetched(digests, self.tier_bytes, self.origin_bytes)

    # -- one blob --------------------------------------------------------------------

    def _job(self, entry: FileEntry, origin: OriginFetch) -> str | None:
        """The local digest of ``entry``'s blob, or None to leave it to the origin download."""
        if self.failed.is_set() or entry.size == 0 or self.tier.down():
            return None  # an empty file has nothing to share: the download makes it
        ident = layout.identity_key(content_identity(self.loc.url, entry))
        try:
            record = self._finished(entry, ident)
            if record is not None:
                try:
                    return self._read_finished(entry, record)
                except _Corrupt as exc:
                    self._damaged(entry, str(exc))
                    return self._repair(entry, ident, record)
            return self._claim_loop(entry, ident, origin)
        except _Corrupt as exc:
            self._damaged(entry, str(exc))
            return None
        except _Unavailable:
            return None
        except TierError as exc:
            self.tier.note_failure(exc)
            return None

    def _damaged(self, entry: FileEntry, why: str) -> None:
        _log.warning(
            "the shared tier's copy of %s/%s is damaged (%s); fetching it from the origin",
            self.loc.url,
            entry.path,
            why,
        )
        self.count("tier_corrupt", 1)

    def _finished(self, entry: FileEntry, ident: str) -> BlobRecord | None:
        """The tier's record of this blob when it is complete there: by the manifest's
        SHA-256 (the same bytes under any identity), else by its identity."""
        sha = self.known.get(entry.path)
        if sha is not None:
            record = BlobRecord.parse(self.backend.get(layout.blob_key(sha)))
            if record is not None and record.sha256 == sha and record.size == entry.size:
                return record
        record = BlobRecord.parse(self.backend.get(layout.done_key(ident)))
        if record is not None and record.size == entry.size:
            return record
        return None

    def _new_writer(self, entry: FileEntry) -> HashingWriter:
        return HashingWriter(self.store.new_blob(entry.size), md5=entry.content_md5 is not None)

    def _commit(self, writer: HashingWriter, sha256: str, counter: str) -> str:
        """Commit a verified blob locally; count where its bytes came from."""
        digest = writer.commit()
        self.tier.remember(digest, sha256)
        with self._lock:
            self.tier_bytes += writer.from_tier
            self.origin_bytes += writer.from_origin
        self.count(counter, 1)
        return digest

    def _read_finished(
        self,
        entry: FileEntry,
        record: BlobRecord,
        writer: HashingWriter | None = None,
        written: set[int] | None = None,
    ) -> str:
        """Read a finished blob's chunks (those ``writer`` lacks: before its first gap, and
        ``written``); verify; commit.

        Raises _Corrupt when the bytes hash wrong (the local blob is dropped).
        """
        writer = writer or self._new_writer(entry)
        try:
            first = writer.received // record.chunk
            count = layout.chunk_count(entry.size, record.chunk)
            self._pull(
                writer,
                record.chunk,
                [i for i in range(first, count) if i not in (written or ())],
                lambda i: self._tier_chunk_or_origin(entry, record, i, writer),
            )
            why = writer.mismatch(record.sha256, entry.content_md5)
            if why:
                raise _Corrupt(why)
            return self._commit(writer, record.sha256, "tier_blobs_read")
        except BaseException:
            writer.abort()
            raise

    def _tier_chunk_or_origin(
        self, entry: FileEntry, record: BlobRecord, index: int, writer: HashingWriter
    ) -> bytes:
        start, end = layout.chunk_range(index, entry.size, record.chunk)
        if not self.tier.down():
            try:
                data = self.backend.get(layout.part_key(record.ident, index))
            except TierError as exc:
                self.tier.note_failure(exc)
                data = None
            if data is not None and len(data) == end - start:
                writer.credit(tier=len(data))
                self._progress(len(data))
                return data
        # A chunk the tier lacks (or cannot give now) comes from the origin.
        return self._from_origin(entry, start, end, writer)

    def _from_origin(self, entry: FileEntry, start: int, end: int, writer: HashingWriter) -> bytes:
        data = origin_range(self.loc, entry.path, start, end, self.settings.timeout)
        writer.credit(origin=len(data))
        self._progress(len(data))
        return data

    def _progress(self, n: int) -> None:
        if self.progress:
            self.progress(n)

    # -- leading and following ------------------------------------------------------------

    def _claim_loop(self, entry: FileEntry, ident: str, origin: OriginFetch) -> str | None:
        view = ClaimView(self.backend, _claim_keys(ident))
        writer = self._new_writer(entry)
        try:
            return self._lead_or_follow(entry, ident, view, writer, origin)
        except BaseException:
            writer.abort()
            raise

    def _lead_or_follow(
        self,
        entry: FileEntry,
        ident: str,
        view: ClaimView,
        writer: HashingWriter,
        origin: OriginFetch,
    ) -> str | None:
        """Follow the blob's leader chunk by chunk; lead when there is none (or it died)."""
        chunk: int | None = None
        written: set[int] = set()
        stalled_at = time.monotonic() + FOLLOW_STALL_S
        poll, checked = POLL_MIN_S, 0.0
        while not self.failed.is_set():
            if chunk is None or time.monotonic() - checked >= CLAIM_CHECK_S:
                claim = view.refresh()
                checked = time.monotonic()
                if claim is None or view.stale():
                    if self.tier.read_only:
                        raise _Unavailable()  # this node never leads: the origin it is
                    digest = self._try_lead(entry, ident, view, claim, writer, written)
                    if digest is not None:
                        return digest
                    continue  # another node won: look again
                if chunk is None:
                    chunk = claim.chunk
                elif claim.chunk != chunk:
                    raise _Unavailable()  # a claim that contradicts its predecessor
            assert chunk is not None  # set by the first claim seen
            before = writer.received
            self._follow_chunks(entry, ident, chunk, writer, written)
            if writer.complete:
                record = BlobRecord.parse(self.backend.get(layout.done_key(ident)))
                if record is not None:
                    return self._verified(entry, record, writer)
            if writer.received > before:
                stalled_at, poll = time.monotonic() + FOLLOW_STALL_S, POLL_MIN_S
                continue
            if time.monotonic() > stalled_at:
                writer.abort()
                return self._origin_with_slot(entry, origin)
            time.sleep(poll)
            poll = min(POLL_MAX_S, poll * 2)
        raise _Unavailable()

    def _follow_chunks(
        self, entry: FileEntry, ident: str, chunk: int, writer: HashingWriter, written: set[int]
    ) -> None:
        """Read every chunk the leader has published that ``writer`` lacks, a few at once.

        The next :data:`FOLLOW_AHEAD` chunks are asked for in parallel (a leader
        publishes them in any order); each one found is written at once and never
        asked for again (``written``), so memory stays within those chunks.
        """
        count = layout.chunk_count(entry.size, chunk)
        while not writer.complete and not self.failed.is_set():
            assert self.chunks is not None
            first = writer.received // chunk
            wanted = [i for i in range(first, min(first + FOLLOW_AHEAD, count)) if i not in written]
            keys = {i: layout.part_key(ident, i) for i in wanted}
            asked = {i: self.chunks.submit(self.backend.get, key) for i, key in keys.items()}
            for index, future in asked.items():
                data = future.result(timeout=WAIT_S)
                if data is None:
                    continue
                start, end = layout.chunk_range(index, entry.size, chunk)
                if len(data) != end - start:
                    raise _Corrupt(f"chunk {index} holds {len(data)} bytes, not {end - start}")
                writer.write(start, data)
                written.add(index)
                writer.credit(tier=len(data))
                self._progress(len(data))
            if first not in written:
                return  # the next chunk is not there yet

    def _verified(self, entry: FileEntry, record: BlobRecord, writer: HashingWriter) -> str:
        """Commit a followed blob once it hashes to its leader's record (and the origin's MD5)."""
        why = writer.mismatch(record.sha256, entry.content_md5)
        if why:
            raise _Corrupt(why)
        return self._commit(writer, record.sha256, "tier_blobs_followed")

    def _try_lead(
        self,
        entry: FileEntry,
        ident: str,
        view: ClaimView,
        claim: ClaimRecord | None,
        writer: HashingWriter,
        written: set[int],
    ) -> str | None:
        """Claim the blob (first, or taking over a stale claim); lead it if we won.

        ``writer`` holds what this node followed so far (``written``: its chunks).
        """
        chunk = claim.chunk if claim is not None else layout.CHUNK
        record = ClaimRecord(self.tier.node, 0, chunk, entry.size, time.time())
        generation, won = try_claim(self.backend, view, record)
        if not won:
            if generation >= MAX_GENERATIONS:
                raise _Unavailable()  # too many takeovers: the origin download takes it
            return None
        held = self.tier.heartbeats.hold(layout.claim_key(ident, generation), record)
        if claim is not None:
            _log.warning(
                "took over the download of %s/%s from node %s (its claim %s); going on from "
                "byte %d",
                self.loc.url,
                entry.path,
                claim.owner,
                "was released" if claim.released else f"stood still for {CLAIM_TTL_S:.0f} s",
                writer.received,
            )
            self.count("tier_takeovers", 1)
        try:
            # Someone may have finished it between our look and our claim.
            finished = BlobRecord.parse(self.backend.get(layout.done_key(ident)))
            if finished is not None and finished.size == entry.size and finished.chunk == chunk:
                self.tier.heartbeats.release(held, done=True)
                return self._read_finished(entry, finished, writer, written)
            digest = self._lead(
                entry, ident, chunk, writer, held, written, resume=claim is not None
            )
        except BaseException:
            self.tier.heartbeats.release(held, done=False)
            raise
        self.tier.heartbeats.release(held, done=True, older=view.older_keys(generation))
        return digest

    def _lead(
        self,
        entry: FileEntry,
        ident: str,
        chunk: int,
        writer: HashingWriter,
        held: HeldClaim,
        written: set[int],
        *,
        resume: bool,
    ) -> str:
        """Fetch the chunks ``writer`` lacks from the origin, publishing each; then the record."""
        publishing = [not self.tier.read_only]

        def fetch(index: int) -> bytes:
            start, end = layout.chunk_range(index, entry.size, chunk)
            key = layout.part_key(ident, index)
            if resume and publishing[0]:
                # A dead leader may have published chunks past the ones we followed.
                got = self._quietly(lambda: self.backend.get(key), publishing, held)
                if isinstance(got, bytes) and len(got) == end - start:
                    writer.credit(tier=len(got))
                    self._progress(len(got))
                    return got
            data = self._from_origin(entry, start, end, writer)
            if publishing[0]:
                self._quietly(lambda: self.backend.create(key, data), publishing, held)
            return data

        first = writer.received // chunk
        count = layout.chunk_count(entry.size, chunk)
        self._pull(writer, chunk, [i for i in range(first, count) if i not in written], fetch)
        self._check_origin_md5(entry, writer)
        sha = writer.sha256()
        if publishing[0]:
            self._publish_record(BlobRecord(sha, entry.size, chunk, ident), publishing, held)
        return self._commit(writer, sha, "tier_blobs_led")

    def _check_origin_md5(self, entry: FileEntry, writer: HashingWriter) -> None:
        why = writer.mismatch(None, entry.content_md5)
        if why:
            raise RemoteChangedError(
                f"{self.loc.url}/{entry.path} arrived from the origin but {why}: it changed "
                "while it was being downloaded, or was damaged on the way; load the model again",
                url=f"{self.loc.url}/{entry.path}",
                path=entry.path,
            )

    def _publish_record(
        self, record: BlobRecord, publishing: list[bool], held: HeldClaim | None
    ) -> None:
        """The finished blob's record: under its identity (replacing a wrong one), then
        under its SHA-256 (kept if there: the same bytes under another identity)."""
        done = layout.done_key(record.ident)
        self._quietly(lambda: self.backend.put(done, record.to_json()), publishing, held)
        by_sha = layout.blob_key(record.sha256)
        self._quietly(lambda: self.backend.create(by_sha, record.to_json()), publishing, held)

    def _quietly(
        self,
        call: Callable[[], object],
        publishing: list[bool],
        held: HeldClaim | None = None,
    ) -> object:
        """A tier write of a leader: on failure stop publishing, keep downloading.

        The claim ``held`` is given up then, so that followers do not wait for
        chunks that will never come: they take over (and publish) or time out.
        """
        try:
            return call()
        except TierError as exc:
            if publishing[0]:
                _log.warning("%s; this node goes on from the origin without publishing", exc)
                if held is not None:
                    self.tier.heartbeats.release(held, done=False)
            publishing[0] = False
            self.tier.note_failure(exc)
            return None

    def _repair(self, entry: FileEntry, ident: str, record: BlobRecord) -> str:
        """Fetch a damaged blob from the origin; rewrite its chunks when they are this
        identity's (so the next node reads them intact)."""
        writer = self._new_writer(entry)
        publishing = [record.ident == ident and not self.tier.read_only]

        def fetch(index: int) -> bytes:
            start, end = layout.chunk_range(index, entry.size, record.chunk)
            data = self._from_origin(entry, start, end, writer)
            if publishing[0]:
                key = layout.part_key(ident, index)
                self._quietly(lambda: self.backend.put(key, data), publishing)
            return data

        try:
            count = layout.chunk_count(entry.size, record.chunk)
            self._pull(writer, record.chunk, list(range(count)), fetch)
            self._check_origin_md5(entry, writer)
            sha = writer.sha256()
            if sha != record.sha256:
                _log.warning(
                    "the shared tier records %s/%s as SHA-256 %s but the origin's bytes hash "
                    "to %s; the origin's are used",
                    self.loc.url,
                    entry.path,
                    record.sha256,
                    sha,
                )
                if publishing[0]:
                    wrong = layout.blob_key(record.sha256)
                    self._quietly(lambda: self.backend.delete(wrong), publishing)
                    fixed = BlobRecord(sha, entry.size, record.chunk, ident)
                    self._publish_record(fixed, publishing, None)
            return self._commit(writer, sha, "tier_blobs_led")
        except BaseException:
            writer.abort()
            raise

    def _origin_with_slot(self, entry: FileEntry, origin: OriginFetch) -> str:
        """The whole blob from the origin, holding one of the fleet's fallback slots."""
        _log.warning(
            "the node downloading %s/%s published nothing for %.0f s; fetching it from the origin",
            self.loc.url,
            entry.path,
            FOLLOW_STALL_S,
        )
        with self.tier.gate.slot(SLOT_WAIT_S):
            digests = origin([entry])
        with self._lock:
            self.origin_bytes += entry.size
        self.count("tier_fallbacks", 1)
        return digests[entry.path]

    # -- chunks ------------------------------------------------------------------------

    def _pull(
        self,
        writer: HashingWriter,
        chunk: int,
        indices: list[int],
        read: Callable[[int], bytes],
    ) -> None:
        """Read chunks ``indices`` with ``read`` on the chunk pool, into ``writer``.

        At most the window's chunks are in flight or waiting to be hashed (a
        token is taken per chunk and given back once it is hashed); the first
        failure stops the others and is raised.
        """
        assert self.chunks is not None
        futures: list[Future[None]] = []
        tally = _Tally()

        def one(index: int) -> None:
            try:
                data = read(index)
                hashed, _done = writer.write(index * chunk, data)
            except BaseException:
                self._give_back(tally, 1)
                raise
            self._give_back(tally, hashed)

        try:
            for index in indices:
                while not self.tokens.acquire(timeout=0.2):
                    if self.failed.is_set():
                        break
                if self.failed.is_set():
                    break
                tally.taken += 1
                futures.append(self.chunks.submit(one, index))
                if any(f.done() and f.exception() for f in futures[-4:]):
                    break
            wait(futures)
        finally:
            # Chunks left waiting to be hashed behind a failed one still hold tokens.
            with tally.lock:
                owed, tally.given = tally.taken - tally.given, tally.taken
            for _ in range(max(0, owed)):
                self.tokens.release()
        errors = [f.exception() for f in futures if f.exception()]
        if errors:
            raise errors[0]  # type: ignore[misc]
        if self.failed.is_set():
            raise _Unavailable()

    def _give_back(self, tally: _Tally, n: int) -> None:
        with tally.lock:
            n = min(n, tally.taken - tally.given)
            tally.given += n
        for _ in range(n):
            self.tokens.release()


@dataclass
class _Tally:
    """Tokens one :meth:`_Run._pull` took and gave back."""

    taken: int = 0
    given: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _claim_keys(ident: str) -> Callable[[int], str]:
    def key(generation: int) -> str:
        return layout.claim_key(ident, generation)

    return key
