"""Download the files a snapshot is missing, concurrently, hashing as bytes arrive.

Every file is cut into ranged parts of ``part_size`` bytes (a small file is
one part). One pool of ``concurrency`` threads fetches parts of all files at
once, so many small files and one large file both keep the link full. A
window of tokens bounds the parts held in memory: a token is taken before a
part is requested and given back only once the part has been hashed, so
memory stays below ``window * part_size`` whatever the file sizes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cacheagent.local.store import BlobWriter, Store
from cacheagent.remote.listing import read_range
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import FileEntry

if TYPE_CHECKING:  # fsspec costs 70 ms to import; a hit never needs it
    from concurrent.futures import Future

    import fsspec

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
    """How hard to pull: parallel requests and the size of each ranged part."""

    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE

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
class _Part:
    entry: FileEntry
    writer: BlobWriter
    start: int
    end: int


class _Download:
    """One run of :func:`download`: shared state between the pool's threads."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem | None,
        location: Location,
        store: Store,
        settings: FetchSettings,
        progress: ProgressFn | None,
    ) -> None:
        self.fs, self.location, self.store = fs, location, store
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
            for start in range(0, entry.size, part_size):
                yield _Part(entry, writer, start, min(start + part_size, entry.size))

    def fetch_part(self, part: _Part) -> None:
        if self.failed.is_set():
            self.tokens.release()
            return
        try:
            data = read_range(self.fs, self.location, part.entry.path, part.start, part.end)
            hashed, done = part.writer.write(part.start, data)
        except BaseException:
            self.failed.set()
            self.tokens.release()
            raise
        # Parts still waiting to be hashed keep their token: that is the memory bound.
        for _ in range(hashed):
            self.tokens.release()
        if self.progress:
            self.progress(len(data))
        if done:
            self.finish(part.entry, part.writer)

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
    fs: fsspec.AbstractFileSystem | None,
    location: Location,
    entries: list[FileEntry],
    store: Store,
    settings: FetchSettings | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, str]:
    """Fetch ``entries`` into blobs; return each relative path's blob digest.

    On any failure every partial blob is removed and the first error is raised.
    """
    run = _Download(fs, location, store, settings or FetchSettings(), progress)
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
                while not run.tokens.acquire(timeout=0.2):
                    if run.failed.is_set():
                        break
                if run.failed.is_set():
                    break
                futures.append(pool.submit(run.fetch_part, part))
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            run.failed.set()
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
