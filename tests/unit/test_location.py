import json

import pytest

from cacheagent.errors import InvalidLocationError, InvalidParameterError
from cacheagent.remote.credentials import longest_prefix_match
from cacheagent.remote.location import parse_location

ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}


@pytest.mark.parametrize(
    ("url", "scheme", "root", "endpoint"),
    [
        ("s3://bucket/models/add", "s3", "bucket/models/add", None),
        ("s3://bucket", "s3", "bucket", None),
        (
            "s3://127.0.0.1:9000/bucket/models/add",
            "s3",
            "bucket/models/add",
            "http://127.0.0.1:9000",
        ),
        ("s3://http://minio.local:9000/b/p", "s3", "b/p", "http://minio.local:9000"),
        (
            "s3://https://s3.example.com:443/b.x/p-q_r.s",
            "s3",
            "b.x/p-q_r.s",
            "https://s3.example.com:443",
        ),
        ("s3://bucket/models/add/", "s3", "bucket/models/add", None),
    ],
)
def test_s3_forms(url, scheme, root, endpoint):
    loc = parse_location(url, ENV)
    assert (loc.scheme, loc.root) == (scheme, root)
    assert loc.storage_options.get("client_kwargs", {}).get("endpoint_url") == endpoint
    assert loc.storage_options["key"] == "AKIDEXAMPLE"
    assert "s3cr3t" not in repr(loc)


def test_gs_and_as_and_local(tmp_path):
    gs = parse_location(
        "gs://my-bucket/repo/model", {"CLOUD_STORAGE_EMULATOR_ENDPOINT": "http://127.0.0.1:1"}
    )
    assert (gs.scheme, gs.root) == ("gs", "my-bucket/repo/model")
    assert gs.storage_options == {"endpoint_url": "http://127.0.0.1:1", "token": "anon"}
    gs_creds = parse_location("gs://b/m", {"GOOGLE_APPLICATION_CREDENTIALS": "/k.json"})
    assert gs_creds.storage_options["token"] == "/k.json"
    az = parse_location("as://acct/container/repo/m", {"AZURE_STORAGE_KEY": "k3y"})
    assert (az.scheme, az.root) == ("as", "container/repo/m")
    assert az.storage_options == {"account_name": "acct", "account_key": "k3y"}
    local = parse_location(str(tmp_path / "m"), {})
    assert (local.scheme, local.root, local.is_remote) == ("file", str(tmp_path / "m"), False)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/x",
        "s3://Upper/x",
        "s3://b/has space",
        "as://acct/ab/x",
        "gs://",
        "s3://h:99999/b/p",
        "",
        "   ",
    ],
)
def test_malformed_locations_name_the_location_and_list_forms(url):
    with pytest.raises(InvalidLocationError) as info:
        parse_location(url, {})
    message = str(info.value)
    assert "as://account/container/path" in message
    if url.strip():
        assert repr(url.strip()) in message or url.split("://")[0] in message


def test_credential_file_longest_prefix_wins(tmp_path):
    creds = {
        "s3": {
            "": {"key_id": "default-id", "secret_key": "default-secret", "region": "eu-west-1"},
            "s3://bucket": {"key_id": "bucket-id", "secret_key": "bucket-secret"},
            "s3://bucket/special": {"key_id": "special-id", "secret_key": "special-secret"},
        },
        "as": {"as://acct/cont": {"account_str": "acct", "account_key": "azkey"}},
        "gs": {"": "/creds/default.json", "gs://other": "/creds/other.json"},
    }
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(creds))
    env = {"TRITON_CLOUD_CREDENTIAL_PATH": str(path), **ENV}
    assert parse_location("s3://bucket/special/m", env).storage_options["key"] == "special-id"
    assert parse_location("s3://bucket/m", env).storage_options["key"] == "bucket-id"
    fallback = parse_location("s3://elsewhere/m", env).storage_options
    assert fallback["key"] == "default-id"
    assert fallback["client_kwargs"]["region_name"] == "eu-west-1"
    assert parse_location("as://acct/cont/m", env).storage_options["account_key"] == "azkey"
    assert parse_location("gs://other/m", env).storage_options["token"] == "/creds/other.json"
    assert parse_location("gs://mine/m", env).storage_options["token"] == "/creds/default.json"


def test_credential_file_without_match_falls_back_to_environment(tmp_path):
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"s3": {"s3://only-this": {"key_id": "x", "secret_key": "y"}}}))
    env = {"TRITON_CLOUD_CREDENTIAL_PATH": str(path), **ENV}
    assert parse_location("s3://bucket/m", env).storage_options["key"] == "AKIDEXAMPLE"


def test_bad_credential_file_is_a_clear_error_without_content(tmp_path):
    path = tmp_path / "creds.json"
    path.write_text('{"s3": {"": {"secret_key": "TOPSECRET"')
    with pytest.raises(InvalidParameterError) as info:
        parse_location("s3://bucket/m", {"TRITON_CLOUD_CREDENTIAL_PATH": str(path)})
    assert str(path) in str(info.value)
    assert "TOPSECRET" not in str(info.value)
    with pytest.raises(InvalidParameterError, match="does not exist"):
        parse_location("s3://b/m", {"TRITON_CLOUD_CREDENTIAL_PATH": str(tmp_path / "nope")})


def test_longest_prefix_match():
    assert longest_prefix_match(["", "s3://a", "s3://a/b"], "s3://a/b/c") == "s3://a/b"
    assert longest_prefix_match(["s3://x"], "s3://a") is None
    assert longest_prefix_match([""], "anything") == ""
