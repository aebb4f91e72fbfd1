"""The content-addressed store: blobs named by their xxh3-128, snapshots of hardlinks.

Layout under the cache directory::

    blobs/ab12...ef         one file per distinct content, read-only (all in one directory)
    snapshots/<key>/...     a model directory made of hardlinks to blobs
    records/<key>.json      each snapshot's record (the index is rebuilt from these)
    tmp/                    unique temp files and dirs, renamed into place when whole
    leases/                 lease tokens (see cacheagent.local.leases)
    owners/                 owner tokens of the processes writing temp files
    locks/                  lock files; they only save duplicate work

Correctness never depends on a lock: every blob and snapshot is built under
a unique temporary name and appears with one atomic rename (or link), so a
reader sees all of it or none of it, whatever process dies when.

Temp entries are named after their writer's owner token
(:mod:`cacheagent.local.liveness`), never its pid: one that no live process
holds is garbage, whatever pid namespace its writer ran in. They are built on
the filesystem they will land on: in ``tmp/`` when it shares a mount with the
destination, else in a ``.staging/`` directory inside ``blobs/`` or
``snapshots/``, so that each may be a separate mount and renames stay atomic.
Snapshot files are hardlinks to blobs, or copies when the two are on different
filesystems (logged once, since copies cost space).

Blobs lie in ``blobs/`` itself, not in shards by their first two hex digits
(``blobs/ab/ab12...``, the layout before 0.2): a fresh cache fetching a model
of many small files made a directory for almost every file, and creating an
inode is the dearest part of storing a small file (0.66 ms for a mkdir on the
machines measured, against 0.02 ms for a link). Directories index their names
(ext4 htree, XFS, btrfs), so one large ``blobs/`` costs nothing per lookup.
A cache in the sharded layout is flattened once when a store opens it
(:meth:`Store.flatten_shards`); a blob an older version still writes into a
shard is counted, verified and collected where it lies.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cacheagent.errors import CacheFullError, UnsafeCacheDirError
from cacheagent.local.atomic import start_writeback
from cacheagent.local.liveness import OWNERS, ProcessOwners, remove_if_unheld

_log = logging.getLogger(__name__)

BLOB_MODE = 0o444
DIR_MODE = 0o700
HASH_CHUNK = 8 * 1024 * 1024
# A blob's received bytes are handed to the disk in runs of this size as they land
# (atomic.start_writeback), so its commit's fsync has little left to flush.
WRITEBACK_CHUNK = 8 * 1024 * 1024
STAGING = ".staging"  # a name no blob, old blob shard (2 hex digits) or snapshot key can have
# In blobs/: its presence says no shard of the old layout is left to flatten.
FLAT_MARK = ".flat"
_DIGEST = re.compile(r"[0-9a-f]{32}")  # an xxh3-128 hexdigest: a blob's name
_SHARD = re.compile(r"[0-9a-f]{2}")  # a directory of blobs in the layout before 0.2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
        self.path = store.temp_path(store.blobs_dir, ".blob")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with store.room_for(self.path, size):
            self._fd = os.open(self.path, flags, 0o600)
        self._hasher = xxhash.xxh3_128()
        self._hashed_upto = 0
        self._writeback_from = 0  # bytes before this are already on their way to disk
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
            self._start_writeback()
            return hashed, self.complete and not was_complete

    def _start_writeback(self) -> None:
        # Under the lock: _close takes it too, so the descriptor is still this blob's
        # (start_writeback only duplicates it and queues: it never waits on the disk).
        # Every byte before _hashed_upto has been written: it was hashed in order.
        ready = self._hashed_upto - self._writeback_from
        if self._fd >= 0 and ready >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._writeback_from, ready)
            self._writeback_from = self._hashed_upto

    @property
    def hashed_bytes(self) -> int:
        """Bytes from the start of the blob that have been hashed (and are no longer held)."""
        return self._hashed_upto

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
            with self._store.room_for(self.path, self.size):
                os.fsync(self._fd)
                os.fchmod(self._fd, BLOB_MODE)
        finally:
            self._close()
        self._store.adopt_blob(self.path, digest)
        return digest

    def abort(self) -> None:
        """Drop the partial blob (safe to call more than once, and after a failed commit)."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _close(self) -> None:
        # Close once: a second os.close of the same number could close a descriptor
        # another thread has opened since.
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class Store:
    """Blobs and snapshots on disk, below one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.snapshots_dir = root / "snapshots"
        self.records_dir = root / "records"
        self.tmp_dir = root / "tmp"
        self.leases_dir = root / "leases"
        self.owners_dir = root / "owners"
        self.locks_dir = root / "locks"
        self._staging: dict[Path, Path] = {}
        self._staging_lock = threading.Lock()
        self._warned_copy = False
        ensure_private_dir(root)
        for directory in (
            self.blobs_dir,
            self.snapshots_dir,
            self.records_dir,
            self.tmp_dir,
            self.leases_dir,
            self.owners_dir,
            self.locks_dir,
            root / "index",
        ):
            # A subdirectory swapped for a symlink would make cleanup delete, and
            # writes land, wherever it points: refuse it like an unsafe cache_dir.
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=DIR_MODE)
            ensure_private_dir(directory)
        if not os.path.lexists(self.blobs_dir / FLAT_MARK):
            self.flatten_shards()

    # -- blobs -------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this content hash lives."""
        return self.blobs_dir / digest

    def flatten_shards(self) -> int:
        """Move the blobs of the old sharded layout into ``blobs/``; return how many moved.

        Runs once per cache (then :data:`FLAT_MARK` says so). Safe against a crash
        or another process doing the same at once: each blob is linked to its new
        name, never replacing one, before its old name goes; a snapshot holds the
        inode, not the name, so no snapshot notices. What cannot move (a name
        taken, a full disk) stays where it is, still counted and collected there.
        """
        moved, stuck = 0, False
        for shard in _old_shards(_scandir(self.blobs_dir)):
            for entry in _blob_entries(_scandir(Path(shard.path))):
                try:
                    os.link(entry.path, self.blobs_dir / entry.name, follow_symlinks=False)
                    os.unlink(entry.path)
                    moved += 1
                except FileNotFoundError:
                    continue  # moved or collected by another process meanwhile
                except OSError as exc:
                    stuck = True
                    _log.debug("blob %s stays in its shard: %s", entry.path, exc)
            with contextlib.suppress(OSError):
                os.rmdir(shard.path)  # only once empty
        if moved:
            _log.info("moved %d blob(s) of %s out of the old sharded layout", moved, self.root)
        if not stuck:
            with contextlib.suppress(OSError):
                flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(self.blobs_dir / FLAT_MARK, flags, 0o600))
        return moved

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
        """Move a finished temp file (staged by :meth:`temp_path`) into place under ``digest``.

        An existing intact copy is kept. The temp file is gone afterwards, also on error.
        """
        target = self.blob_path(digest)
        try:
            with self.room_for(target):
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

    def restore_blob(self, source: Path, digest: str) -> bool:
        """Link ``source`` (a snapshot's copy) back in as blob ``digest`` if its bytes match.

        Used by verification when a blob's name was lost but a snapshot still
        holds the same inode; True if the blob is in place afterwards.
        """
        if self.hash_file(source) != digest:
            return False
        target = self.blob_path(digest)
        _ensure_real_dir(target.parent)
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP):
                raise
            # blobs/ on another filesystem than snapshots/: copy the verified bytes in.
            self._warn_copying(exc)
            temp = self.temp_path(target, ".blob")
            shutil.copyfile(source, temp, follow_symlinks=False)
            os.chmod(temp, BLOB_MODE)
            self.adopt_blob(temp, digest)
        return self.has_blob(digest)

    def remove_blob(self, digest: str) -> None:
        """Delete a blob (used when it is found corrupt), in an old shard too."""
        for path in (self.blob_path(digest), self.blobs_dir / digest[:2] / digest):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)

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
        for digest, _path, info in self.blob_files():
            yield digest, info

    def blob_files(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        """Every blob as (digest, path, stat): those in ``blobs/``, and any left in an
        old shard (a cache still written by an older version)."""
        top = _scandir(self.blobs_dir)  # once: it may hold every blob of the cache
        for entries in (top, *(_scandir(Path(s.path)) for s in _old_shards(top))):
            for entry in _blob_entries(entries):
                yield entry.name, Path(entry.path), entry.stat(follow_symlinks=False)

    def blob_bytes(self) -> int:
        """Bytes held in blobs: the cache's real disk use, since snapshots are hardlinks."""
        return sum(info.st_size for _, info in self.iter_blobs())

    def gc_blobs(self) -> GcResult:
        """Delete blobs that no snapshot links to any more (link count 1)."""
        removed = freed = 0
        for _digest, path, info in list(self.blob_files()):
            if info.st_nlink <= 1:
                # By path: the same digest may lie in blobs/ and in an old shard, linked
                # from snapshots in one place only.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
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
        temp = self.temp_path(self.snapshots_dir, ".snap")
        with self.room_for(temp):
            temp.mkdir(mode=0o755)
        try:
            with self.room_for(temp):
                for relpath in empty_dirs:
                    (temp / relpath).mkdir(mode=0o755, parents=True, exist_ok=True)
                made = {temp}  # each directory once: a model may hold thousands of files
                for relpath, digest in files:
                    dest = temp / relpath
                    if dest.parent not in made:
                        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                        made.add(dest.parent)
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
        # Renamed within its own filesystem (snapshots/ may be a mount of its own). No
        # owner name: it is garbage already, so any cleaner may finish deleting it,
        # and eviction on a disk out of inodes must not need a new owner token.
        doomed = self._staging_dir(self.snapshots_dir) / f"gone.{os.urandom(16).hex()}.gone"
        try:
            os.rename(target, doomed)
        except FileNotFoundError:
            return
        _rmtree(doomed)

    def snapshot_keys(self) -> list[str]:
        """Keys of all published snapshots on disk."""
        return [
            e.name
            for e in _scandir(self.snapshots_dir)
            if e.name != STAGING and e.is_dir(follow_symlinks=False)
        ]

    def _link_or_copy(self, blob: Path, dest: Path) -> None:
        try:
            os.link(blob, dest)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP):
                raise
            self._warn_copying(exc)
            shutil.copyfile(blob, dest, follow_symlinks=False)
            os.chmod(dest, BLOB_MODE)

    def _warn_copying(self, exc: OSError) -> None:
        if self._warned_copy:
            return
        self._warned_copy = True
        _log.warning(
            "cannot hardlink blobs of the cache %s into its snapshots (%s): snapshot files "
            "are copied instead, so each snapshot costs its full size again on disk; keep "
            "%s and %s on one filesystem to avoid it",
            self.root,
            exc.strerror or exc,
            self.blobs_dir,
            self.snapshots_dir,
        )

    # -- temp entries --------------------------------------------------------

    def temp_path(self, destination: Path, suffix: str) -> Path:
        """A unique temp name for an entry bound for ``destination``, owned by this process.

        It lies on ``destination``'s filesystem (see the module docstring), and
        carries this process's owner name, so :meth:`clean_tmp` can tell when
        its writer is gone.
        """
        owner = OWNERS.name_in(self.owners_dir)
        return self._staging_dir(destination) / f"{owner}.{os.urandom(16).hex()}{suffix}"

    def _staging_dir(self, destination: Path) -> Path:
        with self._staging_lock:
            staging = self._staging.get(destination)
            if staging is None:
                staging = self.tmp_dir
                if not same_mount(self.tmp_dir, destination):
                    staging = destination / STAGING
                    with self.room_for(staging):
                        _ensure_real_dir(staging)
                self._staging[destination] = staging
            return staging

    def staging_dirs(self) -> list[Path]:
        """Every directory that may hold temp entries."""
        return [self.tmp_dir, self.blobs_dir / STAGING, self.snapshots_dir / STAGING]

    # -- housekeeping ------------------------------------------------------

    def clean_tmp(self) -> int:
        """Remove temp files and dirs whose writer no longer runs; return the count.

        A writer runs while it holds its owner token: the kernel drops the lock
        when the process dies, in whatever pid namespace or container it ran.
        """
        removed = 0
        for directory in self.staging_dirs():
            if not _is_real_dir(directory):
                continue  # a planted symlink is not scanned (it is refused at open)
            for entry in _scandir(directory):
                owner = entry.name.split(".", 1)[0]
                if ProcessOwners.is_alive(self.owners_dir, owner):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _rmtree(Path(entry.path))
                else:
                    _unlink(entry)
                removed += 1
        for token in _scandir(self.owners_dir):
            remove_if_unheld(Path(token.path))
        return removed

    def free_bytes(self) -> int:
        """Free space on the cache's filesystem, for an unprivileged writer."""
        info = os.statvfs(self.root)
        return info.f_bavail * info.f_frsize

    def translate_write_error(self, exc: OSError, wanted: int) -> Exception:
        """Turn a disk-full error into a CacheFullError that says what to do."""
        return self.disk_full_error(exc, self.root, wanted)

    def disk_full_error(self, exc: OSError, path: Path, wanted: int = 0) -> OSError:
        """``exc`` as a CacheFullError naming ``path`` when it is ENOSPC/EDQUOT (bytes or
        inodes), else ``exc`` itself."""
        if exc.errno not in _DISK_FULL:
            return exc
        needed = f", needed {wanted} more bytes" if wanted else ""
        full = CacheFullError(
            f"the disk holding the cache {self.root} is full (no bytes or inodes left for "
            f"{path}{needed}); free space or inodes on it, lower max_size, or move cache_dir; "
            "the cache itself is consistent"
        )
        full.errno = exc.errno
        return full

    @contextlib.contextmanager
    def room_for(self, path: Path, wanted: int = 0) -> Iterator[None]:
        """Raise a disk-full error inside the block as a CacheFullError naming ``path``."""
        try:
            yield
        except CacheFullError:
            raise
        except OSError as exc:
            full = self.disk_full_error(exc, path, wanted)
            if full is exc:
                raise
            raise full from exc


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
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return  # the common case, once per blob: one system call
        _rmtree(path)
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)


def _blob_entries(entries: list[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    """The entries named like a blob that are regular files (never a planted symlink)."""
    return [e for e in entries if _DIGEST.fullmatch(e.name) and e.is_file(follow_symlinks=False)]


def _old_shards(entries: list[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    """The shard directories of the layout before 0.2 among ``blobs/``'s entries.

    Real directories only: a planted symlink is never followed.
    """
    return [e for e in entries if _SHARD.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]


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


def same_mount(a: Path, b: Path) -> bool:
    """True if ``a`` and ``b`` are on one mount, so a rename or link between them works.

    Bind mounts of one filesystem share a device number but still refuse
    renames across them (EXDEV), so the mount table decides, not ``st_dev``.
    """
    try:
        if os.stat(a).st_dev != os.stat(b).st_dev:
            return False
    except FileNotFoundError:
        return True  # nothing there yet: it will be created beside its parent
    mounts = _mount_table()
    return mounts is None or _mount_of(a, mounts) == _mount_of(b, mounts)


def _mount_table() -> list[tuple[str, str]] | None:
    """(mount id, mount point) of every mount of this process, in mount order."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None  # not Linux, or no /proc: device numbers are all we have
    table = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            table.append((fields[0], _unescape_mount_path(fields[4])))
    return table


def _mount_of(path: Path, mounts: list[tuple[str, str]]) -> str:
    real = os.path.realpath(path)
    best, best_len = "", -1
    for mount_id, point in mounts:
        prefix = point.rstrip("/") + "/"
        # The longest covering mount point wins; of equal ones the last (the one on top).
        if (real == point or real.startswith(prefix)) and len(point) >= best_len:
            best, best_len = mount_id, len(point)
    return best


def _unescape_mount_path(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
