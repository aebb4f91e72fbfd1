"""A tier on a shared filesystem path (NFS, CephFS, EFS, a hostPath every node mounts).

Objects are plain files below the root. Every write goes to a unique temp
file in ``<root>/tmp/`` first, is fsynced, and appears under its key in one
step, so a reader on any node sees all of an object or none of it:

- :meth:`DirectoryBackend.create` links the temp file to the key: ``link()``
  fails with EEXIST if the name exists, atomically, also on NFS (the classic
  lock-file primitive), so exactly one of many nodes creates each key. An
  ``O_EXCL`` open of the key itself would be atomic too, but would show
  readers a file still being written;
- :meth:`DirectoryBackend.put` renames the temp file over the key.

The root must be on one filesystem (``tmp/`` beside the objects), so that
links and renames stay atomic. A hung mount must not hang a LOAD: each
operation runs on a small pool of threads and is given up after
:data:`~cacheagent.tier.backend.OP_TIMEOUT` seconds (its thread may stay stuck in
the kernel; the tier is then left alone for a while, see cacheagent.tier.fetch).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TypeVar

from cacheagent.tier.backend import OP_TIMEOUT
from cacheagent.tier.errors import (
    TierAccessDeniedError,
    TierConfigError,
    TierTimeoutError,
    TierUnavailableError,
)

T = TypeVar("T")

_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
# A temp file older than this was left by a node that died mid-write.
_STALE_TEMP_S = 3600.0


class DirectoryBackend:
    """Objects as files below ``root``, an absolute path on a filesystem every node mounts."""

    def __init__(self, root: str | os.PathLike[str], timeout: float = OP_TIMEOUT) -> None:
        self.root = Path(root)
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="cacheagent-tier-fs")
        if not self.root.is_absolute():
            raise TierConfigError(
                f"shared_cache {str(root)!r} is a relative path; give the absolute path of a "
                "directory every node mounts"
            )
        self._tmp = self.root / "tmp"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _translate(exc, self.root, "creating the tier directory") from exc
        self._clean_stale_temps()

    @property
    def url(self) -> str:
        """The tier's root path."""
        return str(self.root)

    def _get(self, key: str) -> bytes | None:
        """The file at ``key``, or None."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _translate(exc, path, "reading") from exc
        try:
            with open(fd, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise _translate(exc, path, "reading") from exc

    def _create(self, key: str, data: bytes) -> bool:
        """Write ``key`` unless it exists (``link()``: atomic, one winner); True if written."""
        path = self._path(key)
        temp = self._write_temp(data)
        try:
            self._parent(path)
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise _translate(exc, path, "creating") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _put(self, key: str, data: bytes) -> None:
        """Write ``key``, replacing it (``rename()``: readers see the old or the new file)."""
        path = self._path(key)
        temp = self._write_temp(data)
        try:
            self._parent(path)
            os.replace(temp, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise _translate(exc, path, "writing") from exc

    def _delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _translate(exc, path, "deleting") from exc

    def get(self, key: str) -> bytes | None:
        """The file at ``key``, or None."""
        return self._bounded(self._get, key)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` unless it exists (``link()``: atomic, one winner); True if written."""
        return self._bounded(self._create, key, data)

    def put(self, key: str, data: bytes) -> None:
        """Write ``key``, replacing it (``rename()``: readers see the old or the new file)."""
        self._bounded(self._put, key, data)

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        self._bounded(self._delete, key)

    def _bounded(self, call: Callable[..., T], *args: object) -> T:
        future = self._pool.submit(call, *args)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise TierTimeoutError(
                f"the shared tier directory {self.root} did not answer within "
                f"{self.timeout:g} s (a hung mount?); nodes fetch from the origin meanwhile; "
                "check the mount",
                url=str(self.root),
            ) from None

    # -- helpers ---------------------------------------------------------------

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        # Keys are made by cacheagent.tier.layout from hex digests; refuse anything
        # else rather than let a bug write outside the root.
        if not key or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
            raise TierConfigError(f"refusing tier key {key!r}: not a plain relative name")
        return self.root.joinpath(*parts)

    def _parent(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)

    def _write_temp(self, data: bytes) -> Path:
        temp = self._tmp / f"{os.getpid()}.{uuid.uuid4().hex}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o644)
        except OSError as exc:
            raise _translate(exc, temp, "writing") from exc
        try:
            with open(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise _translate(exc, temp, "writing") from exc
        return temp

    def _clean_stale_temps(self) -> None:
        # Best effort: another node's fresh temp file is never touched (age bound).
        now = time.time()
        with contextlib.suppress(OSError), os.scandir(self._tmp) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TEMP_S:
                        os.unlink(entry.path)


def _translate(exc: OSError, path: Path, what: str) -> Exception:
    if exc.errno in _DENIED:
        return TierAccessDeniedError(
            f"{what} {path} on the shared tier was refused ({exc.strerror}); give this node "
            "write access to the tier directory, or mount it read-write",
            url=str(path),
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TierUnavailableError(
            f"{what} {path} on the shared tier failed: the filesystem is full; free space on "
            "it (nodes fetch from the origin meanwhile)",
            url=str(path),
        )
    return TierUnavailableError(
        f"{what} {path} on the shared tier failed ({exc.strerror or exc}); check the mount "
        "(nodes fetch from the origin meanwhile)",
        url=str(path),
    )
