"""A tier in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, ...), without an SDK.

The tier uses the origin's location grammar and credentials
(:func:`cacheagent.remote.location.parse_location`), and where the origin's
fast client can serve a location (static credentials and a known endpoint or
region: :func:`cacheagent.remote.s3.endpoint_of`) the tier talks to it the same
way: Signature Version 4 signed requests with the standard library, one
keep-alive connection per thread. Other locations (a profile, instance roles)
go through s3fs (:class:`cacheagent.tier.sdk.FsspecBackend`).

Conditional create is ``PutObject`` with ``If-None-Match: *``: S3 answers 412
when the key exists (409 when a concurrent conditional write is in flight, which
also means someone else won). SeaweedFS 4.48 and moto implement it; an 8-way
race for each of 40 keys against SeaweedFS had exactly one winner every time.

Bodies are sent with ``x-amz-content-sha256: UNSIGNED-PAYLOAD``: the chunk is
already hashed by the fetch, and signing it would hash every byte once more.
"""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
import threading
from collections.abc import Mapping

from cacheagent import __version__
from cacheagent.remote import s3
from cacheagent.remote.location import Location
from cacheagent.remote.plainhttp import ERROR_BODY_LIMIT, proxy_authorization
from cacheagent.remote.s3 import Endpoint
from cacheagent.tier.backend import OP_TIMEOUT, retrying
from cacheagent.tier.errors import (
    TierAccessDeniedError,
    TierConfigError,
    TierTimeoutError,
    TierUnavailableError,
)

USER_AGENT = f"cacheagent/{__version__} (tier)"
UNSIGNED = "UNSIGNED-PAYLOAD"
_OUTAGE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def sign(
    method: str,
    ep: Endpoint,
    path: str,
    extra: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """Headers of a SigV4-signed request ``method path`` (no query, unsigned payload).

    ``extra`` headers are sent too; only ``host`` and the ``x-amz-*`` ones are signed.
    """
    netloc = ep.origin.netloc
    headers = s3.sign(
        method, netloc, path, {}, ep.key, ep.secret, ep.region, ep.token, UNSIGNED, now
    )
    headers["user-agent"] = USER_AGENT
    headers.update(extra or {})
    return headers


class FastS3Backend:
    """Objects below ``s3://.../bucket/prefix``, reached with signed requests."""

    def __init__(self, location: Location, ep: Endpoint, timeout: float = OP_TIMEOUT) -> None:
        self.location, self.ep, self.timeout = location, ep, timeout
        self._base = "/" + location.root.strip("/")
        self._local = threading.local()

    @property
    def url(self) -> str:
        """The tier location (holds no secret)."""
        return self.location.url

    def get(self, key: str) -> bytes | None:
        """The object at ``key``, or None on 404."""

        def attempt() -> bytes | None:
            status, body = self._request("GET", key)
            if status == 404:
                return None
            self._check(status, body, "GET", key)
            return body

        return retrying(attempt, self.url, f"GET {key}")

    def create(self, key: str, data: bytes) -> bool:
        """PutObject with If-None-Match: *; False when the key exists (412) or a
        concurrent conditional write won (409)."""

        def attempt() -> bool:
            status, body = self._request("PUT", key, data, {"if-none-match": "*"})
            if status in (409, 412):
                return False
            if status == 501:
                raise TierConfigError(
                    f"the shared tier {self.url} does not implement conditional writes "
                    "(PutObject with If-None-Match), which elect one downloader per blob; use "
                    "a store that does (AWS S3, SeaweedFS, MinIO) or a shared filesystem path",
                    url=self.url,
                    status=status,
                )
            self._check(status, body, "PUT", key)
            return True

        return retrying(attempt, self.url, f"PUT {key}")

    def put(self, key: str, data: bytes) -> None:
        """PutObject, replacing whatever is there."""

        def attempt() -> None:
            status, body = self._request("PUT", key, data)
            self._check(status, body, "PUT", key)

        retrying(attempt, self.url, f"PUT {key}")

    def delete(self, key: str) -> None:
        """DeleteObject (S3 answers 204 whether or not the key existed)."""

        def attempt() -> None:
            status, body = self._request("DELETE", key)
            if status != 404:
                self._check(status, body, "DELETE", key)

        retrying(attempt, self.url, f"DELETE {key}")

    # -- the wire ----------------------------------------------------------------

    def _request(
        self, method: str, key: str, body: bytes | None = None, extra: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        path = f"{self._base}/{key}"
        headers = sign(method, self.ep, path, extra)
        if self.ep.proxy is not None and self.ep.origin.scheme == "http":
            headers.update(proxy_authorization(self.ep.proxy))
        if body is not None:
            headers["content-length"] = str(len(body))
        for fresh in (False, True):
            connection = self._connection(fresh)
            try:
                connection.request(method, self._target(path), body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                return response.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                connection.close()
                # A kept-alive connection the server closed meanwhile: one fresh try.
                if fresh:
                    raise self._outage(method, key, exc) from exc
            except TimeoutError as exc:
                connection.close()
                raise TierTimeoutError(
                    f"{method} {key} on the shared tier {self.url} got no answer within "
                    f"{self.timeout:g} s; nodes fetch from the origin meanwhile; check the "
                    "tier's endpoint",
                    url=self.url,
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise TierConfigError(
                        f"the shared tier {self.url}'s TLS certificate could not be verified; "
                        "point AWS_CA_BUNDLE at the CA that signed it",
                        url=self.url,
                    ) from exc
                if isinstance(exc, socket.gaierror) and exc.errno != socket.EAI_AGAIN:
                    raise TierConfigError(
                        f"the shared tier's host in {self.url} does not resolve; fix the "
                        "shared_cache location",
                        url=self.url,
                    ) from exc
                raise self._outage(method, key, exc) from exc
        raise AssertionError("unreachable")

    def _outage(self, method: str, key: str, exc: BaseException) -> TierUnavailableError:
        return TierUnavailableError(
            f"{method} {key} on the shared tier {self.url} failed ({type(exc).__name__}: "
            f"{str(exc)[:200]}); nodes fetch from the origin meanwhile; check the tier's "
            "endpoint and health",
            url=self.url,
        )

    def _check(self, status: int, body: bytes, method: str, key: str) -> None:
        if 200 <= status < 300:
            return
        code = _error_code(body)
        said = f"HTTP {status}{f' {code}' if code else ''}"
        if status in _OUTAGE_STATUS or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            raise TierUnavailableError(
                f"{method} {key} on the shared tier {self.url} answered {said}; nodes fetch "
                "from the origin meanwhile",
                url=self.url,
                status=status,
            )
        if status in (401, 403):
            raise TierAccessDeniedError(
                f"{method} {key} on the shared tier {self.url} was denied ({said}); give this "
                "node's credentials read (and, to fill the tier, write) access to its prefix",
                url=self.url,
                status=status,
            )
        raise TierConfigError(
            f"{method} {key} on the shared tier {self.url} answered {said}; check the "
            "shared_cache location (bucket, endpoint, region) and credentials",
            url=self.url,
            status=status,
        )

    def _target(self, path: str) -> str:
        return s3.request_target(self.ep, s3.quote_path(path))

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        pool: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        connection = pool.get(0)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            connection = pool[0] = self._new_connection()
        return connection

    def _new_connection(self) -> http.client.HTTPConnection:
        origin, proxy = self.ep.origin, self.ep.proxy
        host, port = origin.hostname or "", origin.port
        if origin.scheme == "https":
            context = ssl.create_default_context(cafile=self.ep.ca_bundle)
            if proxy is not None:
                tunnel = http.client.HTTPSConnection(
                    proxy.hostname or "", proxy.port, timeout=self.timeout, context=context
                )
                tunnel.set_tunnel(host, port, proxy_authorization(proxy))
                return tunnel
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
        if proxy is not None:
            return http.client.HTTPConnection(
                proxy.hostname or "", proxy.port, timeout=self.timeout
            )
        return http.client.HTTPConnection(host, port, timeout=self.timeout)


def _error_code(body: bytes) -> str | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(body[:ERROR_BODY_LIMIT])
    except ET.ParseError:
        return None
    return root.findtext("Code")
