"""The Cache API end to end on real local directories (the cloud paths are in tests/integration)."""

import os
import subprocess
import sys
import time

import pytest

from cacheagent.cache import Cache, LeaseSpec
from cacheagent.errors import CacheFullError, RemoteNotFoundError


def make_model(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def cache(tmp_path):
    with Cache(tmp_path / "cache", concurrency=4, part_size=1024 * 1024) as c:
        yield c


def ten_file_model(root):
    return make_model(
        root,
        {f"1/part{i}.bin": os.urandom(50_000 + i) for i in range(9)}
        | {"config.pbtxt": b"name: 'm'"},
    )


def test_miss_then_hit(tmp_path, cache):
    model = ten_file_model(tmp_path / "m")
    first = cache.fetch(str(model))
    assert not first.hit and first.files_fetched == 10 and first.bytes_fetched == first.size
    second = cache.fetch(str(model))
    assert second.hit and second.bytes_fetched == 0 and second.path == first.path
    for rel in ("1/part3.bin", "config.pbtxt"):
        assert (second.path / rel).read_bytes() == (model / rel).read_bytes()
    stats = cache.stats()
    assert stats.counters["hits"] == 1 and stats.counters["misses"] == 1


def test_one_changed_file_of_ten_fetches_only_that_file(tmp_path, cache):
    model = ten_file_model(tmp_path / "m")
    first = cache.fetch(str(model))
    time.sleep(0.01)
    new = os.urandom(70_000)
    (model / "1/part5.bin").write_bytes(new)
    second = cache.fetch(str(model))
    assert not second.hit
    assert second.files_fetched == 1 and second.bytes_fetched == len(new)
    assert (second.path / "1/part5.bin").read_bytes() == new
    assert second.key != first.key and first.path.exists()


def test_large_file_in_many_parts_is_exact(tmp_path):
    data = os.urandom(5 * 1024 * 1024 + 123)
    model = make_model(tmp_path / "m", {"1/big.bin": data, "config.pbtxt": b"x"})
    with Cache(tmp_path / "c", concurrency=3, part_size=1024 * 1024) as c:
        snap = c.fetch(str(model))
        assert (snap.path / "1/big.bin").read_bytes() == data


def test_identical_content_stored_once_across_models_and_versions(tmp_path, cache):
    weights = os.urandom(200_000)
    a = make_model(tmp_path / "a", {"1/w.bin": weights, "2/w.bin": weights, "config.pbtxt": b"a"})
    b = make_model(tmp_path / "b", {"1/w.bin": weights, "config.pbtxt": b"b"})
    cache.fetch(str(a))
    cache.fetch(str(b))
    assert cache.size() == len(weights) + 2


def test_empty_or_missing_directory_is_a_clear_error(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RemoteNotFoundError, match="no model files under"):
        cache.fetch(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        cache.fetch(str(tmp_path / "missing"))


def test_model_larger_than_budget_fails_with_both_sizes(tmp_path):
    model = make_model(tmp_path / "m", {"1/w.bin": b"x" * 5000})
    with Cache(tmp_path / "c", max_size=1000) as c, pytest.raises(CacheFullError) as info:
        c.fetch(str(model))
    assert "5000 bytes" in str(info.value) and "1000 bytes" in str(info.value)
    assert "max_size" in str(info.value)


def test_lru_eviction_respects_leases_and_budget(tmp_path, cache):
    models = [make_model(tmp_path / f"m{i}", {"1/w.bin": os.urandom(100_000)}) for i in range(3)]
    s0 = cache.fetch(str(models[0]), lease=LeaseSpec("L0", os.getpid(), "m0"))
    s1 = cache.fetch(str(models[1]))
    s2 = cache.fetch(str(models[2]))
    cache.fetch(str(models[1]))  # m1 now more recent than m2
    dry = cache.evict(150_000, dry_run=True)
    assert [r.key for r in dry.evicted] == [s2.key, s1.key]
    assert s2.path.exists()
    report = cache.evict(150_000)
    assert {r.key for r in report.evicted} == {s1.key, s2.key}
    assert s0.path.exists() and not s1.path.exists() and not s2.path.exists()
    assert cache.size() == 100_000 and report.size_after == 100_000
    cache.release("L0")
    cache.evict(0)
    assert cache.size() == 0 and not s0.path.exists()


def test_lease_of_dead_process_does_not_protect(tmp_path, cache):
    model = make_model(tmp_path / "m", {"1/w.bin": b"w" * 1000})
    # A lease lives while its taker runs: a child takes one, then exits.
    take = (
        "import os, sys\n"
        "from cacheagent.cache import Cache, LeaseSpec\n"
        "Cache(sys.argv[1]).fetch(sys.argv[2], lease=LeaseSpec('dead', os.getpid(), 'm'))\n"
    )
    child = subprocess.run([sys.executable, "-c", take, str(cache.root), str(model)], timeout=60)
    assert child.returncode == 0
    assert [lease.lease_id for lease in cache.leases()] == ["dead"]
    snap = cache.fetch(str(model))
    assert snap.hit
    assert cache.evict(0).evicted[0].key == snap.key
    assert cache.leases() == []


def test_corrupt_blob_detected_by_size_and_refetched(tmp_path, cache):
    model = make_model(tmp_path / "m", {"1/w.bin": os.urandom(10_000), "config.pbtxt": b"c"})
    snap = cache.fetch(str(model))
    blob = snap.path / "1/w.bin"
    os.chmod(blob, 0o644)
    with open(blob, "ab") as handle:
        handle.write(b"junk")
    again = cache.fetch(str(model))
    assert not again.hit and again.files_fetched == 1
    assert (again.path / "1/w.bin").read_bytes() == (model / "1/w.bin").read_bytes()
    assert cache.stats().counters["corrupt_repaired"] == 1


def test_flipped_byte_detected_only_by_hash_mode(tmp_path):
    model = make_model(tmp_path / "m", {"1/w.bin": os.urandom(10_000)})
    with Cache(tmp_path / "c") as c:
        snap = c.fetch(str(model))
        target = snap.path / "1/w.bin"
        os.chmod(target, 0o644)
        with open(target, "r+b") as handle:
            first = handle.read(1)
            handle.seek(0)
            handle.write(bytes([first[0] ^ 0xFF]))
        assert c.fetch(str(model)).hit  # size check cannot see a flipped byte
        fixed = c.fetch(str(model), settings=c.defaults.replace(verify="hash"))
        assert not fixed.hit
        assert (fixed.path / "1/w.bin").read_bytes() == (model / "1/w.bin").read_bytes()


def test_verify_reports_and_repairs(tmp_path, cache):
    model = make_model(tmp_path / "m", {"1/w.bin": os.urandom(1000)})
    snap = cache.fetch(str(model))
    assert cache.verify().corrupt_blobs == []
    target = snap.path / "1/w.bin"
    os.chmod(target, 0o644)
    target.write_bytes(b"\x00" * 1000)
    report = cache.verify()
    assert len(report.corrupt_blobs) == 1 and report.broken_snapshots == [snap.key]
    assert not snap.path.exists()
    assert not cache.fetch(str(model)).hit


def test_purge_keeps_live_leases(tmp_path, cache):
    a = cache.fetch(
        str(make_model(tmp_path / "a", {"w": b"a" * 10})), lease=LeaseSpec("x", os.getpid())
    )
    b = cache.fetch(str(make_model(tmp_path / "b", {"w": b"b" * 10})))
    assert cache.purge() == 10
    assert a.path.exists() and not b.path.exists()


def test_backend_writes_into_snapshot_do_not_break_it(tmp_path, cache):
    model = make_model(tmp_path / "m", {"1/model.py": b"print()"})
    snap = cache.fetch(str(model))
    version_dir = snap.path / "1"
    os.chmod(version_dir, 0o755)  # root ignores 0555 anyway; emulate a backend writing
    (version_dir / "__pycache__").mkdir()
    (version_dir / "__pycache__" / "model.pyc").write_bytes(b"x")
    assert cache.fetch(str(model)).hit
    assert cache.verify().broken_snapshots == []
    cache.evict(0)
    assert not snap.path.exists()


def test_leased_snapshots_over_budget_warn_instead_of_failing(tmp_path):
    a = make_model(tmp_path / "a", {"w": os.urandom(6000)})
    b = make_model(tmp_path / "b", {"w": os.urandom(6000)})
    with Cache(tmp_path / "c", max_size=10_000) as cache:
        first = cache.fetch(str(a), lease=LeaseSpec("La", os.getpid(), "a"))
        assert first.warning == ""
        second = cache.fetch(str(b))
        assert "over its budget" in second.warning and first.path.exists()


def test_a_hit_is_served_from_its_record_file_and_its_bookkeeping_follows(tmp_path, monkeypatch):
    """defer_bookkeeping: a fresh cache serves a hit, lease taken, before it opens the index."""
    import threading

    from cacheagent.local.index import Index

    model = ten_file_model(tmp_path / "m")
    root = tmp_path / "cache"
    with Cache(root) as first:
        published = first.fetch(str(model))
    gate = threading.Event()
    note_hit = Index.note_hit

    def held_note_hit(self, key, size):  # the index thread, held until the hit is checked
        assert gate.wait(30)
        note_hit(self, key, size)

    monkeypatch.setattr(Index, "note_hit", held_note_hit)
    with Cache(root) as cache:
        lease = LeaseSpec("lease-1", os.getpid(), "m")
        hit = cache.fetch(str(model), lease=lease, defer_bookkeeping=True)
        assert hit.hit and hit.path == published.path
        assert cache.index._db_handle is None  # served without the database
        assert [row.lease_id for row in cache.leases()] == ["lease-1"]
        gate.set()
        counters = cache.stats().counters  # waits for the queued bookkeeping
        assert counters["hits"] == 1 and counters["bytes_served_from_cache"] == hit.size
        [record] = cache.snapshots()
        assert record.last_used > record.created


def test_a_hit_without_deferral_writes_its_bookkeeping_before_it_returns(tmp_path, monkeypatch):
    from cacheagent.local.index import Index

    model = ten_file_model(tmp_path / "m")
    root = tmp_path / "cache"
    with Cache(root) as first:
        first.fetch(str(model))
    written = []
    note_hit = Index.note_hit
    monkeypatch.setattr(
        Index, "note_hit", lambda self, key, size: (written.append(key), note_hit(self, key, size))
    )
    with Cache(root) as cache:
        hit = cache.fetch(str(model))
        assert hit.hit and written == [hit.key]


def test_an_unreadable_record_file_is_a_miss_that_publishes_it_again(tmp_path, cache, caplog):
    model = ten_file_model(tmp_path / "m")
    first = cache.fetch(str(model))
    record_file = cache.root / "records" / f"{first.key}.json"
    record_file.write_text("{ not json")
    again = cache.fetch(str(model))
    assert not again.hit and again.key == first.key
    assert "unreadable" in caplog.text and str(record_file) in caplog.text
    assert cache.fetch(str(model)).hit  # published again, record file included
