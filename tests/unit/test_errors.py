"""The error hierarchy's attributes, the fault classifier on really raised failures,
the deadline, the proxy rule and the credential file's type checks."""

from __future__ import annotations

import http.client
import json
import pickle
import socket
import time

import pytest

from cacheagent.errors import (
    CacheAgentError,
    InvalidParameterError,
    RemoteChangedError,
    RemoteConfigError,
    RemoteNotFoundError,
    StorageUnavailableError,
)
from cacheagent.remote.clients import proxy_for
from cacheagent.remote.faults import CONFIG, NOT_FOUND, OUTAGE, Deadline, classify
from cacheagent.remote.listing import translate_error, with_retries
from cacheagent.remote.location import parse_location


def test_errors_carry_url_status_and_path_and_survive_pickling():
    error = RemoteChangedError("gone", url="s3://b/m/w.bin", status=404, path="w.bin")
    assert (error.url, error.status, error.path) == ("s3://b/m/w.bin", 404, "w.bin")
    assert isinstance(error, RuntimeError) and str(error) == "gone"
    again = pickle.loads(pickle.dumps(error))
    assert (again.url, again.status, again.path) == (error.url, 404, "w.bin")
    assert str(again) == "gone"
    plain = RemoteNotFoundError("nothing")
    assert (plain.url, plain.status, plain.path) == (None, None, None)
    assert isinstance(plain, FileNotFoundError) and isinstance(RemoteConfigError("x"), ValueError)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raised(call) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        call()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing was raised")


def test_refused_and_silent_endpoints_are_outages():
    port = closed_port()
    refused = raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
    assert classify(refused).kind == OUTAGE
    with socket.create_server(("127.0.0.1", 0)) as silent:
        connection = http.client.HTTPConnection("127.0.0.1", silent.getsockname()[1], timeout=0.3)
        timed_out = raised(lambda: (connection.request("GET", "/"), connection.getresponse()))
        connection.close()
    assert isinstance(timed_out, TimeoutError) and classify(timed_out).kind == OUTAGE


def test_an_error_raised_from_a_cause_is_classified_by_the_cause():
    try:
        try:
            raise FileNotFoundError("no such key")
        except FileNotFoundError as cause:
            raise OSError(5, "wrapped by an SDK") from cause
    except OSError as exc:
        assert classify(exc).kind == NOT_FOUND
    assert classify(ValueError("nothing known")).kind == CONFIG  # never an outage by default


def test_only_outages_are_retried(tmp_path):
    location = parse_location(str(tmp_path))
    calls: list[int] = []

    def config_error() -> None:
        calls.append(1)
        raise ValueError("storage said something unexpected")

    with pytest.raises(RemoteConfigError) as failure:
        with_retries(config_error, location, "list", delays=(0.01, 0.01))
    assert len(calls) == 1 and isinstance(failure.value.__cause__, ValueError)

    calls.clear()

    def outage() -> None:
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(StorageUnavailableError, match="unreachable") as failure:
        with_retries(outage, location, "list", delays=(0.01, 0.01))
    assert len(calls) == 3 and isinstance(failure.value.__cause__, ConnectionResetError)


def test_retries_stop_at_the_deadline(tmp_path):
    location = parse_location(str(tmp_path))
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="within the 1 s timeout"):
        with_retries(
            lambda: (_ for _ in ()).throw(TimeoutError("silent")),
            location,
            "list",
            delays=(0.4, 0.4, 0.4, 0.4, 0.4),
            timeout=1.0,
        )
    assert time.monotonic() - started < 1.5


def test_deadline_bounds_each_wait_and_expires():
    deadline = Deadline(60)
    assert deadline.connect_timeout() == 10 and deadline.read_timeout() == 20
    short = Deadline(0.2)
    assert short.read_timeout() <= 0.2
    time.sleep(0.25)
    assert short.expired
    with pytest.raises(TimeoutError):
        short.read_timeout()


def test_translated_errors_name_the_object_and_chain_nothing_secret(tmp_path):
    location = parse_location(str(tmp_path))
    error = translate_error(FileNotFoundError("x"), location, "read w.bin", path="w.bin")
    assert isinstance(error, RemoteNotFoundError)
    assert (error.url, error.status, error.path) == (f"{location.url}/w.bin", 404, "w.bin")
    same = CacheAgentError("already ours")
    assert translate_error(same, location, "list") is same


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("http://s3.local:9000", {"HTTP_PROXY": "http://p:3128"}, "http://p:3128"),
        ("http://s3.local:9000", {"http_proxy": "p:3128", "HTTP_PROXY": "q:1"}, "http://p:3128"),
        ("https://s3.local", {"HTTP_PROXY": "http://p:3128"}, None),
        ("https://s3.local", {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        ("http://s3.local:9000", {"HTTP_PROXY": "http://p", "NO_PROXY": "s3.local"}, None),
        ("http://a.s3.local", {"HTTP_PROXY": "http://p", "NO_PROXY": ".s3.local"}, None),
        ("http://s3.local:9000", {"HTTP_PROXY": "http://p", "NO_PROXY": "s3.local:9000"}, None),
        ("http://s3.local:9000", {"HTTP_PROXY": "http://p", "no_proxy": "*"}, None),
        ("http://other:9000", {"HTTP_PROXY": "http://p", "NO_PROXY": "s3.local"}, "http://p"),
    ],
)
def test_proxy_rule_matches_urllib_and_botocore(url, env, expected):
    assert proxy_for(url, env) == expected


def test_s3_location_takes_proxy_endpoint_and_ca_bundle_from_its_environment():
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_ENDPOINT_URL_S3": "http://minio.local:9000",
        "AWS_CA_BUNDLE": "/etc/ca.pem",
        "HTTP_PROXY": "http://user:pr0xy-pass@proxy.local:3128",
    }
    options = parse_location("s3://bucket/m", env).storage_options
    assert options["client_kwargs"]["endpoint_url"] == "http://minio.local:9000"
    assert options["client_kwargs"]["verify"] == "/etc/ca.pem"
    assert options["config_kwargs"]["proxies"] == {"http": env["HTTP_PROXY"]}
    named = parse_location("s3://127.0.0.1:9/bucket/m", env).storage_options
    assert named["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"  # the URL wins
    ignored = {**env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert "endpoint_url" not in parse_location("s3://b/m", ignored).storage_options.get(
        "client_kwargs", {}
    )


def test_proxy_password_is_scrubbed_from_messages():
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "HTTP_PROXY": "http://user:pr0xy-pass@127.0.0.1:9",
    }
    location = parse_location(f"s3://127.0.0.1:{closed_port()}/bucket/m", env)
    error = translate_error(
        ConnectionRefusedError("via http://user:pr0xy-pass@127.0.0.1:9 with s3cr3t-value"),
        location,
        "list",
    )
    assert "pr0xy-pass" not in str(error) and "s3cr3t-value" not in str(error)


@pytest.mark.parametrize(
    ("cloud", "url", "entry", "words"),
    [
        ("s3", "s3://b/m", "key:secret", ["'s3' credential ''", "not a string"]),
        ("s3", "s3://b/m", ["k", "s"], ["must be an object", "not a list"]),
        ("s3", "s3://b/m", {"key_id": "k", "secret_key": "s", "region": 1}, ['"region"']),
        ("as", "as://acct/cont/m", {"account_str": 7}, ['"account_str"', "a number"]),
        ("gs", "gs://b/m", 42, ["service account key file", "not a number"]),
    ],
)
def test_credential_file_entries_of_the_wrong_type_are_refused(tmp_path, cloud, url, entry, words):
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({cloud: {"": entry}}))
    with pytest.raises(InvalidParameterError) as failure:
        parse_location(url, {"TRITON_CLOUD_CREDENTIAL_PATH": str(path)})
    message = str(failure.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    assert "secret" not in message.replace("secret_key", "")
