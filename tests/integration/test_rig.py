"""Tests of the test rig itself: emulators, counting proxy, counting rules.

Every test here talks to real emulator processes (moto, fake-gcs-server,
Azurite) or, for HTTP framing corner cases, to a real local HTTP server, so
the rig that other tests rely on is proven against real traffic.
"""

from __future__ import annotations

import http.client
import http.server
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from harness.emulators import AZURITE_KEY, StorageRig, content_key
from harness.proxy import CountingProxy, ProxyRecord

TREE = {
    "config.pbtxt": b'name: "m"\n',
    "1/model.onnx": bytes(range(256)) * 20,  # 5120 bytes
    "1/sub/extra.bin": b"x" * 300,
}


def _env_client(rig: StorageRig, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An fsspec client configured ONLY from ``rig.env`` (no explicit endpoint)."""
    for name, value in rig.env.items():
        monkeypatch.setenv(name, value)
    if rig.cloud == "s3":
        import s3fs

        # botocore reads keys, region and AWS_ENDPOINT_URL_S3 from the env.
        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    if rig.cloud == "gs":
        import gcsfs

        # gcsfs reads STORAGE_EMULATOR_HOST as its endpoint.
        return gcsfs.GCSFileSystem(
            token="anon", project="test", skip_instance_cache=True, use_listings_cache=False
        )
    import adlfs

    # adlfs reads AZURE_STORAGE_CONNECTION_STRING.
    return adlfs.AzureBlobFileSystem(skip_instance_cache=True, use_listings_cache=False)


def _raw_get(rig: StorageRig, relpath: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Fetch an object through the proxy with a bare HTTP/1.1 client (no SDK retries).

    moto and Azurite answer an unsigned request with 403; that still proves
    the path to the emulator is open, which is all the callers need there.
    """
    key = quote(relpath, safe="")
    path = {
        "s3": f"/{rig.bucket}/{quote(relpath)}",
        "gs": f"/download/storage/v1/b/{rig.bucket}/o/{key}?alt=media",
        "as": f"/devstoreaccount1/{rig.bucket}/{quote(relpath)}",
    }[rig.cloud]
    conn = http.client.HTTPConnection("127.0.0.1", rig.proxy.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- #
# Locations and environment
# --------------------------------------------------------------------------- #


def test_url_env_and_bucket_shape(rig: StorageRig) -> None:
    """url() points through the proxy in the form Triton users write; names are valid."""
    assert re.fullmatch(r"[0-9a-z.-]{3,63}", rig.bucket)
    port = rig.proxy.port
    expected = {
        "s3": f"s3://127.0.0.1:{port}/{rig.bucket}/m/1",
        "gs": f"gs://{rig.bucket}/m/1",
        "as": f"as://devstoreaccount1/{rig.bucket}/m/1",
    }[rig.cloud]
    assert rig.url("m/1") == expected
    env = rig.env
    if rig.cloud == "s3":
        assert env["AWS_ACCESS_KEY_ID"] == "testing"
        assert env["AWS_SECRET_ACCESS_KEY"] == "testing"
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    elif rig.cloud == "gs":
        assert env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == f"http://127.0.0.1:{port}"
        assert env["STORAGE_EMULATOR_HOST"] == f"http://127.0.0.1:{port}"
        assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    else:
        assert (
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
            in (env["AZURE_STORAGE_CONNECTION_STRING"])
        )
        assert env["AZURE_STORAGE_ACCOUNT"] == "devstoreaccount1"
        assert env["AZURE_STORAGE_KEY"] == AZURITE_KEY


def test_direct_fs_setup_is_not_counted(rig: StorageRig) -> None:
    """put/put_tree/read/delete go straight to the emulator, never through the proxy."""
    rig.put_tree("m", TREE)
    rig.put("other.txt", b"hello")
    assert rig.read("m/1/model.onnx") == TREE["1/model.onnx"]
    assert rig.read("other.txt") == b"hello"
    rig.delete("other.txt")
    assert not rig.fs.exists(rig.key("other.txt"))
    rig.delete("m/1")
    assert sorted(rig.fs.find(rig.key("m"))) == [rig.key("m/config.pbtxt")]
    assert rig.proxy.records() == []


# --------------------------------------------------------------------------- #
# Counting rules against real client traffic
# --------------------------------------------------------------------------- #


def test_listing_and_ranged_read_counts(rig: StorageRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing and metadata calls are not content GETs; each read is one, with exact bytes."""
    rig.put_tree("m", TREE)
    rig.put("m2/unrelated.bin", b"u" * 50)
    fs = _env_client(rig, monkeypatch)

    found = fs.find(rig.key("m"), detail=True)
    assert sorted(found) == sorted(rig.key(f"m/{name}") for name in TREE)
    assert {name: info["size"] for name, info in found.items()} == {
        rig.key(f"m/{name}"): len(data) for name, data in TREE.items()
    }
    fs.invalidate_cache()
    assert fs.info(rig.key("m/config.pbtxt"))["size"] == len(TREE["config.pbtxt"])
    # The client really went through the proxy, yet nothing read contents.
    assert rig.proxy.count("GET") >= 1
    assert rig.object_gets() == 0
    assert rig.object_bytes() == 0

    # One ranged read: exactly one content GET of exactly the range's bytes.
    model = TREE["1/model.onnx"]
    assert fs.cat_file(rig.key("m/1/model.onnx"), start=100, end=164) == model[100:164]
    assert rig.object_gets() == 1
    assert rig.object_bytes() == 64
    (rec,) = rig.content_records()
    assert rec.status == 206
    # Azure's SDK sends the range as x-ms-range, the others as Range.
    range_header = rec.request_headers.get("range") or rec.request_headers.get("x-ms-range")
    assert range_header == "bytes=100-163"

    # A whole-file read through open(): one more GET, of the full size.
    fs.invalidate_cache()
    with fs.open(rig.key("m/1/sub/extra.bin"), "rb") as f:
        assert f.read() == TREE["1/sub/extra.bin"]
    assert rig.object_gets() == 2
    assert rig.object_bytes() == 64 + 300
    assert rig.object_gets("m/1/sub/") == 1
    assert rig.object_gets("m/config") == 0
    assert rig.object_gets("m2/") == 0
    assert rig.downloaded_keys() == ["m/1/model.onnx", "m/1/sub/extra.bin"]

    # The proxy's raw helpers agree with the rig's view.
    assert rig.proxy.bytes_out(lambda r: content_key(rig.cloud, r, rig.bucket) is not None) == (364)
    rig.proxy.reset()
    assert rig.object_gets() == 0 and rig.proxy.records() == []


def test_recursive_download_counts_each_object_once(
    rig: StorageRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fs.get of a tree reads each object once; its listings are not counted."""
    rig.put_tree("m", TREE)
    fs = _env_client(rig, monkeypatch)
    out = rig.bucket + "-dl"
    fs.get(rig.key("m") + "/", f"{os.environ.get('TMPDIR', '/tmp')}/{out}/", recursive=True)
    assert rig.object_gets() == len(TREE)
    assert rig.object_bytes() == sum(len(v) for v in TREE.values())
    assert rig.downloaded_keys("m/") == sorted(f"m/{n}" for n in TREE)


def test_metadata_fields_for_change_detection(rig: StorageRig) -> None:
    """The fields a cache keys on are present where documented (direct listing)."""
    data = b"model bytes"
    rig.put("m/f.bin", data)
    import base64
    import hashlib

    (info,) = rig.fs.find(rig.key("m"), detail=True).values()
    md5 = hashlib.md5(data).digest()
    assert info["size"] == len(data)
    if rig.cloud == "s3":
        assert info["ETag"] == f'"{md5.hex()}"'  # quoted MD5 for single-part uploads
    elif rig.cloud == "gs":
        assert info["md5Hash"] == base64.b64encode(md5).decode()
        assert int(info["generation"]) > 0
        assert info["crc32c"]
    else:
        assert re.fullmatch(r'"0x[0-9A-F]+"', info["etag"])
        assert bytes(info["content_settings"]["content_md5"]) == md5


# --------------------------------------------------------------------------- #
# Outage switch and emulator restart
# --------------------------------------------------------------------------- #


def test_outage_switch_makes_clients_fail(rig: StorageRig) -> None:
    """set_down(True) resets connections at once; set_down(False) restores service."""
    rig.put("a.bin", b"abc")
    status, _ = _raw_get(rig, "a.bin")
    assert status < 500
    rig.proxy.set_down(True)
    with pytest.raises((OSError, http.client.HTTPException)):
        _raw_get(rig, "a.bin")
    assert rig.proxy.refused_connections >= 1
    rig.proxy.set_down(False)
    status, body = _raw_get(rig, "a.bin")
    assert status < 500
    if rig.cloud == "gs":  # the others refuse unsigned requests with 403
        assert body == b"abc"


def test_outage_switch_fails_an_sdk_client(s3_rig: StorageRig) -> None:
    """A real SDK client (s3fs, SDK retries off) errors out while the proxy is down."""
    import botocore.exceptions
    import s3fs

    s3_rig.put("a.bin", b"abc")
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": s3_rig.endpoint, "region_name": "us-east-1"},
        config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}},
        skip_instance_cache=True,
    )
    assert fs.cat_file(s3_rig.key("a.bin")) == b"abc"
    s3_rig.proxy.set_down(True)
    with pytest.raises((OSError, botocore.exceptions.BotoCoreError)):
        fs.cat_file(s3_rig.key("a.bin"))
    s3_rig.proxy.set_down(False)
    assert fs.cat_file(s3_rig.key("a.bin")) == b"abc"


def test_outage_drops_in_flight_download(gcs_rig: StorageRig) -> None:
    """Going down mid-transfer cuts the download; the record says incomplete."""
    gcs_rig.put("big.bin", os.urandom(2_000_000))
    gcs_rig.proxy.per_conn_bytes_per_s = 500_000  # ~4 s for the whole object
    errors: list[BaseException] = []
    got: list[int] = []

    def download() -> None:
        try:
            _, body = _raw_get(gcs_rig, "big.bin", timeout=10)
            got.append(len(body))
        except (OSError, http.client.HTTPException) as exc:
            errors.append(exc)

    worker = threading.Thread(target=download)
    worker.start()
    time.sleep(0.5)  # ~250 kB through, well before the end
    gcs_rig.proxy.set_down(True)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert errors or (got and got[0] < 2_000_000)
    # The proxy's worker notices the drop after its current throttle sleep.
    deadline = time.monotonic() + 5
    while not gcs_rig.proxy.records() and time.monotonic() < deadline:
        time.sleep(0.02)
    (rec,) = gcs_rig.proxy.records()
    assert not rec.complete
    assert 0 < rec.response_bytes < 2_000_000


@pytest.mark.parametrize("how", ["per_conn_bytes_per_s", "total_bytes_per_s"])
def test_throttle_limits_throughput(gcs_rig: StorageRig, how: str) -> None:
    """A 2 MB transfer at 1 MB/s takes at least 1.5 s (loose lower bound only)."""
    data = os.urandom(2_000_000)
    gcs_rig.put("big.bin", data)
    setattr(gcs_rig.proxy, how, 1_000_000)
    fs = gcs_rig.proxied_fs()
    started = time.monotonic()
    assert fs.cat_file(gcs_rig.key("big.bin")) == data
    assert time.monotonic() - started >= 1.5
    assert gcs_rig.object_bytes() == len(data)


def test_latency_is_added_per_request(gcs_rig: StorageRig) -> None:
    """latency_s delays every forwarded request (lower bound only)."""
    gcs_rig.put("a.bin", b"a")
    gcs_rig.proxy.latency_s = 0.25
    started = time.monotonic()
    for _ in range(3):
        assert _raw_get(gcs_rig, "a.bin") == (200, b"a")
    assert time.monotonic() - started >= 0.75


def test_emulator_restart(rig: StorageRig) -> None:
    """A stopped emulator yields 502 through the proxy; a restart brings it back."""
    rig.put("keep.bin", b"kept")
    rig.stop_emulator()
    status, _ = _raw_get(rig, "keep.bin")
    assert status == 502  # the proxy answers as a gateway whose upstream is gone
    rig.start_emulator()
    if rig.emulator.keeps_data_across_restart:
        assert rig.read("keep.bin") == b"kept"
    else:
        assert rig.fs.find(rig.key()) == []  # memory-only: empty, bucket re-created
    rig.put("new.bin", b"new")
    assert rig.read("new.bin") == b"new"


# --------------------------------------------------------------------------- #
# Proxy framing corner cases, against a real local HTTP/1.1 server
# --------------------------------------------------------------------------- #


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Echo the request body back, chunked when the path says so; keep-alive."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        self._reply(b"g" * 1000)

    def do_PUT(self) -> None:
        self._reply(self._body())

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_DELETE(self) -> None:
        self.send_response(204)
        self.end_headers()

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        if self.path.startswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for off in range(0, len(body), 333):
                piece = body[off : off + 333]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture
def echo_proxy() -> Iterator[CountingProxy]:
    """A CountingProxy in front of a local threaded HTTP/1.1 echo server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    # A short poll interval keeps shutdown() (and so teardown) quick.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with CountingProxy(server.server_address[1]) as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def test_proxy_framing_keepalive_chunked_expect(echo_proxy: CountingProxy) -> None:
    """Keep-alive, chunked bodies both ways, Expect: 100-continue, HEAD and 204 all pass."""
    conn = http.client.HTTPConnection("127.0.0.1", echo_proxy.port, timeout=5)
    body = os.urandom(5000)

    conn.request("GET", "/plain?x=1")
    assert conn.getresponse().read() == b"g" * 1000
    sock = conn.sock  # the same client connection must be reused below

    conn.request("PUT", "/chunked/up", body=iter([body[:1234], body[1234:]]), encode_chunked=True)
    assert conn.getresponse().read() == body
    conn.request("PUT", "/plain/up", body=body, headers={"Expect": "100-continue"})
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, body)
    conn.request("HEAD", "/plain")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"")
    conn.request("DELETE", "/plain")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (204, b"")
    assert conn.sock is sock
    conn.close()

    recs = echo_proxy.records()
    assert [(r.method, r.path, r.query, r.status) for r in recs] == [
        ("GET", "/plain", "x=1", 200),
        ("PUT", "/chunked/up", "", 200),
        ("PUT", "/plain/up", "", 200),
        ("HEAD", "/plain", "", 200),
        ("DELETE", "/plain", "", 204),
    ]
    assert [(r.request_bytes, r.response_bytes) for r in recs] == [
        (0, 1000),
        (5000, 5000),
        (5000, 5000),
        (0, 0),
        (0, 0),
    ]
    assert all(r.complete for r in recs)
    assert echo_proxy.count("PUT") == 2
    assert echo_proxy.count(predicate=lambda r: r.status == 204) == 1
    assert echo_proxy.bytes_out() == 11000


def test_proxy_records_are_visible_when_client_returns(echo_proxy: CountingProxy) -> None:
    """The record is published before the client sees the end of the response."""
    for i in range(50):
        conn = http.client.HTTPConnection("127.0.0.1", echo_proxy.port, timeout=5)
        conn.request("GET", "/chunked" if i % 2 else "/plain")
        conn.getresponse().read()
        conn.close()
        assert echo_proxy.count() == i + 1


def test_proxy_counts_concurrent_clients(echo_proxy: CountingProxy) -> None:
    """Records from many threads are all kept."""

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", echo_proxy.port, timeout=5)
        for _ in range(10):
            conn.request("GET", "/plain")
            conn.getresponse().read()
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs: list[ProxyRecord] = echo_proxy.records()
    assert len(recs) == 80
    assert echo_proxy.bytes_out() == 80_000
