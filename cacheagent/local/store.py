"""The content-addressed store: blobs named by their xxh3-128, snapshots of hardlinks.

Layout under the cache directory::

    blobs/ab/ab12...ef      one file per distinct content, read-only
    snapshots/<key>/...     a model directory made of hardlinks to blobs
    tmp/                    unique temp files and dirs, renamed into place when whole
    locks/                  lock files; they only save duplicate work

Correctness never depends on a lock: every blob and snapshot is built under
a unique temporary name and appears with one atomic rename (or link), so a
reader sees all of it or none of it, whatever process dies when.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cacheagent.errors import CacheFullError, UnsafeCacheDirError

BLOB_MODE = 0o444
DIR_MODE = 0o700
HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection of blobs removed."""

    blobs: int
    bytes: int


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing; refuse one that others could write or that we don't own."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UnsafeCacheDirError(
            f"cache directory {path} exists but is not a directory; point cache_dir at a directory"
        ) from None
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheDirError(
            f"cache directory {path} is not a plain directory; point cache_dir at a directory"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeCacheDirError(
            f"cache directory {path} is owned by uid {info.st_uid}, not by this user "
            f"(uid {os.getuid()}); use a directory of your own or fix its owner"
        )
    if info.st_mode & stat.S_IWOTH:
        raise UnsafeCacheDirError(
            f"cache directory {path} is world-writable, so anyone could plant files in it; "
            f"run 'chmod 700 {path}' or choose another cache_dir"
        )


class BlobWriter:
    """A blob being received: parts may arrive in any order, hashing happens in order.

    Parts are written at their offset as they come, and hashed as soon as
    every byte before them has been hashed, so the content is hashed while it
    streams in, never re-read. The caller bounds how many parts are in
    flight, which bounds the memory held here.
    """

    def __init__(self, store: Store, size: int) -> None:
        self.size = size
        self.path = store.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.blob"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hasher = xxhash.xxh3_128()
        self._hashed_upto = 0
        self._pending: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._store = store

    def write(self, offset: int, data: bytes) -> tuple[int, bool]:
        """Write ``data`` at ``offset`` and hash whatever is now contiguous.

        Returns how many parts were hashed by this call (so the caller can
        free their memory budget) and whether this call completed the blob.
        """
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise self._store.translate_write_error(exc, len(data)) from exc
        hashed = 0
        with self._lock:
            was_complete = self.complete
            self._pending[offset] = data
            while self._hashed_upto in self._pending:
                chunk = self._pending.pop(self._hashed_upto)
                self._hasher.update(chunk)
                self._hashed_upto += len(chunk)
                hashed += 1
            return hashed, self.complete and not was_complete

    @property
    def complete(self) -> bool:
        """True once every byte has arrived and been hashed."""
        return self._hashed_upto == self.size

    def commit(self) -> str:
        """Make the blob durable, read-only and visible under its content hash; return the hash."""
        if not self.complete:
            raise RuntimeError(f"blob {self.path} committed at {self._hashed_upto}/{self.size}")
        digest = self._hasher.hexdigest()
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        os.chmod(self.path, BLOB_MODE)
        self._store.adopt_blob(self.path, digest)
        return digest

    def abort(self) -> None:
        """Drop the partial blob."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Store:
    """Blobs and snapshots on disk, below one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.snapshots_dir = root / "snapshots"
        self.tmp_dir = root / "tmp"
        self.locks_dir = root / "locks"
        ensure_private_dir(root)
        for directory in (
            self.blobs_dir,
            self.snapshots_dir,
            self.tmp_dir,
            self.locks_dir,
            root / "index",
        ):
            # A subdirectory swapped for a symlink would make cleanup delete, and
            # writes land, wherever it points: refuse it like an unsafe cache_dir.
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=DIR_MODE)
            ensure_private_dir(directory)

    # -- blobs -------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this content hash lives."""
        return self.blobs_dir / digest[:2] / digest

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """True if the blob exists as a regular file (and has ``size`` bytes, when given)."""
        try:
            # lstat: a symlink planted in blobs/ is no blob, whatever it points at.
            info = self.blob_path(digest).lstat()
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISREG(info.st_mode) and (size is None or info.st_size == size)

    def new_blob(self, size: int) -> BlobWriter:
        """Start receiving a blob of ``size`` bytes into a unique temp file."""
        return BlobWriter(self, size)

    def adopt_blob(self, temp: Path, digest: str) -> None:
        """Move a finished temp file into place under ``digest``; keep an existing copy."""
        target = self.blob_path(digest)
        _ensure_real_dir(target.parent)
        try:
            # link() never replaces: if another process stored the same content
            # first, its inode (already linked from snapshots) stays the blob.
            os.link(temp, target)
        except FileExistsError:
            # ...unless what holds the name is damaged (wrong size) or no regular
            # file at all: then the bytes we just verified take its place.
            if not self.has_blob(digest, os.lstat(temp).st_size):
                os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def remove_blob(self, digest: str) -> None:
        """Delete a blob (used when it is found corrupt)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(digest))

    def hash_file(self, path: Path) -> str:
        """The xxh3-128 of a file's content (used by verification, never by fetching).

        A symlink is never followed: it hashes to "", which matches no digest.
        """
        hasher = xxhash.xxh3_128()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return ""
            raise
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            while chunk := handle.read(HASH_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    def iter_blobs(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every blob as (digest, stat)."""
        for shard in _scandir(self.blobs_dir):
            if not shard.is_dir(follow_symlinks=False):
                continue  # a planted symlink must not make gc delete what it points at
            for entry in _scandir(Path(shard.path)):
                if entry.is_file(follow_symlinks=False):
                    yield entry.name, entry.stat(follow_symlinks=False)

    def blob_bytes(self) -> int:
        """Bytes held in blobs: the cache's real disk use, since snapshots are hardlinks."""
        return sum(info.st_size for _, info in self.iter_blobs())

    def gc_blobs(self) -> GcResult:
        """Delete blobs that no snapshot links to any more (link count 1)."""
        removed = freed = 0
        for digest, info in list(self.iter_blobs()):
            if info.st_nlink <= 1:
                self.remove_blob(digest)
                removed += 1
                freed += info.st_size
        return GcResult(removed, freed)

    # -- snapshots ---------------------------------------------------------

    def snapshot_path(self, key: str) -> Path:
        """Where the snapshot with this key lives."""
        return self.snapshots_dir / key

    def has_snapshot(self, key: str) -> bool:
        """True if a published snapshot with this key exists."""
        path = self.snapshot_path(key)
        return path.is_dir() and not path.is_symlink()

    def publish_snapshot(
        self, key: str, files: Iterable[tuple[str, str]], empty_dirs: Iterable[str] = ()
    ) -> Path:
        """Assemble ``(relpath, digest)`` pairs in a temp dir and rename it into place."""
        temp = self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.snap"
        temp.mkdir(mode=0o755)
        try:
            for relpath in empty_dirs:
                (temp / relpath).mkdir(mode=0o755, parents=True, exist_ok=True)
            for relpath, digest in files:
                dest = temp / relpath
                dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self._link_or_copy(self.blob_path(digest), dest)
            _make_subdirs_read_only(temp)
            target = self.snapshot_path(key)
            if os.path.lexists(target) and not _is_real_dir(target):
                # Not ours (a planted symlink or file): drop the name, never its target.
                _rmtree(target)
            try:
                os.rename(temp, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another process published the same key first; its copy is identical.
                _rmtree(temp)
            return target
        except BaseException:
            _rmtree(temp)
            raise

    def remove_snapshot(self, key: str) -> None:
        """Remove a snapshot: rename it away first so it vanishes at once, then delete."""
        target = self.snapshot_path(key)
        doomed = self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.gone"
        try:
            os.rename(target, doomed)
        except FileNotFoundError:
            return
        _rmtree(doomed)

    def snapshot_keys(self) -> list[str]:
        """Keys of all published snapshots on disk."""
        return [e.name for e in _scandir(self.snapshots_dir) if e.is_dir(follow_symlinks=False)]

    def _link_or_copy(self, blob: Path, dest: Path) -> None:
        try:
            os.link(blob, dest)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP):
                raise
            shutil.copyfile(blob, dest)
            os.chmod(dest, BLOB_MODE)

    # -- housekeeping ------------------------------------------------------

    def clean_tmp(self) -> int:
        """Remove temp files and dirs left by processes that no longer run; return the count."""
        removed = 0
        for entry in _scandir(self.tmp_dir):
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            _rmtree(Path(entry.path)) if entry.is_dir(follow_symlinks=False) else _unlink(entry)
            removed += 1
        return removed

    def free_bytes(self) -> int:
        """Free space on the cache's filesystem, for an unprivileged writer."""
        info = os.statvfs(self.root)
        return info.f_bavail * info.f_frsize

    def translate_write_error(self, exc: OSError, wanted: int) -> Exception:
        """Turn a disk-full error into a CacheFullError that says what to do."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return CacheFullError(
                f"the disk holding the cache {self.root} is full (needed {wanted} more bytes); "
                "free space, lower max_size, or move cache_dir; the cache itself is consistent"
            )
        return exc


def _make_subdirs_read_only(top: Path) -> None:
    # A read-only version directory makes the python backend skip writing
    # __pycache__ beside shared blobs. The top stays writable: renaming a
    # directory to a new parent needs write access to it.
    for dirpath, _dirnames, _filenames in os.walk(top):
        if dirpath != str(top):
            os.chmod(dirpath, 0o555)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _ensure_real_dir(path: Path) -> None:
    """Make ``path`` a directory of ours, replacing a planted symlink or file."""
    if os.path.lexists(path) and not _is_real_dir(path):
        _rmtree(path)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _unlink(entry: os.DirEntry[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry.path)


def _rmtree(path: Path) -> None:
    if not _is_real_dir(path):
        # A symlink (or file) goes by itself: os.walk would follow a symlink at the top.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    # Snapshot subdirectories are read-only (so backends cannot write beside
    # shared blobs); make each writable just before emptying it.
    for dirpath, _dirnames, _filenames in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A killed process stays a zombie until its parent (often init, after Triton
    # died) reaps it; kill(0) still succeeds then, but it will never finish a file.
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return False
    fields = raw.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] in ("Z", "X")
