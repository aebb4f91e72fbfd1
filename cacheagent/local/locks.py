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
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing) for the duration of the block."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        # A symlink planted in locks/ would make O_CREAT create (and flock open)
        # its target outside the cache: drop the link itself and use a plain file.
        os.unlink(path)
        fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
