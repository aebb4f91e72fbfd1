import os
import stat

import pytest
import xxhash

from cacheagent.errors import UnsafeCacheDirError
from cacheagent.local.store import Store


def test_parts_out_of_order_hash_like_the_whole(tmp_path):
    store = Store(tmp_path / "c")
    data = os.urandom(10_000)
    writer = store.new_blob(len(data))
    parts = [(0, 3000), (3000, 6000), (6000, 10_000)]
    hashed_total = 0
    for start, end in reversed(parts):
        hashed, done = writer.write(start, data[start:end])
        hashed_total += hashed
    assert hashed_total == 3 and done
    digest = writer.commit()
    assert digest == xxhash.xxh3_128_hexdigest(data)
    blob = store.blob_path(digest)
    assert blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_same_content_is_stored_once_and_first_inode_is_kept(tmp_path):
    store = Store(tmp_path / "c")
    digests = []
    for _ in range(2):
        writer = store.new_blob(5)
        writer.write(0, b"hello")
        digests.append(writer.commit())
    assert digests[0] == digests[1]
    assert len(list(store.iter_blobs())) == 1


def test_snapshot_is_hardlinks_and_gc_removes_unreferenced(tmp_path):
    store = Store(tmp_path / "c")
    writer = store.new_blob(3)
    writer.write(0, b"abc")
    digest = writer.commit()
    path = store.publish_snapshot("k1", [("1/model.bin", digest), ("config.pbtxt", digest)])
    assert (path / "1" / "model.bin").read_bytes() == b"abc"
    assert store.blob_path(digest).stat().st_nlink == 3
    assert store.gc_blobs().blobs == 0
    store.remove_snapshot("k1")
    assert not path.exists()
    assert store.gc_blobs().blobs == 1
    assert not store.has_blob(digest)


def test_version_dirs_are_read_only_but_removal_works(tmp_path):
    store = Store(tmp_path / "c")
    writer = store.new_blob(1)
    writer.write(0, b"x")
    digest = writer.commit()
    path = store.publish_snapshot("k", [("1/model.py", digest)])
    assert stat.S_IMODE((path / "1").stat().st_mode) == 0o555
    store.remove_snapshot("k")
    assert not path.exists()


def test_aborted_blob_leaves_nothing(tmp_path):
    store = Store(tmp_path / "c")
    writer = store.new_blob(100)
    writer.write(0, b"x" * 10)
    writer.abort()
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.iter_blobs()) == []


def test_clean_tmp_removes_leftovers_of_dead_processes_only(tmp_path):
    store = Store(tmp_path / "c")
    # Temp names carry their writer's owner token; an owner nobody holds is dead.
    dead = store.tmp_dir / "owner-00000000deadbeef.abc.blob"
    dead.write_bytes(b"partial")
    (store.tmp_dir / "owner-00000000deadbeef.def.snap").mkdir()
    mine = store.temp_path(store.blobs_dir, ".blob")
    assert mine.parent == store.tmp_dir
    mine.write_bytes(b"in progress")
    assert store.clean_tmp() == 2
    assert mine.exists() and not dead.exists()


def test_cache_dir_created_private_and_unsafe_dirs_refused(tmp_path):
    Store(tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(UnsafeCacheDirError, match="world-writable"):
        Store(open_dir)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "new")
    with pytest.raises(UnsafeCacheDirError, match="not a plain directory"):
        Store(link)


def test_foreign_owner_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to create a directory owned by someone else")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(UnsafeCacheDirError, match="owned by uid 12345"):
        Store(theirs)


def test_received_bytes_go_to_disk_in_order_as_they_land(tmp_path, monkeypatch):
    """A big blob hands each contiguous run of received bytes to the disk once it is
    complete, never bytes not yet received, and the blob is still exact (the hint
    changes no data)."""
    from cacheagent.local import atomic
    from cacheagent.local import store as store_module

    calls = []

    def spy(fd, offset, length):
        calls.append((offset, length))
        return atomic.start_writeback(fd, offset, length)  # the real call, for real

    monkeypatch.setattr(store_module, "start_writeback", spy)
    chunk = store_module.WRITEBACK_CHUNK
    part = 1 << 20
    data = os.urandom(3 * chunk + part // 2)
    store = Store(tmp_path / "c")
    writer = store.new_blob(len(data))
    offsets = list(range(0, len(data), part))
    # Everything but the first part arrives first: nothing is contiguous yet.
    for offset in offsets[1:]:
        writer.write(offset, data[offset : offset + part])
    assert calls == []
    writer.write(0, data[:part])
    assert calls == [(0, len(data))]  # the whole blob is contiguous at once
    assert writer.commit() == xxhash.xxh3_128_hexdigest(data)

    calls.clear()
    writer = store.new_blob(len(data))
    for offset in offsets:  # in order: one run per chunk, the short tail left to fsync
        writer.write(offset, data[offset : offset + part])
    assert calls == [(i * chunk, chunk) for i in range(3)]
    assert writer.commit() == xxhash.xxh3_128_hexdigest(data)
    assert atomic.wait_for_writeback(10)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_writeback_runs_in_the_background_on_its_own_descriptor(tmp_path):
    """The hint is queued on a duplicate of the descriptor, so the caller may close
    its own at once; once handed to the kernel the duplicate is closed (no leak)."""
    from cacheagent.local.atomic import start_writeback, wait_for_writeback

    path = tmp_path / "f"
    assert wait_for_writeback(10)
    before = open_fds()
    for _ in range(20):
        with open(path, "wb") as handle:
            handle.write(os.urandom(1 << 20))
            handle.flush()
            assert start_writeback(handle.fileno(), 0, 1 << 20) is True
    assert wait_for_writeback(10)
    assert open_fds() == before
    assert path.stat().st_size == 1 << 20


def test_writeback_hint_is_harmless_where_it_cannot_work(tmp_path):
    from cacheagent.local.atomic import start_writeback, wait_for_writeback

    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    assert start_writeback(fd, 0, 0) is False
    os.close(fd)
    assert start_writeback(fd, 0, 4096) is False  # a closed descriptor: no error raised
    assert wait_for_writeback(10)


def put_blob(store: Store, data: bytes) -> str:
    writer = store.new_blob(len(data))
    writer.write(0, data)
    return writer.commit()


def test_blobs_lie_in_one_directory_so_many_small_files_make_no_directories(tmp_path):
    store = Store(tmp_path / "c")
    digests = [put_blob(store, os.urandom(100)) for _ in range(64)]
    inside = sorted(p.name for p in store.blobs_dir.iterdir())
    assert inside == sorted([*digests, ".flat"])  # 64 blobs would fill ~56 shards
    assert all(store.blob_path(d).parent == store.blobs_dir for d in digests)


def shard_like_before(store: Store, digest: str) -> None:
    """Put a blob where the layout before 0.2 kept it: blobs/<first two hex>/<digest>."""
    shard = store.blobs_dir / digest[:2]
    shard.mkdir(exist_ok=True)
    os.rename(store.blob_path(digest), shard / digest)


def test_a_cache_in_the_old_sharded_layout_is_flattened_once_and_its_snapshots_keep_working(
    tmp_path,
):
    root = tmp_path / "c"
    store = Store(root)
    data = {f"1/f{i}": os.urandom(1000 + i) for i in range(20)}
    digests = {path: put_blob(store, blob) for path, blob in data.items()}
    snap = store.publish_snapshot("k", sorted(digests.items()))
    for digest in set(digests.values()):
        shard_like_before(store, digest)
    (store.blobs_dir / ".flat").unlink()
    (store.blobs_dir / "ab").mkdir(exist_ok=True)
    (store.blobs_dir / "ab" / "stray.txt").write_bytes(b"not a blob")  # left as it is

    reopened = Store(root)
    assert all(reopened.has_blob(d, len(data[p])) for p, d in digests.items())
    assert [p.name for p in reopened.blobs_dir.iterdir() if p.is_dir()] == ["ab"]
    assert (reopened.blobs_dir / ".flat").exists()
    # The snapshot holds the same inodes: nothing was copied, and gc keeps them all.
    for path, digest in digests.items():
        assert (snap / path).stat().st_ino == reopened.blob_path(digest).stat().st_ino
    assert reopened.gc_blobs().blobs == 0
    assert reopened.blob_bytes() == sum(map(len, data.values()))
    assert (reopened.blobs_dir / "ab" / "stray.txt").read_bytes() == b"not a blob"
    assert Store(root).flatten_shards() == 0  # once: the mark says so


def test_a_blob_an_older_version_writes_into_a_shard_is_counted_verified_and_collected(tmp_path):
    store = Store(tmp_path / "c")
    kept, lonely = put_blob(store, b"linked from a snapshot"), put_blob(store, b"lonely")
    store.publish_snapshot("k", [("w.bin", kept)])
    for digest in (kept, lonely):
        shard_like_before(store, digest)  # after the cache was flattened
    assert {d for d, _ in store.iter_blobs()} == {kept, lonely}
    paths = {d: p for d, p, _ in store.blob_files()}
    assert paths[kept] == store.blobs_dir / kept[:2] / kept
    result = store.gc_blobs()
    assert (result.blobs, result.bytes) == (1, len(b"lonely"))
    assert {d for d, _ in store.iter_blobs()} == {kept}
    store.remove_blob(kept)
    assert list(store.iter_blobs()) == []


def test_a_symlinked_old_shard_is_never_followed_when_flattening(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ("ab" + "0" * 30)
    victim.write_bytes(b"precious")
    store = Store(tmp_path / "c")
    (store.blobs_dir / ".flat").unlink()
    (store.blobs_dir / "ab").symlink_to(outside)
    reopened = Store(tmp_path / "c")
    assert list(reopened.iter_blobs()) == []
    assert reopened.gc_blobs().blobs == 0
    assert victim.read_bytes() == b"precious"
    assert not reopened.blob_path(victim.name).exists()
