"""Parse Triton's model repository locations into a scheme, a path and storage options.

A :class:`Location` is a parsed value: the filesystem that reaches it is built by
:func:`cacheagent.remote.clients.filesystem_for`.

Accepted forms (the same grammar Triton accepts on ``--model-repository``):

- ``s3://bucket/path``
- ``s3://host:port/bucket/path``, ``s3://http://host:port/...``, ``s3://https://host:port/...``
- ``gs://bucket/path``
- ``as://account/container/path``
- a local path, absolute or relative

Credentials come from :mod:`cacheagent.remote.credentials`. The storage options that
carry secrets are kept out of ``repr`` and out of every message.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cacheagent.errors import InvalidLocationError
from cacheagent.remote.clients import proxy_for
from cacheagent.remote.credentials import credentials_from_file

if TYPE_CHECKING:
    pass

ACCEPTED_FORMS = (
    "s3://bucket/path, s3://host:port/bucket/path, s3://http://host:port/bucket/path, "
    "s3://https://host:port/bucket/path, gs://bucket/path, as://account/container/path, "
    "or a local directory path"
)

# Triton's S3 grammar: bucket [0-9a-z.-], path parts [0-9a-zA-Z._-].
_S3_PATH = r"((?:/[0-9a-zA-Z._-]+)*)/?"
_S3_ENDPOINT_RE = re.compile(
    r"^s3://(?:(https?)://)?([0-9a-zA-Z.-]+):([0-9]{1,5})/([0-9a-z.-]+)" + _S3_PATH + "$"
)
_S3_BUCKET_RE = re.compile(r"^s3://([0-9a-z.-]+)" + _S3_PATH + "$")
_GS_RE = re.compile(r"^gs://([0-9a-z._-]+)((?:/[^/\\\x00]+)*)/?$")
_AS_RE = re.compile(r"^as://([0-9a-zA-Z-]+)/([0-9a-z-]{3,63})((?:/[^/\\\x00]+)*)/?$")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass
class Route:
    """Which client serves a location: its fast client (S3, GCS, Azure), else the SDK.

    A listing or read the fast client cannot do (a region it signs wrongly, a
    redirect, an answer it does not understand) moves the location to the SDK
    for good, so its reads are signed the way its listing was.
    """

    sdk: bool = False


@dataclass(frozen=True)
class Location:
    """A parsed repository location: which store, which directory, and how to reach it."""

    scheme: str  # "s3", "gs", "as" or "file"
    url: str  # as the user wrote it, normalized without a trailing slash; holds no secret
    root: str  # the directory as an fsspec path, without protocol
    storage_options: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    route: Route = field(repr=False, compare=False, default_factory=Route)

    @property
    def is_remote(self) -> bool:
        """True for cloud storage, False for a local directory."""
        return self.scheme != "file"

    def child(self, relpath: str) -> Location:
        """Return the location of ``relpath`` below this one (same store, same credentials)."""
        rel = relpath.strip("/")
        return Location(
            self.scheme,
            f"{self.url}/{rel}",
            f"{self.root}/{rel}",
            dict(self.storage_options),
            Route(self.route.sdk),
        )


def parse_location(text: str, env: Mapping[str, str] | None = None) -> Location:
    """Parse a Triton repository location; raise InvalidLocationError naming it if malformed."""
    env = os.environ if env is None else env
    if not isinstance(text, str) or not text.strip() or "\x00" in text:
        raise InvalidLocationError(f"empty or unreadable location {text!r}; use {ACCEPTED_FORMS}")
    text = text.strip()
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match is None:
        return _parse_local(text)
    scheme = scheme_match.group(1).lower()
    parsers = {"s3": _parse_s3, "gs": _parse_gs, "as": _parse_as}
    if scheme not in parsers:
        raise InvalidLocationError(
            f"unknown storage scheme '{scheme}://' in location {text!r}; use {ACCEPTED_FORMS}"
        )
    return parsers[scheme](text, env)


def _malformed(text: str, hint: str) -> InvalidLocationError:
    return InvalidLocationError(f"malformed location {text!r}: {hint}; use {ACCEPTED_FORMS}")


def _parse_local(text: str) -> Location:
    path = os.path.abspath(text)
    return Location("file", path, path, {})


def _parse_s3(text: str, env: Mapping[str, str]) -> Location:
    endpoint_match = _S3_ENDPOINT_RE.match(text)
    if endpoint_match:
        protocol, host, port, bucket, path = endpoint_match.groups()
        if not 0 < int(port) < 65536:
            raise _malformed(text, f"port {port} is out of range")
        endpoint = f"{protocol or 'http'}://{host}:{port}"
    else:
        bucket_match = _S3_BUCKET_RE.match(text)
        if bucket_match is None:
            raise _malformed(
                text,
                "S3 buckets use [0-9a-z.-] and path parts [0-9a-zA-Z._-] (Triton's S3 grammar)",
            )
        bucket, path = bucket_match.groups()
        endpoint = None
    url = text.rstrip("/")
    return Location("s3", url, bucket + path, _s3_options(url, endpoint, env))


def _s3_options(url: str, endpoint: str | None, env: Mapping[str, str]) -> dict[str, Any]:
    creds = credentials_from_file("s3", url, env)
    if isinstance(creds, dict):
        key, secret = creds.get("key_id"), creds.get("secret_key")
        token, region = creds.get("session_token"), creds.get("region")
        profile = creds.get("profile")
    else:
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN")
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        profile = env.get("AWS_PROFILE")
    # Timeouts and retries are not set here: they follow each call's deadline (clients.py).
    options: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if key and secret:
        options["key"], options["secret"] = key, secret
        if token:
            options["token"] = token
    elif profile:
        options["profile"] = profile
    endpoint = endpoint or _configured_s3_endpoint(env)
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        client_kwargs["region_name"] = region or "us-east-1"
    elif region:
        client_kwargs["region_name"] = region
    if env.get("AWS_CA_BUNDLE"):
        client_kwargs["verify"] = env["AWS_CA_BUNDLE"]
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    origin = endpoint or (f"https://s3.{region}.amazonaws.com" if region else None)
    proxy = proxy_for(origin, env) if origin else None
    if proxy:
        # Given explicitly, so the environment this location was parsed with decides,
        # for the SDK as for the fast client (botocore would read os.environ).
        options["config_kwargs"] = {"proxies": {urllib.parse.urlsplit(origin).scheme: proxy}}
    return options


def _configured_s3_endpoint(env: Mapping[str, str]) -> str | None:
    """The endpoint the AWS SDKs take from the environment when the location names none."""
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def _parse_gs(text: str, env: Mapping[str, str]) -> Location:
    match = _GS_RE.match(text)
    if match is None:
        raise _malformed(text, "GCS buckets use [0-9a-z._-]")
    bucket, path = match.groups()
    url = text.rstrip("/")
    options: dict[str, Any] = {}
    emulator = env.get("CLOUD_STORAGE_EMULATOR_ENDPOINT") or env.get("STORAGE_EMULATOR_HOST")
    creds = credentials_from_file("gs", url, env)
    if emulator:
        options["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        options["token"] = "anon"
    if isinstance(creds, (str, dict)) and creds:
        options["token"] = creds
    elif not emulator:
        options["token"] = env.get("GOOGLE_APPLICATION_CREDENTIALS") or "google_default"
    return Location("gs", url, bucket + path, options)


def _parse_as(text: str, env: Mapping[str, str]) -> Location:
    match = _AS_RE.match(text)
    if match is None:
        raise _malformed(
            text, "Azure locations are as://account/container/path with a 3-63 character container"
        )
    account, container, path = match.groups()
    url = text.rstrip("/")
    creds = credentials_from_file("as", url, env)
    options: dict[str, Any] = {"account_name": account}
    if isinstance(creds, dict):
        options["account_name"] = creds.get("account_str") or account
        if creds.get("account_key"):
            options["account_key"] = creds["account_key"]
    elif env.get("AZURE_STORAGE_CONNECTION_STRING"):
        # Not a Triton variable, but the standard Azure one; it is how a custom
        # endpoint (Azurite, sovereign clouds) is reached.
        options = {"connection_string": env["AZURE_STORAGE_CONNECTION_STRING"]}
    elif env.get("AZURE_STORAGE_KEY"):
        options["account_key"] = env["AZURE_STORAGE_KEY"]
    return Location("as", url, container + path, options)
