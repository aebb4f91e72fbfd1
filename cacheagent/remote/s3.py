"""A fast S3 client for the common case: signed listings and ranged GETs, no SDK.

A cache hit costs one listing, yet listing through s3fs means importing
aiobotocore and building a client first: about 0.45 s on every worker start,
longer than the whole rest of a hit. When the location carries static
credentials (environment or TRITON_CLOUD_CREDENTIAL_PATH) this module signs
the request itself (AWS Signature Version 4) with the standard library.

It honours what the SDK honours for such a location: the endpoint (from the
location, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), the CA bundle
(AWS_CA_BUNDLE), and HTTP(S)_PROXY / NO_PROXY (resolved in location.py; an
https:// proxy is left to the SDK). Every request runs under the caller's
:class:`~cacheagent.remote.faults.Deadline`: connecting, waiting for the answer
and reading each piece of the body are all bounded by the time it has left.

Listings return exactly what ``s3fs.find(detail=True)`` returns for the fields
the manifest uses (name, size, ETag), so both paths give the same snapshot key.
Failures are raised as they are (network errors, :class:`HTTPStatusError` with
S3's error code); :mod:`cacheagent.remote.listing` decides whether to retry,
to hand the location to the SDK, or to report the cause.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import http.client
import re
import ssl
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cacheagent import __version__
from cacheagent.errors import RemoteConfigError
from cacheagent.remote import plainhttp
from cacheagent.remote.faults import Deadline
from cacheagent.remote.location import Location
from cacheagent.settings import DEFAULT_TIMEOUT

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
USER_AGENT = f"cacheagent/{__version__} (s3list)"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_SAFE = "-_.~"


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe=_SAFE)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    key: str,
    secret: str,
    region: str,
    token: str | None = None,
    payload_sha256: str = EMPTY_SHA256,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """The headers of a SigV4-signed S3 request ``method path`` with ``query``.

    ``payload_sha256`` is the body's hash as sent in ``x-amz-content-sha256``
    (``UNSIGNED-PAYLOAD`` for a body left unsigned). Only ``host`` and the
    ``x-amz-*`` headers are signed.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {"host": host, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    signed = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers))
    canonical_request = "\n".join(
        [method, quote_path(path), canonical_query, canonical_headers, signed, payload_sha256]
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


def quote_path(path: str) -> str:
    """``path`` percent-encoded as SigV4's canonical URI (and the request line) has it."""
    return urllib.parse.quote(path, safe="/" + _SAFE)


class HTTPStatusError(OSError):
    """A non-success answer; ``status`` is the HTTP status, ``s3_code`` S3's error code.

    ``fields`` holds the other elements of S3's XML error (Message, Region,
    Endpoint, ...) and the bucket-region header, for messages that say what to fix.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        s3_code: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.s3_code = s3_code
        self.fields = fields or {}
        said = f" {s3_code}: {self.fields.get('Message', '')}" if s3_code else ""
        super().__init__(f"HTTP {status} {reason}{said}")


class S3NotFoundError(HTTPStatusError, FileNotFoundError):
    """A 404: no such key or bucket."""


class S3DeniedError(HTTPStatusError, PermissionError):
    """A 401 or 403: the credentials were refused."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach S3 for one location, and with which static credentials."""

    origin: urllib.parse.SplitResult
    key: str
    secret: str
    region: str
    token: str | None
    proxy: urllib.parse.SplitResult | None
    ca_bundle: str | None


def endpoint_of(location: Location) -> Endpoint | None:
    """The fast client's view of ``location``, or None where only the SDK can serve it.

    None without static credentials, without an endpoint or a region, or behind a
    proxy spoken to over TLS (http.client cannot), and once the location's
    :class:`~cacheagent.remote.location.Route` says the SDK serves it.
    """
    options = location.storage_options
    key, secret = options.get("key"), options.get("secret")
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = client_kwargs.get("endpoint_url")
    region = client_kwargs.get("region_name")
    if location.scheme != "s3" or location.route.sdk or not key or not secret:
        return None
    if not (endpoint or region):
        return None
    origin = urllib.parse.urlsplit(endpoint or f"https://s3.{region}.amazonaws.com")
    if origin.scheme not in ("http", "https") or not origin.hostname:
        return None
    proxies = (options.get("config_kwargs") or {}).get("proxies") or {}
    proxy = urllib.parse.urlsplit(proxies[origin.scheme]) if proxies.get(origin.scheme) else None
    if proxy is not None and (proxy.scheme != "http" or not proxy.hostname):
        return None
    verify = client_kwargs.get("verify")
    return Endpoint(
        origin,
        key,
        secret,
        region or "us-east-1",
        options.get("token"),
        proxy,
        verify if isinstance(verify, str) else None,
    )


def can_read(location: Location) -> bool:
    """True if the fast client serves this location (static credentials, known region)."""
    return endpoint_of(location) is not None


# -- connections ---------------------------------------------------------------

_BODY_PIECE = plainhttp.BODY_PIECE  # read bodies in pieces, each held to the deadline


@functools.lru_cache(maxsize=8)
def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteConfigError(
            f"AWS_CA_BUNDLE names {ca_bundle}, which cannot be read as CA certificates "
            f"({type(exc).__name__}); point it at a PEM file of the CA that signed the endpoint"
        ) from exc


def _new_connection(ep: Endpoint) -> http.client.HTTPConnection:
    origin, proxy = ep.origin, ep.proxy
    tls = _tls_context(ep.ca_bundle) if origin.scheme == "https" else None
    if proxy is None:
        if tls is not None:
            return http.client.HTTPSConnection(origin.hostname or "", origin.port, context=tls)
        return http.client.HTTPConnection(origin.hostname or "", origin.port)
    if tls is None:  # plain HTTP through a proxy: absolute-form requests (see request_target)
        return http.client.HTTPConnection(proxy.hostname or "", proxy.port)
    # HTTPS through a proxy: a CONNECT tunnel, TLS end to end with the origin.
    connection = http.client.HTTPSConnection(proxy.hostname or "", proxy.port, context=tls)
    connection.set_tunnel(origin.hostname or "", origin.port, plainhttp.proxy_authorization(proxy))
    return connection


def _pooled(ep: Endpoint) -> tuple[http.client.HTTPConnection, bool]:
    return plainhttp.thread_connection(ep, lambda: _new_connection(ep))


def request_target(ep: Endpoint, path_and_query: str) -> str:
    """The request line's target: absolute form for plain HTTP through a proxy."""
    if ep.proxy is not None and ep.origin.scheme == "http":
        return f"http://{ep.origin.netloc}{path_and_query}"
    return path_and_query


def _send(
    ep: Endpoint, path: str, query: dict[str, str], extra: dict[str, str], deadline: Deadline
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one signed GET and return the connection and its answer's head."""
    for attempt in (1, 2):
        headers = sign("GET", ep.origin.netloc, path, query, ep.key, ep.secret, ep.region, ep.token)
        headers["user-agent"] = USER_AGENT  # unsigned; names us in storage access logs
        headers.update(extra)
        if ep.proxy is not None and ep.origin.scheme == "http":
            headers.update(plainhttp.proxy_authorization(ep.proxy))
        encoded = quote_path(path)
        if query:
            pairs = sorted(query.items())
            encoded += "?" + urllib.parse.urlencode(pairs, safe=_SAFE, quote_via=urllib.parse.quote)
        connection, reused = _pooled(ep)
        connection.timeout = deadline.connect_timeout()  # used by the next connect
        try:
            connection.request("GET", request_target(ep, encoded), headers=headers)
            plainhttp.hold_to_deadline(connection, deadline)
            return connection, connection.getresponse()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            connection.close()
            # A kept-alive connection the server closed meanwhile: one fresh try at once.
            if not reused or attempt == 2:
                raise
        except BaseException:
            connection.close()
            raise
    raise AssertionError("unreachable")


def _read_exactly(
    connection: http.client.HTTPConnection,
    response: http.client.HTTPResponse,
    size: int,
    deadline: Deadline,
) -> bytes:
    """Exactly ``size`` bytes of the body, each piece within the deadline."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        plainhttp.hold_to_deadline(connection, deadline)
        n = response.readinto(view[got : got + min(_BODY_PIECE, size - got)])
        if not n:
            raise http.client.IncompleteRead(bytes(buffer[:got]), size - got)
        got += n
    return buffer  # type: ignore[return-value]  # bytes-like, without a copy


def _raise_for_status(
    connection: http.client.HTTPConnection, response: http.client.HTTPResponse, deadline: Deadline
) -> None:
    if response.status in (200, 206):
        return
    try:
        body = plainhttp.read_body(connection, response, deadline, plainhttp.ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        body = b""
    connection.close()  # whatever is left of the body is not worth reading
    code, fields = _parse_error(body)
    region = response.getheader("x-amz-bucket-region")
    if region:
        fields.setdefault("x-amz-bucket-region", region)
    cls = HTTPStatusError
    if response.status == 404:
        cls = S3NotFoundError
    elif response.status in (401, 403):
        cls = S3DeniedError
    raise cls(response.status, response.reason, code, fields)


def _parse_error(body: bytes) -> tuple[str | None, dict[str, str]]:
    """S3's ``<Error><Code>..</Code><Message>..</Message>...</Error>``, if that is the body."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None, {}
    fields = {re.sub(r"^\{.*\}", "", child.tag): (child.text or "") for child in root}
    return fields.pop("Code", None), fields


# -- reads -----------------------------------------------------------------------


class Body:
    """An open answer to a GET: which bytes of the object it holds, read in pieces.

    ``start`` is the offset of its first byte in the object, ``length`` how many
    it holds, ``total`` the object's size (None when the server did not say).
    A 200 to a ranged request (a server that ignores Range) holds the whole
    object from 0; ``etag`` is the answer's ETag header (None without one).
    Read with :meth:`read`, then :meth:`close`.
    """

    def __init__(
        self,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        start: int,
        length: int | None,
        total: int | None,
    ) -> None:
        self._connection, self._response = connection, response
        self.status = response.status
        self.start, self.length, self.total = start, length, total
        self.etag: str | None = response.getheader("etag")
        self._left = length

    def read(self, size: int, deadline: Deadline) -> bytes:
        """The next ``size`` bytes of the body (all of them or an error), within ``deadline``."""
        if self._left is not None and size > self._left:
            raise http.client.IncompleteRead(b"", size - self._left)
        try:
            data = _read_exactly(self._connection, self._response, size, deadline)
        except BaseException:
            self._connection.close()
            raise
        if self._left is not None:
            self._left -= size
        return data

    def read_all(self, deadline: Deadline) -> bytes:
        """The rest of the body (for small objects: its length need not be known)."""
        try:
            data = plainhttp.read_body(self._connection, self._response, deadline)
        except BaseException:
            self._connection.close()
            raise
        self._left = 0
        return data

    def skip(self, size: int, deadline: Deadline) -> None:
        """Read and drop the next ``size`` bytes, one piece at a time."""
        while size > 0:
            step = min(size, _BODY_PIECE)
            self.read(step, deadline)
            size -= step

    def close(self) -> None:
        """Release the connection: kept alive if the body was read to its end."""
        if self._left != 0:
            self._connection.close()  # unread bytes: only a new connection is clean
        else:
            self._response.close()


def open_object(
    location: Location,
    relpath: str,
    byte_range: tuple[int, int] | None,
    deadline: Deadline,
) -> Body:
    """GET ``<location>/<relpath>`` (bytes [start, end) when ``byte_range`` is given).

    Raises :class:`HTTPStatusError` (or its 404/403 subclasses) for an error answer.
    """
    ep = endpoint_of(location)
    if ep is None:
        raise ValueError(f"{location.url} cannot be read with the fast S3 client")
    extra = {"range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"} if byte_range else {}
    connection, response = _send(ep, f"/{location.root}/{relpath}", {}, extra, deadline)
    _raise_for_status(connection, response, deadline)
    length_header = response.getheader("content-length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if response.status == 206:
        try:
            start, end, total = _content_range(response.getheader("content-range") or "")
        except BaseException:
            connection.close()
            raise
        return Body(connection, response, start, end - start, total)
    return Body(connection, response, 0, length, length)


def _content_range(header: str) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` as (a, b + 1, total); total None for ``*``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header)
    if match is None:
        raise http.client.HTTPException(f"unreadable Content-Range {header!r} in a 206 answer")
    first, last, total = match.groups()
    return int(first), int(last) + 1, None if total == "*" else int(total)


def fast_cat(location: Location, relpath: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The whole object ``<location>/<relpath>`` by one signed GET (small files: configs)."""
    deadline = Deadline(timeout)
    body = open_object(location, relpath, None, deadline)
    try:
        return body.read_all(deadline)
    finally:
        body.close()


# -- listings ----------------------------------------------------------------------


def list_objects(
    location: Location, deadline: Deadline, delimiter: str | None = None
) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    """Every page of one ListObjectsV2 below ``location``: (objects, common prefixes).

    The objects look like ``s3fs.find(detail=True)``'s. None when the fast
    client cannot serve the location; failures are raised, not hidden.
    """
    ep = endpoint_of(location)
    if ep is None:
        return None
    bucket, _, prefix = location.root.partition("/")
    query = {
        "list-type": "2",
        "prefix": prefix.rstrip("/") + "/" if prefix else "",
        "encoding-type": "url",
    }
    if delimiter:
        query["delimiter"] = delimiter
    found: dict[str, dict[str, Any]] = {}
    prefixes: list[str] = []
    while True:
        connection, response = _send(ep, f"/{bucket}", query, {}, deadline)
        _raise_for_status(connection, response, deadline)
        try:
            root = ET.fromstring(plainhttp.read_body(connection, response, deadline))
        except BaseException:
            connection.close()  # a half-read answer leaves the connection unusable
            raise
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
        token = root.findtext(f"{_NS}NextContinuationToken") or ""
        if not token:
            raise ValueError("a truncated listing without a continuation token")
        query["continuation-token"] = token


def fast_find(
    location: Location, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, dict[str, Any]] | None:
    """List ``location`` recursively like ``s3fs.find(detail=True)``; None if not possible."""
    listed = _quietly(location, None, timeout)
    return None if listed is None else listed[0]


def fast_subdirs(location: Location, timeout: float = DEFAULT_TIMEOUT) -> list[str] | None:
    """The names of the directories directly below ``location``; None if not possible."""
    listed = _quietly(location, "/", timeout)
    if listed is None:
        return None
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed[1])


def _quietly(
    location: Location, delimiter: str | None, timeout: float
) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    # For callers that fall back to the SDK on any failure and let it report the error.
    try:
        return list_objects(location, Deadline(timeout), delimiter)
    except (OSError, http.client.HTTPException, ET.ParseError, ValueError):
        return None
