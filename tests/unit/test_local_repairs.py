"""The local room under real faults that need no storage emulator.

- the one durable atomic writer (``cacheagent.local.atomic``), and install.py using it;
- bounded, logged lock waits against a real holder process;
- a corrupt index database repaired from the store's records, through the API and CLI;
- ``blobs/``, ``tmp/`` or ``snapshots/`` on a filesystem of its own (a real tmpfs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from cacheagent.cache import Cache
from cacheagent.errors import CacheAgentError, CacheFullError, UnsafeCacheDirError
from cacheagent.local import atomic
from cacheagent.local.atomic import write_atomically
from cacheagent.local.locks import LockTimeoutError, file_lock
from cacheagent.local.store import STAGING
from cacheagent.triton.install import LAUNCHER_NAME, install_triton

REPO = Path(__file__).resolve().parents[2]


def make_model(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def model_files(n: int = 4) -> dict[str, bytes]:
    files = {f"1/part{i}.bin": os.urandom(20_000 + i) for i in range(n)}
    return files | {"config.pbtxt": b'name: "m"\n'}


def mount_tmpfs(path: Path, options: str = "size=8m,mode=0700") -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at teardown, innermost first."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---- 5. one durable atomic writer ------------------------------------------------


def test_atomic_write_replaces_whole_with_exact_mode_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.txt"
    write_atomically(target, "one")
    assert target.read_text() == "one" and stat.S_IMODE(target.stat().st_mode) == 0o644
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, b"\x00two", mode=0o755)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"\x00two" and stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(os.listdir(target.parent)) == ["f.txt"]


def test_atomic_write_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep")
    target = tmp_path / "out.txt"
    target.symlink_to(precious)
    write_atomically(target, "new")
    assert not target.is_symlink() and target.read_text() == "new"
    assert precious.read_text() == "keep"


def test_atomic_write_fsyncs_the_file_then_its_directory(tmp_path, monkeypatch):
    # A spy, not a fault: durability cannot be observed without cutting power.
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    write_atomically(tmp_path / "f", "x")
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and synced[0].endswith(".tmp")
    assert synced[1] == str(tmp_path)


def test_atomic_write_on_a_full_disk_is_cache_full_and_keeps_the_old_file(tmp_path, mounts):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=1m,mode=0700")
    mounts.append(disk)
    target = disk / "f"
    write_atomically(target, "old")
    with open(disk / "filler", "wb", buffering=0) as handle, pytest.raises(OSError):
        while True:
            handle.write(b"\0" * 65536)
    with pytest.raises(CacheFullError) as failure:
        write_atomically(target, b"x" * 200_000)
    assert str(target) in str(failure.value) and "Errno" not in str(failure.value)
    assert target.read_text() == "old"
    assert sorted(os.listdir(disk)) == ["f", "filler"]


def test_install_writes_through_the_atomic_writer(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep")
    target_dir = tmp_path / "agents" / "cacheagent"
    target_dir.mkdir(parents=True)
    (target_dir / LAUNCHER_NAME).symlink_to(precious)
    library = install_triton(tmp_path / "agents")
    launcher = target_dir / LAUNCHER_NAME
    assert not launcher.is_symlink() and "cacheagent.triton.worker" in launcher.read_text()
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    assert stat.S_IMODE(library.stat().st_mode) == 0o755
    assert precious.read_text() == "keep"
    assert sorted(os.listdir(target_dir)) == [LAUNCHER_NAME, library.name]


# ---- 6. bounded, logged lock waits ---------------------------------------------------

HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout and proc.stdout.readline().strip() == "held"
    return proc


def test_lock_wait_is_bounded_and_says_which_lock_and_who(tmp_path):
    lock = tmp_path / "gc.lock"
    holder = hold_lock(lock, 30)
    try:
        started = time.monotonic()
        with (
            pytest.raises(LockTimeoutError) as failure,
            file_lock(lock, timeout=0.5, what="the cache's eviction"),
        ):
            pass
        assert 0.4 < time.monotonic() - started < 5
        message = str(failure.value)
        assert "the cache's eviction" in message and str(lock) in message
        assert "another process" in message
        assert isinstance(failure.value, CacheAgentError)
    finally:
        holder.kill()
        holder.wait()


def test_a_wait_over_a_second_is_logged_once_then_the_lock_is_taken(tmp_path, caplog):
    lock = tmp_path / "snap.lock"
    holder = hold_lock(lock, 1.6)
    try:
        with (
            caplog.at_level(logging.INFO, logger="cacheagent.local.locks"),
            file_lock(lock, timeout=30, what="the download of s3://b/m"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    waiting = [r for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.INFO
    assert "the download of s3://b/m" in waiting[0].getMessage()
    assert "another process" in waiting[0].getMessage()


# ---- 4. a corrupt index is repaired from the store's records -----------------------


def corrupt(db: Path) -> None:
    db.write_bytes(os.urandom(max(db.stat().st_size, 8192)))


def test_corrupt_index_is_moved_aside_and_rebuilt_then_a_fetch_hits(tmp_path, caplog):
    model = make_model(tmp_path / "m", model_files())
    root = tmp_path / "cache"
    with Cache(root) as cache:
        first = cache.fetch(str(model))
        assert cache.stats().counters["misses"] == 1
    corrupt(root / "index" / "cache.db")
    with caplog.at_level(logging.WARNING, logger="cacheagent"), Cache(root) as cache:
        again = cache.fetch(str(model))
        assert again.hit and again.key == first.key and again.path == first.path
        assert [r.key for r in cache.snapshots()] == [first.key]
        assert cache.stats().counters["misses"] == 0  # reset, and the log says so
        assert cache.verify().corrupt_blobs == []
    asides = sorted(
        p.name for p in (root / "index").iterdir() if p.name.startswith("index.corrupt-")
    )
    assert asides, "the damaged database was not kept aside"
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert asides[0] in text and "rebuil" in text and "counters" in text


def test_rebuilt_contents_spare_refetching_unchanged_files(tmp_path):
    model = make_model(tmp_path / "m", model_files())
    root = tmp_path / "cache"
    with Cache(root) as cache:
        cache.fetch(str(model))
    corrupt(root / "index" / "cache.db")
    time.sleep(0.01)
    (model / "1/part2.bin").write_bytes(os.urandom(30_000))  # one file of five changes
    with Cache(root) as cache:
        changed = cache.fetch(str(model))
        assert not changed.hit and changed.files_fetched == 1
        assert changed.bytes_fetched == 30_000


def test_an_index_in_the_old_one_database_per_table_layout_is_brought_over(tmp_path):
    model = make_model(tmp_path / "m", model_files(2))
    root = tmp_path / "cache"
    with Cache(root) as cache:
        snap = cache.fetch(str(model))
        record = cache.index.get_snapshot(snap.key)
    assert record is not None
    # The layout before: one diskcache directory per table, and no records beside snapshots.
    shutil.rmtree(root / "index")
    for path in (root / "records").iterdir():
        path.unlink()
    old = {"eviction_policy": "none", "size_limit": 2**62}
    with diskcache.Cache(str(root / "index" / "snapshots"), **old) as table:
        table.set(snap.key, dataclasses.asdict(record))
    with diskcache.Cache(str(root / "index" / "counters"), **old) as table:
        table.set("hits", 7)
    with Cache(root) as cache:
        again = cache.fetch(str(model))
        assert again.hit and again.key == snap.key
        assert cache.stats().counters["hits"] == 8
    assert not (root / "index" / "snapshots").exists()
    assert os.listdir(root / "records") == [f"{snap.key}.json"]


def test_records_are_written_at_publish_and_removed_with_the_snapshot(tmp_path):
    model = make_model(tmp_path / "m", model_files(2))
    with Cache(tmp_path / "cache") as cache:
        snap = cache.fetch(str(model))
        assert os.listdir(cache.root / "records") == [f"{snap.key}.json"]
        cache.evict(0)
        assert os.listdir(cache.root / "records") == []


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cacheagent.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "command", [["ls"], ["verify"], ["purge", "--yes"], ["stats"], ["warm", "MODEL"]]
)
def test_cli_commands_on_a_corrupt_index_warn_and_succeed(tmp_path, command):
    model = make_model(tmp_path / "m", model_files(2))
    root = tmp_path / "cache"
    warmed = cli("warm", str(model), "--cache-dir", str(root), "--no-progress")
    assert warmed.returncode == 0, warmed.stderr
    corrupt(root / "index" / "cache.db")
    args = [str(model) if a == "MODEL" else a for a in command]
    done = cli(*args, "--cache-dir", str(root))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "not a database" in done.stderr
    assert "index.corrupt-" in done.stderr and "rebuil" in done.stderr
    if command == ["ls"]:
        assert str(model) in done.stdout  # the snapshot is listed again


@pytest.mark.parametrize("part", ["records", "leases", "owners"])
def test_new_cache_subdirectory_replaced_by_symlink_is_refused(tmp_path, part):
    root = tmp_path / "cache"
    Cache(root).close()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(root / part)
    (root / part).symlink_to(outside)
    with pytest.raises(UnsafeCacheDirError, match=rf"cache/{part} is not a plain directory"):
        Cache(root)
    assert os.listdir(outside) == []


# ---- 3. blobs/, tmp/ or snapshots/ on a filesystem of its own --------------------------


@pytest.mark.parametrize("part", ["blobs", "tmp", "snapshots"])
def test_fetch_works_with_a_cache_part_on_another_filesystem(tmp_path, mounts, caplog, part):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    mount_tmpfs(root / part)
    mounts.append(root / part)
    a = make_model(tmp_path / "a", model_files())
    b = make_model(tmp_path / "b", model_files(3))
    with caplog.at_level(logging.WARNING, logger="cacheagent"), Cache(root) as cache:
        for model in (a, b):
            snap = cache.fetch(str(model))
            assert not snap.hit
            for relpath in ("1/part0.bin", "config.pbtxt"):
                assert (snap.path / relpath).read_bytes() == (model / relpath).read_bytes()
            assert cache.fetch(str(model)).hit
        assert cache.verify().corrupt_blobs == [] and cache.verify().broken_snapshots == []
        cache.evict(0)
        assert cache.snapshots() == [] and cache.size() == 0
        for staging in (root / "tmp", root / "blobs" / STAGING, root / "snapshots" / STAGING):
            assert not staging.exists() or os.listdir(staging) == [], f"{staging} kept temp files"
    copies = [r for r in caplog.records if "copied instead" in r.getMessage()]
    if part == "tmp":  # blobs/ and snapshots/ still share a filesystem: hardlinks
        assert copies == []
    else:  # once per cache, however many files were copied
        assert len(copies) == 1 and copies[0].levelno == logging.WARNING


def test_queued_bookkeeping_that_fails_is_logged_and_the_next_still_runs(tmp_path, caplog):
    from cacheagent.local.index import Index

    index = Index(tmp_path / "index")
    ran = []

    def broken() -> None:
        raise OSError("the disk went away")

    index._later.submit(broken)
    index._later.submit(lambda: ran.append(1))
    index.settle()
    assert ran == [1]
    assert "could not record a cache hit in the index: the disk went away" in caplog.text
    index.close()


def test_a_read_waits_for_queued_bookkeeping_only_so_long(tmp_path, caplog):
    import threading

    from cacheagent.local.index import Index

    index = Index(tmp_path / "index")
    gate = threading.Event()
    index._later.submit(lambda: gate.wait(30))
    index.settle(timeout=0.05)
    assert "has not written this process's last hits after" in caplog.text
    gate.set()
    index.close()
