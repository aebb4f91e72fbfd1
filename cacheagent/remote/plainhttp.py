"""Plain GETs with the standard library, for the SDK-free GCS and Azure clients.

The hit path of a fresh worker sends one listing (and ``cacheagent warm`` one
small read); importing gcsfs or adlfs and building their aiohttp clients for
that costs far more than the round trip. This module sends such GETs with
``http.client`` instead, on a keep-alive connection per thread and origin.

It honours HTTP(S)_PROXY / NO_PROXY from the process environment, as the SDKs'
aiohttp sessions do (``trust_env``): plain HTTP in absolute form through the
proxy, HTTPS through a CONNECT tunnel. An ``https://`` proxy is left to the SDK
(:func:`origin_of` says None). Every request is bounded by the caller's
:class:`~cacheagent.remote.faults.Deadline`: connecting, waiting for the answer
and each piece of the body.

Failures are raised as they are (network errors, :class:`HTTPStatusError` with
the storage's error code), for :mod:`cacheagent.remote.faults` to classify.
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from cacheagent import __version__
from cacheagent.remote.clients import proxy_for
from cacheagent.remote.faults import Deadline

USER_AGENT = f"cacheagent/{__version__} (plainhttp)"
BODY_PIECE = 1 << 20  # bodies are read in pieces, each held to the deadline
ERROR_BODY_LIMIT = 64 * 1024  # how much of an error answer is read
_LOCAL = threading.local()
_TLS: list[ssl.SSLContext] = []  # one default context, built on first HTTPS use


class HTTPStatusError(OSError):
    """A non-success answer: ``status`` and the storage's ``error_code`` (when it gave one).

    ``fields`` holds the storage's own message, for the operator.
    """

    def __init__(self, status: int, reason: str, error_code: str | None, message: str) -> None:
        self.status = status
        self.error_code = error_code
        self.fields = {"Message": message} if message else {}
        said = f" {error_code}" if error_code else ""
        said += f": {message}" if message else ""
        super().__init__(f"HTTP {status} {reason}{said}")


class NotFoundError(HTTPStatusError, FileNotFoundError):
    """A 404: no such object, bucket or container."""


class DeniedError(HTTPStatusError, PermissionError):
    """A 401 or 403: the credentials were refused, or there were none."""


def status_error(status: int, reason: str, code: str | None, message: str) -> HTTPStatusError:
    """The exception for an error answer, of the subclass its status calls for."""
    cls = HTTPStatusError
    if status == 404:
        cls = NotFoundError
    elif status in (401, 403):
        cls = DeniedError
    return cls(status, reason, code, message[:500])


@dataclass(frozen=True)
class Origin:
    """Where requests go: ``scheme://host:port`` of storage, and the proxy in between."""

    scheme: str
    host: str
    port: int | None
    proxy: urllib.parse.SplitResult | None

    @property
    def netloc(self) -> str:
        """``host[:port]`` as the Host header names it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port else host


@dataclass(frozen=True)
class Response:
    """A whole answer: status, reason, headers (names in lower case) and body."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


def origin_of(base_url: str, env: Mapping[str, str] | None = None) -> Origin | None:
    """The origin of ``base_url``, or None where only an SDK can reach it (an https proxy)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    proxy_url = proxy_for(base_url, os.environ if env is None else env)
    proxy = urllib.parse.urlsplit(proxy_url) if proxy_url else None
    if proxy is not None and (proxy.scheme != "http" or not proxy.hostname):
        return None
    return Origin(parts.scheme, parts.hostname, parts.port, proxy)


def get(origin: Origin, target: str, headers: Mapping[str, str], deadline: Deadline) -> Response:
    """GET ``target`` (an encoded path and query) from ``origin``; the whole answer.

    Error answers are returned too: the caller reads the storage's error format.
    """
    for attempt in (1, 2):
        connection, reused = _pooled(origin)
        connection.timeout = deadline.connect_timeout()  # used by the next connect
        try:
            connection.request(
                "GET", _request_target(origin, target), headers=_with_ours(origin, headers)
            )
            hold_to_deadline(connection, deadline)
            response = connection.getresponse()
            limit = None if response.status < 300 else ERROR_BODY_LIMIT
            body = read_body(connection, response, deadline, limit)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            connection.close()
            # A kept-alive connection the server closed meanwhile: one fresh try at once.
            if not reused or attempt == 2:
                raise
            continue
        except BaseException:
            connection.close()  # a half-read answer leaves the connection unusable
            raise
        if response.status >= 300:
            connection.close()  # what is left of an error body is not worth reading
        heads = {name.lower(): value for name, value in response.getheaders()}
        return Response(response.status, response.reason, heads, body)
    raise AssertionError("unreachable")


def _with_ours(origin: Origin, headers: Mapping[str, str]) -> dict[str, str]:
    # Host named explicitly: through a proxy, http.client would name the proxy's.
    sent = {"host": origin.netloc, "user-agent": USER_AGENT, **headers}
    if origin.proxy is not None and origin.scheme == "http":
        sent.update(proxy_authorization(origin.proxy))
    return sent


def _request_target(origin: Origin, target: str) -> str:
    # Plain HTTP through a proxy is sent in absolute form; a tunnel carries origin form.
    if origin.proxy is not None and origin.scheme == "http":
        return f"http://{origin.netloc}{target}"
    return target


def proxy_authorization(proxy: urllib.parse.SplitResult) -> dict[str, str]:
    """Basic credentials for a proxy URL that carries a user (never logged)."""
    if proxy.username is None:
        return {}
    user = urllib.parse.unquote(proxy.username)
    password = urllib.parse.unquote(proxy.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {token}"}


def _tls() -> ssl.SSLContext:
    # The system CA bundle (SSL_CERT_FILE / SSL_CERT_DIR honoured), as aiohttp uses.
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]


def _new_connection(origin: Origin) -> http.client.HTTPConnection:
    proxy = origin.proxy
    if proxy is None:
        if origin.scheme == "https":
            return http.client.HTTPSConnection(origin.host, origin.port, context=_tls())
        return http.client.HTTPConnection(origin.host, origin.port)
    if origin.scheme == "http":
        return http.client.HTTPConnection(proxy.hostname or "", proxy.port)
    connection = http.client.HTTPSConnection(proxy.hostname or "", proxy.port, context=_tls())
    connection.set_tunnel(origin.host, origin.port, proxy_authorization(proxy))
    return connection


def thread_connection(
    key: Hashable, connect: Callable[[], http.client.HTTPConnection]
) -> tuple[http.client.HTTPConnection, bool]:
    """This thread's keep-alive connection for ``key`` (made by ``connect`` the first
    time), and whether it is open already. One per thread: http.client is not
    thread-safe. ``key`` is where it goes (an :class:`Origin`, S3's endpoint)."""
    pool: dict[Hashable, http.client.HTTPConnection] = _LOCAL.__dict__.setdefault("pool", {})
    connection = pool.get(key)
    if connection is None:
        connection = pool[key] = connect()
    return connection, connection.sock is not None


def _pooled(origin: Origin) -> tuple[http.client.HTTPConnection, bool]:
    return thread_connection(origin, lambda: _new_connection(origin))


def hold_to_deadline(connection: http.client.HTTPConnection, deadline: Deadline) -> None:
    """Bound the next socket read by the operation's deadline."""
    if connection.sock is not None:
        connection.sock.settimeout(deadline.read_timeout())


def read_body(
    connection: http.client.HTTPConnection,
    response: http.client.HTTPResponse,
    deadline: Deadline,
    limit: int | None = None,
) -> bytes:
    """The rest of the body (at most ``limit`` bytes), each piece within the deadline."""
    pieces: list[bytes] = []
    total = 0
    while limit is None or total < limit:
        hold_to_deadline(connection, deadline)
        piece = response.read(BODY_PIECE if limit is None else min(BODY_PIECE, limit - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)
