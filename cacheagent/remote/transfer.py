"""Download the files a snapshot is missing, concurrently, hashing as bytes arrive.

Every file is cut into ranged parts (a small file is one part), and parts of
all files are fetched at once, so many small files and one large file both keep
the link full. How many requests run at once adapts to the link
(:mod:`cacheagent.remote.pacing`): it starts small and doubles while the bytes
per second keep growing, up to ``concurrency``. Every download to one storage
endpoint in a process shares that number and one memory budget (a LOAD and the
prefetch of its siblings fill the link together, not each on its own). Memory is
taken before a part is requested and given back once the part is hashed, so it
stays bounded whatever the file sizes and the number of downloads.

Each ranged read is one storage operation with its own ``timeout`` (retries
included, see :mod:`cacheagent.remote.listing`). A server that ignores Range
answers a ranged GET with the whole object: that one answer is then streamed
into the blob a part's worth at a time, the file's other parts are not
requested, and answers already in flight are dropped unread, so the object
crosses the network about once instead of once per part.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cacheagent.errors import RemoteChangedError
from cacheagent.local.store import BlobWriter, Store
from cacheagent.remote.listing import WholeObject, read_tagged_part
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import FileEntry, contradicts_listing
from cacheagent.remote.pacing import MIN_PART, Link, link_for, part_size_for
from cacheagent.settings import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, DEFAULT_TIMEOUT

if TYPE_CHECKING:  # a hit never needs a pool (see download)
    from concurrent.futures import Future

_log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class FetchSettings:
    """How hard to pull: the cap on parallel requests, the largest ranged part, and
    how long one ranged read may take in all (seconds, retries included)."""

    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE
    timeout: float = DEFAULT_TIMEOUT

    def part_bytes(self, in_flight: int) -> int:
        """The size of the next ranged part when ``in_flight`` requests may run at once.

        Large while few requests run (fewer round trips on a fast link), down to
        1 MiB as the number grows (they share one memory budget).
        """
        return part_size_for(in_flight, self.part_size)


@dataclass
class _File:
    """One file being downloaded: its blob, and which parts are already in it.

    ``claimed`` holds the byte ranges written (a range is claimed and written
    under ``lock``, so every claimed range is in the blob, and no byte is written
    twice: the hash runs over each byte once, in order). ``streaming`` is set
    once a server answered a ranged GET with the whole object: that one answer
    then fills the blob and the file's other parts are not requested.
    """

    entry: FileEntry
    # Created by the first part that arrives, on that part's thread: creating
    # hundreds of temp files on the loop that submits parts would serialize them
    # behind the GIL while the pool's threads hold it.
    writer: BlobWriter | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: list[tuple[int, int]] = field(default_factory=list)

    def overlaps(self, start: int, end: int) -> bool:
        """True if any byte of [start, end) is already claimed."""
        return any(s < end and start < e for s, e in self.claimed)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The unclaimed pieces of [start, end), in order."""
        pieces, at = [], start
        for s, e in sorted(self.claimed):
            if e <= at or s >= end:
                continue
            if s > at:
                pieces.append((at, s))
            at = max(at, e)
        if at < end:
            pieces.append((at, end))
        return pieces

    streaming: bool = False

    @property
    def complete(self) -> bool:
        """True once every byte is in the blob and hashed."""
        return self.writer is not None and self.writer.complete


@dataclass
class _Part:
    file: _File
    start: int
    end: int


class _Download:
    """One run of :func:`download`: shared state between the pool's threads.

    Memory is bounded by the link's budget: a part's bytes are taken before it
    is requested and given back once they are hashed. Chunks of a whole-object
    answer are written in order, so each is hashed at once and holds nothing.
    """

    def __init__(
        self,
        location: Location,
        store: Store,
        settings: FetchSettings,
        progress: ProgressFn | None,
    ) -> None:
        self.location, self.store = location, store
        self.settings, self.progress = settings, progress
        self.link: Link = link_for(_endpoint(location))
        self.failed = threading.Event()
        self.held = 0  # bytes of the link's memory this download holds
        self.digests: dict[str, str] = {}
        self.writers: list[BlobWriter] = []
        self.lock = threading.Lock()

    def parts(self, entries: list[FileEntry]) -> Iterator[_Part]:
        for entry in entries:
            file = _File(entry)
            if entry.size == 0:
                with file.lock:
                    self.finish(entry, self.writer_of(file))
                continue
            start = 0
            while start < entry.size:
                # Sized when cut: parts cut after the link has shown it needs many
                # requests at once are smaller, so they all fit the memory budget.
                end = min(start + self.next_part(entry.size - start), entry.size)
                yield _Part(file, start, end)
                start = end

    def next_part(self, remaining: int) -> int:
        """Bytes of the next part of a file with ``remaining`` bytes left to cut.

        While the link is still being measured, parts are the smallest (1 MiB), so
        each round of measurement is short even on a slow link. Then they are as
        large as the memory budget's share of each request allows, but small
        enough that a file alone keeps every allowed request busy, twice over.
        """
        if not self.link.limit.settled:
            return MIN_PART
        limit = self.link.limit.limit
        spread = max(MIN_PART, (remaining // (2 * limit) // MIN_PART) * MIN_PART)
        return min(self.settings.part_bytes(limit), spread)

    def writer_of(self, file: _File) -> BlobWriter:
        """``file``'s blob writer, created on first use (the caller holds ``file.lock``)."""
        if file.writer is None:
            writer = self.store.new_blob(file.entry.size)
            with self.lock:
                self.writers.append(writer)
            file.writer = writer
        return file.writer

    def fetch_part(self, part: _Part) -> None:
        size = part.end - part.start
        if self.failed.is_set() or part.file.streaming:
            self.link.request_done(None)
            self.free(size)
            return
        entry = part.file.entry
        delivered: int | None = None
        began = self.link.now()
        try:
            got, etag = read_tagged_part(
                self.location, entry.path, part.start, part.end, entry.size, self.settings.timeout
            )
            if contradicts_listing(entry, etag):
                if isinstance(got, WholeObject):
                    got.close()
                raise _replaced(self.location, entry, etag)
            if isinstance(got, WholeObject):
                self.stream(part.file, got, size)
                return
            delivered = len(got)
            self.store_part(part.file, part.start, got)
        except BaseException:
            self.failed.set()
            self.free(size)
            raise
        finally:
            self.link.request_done(delivered, began)

    def store_part(self, file: _File, offset: int, data: bytes) -> None:
        """Write one part unless a whole-object stream wrote it; free what hashing frees."""
        with file.lock:
            if file.overlaps(offset, offset + len(data)):
                self.free(len(data))
                return
            file.claimed.append((offset, offset + len(data)))
            writer = self.writer_of(file)
            before = writer.hashed_bytes
            _hashed, done = writer.write(offset, data)
            freed = writer.hashed_bytes - before
        # Parts still waiting to be hashed keep their memory: that is the bound.
        self.free(freed)
        self._wrote(file, len(data), done)

    def store_stream(self, file: _File, offset: int, data: bytes) -> None:
        """Write the bytes of a whole-object chunk that no part has written yet.

        The stream runs from the start of the file, so everything before the chunk
        is written and the chunk is hashed at once: it holds no memory of its own.
        """
        with file.lock:
            pieces = file.gaps(offset, offset + len(data))
            file.claimed.extend(pieces)
            writer = self.writer_of(file)
            before = writer.hashed_bytes
            done = False
            for start, end in pieces:
                done = writer.write(start, data[start - offset : end - offset])[1] or done
            freed = writer.hashed_bytes - before
        written = sum(end - start for start, end in pieces)
        self.free(freed - written)  # what the chunk unblocked of parts held in memory
        self._wrote(file, written, done)

    def _wrote(self, file: _File, nbytes: int, done: bool) -> None:
        if self.progress and nbytes:
            self.progress(nbytes)
        if done:
            assert file.writer is not None  # it wrote the last byte
            self.finish(file.entry, file.writer)

    def stream(self, file: _File, whole: WholeObject, held: int) -> None:
        """Fill ``file``'s blob from one whole-object answer, a part's worth at a time.

        Runs on the part's thread and keeps the part's memory (``held`` bytes)
        until the end (the caller frees it on failure). Parts that other threads
        already wrote are read past; the stream stops once the blob is complete.
        """
        entry, chunk = file.entry, self.settings.part_size
        with file.lock:
            already, file.streaming = file.streaming, True
        if already:  # another thread streams this file: drop this answer unread
            whole.close()
            self.free(held)
            return
        try:
            _log.warning(
                "cacheagent: %s/%s was answered whole to a ranged GET (storage ignores Range): "
                "streaming it from that one answer",
                self.location.url,
                entry.path,
            )
            offset = 0
            while offset < entry.size and not (self.failed.is_set() or file.complete):
                data = whole.read(min(chunk, entry.size - offset), self.settings.timeout)
                if not data:
                    raise RemoteChangedError(
                        f"{self.location.url}/{entry.path} ended after {offset} of {entry.size} "
                        "bytes: the object changed while it was being downloaded; retry the load",
                        url=self.location.url,
                    )
                self.store_stream(file, offset, data)
                offset += len(data)
        finally:
            whole.close()
        self.free(held)

    def finish(self, entry: FileEntry, writer: BlobWriter) -> None:
        digest = writer.commit()
        with self.lock:
            self.digests[entry.path] = digest
            self.writers.remove(writer)

    def take(self, nbytes: int) -> bool:
        """Wait for a request slot and ``nbytes`` of memory on the shared link."""
        if not self.link.acquire(nbytes, self.failed):
            return False
        with self.lock:
            self.held += nbytes
        return True

    def free(self, nbytes: int) -> None:
        """Give back memory this download held (a part hashed or dropped)."""
        if nbytes <= 0:
            return
        with self.lock:
            nbytes = min(nbytes, self.held)
            self.held -= nbytes
        if nbytes > 0:
            self.link.release_bytes(nbytes)

    def settle(self, futures: list[Future[None]]) -> None:
        """After the pool is done: free the slots of parts never run, and all memory left.

        The link outlives this download (the next one shares it), so nothing a
        failed or cancelled part took may stay taken.
        """
        for future in futures:
            if future.cancelled():
                self.link.request_done(None)
        self.free(self.held)

    def abort(self) -> None:
        with self.lock:
            for writer in self.writers:
                writer.abort()
            self.writers.clear()


def download(
    location: Location,
    entries: list[FileEntry],
    store: Store,
    settings: FetchSettings | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, str]:
    """Fetch ``entries`` into blobs; return each relative path's blob digest.

    On any failure every partial blob is removed and the first error is raised.
    """
    run = _Download(location, store, settings or FetchSettings(), progress)
    # Largest first: the long transfers start early and small files fill the gaps.
    ordered = sorted(entries, key=lambda e: e.size, reverse=True)
    # Imported here: a worker answering hits never needs a pool (see actions.py).
    from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, wait

    futures: list[Future[None]] = []
    run.link.begin(run.settings.concurrency)
    try:
        try:
            for part in run.parts(ordered):
                if part.file.streaming:
                    continue  # one whole-object answer is filling this file
                if not run.take(part.end - part.start):
                    break
                futures.append(run.link.submit(run.fetch_part, part))
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # E.g. an interrupt: let the parts in flight stop, then drop every
            # partial blob, or their files and fds leak.
            run.failed.set()
            raise
        finally:
            if run.failed.is_set():
                for future in futures:
                    future.cancel()
            # The pool is the link's (other downloads share it): wait for this
            # download's own parts, so none writes to a blob after it is dropped.
            wait(futures, return_when=ALL_COMPLETED)
    except BaseException:
        run.abort()
        raise
    finally:
        run.settle(futures)
        run.link.end()
    _log.debug(
        "fetched %d file(s) of %s with up to %d requests in flight",
        len(entries),
        location.url,
        run.link.limit.peak,
    )
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors or run.failed.is_set():
        run.abort()
        if errors:
            raise errors[0]  # type: ignore[misc]
        raise RuntimeError("download aborted")
    return run.digests


def _replaced(location: Location, entry: FileEntry, etag: str | None) -> RemoteChangedError:
    url = f"{location.url}/{entry.path}"
    return RemoteChangedError(
        f"{url} changed while it was being downloaded: it answered with ETag {etag} where "
        f"its listing said {entry.fingerprint}; nothing of it is kept; load the model again "
        "once the upload has finished",
        url=url,
        path=entry.path,
    )


def _endpoint(location: Location) -> str:
    """What downloads share a link by: the storage host or bucket of a location."""
    return "/".join(location.url.split("/")[:3])
