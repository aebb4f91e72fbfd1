"""The hit path's own SigV4 signing agrees with botocore's, byte for byte."""

import datetime as dt

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cacheagent.remote.location import parse_location
from cacheagent.remote.s3 import EMPTY_SHA256, fast_find, sign

NOW = dt.datetime(2026, 11, 21, 12, 34, 56, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("token", [None, "session-token/with+odd=chars"])
@pytest.mark.parametrize(
    "query",
    [
        {"list-type": "2", "prefix": "models/add/", "encoding-type": "url"},
        {"list-type": "2", "prefix": "a b/ü~x", "continuation-token": "1/+=abc"},
    ],
)
def test_signature_matches_botocore(query, token):
    host = "127.0.0.1:9000"
    ours = sign(
        "GET",
        host,
        "/my-bucket",
        query,
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG",
        "eu-west-1",
        token,
        now=NOW,
    )

    request = AWSRequest(method="GET", url=f"http://{host}/my-bucket", params=query)
    request.headers["x-amz-content-sha256"] = EMPTY_SHA256
    request.context["timestamp"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    auth = S3SigV4Auth(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", "eu-west-1"
    )
    auth._modify_request_before_signing(request)
    request.prepare()
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    assert ours["authorization"].endswith(f"Signature={signature}")


def test_fast_path_needs_static_credentials_and_a_region_or_endpoint():
    assert fast_find(parse_location("s3://bucket/m", {})) is None  # SDK credential chain
    assert fast_find(parse_location("gs://bucket/m", {})) is None
    # Nothing listens on port 9: the fast path gives up quietly; s3fs will report the error.
    env = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    assert fast_find(parse_location("s3://127.0.0.1:9/bucket/m", env)) is None
