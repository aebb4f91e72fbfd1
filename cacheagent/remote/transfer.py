"""Download the files a snapshot is missing, concurrently, hashing as bytes arrive.

Every file is cut into ranged parts of ``part_size`` bytes (a small file is
one part). One pool of ``concurrency`` threads fetches parts of all files at
once, so many small files and one large file both keep the link full. A
window of tokens bounds the parts held in memory: a token is taken before a
part is requested and given back only once the part has been hashed, so
memory stays below ``window * part_size`` whatever the file sizes.

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

from cacheagent.local.store import BlobWriter, Store
from cacheagent.remote.listing import WholeObject, read_part
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import FileEntry
from cacheagent.settings import DEFAULT_TIMEOUT

if TYPE_CHECKING:  # a hit never needs a pool (see download)
    from concurrent.futures import Future

_log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]

# Defaults. Real object stores give roughly 50-100 MB/s per connection and
# tens of ms per request, so 8 concurrent 8 MiB parts keep about 8 requests'
# worth of latency hidden and fill a multi-Gbit link, while holding at most
# 2 * 8 * 8 MiB = 128 MiB of parts in memory.
DEFAULT_CONCURRENCY = 8
DEFAULT_PART_SIZE = 8 * 1024 * 1024
WINDOW_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class FetchSettings:
    """How hard to pull: parallel requests, the size of each ranged part, and how long
    one ranged read may take in all (seconds, retries included)."""

    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE
    timeout: float = DEFAULT_TIMEOUT

    @property
    def window(self) -> int:
        """Parts that may be in flight or waiting to be hashed at once.

        Twice the concurrency keeps every connection busy while earlier parts
        wait to be hashed, but never more than WINDOW_BYTES of parts: with big
        parts and high concurrency, 2 x 16 x 32 MiB measured 824 MiB of RSS.
        """
        by_memory = max(1, WINDOW_BYTES // self.part_size)
        return max(self.concurrency, min(2 * self.concurrency, by_memory))


@dataclass
class _File:
    """One file being downloaded: its blob, and which parts are already in it.

    ``claimed`` holds the offsets of parts written (a part is claimed and written
    under ``lock``, so every claimed part is in the blob). ``streaming`` is set
    once a server answered a ranged GET with the whole object: that one answer
    then fills the blob and the file's other parts are not requested.
    """

    entry: FileEntry
    writer: BlobWriter
    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: set[int] = field(default_factory=set)
    streaming: bool = False


@dataclass
class _Part:
    file: _File
    start: int
    end: int


class _Download:
    """One run of :func:`download`: shared state between the pool's threads.

    Memory is bounded by tokens: a token is taken before a part is requested
    and given back once the part is hashed. Chunks of a whole-object answer are
    written in order, so each is hashed at once and holds no token of its own.
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
        self.tokens = threading.Semaphore(settings.window)
        self.failed = threading.Event()
        self.digests: dict[str, str] = {}
        self.writers: list[BlobWriter] = []
        self.lock = threading.Lock()

    def parts(self, entries: list[FileEntry]) -> Iterator[_Part]:
        part_size = self.settings.part_size
        for entry in entries:
            writer = self.store.new_blob(entry.size)
            with self.lock:
                self.writers.append(writer)
            if entry.size == 0:
                self.finish(entry, writer)
                continue
            file = _File(entry, writer)
            for start in range(0, entry.size, part_size):
                yield _Part(file, start, min(start + part_size, entry.size))

    def fetch_part(self, part: _Part) -> None:
        if self.failed.is_set() or part.file.streaming:
            self.tokens.release()
            return
        entry = part.file.entry
        try:
            got = read_part(
                self.location, entry.path, part.start, part.end, entry.size, self.settings.timeout
            )
            if isinstance(got, WholeObject):
                self.stream(part.file, got)
                return
            self.store_part(part.file, part.start, got, holds_token=True)
        except BaseException:
            self.failed.set()
            self.tokens.release()
            raise

    def store_part(self, file: _File, offset: int, data: bytes, *, holds_token: bool) -> None:
        """Write one part unless it is already in the blob; free the tokens hashing frees."""
        with file.lock:
            if offset in file.claimed:
                if holds_token:
                    self.tokens.release()
                return
            file.claimed.add(offset)
            hashed, done = file.writer.write(offset, data)
        # Parts still waiting to be hashed keep their token: that is the memory bound.
        # A chunk of a whole-object answer is hashed at once and never held a token.
        for _ in range(hashed if holds_token else hashed - 1):
            self.tokens.release()
        if self.progress:
            self.progress(len(data))
        if done:
            self.finish(file.entry, file.writer)

    def stream(self, file: _File, whole: WholeObject) -> None:
        """Fill ``file``'s blob from one whole-object answer, a part's worth at a time.

        Runs on the part's thread and keeps its token until the end (the caller
        releases it on failure). Parts that other threads already wrote are read
        past; the stream stops as soon as the blob is complete.
        """
        entry, part_size = file.entry, self.settings.part_size
        with file.lock:
            already, file.streaming = file.streaming, True
        if already:  # another thread streams this file: drop this answer unread
            whole.close()
            self.tokens.release()
            return
        try:
            _log.warning(
                "cacheagent: %s/%s was answered whole to a ranged GET (storage ignores Range): "
                "streaming it from that one answer",
                self.location.url,
                entry.path,
            )
            for offset in range(0, entry.size, part_size):
                if self.failed.is_set() or file.writer.complete:
                    break
                data = whole.read(min(part_size, entry.size - offset), self.settings.timeout)
                self.store_part(file, offset, data, holds_token=False)
        finally:
            whole.close()
        self.tokens.release()

    def finish(self, entry: FileEntry, writer: BlobWriter) -> None:
        digest = writer.commit()
        with self.lock:
            self.digests[entry.path] = digest
            self.writers.remove(writer)

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
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    futures: list[Future[None]] = []
    with ThreadPoolExecutor(
        run.settings.concurrency, thread_name_prefix="cacheagent-fetch"
    ) as pool:
        try:
            for part in run.parts(ordered):
                if part.file.streaming:
                    continue  # one whole-object answer is filling this file
                while not run.tokens.acquire(timeout=0.2):
                    if run.failed.is_set():
                        break
                if run.failed.is_set():
                    break
                futures.append(pool.submit(run.fetch_part, part))
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # E.g. creating a temp blob failed (disk out of inodes): let the parts in
            # flight stop, then drop every partial blob, or their files and fds leak.
            run.failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            run.abort()
            raise
        finally:
            if run.failed.is_set():
                for future in futures:
                    future.cancel()
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors or run.failed.is_set():
        run.abort()
        if errors:
            raise errors[0]  # type: ignore[misc]
        raise RuntimeError("download aborted")
    return run.digests
