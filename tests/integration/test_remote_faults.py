"""Storage faults, each produced for real, and what ``Cache.fetch`` makes of them.

A configuration error (no credentials, an unknown profile, a wrong region, a
redirect, a rejected token or request, an unverifiable certificate, a bad
credential file) must fail the fetch with an error that names the cause, even
with a cached snapshot at hand: serving it stale would hide the mistake. Only
outages (refused or reset connections, a black hole, 5xx, 429, SlowDown) serve
the cached snapshot, with a warning, and within the ``timeout`` setting.

The faults come from real endpoints on 127.0.0.1 (:mod:`remote_endpoints`):
an S3 front to moto that answers what S3 answers when something is wrong or
ignores Range, a black hole, a forward proxy; and from the real emulators.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cacheagent.cache import Cache
from cacheagent.errors import (
    InvalidParameterError,
    RemoteChangedError,
    RemoteConfigError,
    StorageUnavailableError,
)
from cacheagent.local.store import Store
from cacheagent.remote.listing import list_manifest, read_range
from cacheagent.remote.location import parse_location
from cacheagent.remote.transfer import FetchSettings, download
from harness.emulators import StorageRig
from tests.integration.remote_endpoints import (
    BlackHole,
    ForwardProxy,
    RequiredRegion,
    S3Fault,
    S3Front,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SECRET = "sEcReT-remote-faults-0123456789"
FILES = {"1/model.py": b"# model\n", "1/w.bin": b"w" * 300_000, "config.pbtxt": b'name: "m"'}


# ---- helpers ------------------------------------------------------------------


@pytest.fixture
def front(s3_rig: StorageRig) -> Iterator[S3Front]:
    """An S3 front to the rig's moto, behaving until a test tells it otherwise."""
    with S3Front(s3_rig.emulator.port) as server:
        yield server


def front_url(front: S3Front, rig: StorageRig, relpath: str = "models/m") -> str:
    return f"s3://127.0.0.1:{front.port}/{rig.bucket}/{relpath}"


def s3_env(rig: StorageRig, **changes: str | None) -> dict[str, str]:
    """The rig's S3 environment with a distinctive secret; ``None`` removes a variable."""
    env = {**os.environ, **rig.env, "AWS_SECRET_ACCESS_KEY": SECRET}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def cached(root: Path, url: str, env: dict[str, str], **settings: Any) -> Cache:
    """A cache holding a good snapshot of ``url`` (fetched now, while storage behaves)."""
    cache = Cache(root, env=env, **settings)
    first = cache.fetch(url)
    assert not first.stale
    return cache


def assert_refused_not_stale(cache: Cache, url: str, error: type[Exception]) -> Exception:
    """The fetch fails with ``error`` although a good snapshot of ``url`` is cached."""
    with pytest.raises(error) as failure:
        cache.fetch(url)
    assert cache.stats().counters.get("stale_served", 0) == 0
    assert SECRET not in str(failure.value)
    return failure.value


def assert_served_stale(cache: Cache, url: str) -> None:
    stale = cache.fetch(url)
    assert stale.stale and stale.hit
    assert "unreachable" in stale.warning and url in stale.warning
    for relpath, data in FILES.items():
        assert (stale.path / relpath).read_bytes() == data


# ---- 1. configuration errors are not outages -------------------------------------

BUCKET_ENDPOINT = "{bucket}.s3.eu-west-1.amazonaws.com"
CONFIG_FAULTS = {
    "wrong-region": (
        RequiredRegion("eu-west-1", name_region=False),
        400,
        ["wrong region", "'eu-west-1'", "AWS_DEFAULT_REGION"],
    ),
    "permanent-redirect": (
        S3Fault(
            301,
            "PermanentRedirect",
            "The bucket you are attempting to access must be addressed using the specified "
            "endpoint. Please send all future requests to this endpoint.",
            {"Endpoint": BUCKET_ENDPOINT, "Bucket": "{bucket}"},
            {"x-amz-bucket-region": "eu-west-1"},
        ),
        301,
        ["another endpoint or region", "eu-west-1.amazonaws.com", "AWS_DEFAULT_REGION"],
    ),
    "invalid-token": (
        S3Fault(400, "InvalidToken", "The provided token is malformed or otherwise invalid."),
        400,
        ["session token", "AWS_SESSION_TOKEN"],
    ),
    "invalid-request": (
        S3Fault(
            400,
            "InvalidRequest",
            "The authorization mechanism you have provided is not supported. "
            "Please use AWS4-HMAC-SHA256.",
        ),
        400,
        ["invalid", "AWS4-HMAC-SHA256"],
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_FAULTS))
def test_s3_configuration_error_fails_naming_the_cause_instead_of_serving_stale(
    tmp_path, s3_rig, front, name
):
    fault, status, words = CONFIG_FAULTS[name]
    s3_rig.put_tree("models/m", FILES)
    url = front_url(front, s3_rig)
    with cached(tmp_path / "cache", url, s3_env(s3_rig)) as cache:
        if isinstance(fault, RequiredRegion):
            front.required_region = fault
        else:
            front.fault = S3Fault(
                fault.status,
                fault.code,
                fault.message,
                {k: v.format(bucket=s3_rig.bucket) for k, v in fault.fields.items()},
                fault.headers,
            )
        front.reset()
        error = assert_refused_not_stale(cache, url, RemoteConfigError)
    message = str(error)
    for word in words:
        assert word in message, message
    assert "not an outage" in message and url in message
    # Not retried: the fast client's attempt, the SDK's, and at most its one redirect.
    assert 2 <= len(front.requests) <= 3, front.requests
    assert (error.url, error.status) == (url, status)
    assert error.__cause__ is not None  # the SDK's own error stays chained


@pytest.fixture
def no_aws_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process environment in which the SDK's credential chain finds nothing."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({}, ["no credentials were found", "AWS_ACCESS_KEY_ID"]),
        ({"AWS_PROFILE": "no-such-profile"}, ["AWS_PROFILE", "no-such-profile"]),
    ],
    ids=["no-credentials", "unknown-profile"],
)
def test_missing_credentials_fail_naming_the_cause_instead_of_serving_stale(
    tmp_path, s3_rig, no_aws_credentials, changes, words
):
    s3_rig.put_tree("models/m", FILES)
    url = s3_rig.url("models/m")
    with cached(tmp_path / "cache", url, s3_env(s3_rig)):
        pass
    env = s3_env(s3_rig, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, **changes)
    with Cache(tmp_path / "cache", env=env) as cache:
        error = assert_refused_not_stale(cache, url, RemoteConfigError)
    for word in words:
        assert word in str(error)
    assert error.url == url and error.__cause__ is not None


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("AKIDEXAMPLE:secret", ["must be an object", "not a string"]),
        ({"key_id": "k", "secret_key": SECRET, "region": 5}, ['"region"', "a number"]),
        ({"key_id": "k", "secret_key": SECRET, "session_token": 123}, ['"session_token"']),
    ],
    ids=["entry-is-a-string", "numeric-region", "numeric-token"],
)
def test_credential_file_entry_of_the_wrong_type_is_a_clear_error(tmp_path, s3_rig, entry, words):
    s3_rig.put_tree("models/m", FILES)
    url = s3_rig.url("models/m")
    with cached(tmp_path / "cache", url, s3_env(s3_rig)):
        pass
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"s3": {"": entry}}))
    env = s3_env(s3_rig, TRITON_CLOUD_CREDENTIAL_PATH=str(creds))
    with Cache(tmp_path / "cache", env=env) as cache:
        error = assert_refused_not_stale(cache, url, InvalidParameterError)
    message = str(error)
    assert str(creds) in message and "'s3' credential ''" in message
    for word in words:
        assert word in message, message


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    )
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=cacheagent test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def test_https_endpoint_needs_aws_ca_bundle_and_its_absence_is_not_an_outage(tmp_path, s3_rig):
    ca, cert, key = make_tls_files(tmp_path)
    s3_rig.put_tree("models/m", FILES)
    with S3Front(s3_rig.emulator.port, tls=(cert, key)) as tls_front:
        url = f"s3://https://127.0.0.1:{tls_front.port}/{s3_rig.bucket}/models/m"
        with cached(tmp_path / "cache", url, s3_env(s3_rig, AWS_CA_BUNDLE=str(ca))) as cache:
            assert cache.fetch(url).hit  # the fast client verified the endpoint with the CA
        assert any(status == 200 for _, _, status in tls_front.requests)
        env = s3_env(s3_rig, AWS_CA_BUNDLE=None)
        with Cache(tmp_path / "cache", env=env) as cache:
            error = assert_refused_not_stale(cache, url, RemoteConfigError)
    assert "certificate" in str(error) and "AWS_CA_BUNDLE" in str(error)


def test_object_deleted_after_listing_is_reported_as_changed(tmp_path, s3_rig):
    s3_rig.put_tree("models/m", FILES)
    loc = parse_location(s3_rig.url("models/m"), s3_env(s3_rig))
    manifest = list_manifest(loc)
    s3_rig.delete("models/m/1/w.bin")
    with pytest.raises(RemoteChangedError) as failure:
        download(loc, list(manifest.files), Store(tmp_path / "store"), FetchSettings(2, MiB))
    error = failure.value
    assert "was listed but is gone now" in str(error) and "bucket" not in str(error)
    assert (error.path, error.status) == ("1/w.bin", 404)
    assert error.url == f"{loc.url}/1/w.bin" and error.__cause__ is not None


def test_fetch_of_a_model_whose_file_vanishes_mid_load_lists_again(tmp_path, s3_rig):
    s3_rig.put_tree("models/m", FILES)
    deleted: list[int] = []

    def delete_once(_files: int, _size: int) -> None:
        if not deleted:
            deleted.append(1)
            s3_rig.delete("models/m/1/w.bin")

    with Cache(tmp_path / "cache", env=s3_env(s3_rig)) as cache:
        snap = cache.fetch(s3_rig.url("models/m"), on_plan=delete_once)
    assert deleted and not snap.stale
    assert not (snap.path / "1/w.bin").exists()
    assert (snap.path / "config.pbtxt").read_bytes() == FILES["config.pbtxt"]


# ---- 1. ... and only outages serve stale ----------------------------------------

OUTAGES = {
    "internal-error": S3Fault(500, "InternalError", "We encountered an internal error."),
    "slow-down": S3Fault(503, "SlowDown", "Please reduce your request rate."),
    "too-many-requests": S3Fault(429, "TooManyRequests", "Too many requests."),
    "bad-gateway": S3Fault(502, "BadGateway", "Bad gateway."),
}


@pytest.mark.parametrize("name", [*OUTAGES, "refused"])
def test_s3_outage_serves_the_cached_snapshot_and_logs_each_retry(
    tmp_path, s3_rig, front, name, caplog
):
    s3_rig.put_tree("models/m", FILES)
    url = front_url(front, s3_rig)
    with cached(tmp_path / "cache", url, s3_env(s3_rig)) as cache:
        if name == "refused":
            front.stop()
        else:
            front.fault = OUTAGES[name]
        with caplog.at_level(logging.WARNING, logger="cacheagent.remote"):
            assert_served_stale(cache, url)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries, caplog.text
    assert all("attempt 1 of" in line and url in line for line in retries)
    assert SECRET not in caplog.text


def test_s3_reset_connections_serve_the_cached_snapshot(tmp_path, s3_rig):
    s3_rig.put_tree("models/m", FILES)
    url = s3_rig.url("models/m")
    with cached(tmp_path / "cache", url, s3_env(s3_rig)) as cache:
        s3_rig.proxy.set_down(True)  # the counting proxy resets every connection
        try:
            assert_served_stale(cache, url)
        finally:
            s3_rig.proxy.set_down(False)


# ---- 2. a black hole answers within the timeout ------------------------------------

TIMEOUT = 3.0
BOUND = 4 * TIMEOUT  # a bound against hanging, not a speed target


def test_black_holed_s3_endpoint_serves_stale_within_the_timeout(tmp_path, s3_rig, front):
    s3_rig.put_tree("models/m", FILES)
    url = front_url(front, s3_rig)
    with cached(tmp_path / "cache", url, s3_env(s3_rig), timeout=TIMEOUT) as cache:
        port = front.port
        front.stop()
        with BlackHole(port) as hole:
            started = time.monotonic()
            assert_served_stale(cache, url)
            elapsed = time.monotonic() - started
            assert hole.connections >= 1  # it really was connected to, then ignored
            assert elapsed < BOUND, f"a black hole held the fetch for {elapsed:.1f} s"
            started = time.monotonic()
            with pytest.raises(StorageUnavailableError, match="unreachable"):
                cache.fetch(f"s3://127.0.0.1:{port}/{s3_rig.bucket}/models/never-cached")
            assert time.monotonic() - started < BOUND


def test_black_holed_reads_fail_within_the_timeout(tmp_path, s3_rig, front, caplog):
    s3_rig.put_tree("models/m", {**FILES, "1/big.bin": os.urandom(3 * MiB)})
    url = front_url(front, s3_rig)
    front.hang_object_gets = True  # listings answer, object GETs never do
    with Cache(tmp_path / "cache", env=s3_env(s3_rig), timeout=TIMEOUT, part_size=MiB) as cache:
        started = time.monotonic()
        with (
            caplog.at_level(logging.WARNING, logger="cacheagent.remote"),
            pytest.raises(StorageUnavailableError) as failure,
        ):
            cache.fetch(url)
        elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"black-holed reads held the fetch for {elapsed:.1f} s"
    assert "unreachable" in str(failure.value)
    assert "deadline expires" in caplog.text or "timeout" in str(failure.value)


def gcs_env(rig: StorageRig, endpoint: str) -> dict[str, str]:
    env = {**os.environ, **rig.env}
    env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = env["STORAGE_EMULATOR_HOST"] = endpoint
    return env


def azure_env(rig: StorageRig, endpoint: str) -> dict[str, str]:
    env = {**os.environ, **rig.env}
    connection = env["AZURE_STORAGE_CONNECTION_STRING"]
    env["AZURE_STORAGE_CONNECTION_STRING"] = connection.replace(rig.proxy.url, endpoint)
    return env


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_black_holed_gcs_and_azure_endpoints_serve_stale_within_the_timeout(
    request, tmp_path, cloud
):
    rig: StorageRig = request.getfixturevalue({"gs": "gcs_rig", "as": "azure_rig"}[cloud])
    rig.put_tree("models/m", FILES)
    url = rig.url("models/m")
    with cached(tmp_path / "cache", url, {**os.environ, **rig.env}, timeout=TIMEOUT):
        pass
    with BlackHole() as hole:
        env = (gcs_env if cloud == "gs" else azure_env)(rig, hole.url)
        with Cache(tmp_path / "cache", env=env, timeout=TIMEOUT) as cache:
            started = time.monotonic()
            assert_served_stale(cache, url)
            elapsed = time.monotonic() - started
        assert hole.connections >= 1
    assert elapsed < BOUND, f"a black hole held the {cloud} fetch for {elapsed:.1f} s"


# ---- 3. a server that ignores Range ---------------------------------------------------


def test_server_ignoring_range_streams_each_file_once(tmp_path, s3_rig, front, caplog):
    big = os.urandom(24 * MiB + 123)
    files = {**FILES, "1/w.bin": big}
    s3_rig.put_tree("models/m", files)
    url = front_url(front, s3_rig)
    front.ignore_range = True
    concurrency, part_size = 4, MiB
    with (
        Cache(
            tmp_path / "cache", env=s3_env(s3_rig), concurrency=concurrency, part_size=part_size
        ) as cache,
        caplog.at_level(logging.WARNING, logger="cacheagent.remote"),
    ):
        front.reset()
        snap = cache.fetch(url)
    for relpath, data in files.items():
        assert (snap.path / relpath).read_bytes() == data
    total = sum(map(len, files.values()))
    # The other parts in flight were answered whole too; each connection dropped
    # unread moves at most its socket buffers (tcp_wmem caps them at 4 MiB here).
    in_flight = concurrency * (part_size + 5 * MiB)
    assert front.bytes_sent - 100_000 <= 1.1 * total + in_flight, (
        f"{front.bytes_sent} bytes sent for {total} bytes of files"
    )
    object_gets = [t for m, t, _ in front.requests if m == "GET" and "list-type" not in t]
    assert len(object_gets) <= len(files) + concurrency
    assert "ignores Range" in caplog.text


def test_read_range_of_a_server_ignoring_range_is_exact(s3_rig, front):
    data = os.urandom(3 * MiB)
    s3_rig.put("models/m/w.bin", data)
    front.ignore_range = True
    loc = parse_location(front_url(front, s3_rig), s3_env(s3_rig))
    assert read_range(loc, "w.bin", MiB + 5, 2 * MiB) == data[MiB + 5 : 2 * MiB]


# ---- 4. proxies, endpoint variables, one client per location ------------------------


def direct_url(rig: StorageRig, relpath: str = "models/m") -> str:
    return f"s3://127.0.0.1:{rig.emulator.port}/{rig.bucket}/{relpath}"


def test_s3_requests_go_through_the_proxy_named_in_http_proxy(tmp_path, s3_rig):
    s3_rig.put_tree("models/m", FILES)
    with ForwardProxy() as proxy:
        env = s3_env(s3_rig, HTTP_PROXY=proxy.url, http_proxy=None, NO_PROXY="", no_proxy="")
        with Cache(tmp_path / "cache", env=env) as cache:
            snap = cache.fetch(direct_url(s3_rig))
        assert (snap.path / "1/w.bin").read_bytes() == FILES["1/w.bin"]
        origin = f"http://127.0.0.1:{s3_rig.emulator.port}/{s3_rig.bucket}"
        assert any("list-type=2" in t and t.startswith(origin) for t in proxy.targets)
        assert any(t == f"{origin}/models/m/1/w.bin" for t in proxy.targets)
        # The SDK (s3fs) is given the same proxy, for listings and for reads.
        proxy.targets.clear()
        loc = parse_location(direct_url(s3_rig), env)
        loc.route.sdk = True
        assert list_manifest(loc).key == snap.key
        assert read_range(loc, "1/w.bin", 0, 10) == FILES["1/w.bin"][:10]
        assert any(t.startswith(origin) and "1/w.bin" in t for t in proxy.targets)
        assert any(t.startswith(origin) and "list-type=2" in t for t in proxy.targets)


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1:{port}", "*"])
def test_no_proxy_bypasses_the_proxy(tmp_path, s3_rig, no_proxy):
    s3_rig.put_tree("models/m", FILES)
    no_proxy = no_proxy.format(port=s3_rig.emulator.port)
    with ForwardProxy() as proxy:
        env = s3_env(s3_rig, HTTP_PROXY=proxy.url, NO_PROXY=no_proxy, no_proxy=None)
        with Cache(tmp_path / "cache", env=env) as cache:
            cache.fetch(direct_url(s3_rig))
        loc = parse_location(direct_url(s3_rig), env)
        loc.route.sdk = True
        list_manifest(loc)
        assert proxy.targets == []


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_endpoint_variable_is_honoured_when_the_location_names_none(tmp_path, s3_rig, variable):
    s3_rig.put_tree("models/m", FILES)
    env = s3_env(s3_rig, AWS_ENDPOINT_URL_S3=None)
    env[variable] = s3_rig.proxy.url
    with Cache(tmp_path / "cache", env=env) as cache:
        snap = cache.fetch(f"s3://{s3_rig.bucket}/models/m")
    assert (snap.path / "1/w.bin").read_bytes() == FILES["1/w.bin"]
    assert s3_rig.object_bytes("models/m/") == sum(map(len, FILES.values()))


def test_reads_go_through_the_client_that_listed(tmp_path, s3_rig, front, caplog):
    # The bucket lives in eu-west-1 but the environment says us-east-1: the fast client
    # is refused, the SDK follows S3's redirect, and must then do the reads too.
    s3_rig.put_tree("models/m", FILES)
    front.required_region = RequiredRegion("eu-west-1")
    with (
        Cache(tmp_path / "cache", env=s3_env(s3_rig)) as cache,
        caplog.at_level(logging.INFO, logger="cacheagent.remote"),
    ):
        snap = cache.fetch(front_url(front, s3_rig))
    for relpath, data in FILES.items():
        assert (snap.path / relpath).read_bytes() == data
    object_gets = [(t, s) for m, t, s in front.requests if m == "GET" and "list-type" not in t]
    assert object_gets and all(status in (200, 206) for _, status in object_gets)
    assert "the SDK serves this location from now on" in caplog.text


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_gcs_and_azure_requests_go_through_http_proxy(request, tmp_path, monkeypatch, cloud):
    rig: StorageRig = request.getfixturevalue({"gs": "gcs_rig", "as": "azure_rig"}[cloud])
    rig.put_tree("models/m", FILES)
    direct = f"http://127.0.0.1:{rig.emulator.port}"
    # aiohttp reads the proxy variables from the process environment. They are put
    # back before the rig's own teardown, whose client would use the proxy too.
    with ForwardProxy() as proxy, monkeypatch.context() as patch:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            patch.delenv(name, raising=False)
        patch.setenv("HTTP_PROXY", proxy.url)
        env = (gcs_env if cloud == "gs" else azure_env)(rig, direct)
        with Cache(tmp_path / "cache", env=env) as cache:
            snap = cache.fetch(rig.url("models/m"))
        assert (snap.path / "1/w.bin").read_bytes() == FILES["1/w.bin"]
        assert any(t.startswith(direct) and "w.bin" in t for t in proxy.targets), proxy.targets
