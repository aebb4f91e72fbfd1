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
import os
import tempfile
from pathlib import Path

from cacheagent.errors import CacheFullError


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
