"""Small real endpoints on 127.0.0.1 that misbehave the way real ones do, for fault tests.

* :class:`S3Front` - an HTTP server in front of moto that passes S3 requests
  through, and on demand answers what real S3 (or an S3-compatible store)
  answers when something is wrong: an error of a given status, code and XML
  fields; a wrong signing region; or a server that ignores ``Range``. It
  counts requests and the body bytes it sent.
* :class:`BlackHole` - a listening socket that accepts connections and never
  answers: a firewall dropping replies, a hung load balancer.
* :class:`ForwardProxy` - a plain HTTP forward proxy (absolute-form requests),
  counting what went through it, as a site's caching proxy would see it.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

_PIECE = 256 * 1024
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "host"}


@dataclass(frozen=True)
class S3Fault:
    """An S3 error answer: ``<Error><Code>code</Code><Message>..</Message>...</Error>``."""

    status: int
    code: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        extra = "".join(f"<{k}>{v}</{k}>" for k, v in self.fields.items())
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>{self.message}</Message>{extra}<RequestId>4442587FB7D0A2F9</RequestId>"
            "</Error>"
        ).encode()


@dataclass(frozen=True)
class RequiredRegion:
    """Refuse requests signed for another region, as S3 does (``name_region`` says it)."""

    region: str
    name_region: bool = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class S3Front:
    """A real HTTP server in front of moto (see the module docstring)."""

    def __init__(self, upstream_port: int, tls: tuple[Path, Path] | None = None) -> None:
        """``tls`` is (certificate, key): then the front speaks HTTPS."""
        self.upstream_port = upstream_port
        self.fault: S3Fault | None = None
        self.required_region: RequiredRegion | None = None
        self.ignore_range = False
        self.hang_object_gets = False  # listings answer; object GETs never do
        self.requests: list[tuple[str, str, int]] = []  # method, target, status
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()  # client connections, cut at stop
        self._server = _Server(("127.0.0.1", 0), self._handler())
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> S3Front:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()  # lets hung handlers go
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._open:  # kept-alive connections would outlive the listener
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> S3Front:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent = 0

    def _record(self, method: str, target: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, target, status))

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with front._lock:
                    front._open.add(self.connection)

            def finish(self) -> None:
                with front._lock:
                    front._open.discard(self.connection)
                super().finish()

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_HEAD(self) -> None:
                self._serve()

            def _serve(self) -> None:
                if (
                    front.hang_object_gets
                    and self.command == "GET"
                    and "list-type" not in self.path
                ):
                    front._record(self.command, self.path, 0)
                    front._stopping.wait(120)  # bounded: a test never waits this long
                    self.close_connection = True
                    return
                refusal = front._refusal(self.headers.get("authorization", ""))
                if refusal is not None:
                    self._answer_error(refusal)
                    return
                self._forward()

            def _answer_error(self, fault: S3Fault) -> None:
                body = fault.body() if self.command != "HEAD" else b""
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                for name, value in fault.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                front._record(self.command, self.path, fault.status)

            def _forward(self) -> None:
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP_HEADERS
                    and not (front.ignore_range and k.lower() == "range")
                }
                upstream = http.client.HTTPConnection("127.0.0.1", front.upstream_port, timeout=30)
                try:
                    upstream.request(self.command, self.path, headers=headers)
                    response = upstream.getresponse()
                    front._record(self.command, self.path, response.status)
                    self.send_response(response.status)
                    body_length = response.getheader("content-length")
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_HEADERS:
                            self.send_header(name, value)
                    if body_length is None and self.command != "HEAD":
                        data = response.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self._send(data)
                    else:
                        self.end_headers()
                        while self.command != "HEAD":
                            piece = response.read(_PIECE)
                            if not piece:
                                break
                            self._send(piece)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up: stop sending
                finally:
                    upstream.close()

            def _send(self, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                front._count(len(data))

        return Handler

    def _refusal(self, authorization: str) -> S3Fault | None:
        if self.fault is not None:
            return self.fault
        wanted = self.required_region
        if wanted is None:
            return None
        match = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/s3/", authorization)
        signed = match.group(1) if match else "?"
        if signed == wanted.region:
            return None
        return S3Fault(
            400,
            "AuthorizationHeaderMalformed",
            f"The authorization header is malformed; the region '{signed}' is wrong; "
            f"expecting '{wanted.region}'",
            {"Region": wanted.region} if wanted.name_region else {},
        )


class BlackHole:
    """A TCP listener on 127.0.0.1 that accepts every connection and never answers."""

    def __init__(self, port: int = 0) -> None:
        """``port`` 0 picks a free one; another reuses an endpoint that just went away."""
        self._listener = socket.create_server(("127.0.0.1", port), backlog=64, reuse_port=False)
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self._listener.accept()
                self._held.append(conn)  # kept open, never read from, never answered

    def __enter__(self) -> BlackHole:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._listener.close()

    @property
    def connections(self) -> int:
        return len(self._held)


class ForwardProxy:
    """A plain HTTP forward proxy: absolute-form requests, one exchange per connection."""

    def __init__(self) -> None:
        self.targets: list[str] = []  # every absolute URL requested through it
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._relay()

            def do_HEAD(self) -> None:
                self._relay()

            def do_POST(self) -> None:
                self._relay()

            def do_PUT(self) -> None:
                self._relay()

            def _relay(self) -> None:
                target = urllib.parse.urlsplit(self.path)
                if target.scheme != "http" or not target.hostname:
                    self.send_error(400, "absolute-form http:// requests only")
                    return
                with proxy._lock:
                    proxy.targets.append(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP_HEADERS and k.lower() != "proxy-authorization"
                }
                headers["Host"] = target.netloc
                path = target.path + (f"?{target.query}" if target.query else "")
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    upstream.request(self.command, path or "/", body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_HEADERS | {"content-length"}:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()
                    self.close_connection = True

        return Handler
