"""Process liveness, in one place: a *held token*.

A token is a small file that its holder keeps open, with an flock on it, for as
long as what it stands for lasts (a lease on a snapshot, the lifetime of a
process writing temp files). The kernel drops an flock when the last
descriptor of it closes, which happens at exit, at ``kill -9``, in any pid
namespace and in any container sharing the filesystem. So "is the holder
alive?" is answered by one question to the kernel, "can I lock it
exclusively right now?", and never by a pid, which means nothing across pid
namespaces and is reused on one host.

Rules that keep the answer exact:

* A token is visible under its name only once it is locked: it is created
  exclusively, locked, then checked to still be the file at that name (a
  cleaner may have removed the name meanwhile; then a new one is made).
* A cleaner removes a token only while it holds the exclusive lock itself
  (:func:`remove_if_unheld`), so it can never delete one that a holder locked
  after the cleaner's check.
* Tokens are opened ``O_NOFOLLOW | O_CLOEXEC``: a planted symlink is never
  followed, and programs a holder starts never inherit (and so never extend)
  its tokens.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.errors import CacheFullError

TOKEN_MODE = 0o600
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_TRIES = 5
# Holders take their lock without waiting, except that a cleaner's probe holds the
# exclusive lock for microseconds; this bounds how long a holder retries past one.
_LOCK_WAIT = 2.0
_LOCK_POLL = 0.005


@dataclass
class HeldToken:
    """An open, locked token file; closing it (or the holder's death) releases it."""

    path: Path
    fd: int
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self.fd < 0

    def close(self) -> None:
        """Release the lock (idempotent). The file stays, to be removed by whoever cleans."""
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def hold_token(path: Path, *, shared: bool, content: bytes = b"") -> HeldToken:
    """Create the token ``path`` holding ``content`` and lock it (shared or exclusive).

    ``path`` must not exist: token names are unique (they carry a random part).
    Raises :class:`CacheFullError` when the disk has no room (bytes or inodes)
    for the token.
    """
    for _ in range(_CREATE_TRIES):
        fd = _create(path, content)
        try:
            _lock_within(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, path)
            if _same_file(path, fd):
                return HeldToken(path, fd)
        except BaseException:
            os.close(fd)
            raise
        # A cleaner removed the name between our create and our lock: make it again.
        os.close(fd)
    raise RuntimeError(f"could not create the token {path}: its name kept vanishing")


def is_held(path: Path) -> bool:
    """True if a live process holds the token ``path`` (shared or exclusive).

    A missing token, or anything at that name that is not a regular file, is
    not held.
    """
    fd = _open_existing(path)
    if fd is None:
        return False
    try:
        return not _try_lock_exclusive(fd)
    finally:
        os.close(fd)  # also drops the probe's lock, if we got it


def remove_if_unheld(path: Path) -> bool:
    """Remove the token ``path`` if no live process holds it; True if it is gone now."""
    try:
        fd = _open_existing(path)
    except OSError:
        return False
    if fd is None:
        if os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a planted symlink goes by itself, never its target
        return not os.path.lexists(path)
    try:
        if not _try_lock_exclusive(fd):
            return False
        # Unlink while we hold the lock: a holder that locks after us then finds
        # its name gone (see hold_token) instead of holding a deleted file.
        with contextlib.suppress(FileNotFoundError):
            if _same_file(path, fd):
                os.unlink(path)
        return True
    finally:
        os.close(fd)


def read_token(path: Path, limit: int = 64 * 1024) -> bytes:
    """The content written into a token at creation (b"" if it is gone or unreadable)."""
    fd = _open_existing(path)
    if fd is None:
        return b""
    try:
        return os.read(fd, limit)
    except OSError:
        return b""
    finally:
        os.close(fd)


def random_name(prefix: str) -> str:
    """A fresh token or temp name: ``prefix`` and 16 random hex digits."""
    return f"{prefix}{os.urandom(8).hex()}"


# -- the owner token of this process ---------------------------------------------


class ProcessOwners:
    """This process's owner tokens: one per directory, held exclusively until exit.

    Temp files and dirs carry their owner's name, so whoever cleans up knows
    whether their writer still runs (:meth:`is_alive`) without knowing its pid.
    A forked child gets owners of its own (it would otherwise share, and so
    keep alive, the parent's).
    """

    PREFIX = "owner-"

    def __init__(self) -> None:
        self._tokens: dict[Path, HeldToken] = {}
        self._lock = threading.Lock()

    def name_in(self, directory: Path) -> str:
        """This process's owner name in ``directory``, creating its token on first use."""
        key = directory.absolute()
        with self._lock:
            token = self._tokens.get(key)
            if token is None or token.closed:
                token = self._create(key)
                self._tokens[key] = token
            return token.path.name.removesuffix(".lock")

    @staticmethod
    def is_alive(directory: Path, owner: str) -> bool:
        """True if the owner named ``owner`` (see :meth:`name_in`) still runs."""
        if not owner.startswith(ProcessOwners.PREFIX) or "/" in owner:
            return False
        return is_held(directory / f"{owner}.lock")

    def _create(self, directory: Path) -> HeldToken:
        path = directory / f"{random_name(self.PREFIX)}.lock"
        # For people reading the directory only: liveness never looks at the pid.
        content = f"pid {os.getpid()}\n".encode()
        return hold_token(path, shared=False, content=content)

    def _forget_after_fork(self) -> None:
        # The child shares the parent's lock through the inherited descriptors;
        # dropping them here leaves the parent's tokens to the parent.
        tokens, self._tokens = list(self._tokens.values()), {}
        self._lock = threading.Lock()
        for token in tokens:
            with contextlib.suppress(OSError):
                os.close(token.fd)


OWNERS = ProcessOwners()
os.register_at_fork(after_in_child=OWNERS._forget_after_fork)


# -- internals -------------------------------------------------------------------


def _create(path: Path, content: bytes) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, TOKEN_MODE)
    except OSError as exc:
        raise _translate(exc, path) from exc
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise _translate(exc, path) from exc
    return fd


def _translate(exc: OSError, path: Path) -> OSError:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    full = CacheFullError(
        f"cannot create {path}, which records a process using the cache: the disk holding "
        "it is full (no bytes or inodes left); free space or inodes on that disk, lower "
        "max_size, or move cache_dir"
    )
    full.errno = exc.errno
    return full


def _open_existing(path: Path) -> int | None:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
            return None
        raise
    if not _is_regular(fd):
        os.close(fd)
        return None
    return fd


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _try_lock_exclusive(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_within(fd: int, mode: int, path: Path) -> None:
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"could not lock the new token {path} within {_LOCK_WAIT:.0f} s; "
                    "another process keeps it locked, which only a cleaner should do briefly"
                ) from None
            time.sleep(_LOCK_POLL)


def _same_file(path: Path, fd: int) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (info.st_dev, info.st_ino) == (mine.st_dev, mine.st_ino)
