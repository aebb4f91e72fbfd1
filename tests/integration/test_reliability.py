"""Reliability of the core cache under real faults, against real emulators and processes.

Every fault is produced for real: a ``cacheagent warm`` process is killed with
SIGKILL, the storage emulator is stopped or the proxy in front of it cut,
objects are replaced in the bucket while they download, bytes of cached blobs
are flipped on disk, a small tmpfs fills up. Each test then checks that
nothing partial or wrong became visible and that the cache recovers.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash

from cacheagent.cache import Cache, LeaseSpec
from cacheagent.errors import (
    CacheFullError,
    RemoteChangedError,
    StorageUnavailableError,
    UnsafePathError,
)
from cacheagent.local.index import Index
from cacheagent.remote.listing import list_manifest
from cacheagent.remote.location import parse_location
from harness.emulators import StorageRig
from harness.wait import wait_for
from tests.integration import disks

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
RIGS = {"s3": "s3_rig", "gs": "gcs_rig", "as": "azure_rig"}


# ---- helpers ------------------------------------------------------------------


def open_cache(root: Path, rig: StorageRig, **kwargs: object) -> Cache:
    """A cache that reaches the rig's storage through its counting proxy."""
    return Cache(root, env={**os.environ, **rig.env}, **kwargs)  # type: ignore[arg-type]


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def cache_problems(root: Path) -> list[str]:
    """Everything visible in the cache that is partial or wrong; empty when consistent.

    Read straight from disk and the index, without opening a :class:`Cache` (which
    would clean up temp files, the evidence some tests look for).
    """
    problems = []
    for blob in sorted((root / "blobs").iterdir()):
        if blob.name in (".flat", ".staging"):
            continue
        if blob.is_symlink() or not blob.is_file():
            problems.append(f"blob {blob.name} is not a regular file")
        elif xxh(blob.read_bytes()) != blob.name:
            problems.append(f"blob {blob.name} holds content of another hash")
    index = Index(root / "index")
    try:
        records = {record.key: record for record in index.snapshots()}
    finally:
        index.close()
    for entry in sorted((root / "snapshots").iterdir()):
        record = records.get(entry.name)
        if record is None:
            problems.append(f"snapshot {entry.name} is visible without an index record")
            continue
        for relpath, _size, _fp, _md5, digest in record.files:
            path = entry / relpath
            if path.is_symlink() or not path.is_file():
                problems.append(f"snapshot {entry.name} lacks {relpath}")
            elif xxh(path.read_bytes()) != digest:
                problems.append(f"snapshot {entry.name} has wrong bytes in {relpath}")
    for key in records:
        if not (root / "snapshots" / key).is_dir():
            problems.append(f"index names snapshot {key}, which is not on disk")
    return problems


def owners_of(cache: Path, pid: int) -> list[str]:
    """The owner names of process ``pid``: temp names carry those, not pids.

    An owner token says which pid created it (for people only), and stays until
    a cleanup after its holder's death, so call this before that cleanup.
    """
    return [
        token.stem
        for token in (cache / "owners").glob("owner-*.lock")
        if token.read_text().strip() == f"pid {pid}"
    ]


def temp_entries_of(cache: Path, owners: list[str]) -> list[Path]:
    """Temp files and dirs of those owners."""
    return [path for owner in owners for path in (cache / "tmp").glob(f"{owner}.*")]


def temp_blobs_with_bytes(cache: Path, pid: int) -> list[Path]:
    """Temp blobs of process ``pid`` that already hold downloaded bytes."""
    found = []
    for path in temp_entries_of(cache, owners_of(cache, pid)):
        with contextlib.suppress(FileNotFoundError):  # finished and renamed meanwhile
            if path.suffix == ".blob" and path.stat().st_size > 0:
                found.append(path)
    return found


def snapshot_dirs(root: Path) -> list[str]:
    return sorted(entry.name for entry in (root / "snapshots").iterdir())


def warm_cmd(url: str, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cacheagent.cli.main",
        "warm",
        url,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        *extra,
    ]


def fresh_key(rig: StorageRig, relpath: str) -> str:
    """The snapshot key of what storage holds right now (listed directly, not via the cache)."""
    loc = parse_location(rig.url(relpath), {**os.environ, **rig.env})
    return list_manifest(loc).key


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the retry policy's attempt counts but shrink its sleeps, for tests that wait
    out a persistent outage (the outage itself stays real)."""
    import cacheagent.remote.listing as remote

    monkeypatch.setattr(remote, "RETRY_DELAYS", tuple(0.05 for _ in remote.RETRY_DELAYS))
    monkeypatch.setattr(remote, "LIST_RETRY_DELAYS", tuple(0.05 for _ in remote.LIST_RETRY_DELAYS))


class Once:
    """Run ``action`` the first time it is called, with any arguments; later calls do nothing."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *_args: object) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.done.set()
        self.action()


# ---- 1. crash safety ----------------------------------------------------------


def test_kill9_of_warm_mid_fetch_leaves_nothing_partial(tmp_path, s3_rig):
    rig = s3_rig
    files = {"1/w.bin": os.urandom(6 * MiB), "1/model.py": b"# model\n", "config.pbtxt": b"c"}
    total = sum(map(len, files.values()))
    rig.put_tree("models/m", files)
    cache = tmp_path / "cache"
    env = {**os.environ, **rig.env}
    # Two connections of 1 MiB/s: the 6 MiB take ~3 s, so the kill lands mid-fetch.
    rig.proxy.per_conn_bytes_per_s = MiB
    proc = subprocess.Popen(
        warm_cmd(rig.url("models/m"), cache, "--concurrency", "2", "--part-size", "1MiB"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: bool(temp_blobs_with_bytes(cache, proc.pid)),
            60,
            "the first downloaded part to land in a temp blob",
        )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    # The proxy records a cut download once it notices the closed connection.
    wait_for(lambda: rig.object_bytes("models/m/", ok_only=False) > 0, 10, "the cut GETs")
    crossed = rig.object_bytes("models/m/", ok_only=False)
    assert 0 < crossed < total, "the kill did not land mid-fetch"

    owners = owners_of(cache, proc.pid)
    leftovers = temp_entries_of(cache, owners)
    assert leftovers, "the killed process left no temp file: it was not mid-download"
    assert snapshot_dirs(cache) == []
    assert cache_problems(cache) == []

    rig.proxy.per_conn_bytes_per_s = None
    again = subprocess.run(
        warm_cmd(rig.url("models/m"), cache, "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["hit"] is False
    for relpath, data in files.items():
        assert (Path(result["path"]) / relpath).read_bytes() == data
    assert not temp_entries_of(cache, owners), "the dead pid's temp files stayed"
    assert snapshot_dirs(cache) == [result["key"]]
    assert cache_problems(cache) == []


# ---- 2. storage faults --------------------------------------------------------


@pytest.mark.parametrize(
    ("cloud", "fault"),
    [
        ("s3", "proxy_down"),
        ("gs", "emulator_stopped"),
        ("as", "emulator_stopped"),
    ],
)
def test_storage_lost_mid_download_fails_clearly_and_publishes_nothing(
    request, tmp_path, cloud, fault, fast_retries
):
    rig: StorageRig = request.getfixturevalue(RIGS[cloud])
    files = {"1/w.bin": os.urandom(3 * MiB), "config.pbtxt": b"c"}
    rig.put_tree("models/m", files)
    url = rig.url("models/m")
    rig.proxy.per_conn_bytes_per_s = 2 * MiB
    cut = Once(lambda: rig.proxy.set_down(True) if fault == "proxy_down" else rig.stop_emulator())
    with open_cache(tmp_path / "cache", rig, concurrency=2, part_size=MiB) as cache:
        with pytest.raises(StorageUnavailableError) as failure:
            cache.fetch(url, progress=cut)
        assert cut.done.is_set(), "the download finished before the fault"
        # A dead endpoint is tried a bounded number of times, then given up on: per part
        # 4 attempts of ours, each at most 2 of the SDK's own retry loops of up to 3
        # requests; 2 parts in flight.
        failed = rig.proxy.refused_connections + rig.proxy.count(
            predicate=lambda r: r.status >= 500 or not r.complete
        )
        assert 0 < failed <= 2 * 4 * 2 * 3
        message = str(failure.value)
        assert url in message and "unreachable" in message
        assert cache.snapshots() == [] and snapshot_dirs(cache.root) == []
        report = cache.verify(repair=False)
        assert report.corrupt_blobs == [] and report.broken_snapshots == []
        # Our pid is alive, so nothing would clean these later: the abort must have.
        assert list((cache.root / "tmp").iterdir()) == []
        assert cache_problems(cache.root) == []

        if fault == "proxy_down":
            rig.proxy.set_down(False)
        else:
            rig.start_emulator()
            if not rig.emulator.keeps_data_across_restart:
                rig.put_tree("models/m", files)
        rig.proxy.per_conn_bytes_per_s = None
        snap = cache.fetch(url)
        assert not snap.hit
        for relpath, data in files.items():
            assert (snap.path / relpath).read_bytes() == data
    assert cache_problems(tmp_path / "cache") == []


def test_transient_outage_mid_download_is_retried(tmp_path, rig):
    files = {"1/w.bin": os.urandom(4 * MiB), "config.pbtxt": b"c"}
    rig.put_tree("models/m", files)
    rig.proxy.per_conn_bytes_per_s = 2 * MiB

    def blip() -> None:
        rig.proxy.set_down(True)
        threading.Timer(0.5, rig.proxy.set_down, (False,)).start()

    blipped = Once(blip)
    with open_cache(tmp_path / "cache", rig, concurrency=2, part_size=MiB) as cache:
        snap = cache.fetch(rig.url("models/m"), progress=blipped)
    assert blipped.done.is_set()
    for relpath, data in files.items():
        assert (snap.path / relpath).read_bytes() == data
    # The outage really broke transfers or refused connections, and retries got past it.
    broken = [r for r in rig.content_records("models/m/", ok_only=False) if not r.complete]
    assert broken or rig.proxy.refused_connections > 0
    assert rig.object_bytes("models/m/") >= sum(map(len, files.values()))
    assert cache_problems(tmp_path / "cache") == []


def test_object_replaced_after_listing_is_detected(tmp_path, rig):
    old = {"1/w.bin": os.urandom(100_000), "config.pbtxt": b"version 1"}
    new = {"1/w.bin": os.urandom(100_000), "config.pbtxt": b"version 2"}  # same sizes
    rig.put_tree("models/m", old)
    upload = Once(lambda: rig.put_tree("models/m", new))
    with open_cache(tmp_path / "cache", rig) as cache:
        snap = cache.fetch(rig.url("models/m"), on_plan=upload)
        assert upload.done.is_set()
        for relpath, data in new.items():
            assert (snap.path / relpath).read_bytes() == data
        # The snapshot is filed under what it holds: the listing taken after the upload.
        # Filed under the earlier listing, its new bytes would pass for the old version.
        assert snap.key == fresh_key(rig, "models/m")
        assert [r.key for r in cache.snapshots()] == [snap.key]
    assert cache_problems(tmp_path / "cache") == []


def test_object_that_keeps_changing_is_never_published(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/m", {"1/w.bin": b"v0" * 5000, "config.pbtxt": b"c"})
    uploads = []

    def upload_again(_files: int, _size: int) -> None:
        uploads.append(len(uploads))
        rig.put("models/m/1/w.bin", f"v{len(uploads)}".encode() * 5000)

    with open_cache(tmp_path / "cache", rig) as cache:
        with pytest.raises(RemoteChangedError) as failure:
            cache.fetch(rig.url("models/m"), on_plan=upload_again)
        assert rig.url("models/m") in str(failure.value)
        assert "changed while" in str(failure.value)
        assert len(uploads) == 2  # one retry, then a clear error instead of a loop
        assert cache.snapshots() == [] and snapshot_dirs(cache.root) == []
    assert cache_problems(tmp_path / "cache") == []


def test_object_replaced_mid_download_is_never_published_mixed(tmp_path, rig):
    old, new = os.urandom(4 * MiB), os.urandom(4 * MiB)
    rig.put_tree("models/m", {"1/w.bin": old, "config.pbtxt": b"c"})
    rig.proxy.per_conn_bytes_per_s = 4 * MiB
    # One connection, 1 MiB parts in order: the first part is old, the rest new.
    replace = Once(lambda: rig.put("models/m/1/w.bin", new))
    with open_cache(tmp_path / "cache", rig, concurrency=1, part_size=MiB) as cache:
        snap = cache.fetch(rig.url("models/m"), progress=replace)
        assert replace.done.is_set()
        assert (snap.path / "1/w.bin").read_bytes() == new
        assert snap.key == fresh_key(rig, "models/m")
        assert [r.key for r in cache.snapshots()] == [snap.key]
        # The first attempt really got a mix of both versions; it was caught, not published.
        mixed = [
            digest
            for digest, _info in cache.store.iter_blobs()
            if (data := cache.store.blob_path(digest).read_bytes())[:MiB] == old[:MiB]
            and data[MiB:] == new[MiB:]
        ]
        # On S3 the part of the other version is refused as it arrives (its ETag), so
        # the mixed blob is never even committed; the SDKs hide the ETag, and there
        # the listing after the download catches it.
        if rig.cloud == "s3":
            assert not mixed
        else:
            assert mixed, "the replacement did not land mid-download"
        published = {row[4] for record in cache.snapshots() for row in record.files}
        assert not set(mixed) & published
    assert cache_problems(tmp_path / "cache") == []


@pytest.mark.parametrize("origin", ["s3_rig", "seaweed_rig"])
def test_an_object_replaced_and_put_back_mid_download_is_never_published_mixed(
    tmp_path, origin, request
):
    # A, then B after the first part, then A again after the next: a listing
    # after the download sees A as the first did, so only the ETag of each
    # answer can tell that a part came from B.
    rig: StorageRig = request.getfixturevalue(origin)
    a, b = os.urandom(3 * MiB), os.urandom(3 * MiB)
    rig.put_tree("models/m", {"1/w.bin": a, "config.pbtxt": b"c"})
    uploads = [lambda: rig.put("models/m/1/w.bin", b), lambda: rig.put("models/m/1/w.bin", a)]

    def progress(_nbytes: int) -> None:
        if uploads:  # one request at a time: no race
            uploads.pop(0)()

    rig.proxy.per_conn_bytes_per_s = 8 * MiB
    with open_cache(tmp_path / "cache", rig, concurrency=1, part_size=MiB) as cache:
        try:
            snap = cache.fetch(rig.url("models/m"), progress=progress)
        except RemoteChangedError as exc:
            assert "changed while it was being downloaded" in str(exc)
        else:  # whatever was published is one whole version, filed under it
            assert (snap.path / "1/w.bin").read_bytes() in (a, b)
            assert snap.key == fresh_key(rig, "models/m")
        assert not uploads
        published = {row[4] for record in cache.snapshots() for row in record.files}
        assert published <= {xxh(a), xxh(b), xxh(b"c")}
    assert cache_problems(tmp_path / "cache") == []


def test_a_multi_file_upload_that_lands_mid_download_is_published_whole(tmp_path, s3_rig):
    # The first listing sees the upload half done (config new, weights old); the
    # weights land after their own GETs ended, while another file still downloads.
    # Every answer carried the ETag listed: only the listing after the download sees it.
    rig = s3_rig
    big1, big2, mid = os.urandom(4 * MiB), os.urandom(4 * MiB), os.urandom(2 * MiB)
    rig.put_tree("models/m", {"1/big.bin": big1, "1/mid.bin": mid, "config.pbtxt": b"cfg v1"})
    rig.put("models/m/config.pbtxt", b"cfg v2")
    arrived = [0]
    land = Once(lambda: rig.put("models/m/1/big.bin", big2))

    def progress(nbytes: int) -> None:
        arrived[0] += nbytes  # one request at a time: no race on the count
        if arrived[0] >= 4 * MiB:  # largest first: all of big.bin, none of mid.bin yet
            land()

    rig.proxy.per_conn_bytes_per_s = 8 * MiB
    with open_cache(tmp_path / "cache", rig, concurrency=1, part_size=MiB) as cache:
        snap = cache.fetch(rig.url("models/m"), progress=progress)
        assert land.done.is_set()
        assert (snap.path / "config.pbtxt").read_bytes() == b"cfg v2"
        assert (snap.path / "1/big.bin").read_bytes() == big2
        assert snap.key == fresh_key(rig, "models/m")
    assert cache_problems(tmp_path / "cache") == []


# ---- 3. corruption ------------------------------------------------------------


def blob_of(cache: Cache, relpath: str) -> Path:
    (record,) = cache.snapshots()
    digest = record.blobs()[relpath]
    return cache.store.blob_path(digest)


def corrupt(path: Path, how: str) -> None:
    """Damage a cached file in place (blobs are read-only: make it writable first)."""
    path.chmod(0o644)
    if how == "append":
        with open(path, "ab") as handle:
            handle.write(b"!")
    else:  # flip one bit in the middle, same size
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x01]))
    path.chmod(0o444)


def model_files() -> dict[str, bytes]:
    return {
        "1/w.bin": os.urandom(2 * MiB),
        "1/model.py": b"# model\n",
        "config.pbtxt": b'name: "m"',
    }


def test_appended_byte_is_caught_by_the_size_check_and_refetched(tmp_path, s3_rig):
    rig = s3_rig
    files = model_files()
    rig.put_tree("models/m", files)
    with open_cache(tmp_path / "cache", rig) as cache:  # verify="size", the default
        cache.fetch(rig.url("models/m"))
        corrupt(blob_of(cache, "1/w.bin"), "append")
        rig.proxy.reset()
        snap = cache.fetch(rig.url("models/m"))
        assert not snap.hit and snap.files_fetched == 1
        assert snap.bytes_fetched == len(files["1/w.bin"])
        assert rig.object_bytes("models/m/") == len(files["1/w.bin"])
        for relpath, data in files.items():
            assert (snap.path / relpath).read_bytes() == data
        assert cache.stats().counters["corrupt_repaired"] == 1
    assert cache_problems(tmp_path / "cache") == []


def test_damaged_blob_reused_by_a_new_version_is_replaced_not_linked(tmp_path, s3_rig):
    rig = s3_rig
    files = model_files()
    rig.put_tree("models/m", files)
    with open_cache(tmp_path / "cache", rig) as cache:
        old = cache.fetch(rig.url("models/m"))
        corrupt(blob_of(cache, "1/w.bin"), "append")
        # A new version with the same weights: the damaged blob is found by its content
        # hash, fails the size check, and the fresh download must take its place.
        config = b'name: "m" # v2'
        rig.put("models/m/config.pbtxt", config)
        snap = cache.fetch(rig.url("models/m"))
        assert snap.files_fetched == 2
        assert snap.bytes_fetched == len(files["1/w.bin"]) + len(config)
        assert (snap.path / "1/w.bin").read_bytes() == files["1/w.bin"]
    # Only the old snapshot still holds the damaged copy (its next load re-fetches it).
    assert cache_problems(tmp_path / "cache") == [f"snapshot {old.key} has wrong bytes in 1/w.bin"]


def test_flipped_byte_is_caught_by_verify_hash_and_refetched(tmp_path, s3_rig):
    rig = s3_rig
    files = model_files()
    rig.put_tree("models/m", files)
    root = tmp_path / "cache"
    with open_cache(root, rig) as cache:
        cache.fetch(rig.url("models/m"))
        corrupt(blob_of(cache, "1/w.bin"), "flip")
        # Precondition: the flip kept the size, so only a re-hash can see it.
        assert cache.fetch(rig.url("models/m")).hit
    rig.proxy.reset()
    with open_cache(root, rig, verify="hash") as cache:
        snap = cache.fetch(rig.url("models/m"))
        assert not snap.hit and snap.bytes_fetched == len(files["1/w.bin"])
        assert rig.object_bytes("models/m/") == len(files["1/w.bin"])
        for relpath, data in files.items():
            assert (snap.path / relpath).read_bytes() == data
        assert cache.fetch(rig.url("models/m")).hit  # and the repaired copy passes
    assert cache_problems(root) == []


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cacheagent.cli.main", *argv],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_verify_scans_reports_and_repairs(tmp_path, s3_rig):
    rig = s3_rig
    files = model_files()
    rig.put_tree("models/m", files)
    root = tmp_path / "cache"
    with open_cache(root, rig) as cache:
        snap = cache.fetch(rig.url("models/m"))
        blob = blob_of(cache, "1/w.bin")
    corrupt(blob, "flip")

    scan = run_cli("verify", "--cache-dir", str(root), "--no-repair", "--json")
    assert scan.returncode == 3, scan.stderr  # corruption found, left in place
    found = json.loads(scan.stdout)
    assert found["corrupt_blobs"] == [blob.name]
    assert found["broken_snapshots"] == [snap.key]
    assert found["repaired"] is False and blob.exists()
    text = run_cli("verify", "--cache-dir", str(root), "--no-repair")
    assert text.returncode == 3 and "1 corrupt blob(s)" in text.stdout

    repair = run_cli("verify", "--cache-dir", str(root), "--json")
    assert repair.returncode == 4, repair.stderr  # found and repaired
    repaired = json.loads(repair.stdout)
    assert repaired["corrupt_blobs"] == [blob.name] and repaired["repaired"] is True
    assert not blob.exists() and not snap.path.exists()
    assert cache_problems(root) == []
    clean = run_cli("verify", "--cache-dir", str(root), "--json")
    assert clean.returncode == 0 and json.loads(clean.stdout)["corrupt_blobs"] == []

    rig.proxy.reset()
    warm = run_cli(
        "warm",
        rig.url("models/m"),
        "--cache-dir",
        str(root),
        "--json",
        env={**os.environ, **rig.env},
    )
    assert warm.returncode == 0, warm.stderr
    result = json.loads(warm.stdout)
    assert result["bytes_fetched"] == len(files["1/w.bin"])  # only the damaged file
    for relpath, data in files.items():
        assert (Path(result["path"]) / relpath).read_bytes() == data


# ---- 4. outage ----------------------------------------------------------------


def test_real_outage_serves_last_good_snapshot_or_fails_naming_url(tmp_path, rig, fast_retries):
    files = model_files()
    rig.put_tree("models/m", files)
    url = rig.url("models/m")
    with open_cache(tmp_path / "cache", rig) as cache:
        good = cache.fetch(url)
        rig.stop_emulator()
        stale = cache.fetch(url)
        assert stale.stale and stale.hit and stale.path == good.path
        assert url in stale.warning and "stale" in stale.warning
        for relpath, data in files.items():
            assert (stale.path / relpath).read_bytes() == data
        assert cache.stats().counters["stale_served"] == 1

        strict = cache.defaults.replace(stale_if_error=False)
        with pytest.raises(StorageUnavailableError) as refused:
            cache.fetch(url, settings=strict)
        assert url in str(refused.value) and "unreachable" in str(refused.value)
    assert cache_problems(tmp_path / "cache") == []


# ---- 5. concurrency -----------------------------------------------------------


def test_concurrent_warms_overlap_and_download_once(tmp_path, s3_rig):
    rig = s3_rig
    files = {"1/w.bin": os.urandom(4 * MiB), "config.pbtxt": b"c"}
    size = sum(map(len, files.values()))
    rig.put_tree("models/m", files)
    # A crawl until all three have listed the model, so the runs surely overlap
    # however slowly they start; then full speed.
    rig.proxy.per_conn_bytes_per_s = 64 * 1024
    cache = tmp_path / "cache"
    env = {**os.environ, **rig.env}
    cmd = warm_cmd(rig.url("models/m"), cache, "--json", "--concurrency", "1")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        wait_for(lambda: len(listings(rig)) >= 3, 60, "three listings")
        assert rig.object_bytes("models/m/1/") == 0, "the download ended before all listed"
        rig.proxy.per_conn_bytes_per_s = None
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len({r["path"] for r in results}) == 1
    assert sorted(r["hit"] for r in results) == [False, True, True]
    assert sum(r["bytes_fetched"] for r in results) == size
    # The model's files cross once; each warm also reads config.pbtxt to select the
    # versions its policy loads, as Triton hands a LOAD its config.
    config = len(files["config.pbtxt"])
    assert rig.object_bytes("models/m/") == size + 3 * config
    assert cache_problems(cache) == []


def listings(rig: StorageRig) -> list[object]:
    return [r for r in rig.proxy.records() if "list-type=2" in r.query]


# ---- 6. budget and disk -------------------------------------------------------


def test_model_over_budget_fails_naming_both_sizes_before_any_download(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/big", {"1/w.bin": os.urandom(2 * MiB), "config.pbtxt": b"c"})
    with (
        open_cache(tmp_path / "cache", rig, max_size=MiB) as cache,
        pytest.raises(CacheFullError) as failure,
    ):
        cache.fetch(rig.url("models/big"))
    message = str(failure.value)
    assert str(2 * MiB + 1) in message and str(MiB) in message and "max_size" in message
    assert rig.url("models/big") in message
    assert rig.object_bytes() == 0


def test_leased_snapshot_is_never_evicted(tmp_path, s3_rig):
    rig = s3_rig
    for name in ("a", "b", "c"):
        rig.put_tree(f"models/{name}", {"1/w.bin": os.urandom(MiB), "config.pbtxt": name.encode()})
    # A lease lives while its taker runs: "b" is leased by a process that has exited.
    take_and_exit = (
        "import os, sys\n"
        "from cacheagent.cache import Cache, LeaseSpec\n"
        "Cache(sys.argv[1]).fetch(sys.argv[2], lease=LeaseSpec('dead', os.getpid(), 'b'))\n"
    )
    with open_cache(tmp_path / "cache", rig, max_size=2 * MiB + 100) as cache:
        # "a" is leased by this (live) process and used least recently of all.
        a = cache.fetch(rig.url("models/a"), lease=LeaseSpec("live", os.getpid(), "a"))
        dead = subprocess.run(
            [sys.executable, "-c", take_and_exit, str(cache.root), rig.url("models/b")],
            env={**os.environ, **rig.env},
            timeout=120,
        )
        assert dead.returncode == 0
        b = cache.fetch(rig.url("models/b"))
        assert b.hit and {lease.lease_id for lease in cache.leases()} == {"live", "dead"}
        c = cache.fetch(rig.url("models/c"))  # must make room: only "b" may go
        kept = {r.key for r in cache.snapshots()}
        assert a.key in kept and c.key in kept and b.key not in kept
        report = cache.evict(0)
        assert report.kept_leased == 1 and [r.key for r in report.evicted] == [c.key]
        assert [r.key for r in cache.snapshots()] == [a.key] and a.path.is_dir()
        cache.purge()
        assert a.path.is_dir() and (a.path / "1/w.bin").stat().st_size == MiB
        cache.release("live")
        cache.evict(0)
        assert cache.snapshots() == [] and cache.size() == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, so 'disk full' is the kernel's ENOSPC, not a mock."""
    with disks.tmpfs(tmp_path / "tmpfs", "size=8m,mode=0700") as mount:
        yield mount


def test_model_larger_than_the_disk_fails_cleanly(tmpfs, s3_rig):
    rig = s3_rig
    rig.put_tree("models/m", {"1/w.bin": os.urandom(20 * MiB), "config.pbtxt": b"c"})
    with open_cache(tmpfs / "cache", rig) as cache:
        with pytest.raises(CacheFullError) as failure:
            cache.fetch(rig.url("models/m"))
        assert "free" in str(failure.value) and str(cache.root) in str(failure.value)
        assert cache.snapshots() == [] and list((cache.root / "tmp").iterdir()) == []
    assert rig.object_bytes() == 0  # refused up front, no wasted download
    assert cache_problems(tmpfs / "cache") == []


def test_disk_filling_up_mid_download_fails_cleanly_then_recovers(tmpfs, s3_rig):
    rig = s3_rig
    files = {"1/w.bin": os.urandom(5 * MiB), "config.pbtxt": b"c"}
    rig.put_tree("models/m", files)
    filler = tmpfs / "filler"

    def fill_disk(_files: int, _size: int) -> None:
        # Another tenant of the disk takes all but 1 MiB after the free-space check:
        # the download then hits a real ENOSPC.
        free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
        with open(filler, "wb") as handle:
            handle.write(b"\0" * max(free - MiB, 0))

    with open_cache(tmpfs / "cache", rig, concurrency=2, part_size=MiB) as cache:
        with pytest.raises(CacheFullError) as failure:
            cache.fetch(rig.url("models/m"), on_plan=fill_disk)
        assert filler.exists()
        assert "full" in str(failure.value) and str(cache.root) in str(failure.value)
        assert cache.snapshots() == [] and list((cache.root / "tmp").iterdir()) == []
        assert cache_problems(cache.root) == []

        filler.unlink()
        snap = cache.fetch(rig.url("models/m"))
        for relpath, data in files.items():
            assert (snap.path / relpath).read_bytes() == data

        # A hit needs no new space: it is served even when the disk is full.
        with open(filler, "wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
        assert os.statvfs(tmpfs).f_bavail == 0
        hit = cache.fetch(rig.url("models/m"))
        assert hit.hit and hit.path == snap.path
        # A lease must be recorded (or eviction could pull the snapshot from under its
        # user): without room for it, the load fails and says why.
        with pytest.raises(CacheFullError, match="full"):
            cache.fetch(rig.url("models/m"), lease=LeaseSpec("l", os.getpid()))
    assert cache_problems(tmpfs / "cache") == []


# ---- 7. hostile object names and secrets ---------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../../{leaf}",
        "1/../../../{leaf}",
        "/{leaf}",
        "1\\..\\..\\{leaf}",
        "./{leaf}",
        "x" * 256 + "{leaf}",
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "backslash", "dot", "too-long"],
)
def test_hostile_object_names_are_refused_and_nothing_escapes(tmp_path, s3_rig, name):
    rig = s3_rig
    leaf = f"escaped-{secrets.token_hex(6)}.bin"
    hostile = name.format(leaf=leaf)
    # S3 keys may hold '..', '//', and backslashes: create the object for real.
    rig.put("models/m/config.pbtxt", b"c")
    rig.put(f"models/m/{hostile}", b"payload")
    rig.fs.invalidate_cache()
    assert any(key.endswith(leaf) for key in rig.fs.find(rig.key("models/m")))
    root = tmp_path / "deep" / "er" / "cache"
    with open_cache(root, rig) as cache:
        with pytest.raises(UnsafePathError) as failure:
            cache.fetch(rig.url("models/m"))
        assert "refusing object name" in str(failure.value)
        assert cache.snapshots() == [] and snapshot_dirs(root) == []
    assert rig.object_bytes() == 0
    escaped = [str(p) for p in tmp_path.rglob(f"*{leaf}*")]
    assert escaped == [] and not Path("/", leaf).exists()


SECRET_KEY = "sEcReT-" + secrets.token_hex(12)
AZURE_SECRET = base64.b64encode(b"azure-account-key-" + secrets.token_bytes(24)).decode()


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        assert SECRET_KEY not in output and AZURE_SECRET not in output


def test_s3_secret_never_appears_in_cli_output(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/m", {"1/w.bin": b"w", "config.pbtxt": b"c"})
    env = {**os.environ, **rig.env, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    root = str(tmp_path / "cache")
    creds = tmp_path / "creds.json"
    closed_port = rig.proxy.port  # stopped below: a real unreachable endpoint
    bad_bucket = rig.url("models/m").replace(rig.bucket, "no-such-bucket-here")
    outputs = []

    def run(
        *argv: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = run_cli(*argv, "--cache-dir", root, env={**env, **(extra_env or {})})
        outputs.extend([done.stdout, done.stderr])
        return done

    ok = run("warm", rig.url("models/m"), "--json")
    assert ok.returncode == 0, ok.stderr
    assert run("warm", bad_bucket).returncode == 1
    # Broken JSON that quotes the secret: the parse error must not echo it.
    creds.write_text('{"s3": {"": {"key_id": "k", "secret_key": "' + SECRET_KEY + '",}}')
    broken = run(
        "warm", rig.url("models/m"), extra_env={"TRITON_CLOUD_CREDENTIAL_PATH": str(creds)}
    )
    assert broken.returncode != 0 and str(creds) in broken.stderr
    creds.write_text(json.dumps({"s3": {"": {"key_id": "k", "secret_key": SECRET_KEY}}}))
    run("warm", rig.url("models/m"), extra_env={"TRITON_CLOUD_CREDENTIAL_PATH": str(creds)})
    for command in ("ls", "stats"):
        assert run(command, "--json").returncode == 0
    rig.proxy.stop()
    down = run("warm", f"s3://127.0.0.1:{closed_port}/{rig.bucket}/models/other", "--no-stale")
    assert down.returncode == 1 and "unreachable" in down.stderr
    assert "Traceback" not in "".join(outputs)
    assert_no_secret(*outputs)


def test_azure_key_never_appears_in_cli_output(tmp_path, azure_rig):
    rig = azure_rig
    rig.put_tree("models/m", {"1/w.bin": b"w", "config.pbtxt": b"c"})
    good = rig.env
    wrong_key = good["AZURE_STORAGE_CONNECTION_STRING"].replace(
        good["AZURE_STORAGE_KEY"], AZURE_SECRET
    )
    creds = tmp_path / "creds.json"
    # Broken JSON quoting the key (a credential file never sends us off the loopback).
    creds.write_text(
        '{"as": {"": {"account_str": "devstoreaccount1", "account_key": "' + AZURE_SECRET + '"'
    )
    variants = [
        {"AZURE_STORAGE_CONNECTION_STRING": wrong_key, "AZURE_STORAGE_KEY": AZURE_SECRET},
        {"AZURE_STORAGE_CONNECTION_STRING": "AccountKey=" + AZURE_SECRET + ";BlobEndpoint=::"},
        {"TRITON_CLOUD_CREDENTIAL_PATH": str(creds)},
    ]
    outputs = []
    for variant in variants:
        done = run_cli(
            "warm",
            rig.url("models/m"),
            "--cache-dir",
            str(tmp_path / "cache"),
            env={**os.environ, **good, **variant},
        )
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr
        assert rig.url("models/m") in done.stderr or str(creds) in done.stderr
        outputs.extend([done.stdout, done.stderr])
    assert "Traceback" not in "".join(outputs)
    assert_no_secret(*outputs)


def test_stale_if_error_serves_only_a_snapshot_of_the_same_version_selection(
    tmp_path: Path, s3_rig: StorageRig
) -> None:
    """Two models on one source, ``specific [1]`` and ``specific [2]``: in an outage
    each gets its own cached selection, never the other's (which would lack its
    version and fail to load)."""
    from cacheagent.triton.layout import version_selection

    rig = s3_rig
    rig.put_tree("models/m", {"config.pbtxt": b"x", "1/w.bin": b"one", "2/w.bin": b"two"})
    url = rig.url("models/m")
    policies = {
        v: version_selection({"version_policy": {"specific": {"versions": [v]}}}, "policy")
        for v in (1, 2)
    }
    with open_cache(tmp_path / "cache", rig) as cache:
        good = {
            v: cache.fetch(url, select=select, selection=name)
            for v, (select, name) in policies.items()
        }
        assert good[1].key != good[2].key
        rig.proxy.set_down(True)
        try:
            for v, (select, name) in policies.items():
                stale = cache.fetch(url, select=select, selection=name)
                assert stale.stale and stale.key == good[v].key
                assert (stale.path / f"{v}/w.bin").is_file()
            # Triton's JSON gives specific versions as strings: the same selection.
            select, name = version_selection(
                {"version_policy": {"specific": {"versions": ["1"]}}}, "policy"
            )
            assert cache.fetch(url, select=select, selection=name).key == good[1].key
            # A selection never fetched has nothing to fall back on.
            select, name = version_selection({"version_policy": {"all": {}}}, "policy")
            with pytest.raises(StorageUnavailableError):
                cache.fetch(url, select=select, selection=name)
        finally:
            rig.proxy.set_down(False)


def test_verify_repairs_around_a_leased_snapshot_and_never_removes_it(
    tmp_path: Path, s3_rig: StorageRig
) -> None:
    """``verify`` relinks a blob whose name was lost while its snapshot still holds
    intact bytes, and reports (never removes) a damaged snapshot a live process leases."""
    rig = s3_rig
    rig.put_tree("models/m", {"config.pbtxt": b"cfg", "1/w.bin": b"weights" * 1000})
    url = rig.url("models/m")
    with open_cache(tmp_path / "cache", rig) as holder:
        snap = holder.fetch(url, lease=LeaseSpec("holder", os.getpid(), "m"))
        record = holder.index.get_snapshot(snap.key)
        assert record is not None
        digest = record.blobs()["1/w.bin"]
        holder.store.remove_blob(digest)  # the blob's extra name is gone, bytes intact

        with open_cache(tmp_path / "cache", rig) as checker:
            report = checker.verify(repair=True)
            assert report.relinked_blobs == [digest] and report.repaired
            assert report.broken_snapshots == [] and report.leased_left == []
            assert checker.store.has_blob(digest) and snap.path.is_dir()

            weights = snap.path / "1" / "w.bin"
            weights.chmod(0o644)
            with open(weights, "r+b") as handle:  # now real damage, under a live lease
                handle.write(b"X")
            report = checker.verify(repair=True)
            assert report.leased_left == [snap.key] and not report.repaired
            assert report.broken_snapshots == []
            assert snap.path.is_dir()  # a running server's model is never pulled away
        holder.release("holder")
    with open_cache(tmp_path / "cache", rig) as after:
        report = after.verify(repair=True)  # unleased now: removed, fetched at next load
        assert report.broken_snapshots == [snap.key] and report.repaired
        assert not snap.path.exists()
