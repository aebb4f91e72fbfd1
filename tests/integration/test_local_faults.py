"""Faults of the local room, for real, through fetches against the S3 emulator.

- a disk out of inodes or out of bytes (a real, small tmpfs) fails a fetch with
  CacheFullError and leaks no temp blob and no file descriptor in a long-lived
  process, also across later successful fetches;
- a ``cacheagent warm`` killed with SIGKILL while it runs as pid 1 of its own pid
  namespace leaves a partial temp blob that the next fetch or purge removes, and
  that is counted nowhere meanwhile;
- a corrupt index database: the next fetch is a hit again (no content GET at the
  proxy) and the CLI commands warn and succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cacheagent.cache import Cache
from cacheagent.errors import CacheFullError
from cacheagent.local.store import STAGING
from harness.emulators import StorageRig
from harness.wait import wait_for
from tests.integration.disks import tmpfs

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CONFIG = b'name: "m"\n'


def open_cache(root: Path, rig: StorageRig, **kwargs: object) -> Cache:
    return Cache(root, env={**os.environ, **rig.env}, **kwargs)  # type: ignore[arg-type]


def fds_into(directory: Path) -> list[str]:
    """What this process's open descriptors under ``directory`` point at."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory) + "/"):
                found.append(target)
    return sorted(found)


def temp_entries(root: Path) -> list[str]:
    """Everything in the cache's temp and staging directories."""
    entries = []
    for directory in (root / "tmp", root / "blobs" / STAGING, root / "snapshots" / STAGING):
        with contextlib.suppress(FileNotFoundError):
            entries += [str(directory / name) for name in os.listdir(directory)]
    return entries


def fill_inodes(directory: Path) -> int:
    directory.mkdir(exist_ok=True)
    made = 0
    with contextlib.suppress(OSError):
        while True:
            (directory / str(made)).touch()
            made += 1
    return made


def fill_bytes(path: Path) -> None:
    with open(path, "ab", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)


def many_files(count: int, size: int) -> dict[str, bytes]:
    return {f"1/f{i}.bin": os.urandom(size + i) for i in range(count)} | {"config.pbtxt": CONFIG}


# ---- 2. ENOSPC, inodes and bytes ---------------------------------------------------------


def test_disk_out_of_inodes_is_cache_full_and_leaks_nothing(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/a", many_files(2, 1000))
    rig.put_tree("models/b", many_files(6, 20_000))
    rig.put_tree("models/c", many_files(2, 500))
    with (
        tmpfs(tmp_path / "disk", "size=64m,nr_inodes=80,mode=0700") as disk,
        open_cache(disk / "cache", rig, concurrency=4) as cache,
    ):
        cache.fetch(rig.url("models/a"))  # warm: index, locks and owner token exist
        baseline = fds_into(disk)
        filler = disk / "filler"

        def out_of_inodes(_files: int, _size: int) -> None:
            assert fill_inodes(filler) > 0

        # A long-lived process fails again and again: inodes run out while the
        # fetch creates its temp blobs, or before it creates even its lock file.
        for model, filled_first in (("b", False), ("b", False), ("c", True)):
            if filled_first:
                fill_inodes(filler)
            with pytest.raises(CacheFullError) as failure:
                plan = None if filled_first else out_of_inodes
                cache.fetch(rig.url(f"models/{model}"), on_plan=plan)
            message = str(failure.value)
            assert str(cache.root) in message and "inodes" in message
            assert "Errno" not in message and "free" in message
            assert temp_entries(cache.root) == []
            assert fds_into(disk) == baseline
            shutil.rmtree(filler)

        snap = cache.fetch(rig.url("models/b"))
        assert not snap.hit and (snap.path / "1/f5.bin").stat().st_size == 20_005
        assert temp_entries(cache.root) == [] and fds_into(disk) == baseline
        assert cache.verify().corrupt_blobs == []


def test_disk_out_of_bytes_is_cache_full_and_leaks_nothing(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/a", many_files(2, 1000))
    rig.put_tree("models/b", many_files(4, 3 * MiB))
    with (
        tmpfs(tmp_path / "disk", "size=24m,mode=0700") as disk,
        open_cache(disk / "cache", rig, concurrency=2, part_size=MiB) as cache,
    ):
        cache.fetch(rig.url("models/a"))
        baseline = fds_into(disk)
        filler = disk / "filler"

        def out_of_bytes(_files: int, _size: int) -> None:
            fill_bytes(filler)  # after the free-space check: another tenant filled it

        for _attempt in range(3):
            with pytest.raises(CacheFullError) as failure:
                cache.fetch(rig.url("models/b"), on_plan=out_of_bytes)
            message = str(failure.value)
            assert str(cache.root) in message and "full" in message
            assert "Errno" not in message
            assert temp_entries(cache.root) == []
            assert fds_into(disk) == baseline
            # Purging is how space is freed: it works on the full disk too.
            assert cache.purge() > 0
            assert cache.snapshots() == [] and cache.size() == 0
            filler.unlink()
            assert cache.snapshots() == []  # the rows deleted late stay deleted
            cache.fetch(rig.url("models/a"))

        snap = cache.fetch(rig.url("models/b"))
        assert not snap.hit and (snap.path / "1/f3.bin").stat().st_size == 3 * MiB + 3
        assert temp_entries(cache.root) == [] and fds_into(disk) == baseline


# ---- 1c. temp files of a writer killed as pid 1 of its pid namespace ---------------------


def warm_in_pid_namespace(url: str, cache: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-m",
        "cacheagent.cli.main",
        "warm",
        url,
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--concurrency",
        "2",
        "--part-size",
        "1MiB",
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def partial_temp_blobs(cache: Path) -> list[Path]:
    found = []
    for path in (cache / "tmp").glob("*.blob"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > 0:
                found.append(path)
    return found


def child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, f"unshare (pid {pid}) has no child"
    return int(children[0])


@pytest.mark.parametrize("cleaner", ["fetch", "purge"])
def test_warm_killed_as_pid_1_leaves_temp_blobs_the_next_cleanup_removes(tmp_path, s3_rig, cleaner):
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode != 0:
        pytest.skip("cannot create pid namespaces here (needs root)")
    rig = s3_rig
    files = {"1/w.bin": os.urandom(6 * MiB), "config.pbtxt": CONFIG}
    rig.put_tree("models/m", files)
    rig.put_tree("models/other", {"1/x.bin": os.urandom(1000), "config.pbtxt": CONFIG})
    cache = tmp_path / "cache"
    rig.proxy.per_conn_bytes_per_s = MiB  # ~3 s of download: the kill lands inside it
    proc = warm_in_pid_namespace(rig.url("models/m"), cache, {**os.environ, **rig.env})
    try:
        wait_for(lambda: bool(partial_temp_blobs(cache)), 60, "a partial temp blob")
        os.kill(child_of(proc.pid), signal.SIGKILL)  # pid 1 in there: Triton in a container
        proc.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError, AssertionError, FileNotFoundError):
            os.kill(child_of(proc.pid), signal.SIGKILL)
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    leftovers = partial_temp_blobs(cache)
    assert leftovers, "the kill did not land mid-download"
    rig.proxy.per_conn_bytes_per_s = None

    with open_cache(cache, rig) as opened:
        # Counted nowhere while it lies there: not in size, blobs, snapshots or stats.
        stats = opened.stats()
        assert (stats.size, stats.blobs, stats.snapshots) == (0, 0, 0)
        if cleaner == "fetch":
            snap = opened.fetch(rig.url("models/other"))
            assert (snap.path / "1/x.bin").stat().st_size == 1000
        else:
            opened.purge()
        assert not any(path.exists() for path in leftovers), "the dead writer's temp files stayed"
        assert temp_entries(opened.root) == []
        assert os.listdir(opened.root / "owners") == [] or cleaner == "fetch"


# ---- 4. a corrupt index: a hit again, and the CLI says what happened -----------------------


def cli(rig: StorageRig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cacheagent.cli.main", *args],
        env={**os.environ, **rig.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_corrupt_index_is_rebuilt_and_a_fetch_is_a_hit_without_content_gets(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/m", many_files(3, 50_000))
    root = tmp_path / "cache"
    with open_cache(root, rig) as cache:
        first = cache.fetch(rig.url("models/m"))
    db = root / "index" / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    gets = rig.object_gets()
    with open_cache(root, rig) as cache:
        again = cache.fetch(rig.url("models/m"))
        assert again.hit and again.key == first.key and again.bytes_fetched == 0
    assert rig.object_gets() == gets, "a rebuilt index must not refetch model content"

    for command in (["ls"], ["verify"], ["purge", "--yes"]):
        db.write_bytes(os.urandom(db.stat().st_size))
        done = cli(rig, *command, "--cache-dir", str(root))
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert "damaged" in done.stderr and "index.corrupt-" in done.stderr
    assert not (root / "snapshots" / first.key).exists()  # purge ran on the rebuilt index
    warmed = cli(rig, "warm", rig.url("models/m"), "--cache-dir", str(root), "--json")
    assert warmed.returncode == 0, warmed.stderr
    assert json.loads(warmed.stdout)["hit"] is False
