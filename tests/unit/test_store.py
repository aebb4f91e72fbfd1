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
