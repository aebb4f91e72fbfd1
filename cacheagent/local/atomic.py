"""The one durable, atomic file writer: readers see the old content or the new, never half.

Every file cacheagent writes whole (stub configs, metrics files, snapshot
records, the installed Triton shim and launcher) goes through
:func:`write_atomically`:

1. a unique temp file is created exclusively in the target's directory
   (``O_EXCL``: never through a planted symlink, never someone else's file);
2. the data is written, the mode set, and the file fsynced;
3. it is renamed over the target, which replaces the name itself (a symlink at
   the target is replaced, not followed), and never changes an inode in place:
   a process that has the old file open or mapped (Triton and its ``.so``)
   keeps the old bytes;
4. the directory is fsynced, so the rename survives a power cut too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from cacheagent.errors import CacheFullError

_log = logging.getLogger(__name__)


def write_atomically(
    path: Path, data: str | bytes, *, mode: int = 0o644, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) atomically; fsync file and dir if ``durable``.

    ``mode`` is set exactly (the umask does not apply): the default 0644 suits
    files read by other users (Triton, a metrics collector). Raises
    :class:`CacheFullError` when the disk has no room, and leaves no temp file.
    """
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _disk_full(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise _disk_full(exc, path) from exc
        raise
    if durable:
        fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (mode 0644)."""
    write_atomically(path, text)


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Have the kernel start writing ``length`` bytes at ``offset`` of ``fd`` to disk soon.

    A hint, not a guarantee (durability still comes from the fsync that follows):
    Linux keeps freshly written data dirty in memory for up to 30 s, so a blob
    downloaded in seconds would otherwise all be flushed by its commit's fsync,
    about 0.45 s for 1 GiB here, with the model's load waiting on it. Started as
    the data lands, that writeback overlaps the download and the fsync finds
    little left to do. The pages stay cached for Triton to read.

    The call itself (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``) can
    block while the disk's queue is full, so it runs on one background thread,
    on a duplicate of ``fd`` (the caller may close its own at once); this only
    queues it. Returns False, doing nothing, off Linux, when ``length`` is 0,
    when ``fd`` is not open, or when 64 requests are already queued (the disk is
    behind: the fsync will do it).
    """
    call = _sync_file_range()
    if call is None or length <= 0:
        return False
    return _writeback().submit(call, fd, offset, length)


def wait_for_writeback(timeout: float) -> bool:
    """Wait up to ``timeout`` s until every queued writeback hint has been handed over."""
    return _writeback().drain(timeout)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_WRITEBACK_QUEUE = 64


@functools.cache
def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only a cache fill gets here

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not glibc/musl, or a libc without it
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


class _Writeback:
    """One daemon thread making the queued ``sync_file_range`` calls (ctypes drops the GIL)."""

    def __init__(self) -> None:
        import queue  # only a cache fill gets here

        self._queue: queue.Queue[tuple[Any, int, int, int] | threading.Event] = queue.Queue(
            _WRITEBACK_QUEUE
        )
        self._full = queue.Full
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, call: Any, fd: int, offset: int, length: int) -> bool:
        try:
            dup = os.dup(fd)
        except OSError:
            return False
        try:
            self._queue.put_nowait((call, dup, offset, length))
        except self._full:
            os.close(dup)
            return False
        self._ensure_thread()
        return True

    def drain(self, timeout: float) -> bool:
        marker = threading.Event()
        try:
            self._queue.put(marker, timeout=timeout)
        except self._full:
            return False
        self._ensure_thread()
        return marker.wait(timeout)

    def _ensure_thread(self) -> None:
        with self._lock:
            # is_alive() is False in a child after fork(): the child starts its own.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="cacheagent-writeback", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            call, fd, offset, length = item
            try:
                if int(call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)) != 0:
                    import ctypes  # loaded already: _sync_file_range made ``call``

                    _log.debug(
                        "writeback hint refused for fd %d (errno %d)", fd, ctypes.get_errno()
                    )
            finally:
                os.close(fd)


@functools.cache
def _writeback() -> _Writeback:
    """The process's one writeback thread and queue, built on first use (a hit never is)."""
    return _Writeback()


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (and FUSE mounts) cannot fsync a directory: the data
        # itself is already durable, so this is no reason to fail the write.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _disk_full(exc: OSError, path: Path) -> OSError:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    full = CacheFullError(
        f"cannot write {path}: the disk holding it is full (no bytes or inodes left); "
        "free space on that disk and try again"
    )
    full.errno = exc.errno
    return full
