"""Advisory file locks between processes sharing one cache directory.

They save work (two processes wanting the same model download it once) and
keep eviction from deleting what a fetch is about to link. Correctness of
what lands on disk never rests on them: that comes from unique temp names
and atomic renames.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cacheagent.errors import CacheAgentError, CacheFullError

_log = logging.getLogger(__name__)


# Locks guard local bookkeeping (milliseconds) or another process's download of the
# same model; waits past this are logged, and every wait has a bound.
DEFAULT_LOCK_TIMEOUT = 120.0
_LOG_AFTER = 1.0
_POLL = 0.05


class LockTimeoutError(CacheAgentError, TimeoutError):
    """A lock stayed held by another process for longer than the wait allowed."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.lock_path = path


@contextlib.contextmanager
def file_lock(
    path: Path,
    *,
    shared: bool = False,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    what: str = "",
) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing) for the duration of the block.

    Waits at most ``timeout`` seconds, then raises :class:`LockTimeoutError`; a wait
    of over a second is logged once, naming ``what`` the lock protects.
    """
    fd = _open_lock_file(path)
    try:
        _acquire(fd, path, shared, timeout, what or path.name)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _open_lock_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            return os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            # A symlink planted in locks/ would make O_CREAT create (and flock open)
            # its target outside the cache: drop the link itself and use a plain file.
            os.unlink(path)
            return os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = CacheFullError(
            f"cannot create the lock file {path}: the disk holding it is full (no bytes or "
            "inodes left); free space or inodes on it, lower max_size, or move cache_dir"
        )
        full.errno = exc.errno
        raise full from exc


def _acquire(fd: int, path: Path, shared: bool, timeout: float, what: str) -> None:
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    started = time.monotonic()
    logged = False
    while True:
        try:
            fcntl.flock(fd, mode)
            break
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited >= timeout:
                raise LockTimeoutError(
                    f"gave up after {waited:.0f} s waiting for the lock on {what} ({path}), "
                    "held by another process; if no cacheagent process is running, the "
                    "holder is stuck: stop it and retry",
                    path,
                ) from None
            if not logged and waited >= _LOG_AFTER:
                _log.info("waiting for the lock on %s, held by another process", what)
                logged = True
            time.sleep(_POLL)
    if logged:
        _log.info("got the lock on %s after %.1f s", what, time.monotonic() - started)
