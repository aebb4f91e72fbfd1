"""A fast S3 client for the common case: signed listings and ranged GETs, no SDK.

A cache hit costs one listing, yet listing through s3fs means importing
aiobotocore and building a client first: about 0.45 s on every worker start,
longer than the whole rest of a hit. When the location carries static
credentials (environment or TRITON_CLOUD_CREDENTIAL_PATH) this module signs
the request itself (AWS Signature Version 4) with the standard library.

It returns exactly what ``s3fs.find(detail=True)`` returns for the fields the
manifest uses (name, size, ETag), so both paths give the same snapshot key.
Anything unexpected (no static credentials, an HTTP error, a redirect, a
parse error) returns None and the caller lists through s3fs, which then
reports real errors in full. Ranged reads (the miss path) keep one keep-alive
connection per thread and raise ordinary OSErrors that cacheagent.remote.listing
retries and translates like the SDK's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any

from cacheagent import __version__
from cacheagent.remote.location import Location

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
USER_AGENT = f"cacheagent/{__version__} (s3list)"
TIMEOUT_S = 10.0
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_SAFE = "-_.~"


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe=_SAFE)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign_get(
    host: str,
    path: str,
    query: dict[str, str],
    key: str,
    secret: str,
    region: str,
    token: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """The headers of a SigV4-signed S3 GET of ``path`` with ``query`` (no body)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {"host": host, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    signed = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers))
    canonical_request = "\n".join(
        ["GET", _quote_path(path), canonical_query, canonical_headers, signed, EMPTY_SHA256]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    signing_key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{secret}".encode(), day), region), "s3"), "aws4_request"
    )
    signature = hmac.new(signing_key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def _quote_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/" + _SAFE)


class HTTPStatusError(OSError):
    """A non-success answer to a ranged GET; ``status`` is the HTTP status code."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


_Target = tuple[urllib.parse.SplitResult, str, str, str, "str | None"]


def _target(location: Location) -> _Target | None:
    options = location.storage_options
    key, secret = options.get("key"), options.get("secret")
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = client_kwargs.get("endpoint_url")
    region = client_kwargs.get("region_name")
    if location.scheme != "s3" or not key or not secret or not (endpoint or region):
        return None
    parsed = urllib.parse.urlsplit(endpoint or f"https://s3.{region}.amazonaws.com")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    return parsed, key, secret, region or "us-east-1", options.get("token")


def can_read(location: Location) -> bool:
    """True if :func:`fast_read` can serve this location (static credentials, known region)."""
    return _target(location) is not None


def fast_find(location: Location) -> dict[str, dict[str, Any]] | None:
    """List ``location`` recursively like ``s3fs.find(detail=True)``; None if not possible."""
    listed = _list(location, delimiter=None)
    return None if listed is None else listed[0]


def fast_subdirs(location: Location) -> list[str] | None:
    """The names of the directories directly below ``location``; None if not possible."""
    listed = _list(location, delimiter="/")
    if listed is None:
        return None
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed[1])


def _list(
    location: Location, delimiter: str | None
) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    target = _target(location)
    if target is None:
        return None
    parsed, key, secret, region, token = target
    bucket, _, prefix = location.root.partition("/")
    query = {
        "list-type": "2",
        "prefix": prefix.rstrip("/") + "/" if prefix else "",
        "encoding-type": "url",
    }
    if delimiter:
        query["delimiter"] = delimiter
    try:
        return _list_all(parsed, bucket, query, key, secret, region, token)
    except (OSError, http.client.HTTPException, ET.ParseError, ValueError):
        return None


_LOCAL = threading.local()


def _connection(endpoint: urllib.parse.SplitResult) -> http.client.HTTPConnection:
    # http.client connections are not thread-safe: one keep-alive connection per thread.
    pool: dict[str, http.client.HTTPConnection] = _LOCAL.__dict__.setdefault("pool", {})
    name = f"{endpoint.scheme}://{endpoint.netloc}"
    connection = pool.get(name)
    if connection is None:
        cls = (
            http.client.HTTPSConnection
            if endpoint.scheme == "https"
            else http.client.HTTPConnection
        )
        connection = cls(endpoint.hostname or "", endpoint.port, timeout=60)
        pool[name] = connection
    return connection


def fast_read(location: Location, relpath: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of ``<location>/<relpath>`` by one signed ranged GET."""
    body, status = _get(location, relpath, f"bytes={start}-{end - 1}")
    return body if status == 206 else body[start:end]


def fast_cat(location: Location, relpath: str) -> bytes:
    """The whole object ``<location>/<relpath>`` by one signed GET (small files: configs)."""
    return _get(location, relpath, None)[0]


def _get(location: Location, relpath: str, byte_range: str | None) -> tuple[bytes, int]:
    target = _target(location)
    if target is None:
        raise ValueError(f"{location.url} has no static credentials for the fast S3 client")
    parsed, key, secret, region, token = target
    raw_path = f"/{location.root}/{relpath}"
    headers = sign_get(parsed.netloc, raw_path, {}, key, secret, region, token)
    if byte_range:
        headers["range"] = byte_range
    headers["user-agent"] = USER_AGENT
    connection = _connection(parsed)
    try:
        connection.request("GET", _quote_path(raw_path), headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()  # a broken keep-alive connection is rebuilt on the next call
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
    if response.status == 404:
        raise FileNotFoundError(f"{location.url}/{relpath}")
    if response.status in (401, 403):
        raise PermissionError(f"HTTP {response.status} for {location.url}/{relpath}")
    if response.status not in (200, 206):
        raise HTTPStatusError(response.status, response.reason)
    return body, response.status


def _list_all(
    endpoint: urllib.parse.SplitResult,
    bucket: str,
    query: dict[str, str],
    key: str,
    secret: str,
    region: str,
    token: str | None,
) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    """Every page of one ListObjectsV2: (objects like s3fs's find, common prefixes)."""
    host = endpoint.netloc
    cls = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    connection = cls(endpoint.hostname, endpoint.port, timeout=TIMEOUT_S)
    found: dict[str, dict[str, Any]] = {}
    prefixes: list[str] = []
    try:
        while True:
            path = f"/{bucket}"
            headers = sign_get(host, path, query, key, secret, region, token)
            headers["user-agent"] = USER_AGENT  # unsigned; names us in storage access logs
            target = (
                path + "?" + urllib.parse.urlencode(sorted(query.items()), quote_via=_quote_via)
            )
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                return None
            root = ET.fromstring(body)
            for item in root.iter(f"{_NS}Contents"):
                name = urllib.parse.unquote_plus(item.findtext(f"{_NS}Key") or "")
                found[f"{bucket}/{name}"] = {
                    "name": f"{bucket}/{name}",
                    "size": int(item.findtext(f"{_NS}Size") or 0),
                    "ETag": item.findtext(f"{_NS}ETag") or "",
                    "type": "file",
                }
            for item in root.iter(f"{_NS}CommonPrefixes"):
                prefixes.append(urllib.parse.unquote_plus(item.findtext(f"{_NS}Prefix") or ""))
            if (root.findtext(f"{_NS}IsTruncated") or "").lower() != "true":
                return found, prefixes
            query["continuation-token"] = root.findtext(f"{_NS}NextContinuationToken") or ""
            if not query["continuation-token"]:
                return None
    finally:
        connection.close()


def _quote_via(text: str, safe: str = "", encoding: Any = None, errors: Any = None) -> str:
    return _quote(text)
