"""A counting, throttling HTTP/1.1 reverse proxy for tests and benchmarks.

:class:`CountingProxy` listens on a free ``127.0.0.1`` port and forwards every
request to one upstream server (a storage emulator), recording what went
through: method, path, query string, status, request and response body sizes.
Tests put it between the code under test and the emulator to assert *how many*
object downloads happened; benchmarks use its optional throttles (bandwidth,
latency) to imitate a slow network; outage tests flip :meth:`CountingProxy.set_down`.

It works on raw sockets rather than ``http.server`` so bodies stream through
in large slices (1 MiB reads, no per-byte Python work) and keep-alive and
chunked framing are preserved end to end. Only the standard library is used.

What is rewritten on the way (everything else passes byte for byte):

* ``Expect: 100-continue`` is answered by the proxy itself and stripped from
  the forwarded request, so the proxy never has to stall a body waiting for
  an interim response from the upstream.
* A response ``Location`` header naming the upstream's address is pointed back
  at the proxy, so e.g. resumable-upload sessions of fake-gcs-server keep
  going through the proxy.

Throttles apply to body bytes in both directions (downloads dominate in this
project); header bytes are not throttled.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["CountingProxy", "ProxyRecord"]

_READ_SIZE = 1 << 20  # large reads keep the per-call Python overhead negligible
_HEAD_READ_SIZE = 64 * 1024
_MAX_HEAD = 256 * 1024  # a request/response head larger than this is a bug
_CONNECT_TIMEOUT_S = 10.0
_IDLE_TIMEOUT_S = 300.0  # generous: a throttled benchmark may sit in a long read


@dataclass(frozen=True)
class ProxyRecord:
    """One request that went through the proxy.

    ``status`` is 0 when no response head reached the client (upstream down,
    connection dropped by :meth:`CountingProxy.set_down`, ...); ``complete`` is
    False whenever the exchange was cut short. Header names are lower-cased.
    """

    method: str
    path: str
    query: str
    status: int
    request_bytes: int
    response_bytes: int
    request_headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    complete: bool = True
    started: float = 0.0
    duration_s: float = 0.0

    @property
    def target(self) -> str:
        """The request target as sent: path plus ``?query`` when there is one."""
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass
class _Tally:
    """Mutable state of one exchange, published as a :class:`ProxyRecord`."""

    method: str
    path: str
    query: str
    request_headers: dict[str, str]
    status: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    published: ProxyRecord | None = None

    def to_record(self, complete: bool) -> ProxyRecord:
        """Freeze the current state."""
        return ProxyRecord(
            method=self.method,
            path=self.path,
            query=self.query,
            status=self.status,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            request_headers=self.request_headers,
            response_headers=self.response_headers,
            complete=complete,
            started=self.started,
            duration_s=time.monotonic() - self.started,
        )


class _Dropped(Exception):
    """The exchange cannot continue (peer closed, proxy going down, bad framing)."""


class _TokenBucket:
    """A thread-safe token bucket; callers may go into debt and then sleep it off.

    Letting a caller take more tokens than are available (and sleeping for the
    deficit) keeps the long-run rate exact without splitting writes further.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def take(self, n: int, rate: float) -> float:
        """Consume ``n`` tokens at ``rate`` bytes/s; return how long to sleep."""
        with self._lock:
            now = time.monotonic()
            if rate != self.rate:
                # A runtime change of rate starts from an empty bucket so the
                # new rate is visible immediately.
                self.rate = rate
                self._tokens = 0.0
                self._stamp = now
            # A small burst allowance (50 ms worth) smooths scheduling jitter
            # without letting a transfer run noticeably faster than the rate.
            burst = rate * 0.05
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= n
            return -self._tokens / rate if self._tokens < 0 else 0.0


class _Conn:
    """A socket plus a read-ahead buffer, with HTTP framing helpers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def fill(self) -> bool:
        """Read more data into the buffer; return False at end of stream."""
        try:
            # Heads and chunk-size lines are small; a modest read avoids
            # allocating a 1 MiB buffer per request.
            data = self.sock.recv(_HEAD_READ_SIZE)
        except OSError as exc:
            raise _Dropped(str(exc)) from exc
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """Return the next message head (through the blank line), or None at a clean EOF."""
        start = 0
        while True:
            idx = self.buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                head = bytes(self.buf[: idx + 4])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _Dropped("message head too large")
            start = max(0, len(self.buf) - 3)
            if not self.fill():
                if self.buf:
                    raise _Dropped("connection closed inside a message head")
                return None

    def read_line(self) -> bytes:
        """Return one CRLF-terminated line (with the CRLF), for chunked framing."""
        while True:
            idx = self.buf.find(b"\n")
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) > _MAX_HEAD or not self.fill():
                raise _Dropped("bad or truncated chunked framing")

    def chunks(self, limit: int | None) -> Iterator[bytes]:
        """Yield up to ``limit`` body bytes (all until EOF when None), in large slices."""
        remaining = limit
        while remaining is None or remaining > 0:
            if self.buf:
                if remaining is None or len(self.buf) <= remaining:
                    data = bytes(self.buf)
                    self.buf.clear()
                else:
                    data = bytes(self.buf[:remaining])
                    del self.buf[:remaining]
            else:
                want = _READ_SIZE if remaining is None else min(_READ_SIZE, remaining)
                try:
                    data = self.sock.recv(want)
                except OSError as exc:
                    raise _Dropped(str(exc)) from exc
                if not data:
                    self.eof = True
                    if remaining is None:
                        return
                    raise _Dropped("connection closed inside a body")
            if remaining is not None:
                remaining -= len(data)
            yield data


@dataclass
class _Head:
    """A parsed request or response head."""

    first_line: str
    lines: list[tuple[str, str]]  # original-case names, values

    def get(self, name: str) -> str | None:
        """Return the last value of header ``name`` (case-insensitive), if present."""
        lname = name.lower()
        found = None
        for key, value in self.lines:
            if key.lower() == lname:
                found = value
        return found

    def tokens(self, name: str) -> set[str]:
        """Return the comma-separated tokens of every ``name`` header, lower-cased."""
        lname = name.lower()
        out: set[str] = set()
        for key, value in self.lines:
            if key.lower() == lname:
                out.update(t.strip().lower() for t in value.split(",") if t.strip())
        return out

    def as_dict(self) -> dict[str, str]:
        """Headers as a lower-cased dict (last value wins)."""
        return {k.lower(): v for k, v in self.lines}

    def encode(self) -> bytes:
        """Serialise back to wire form."""
        out = [self.first_line, *(f"{k}: {v}" for k, v in self.lines), "", ""]
        return "\r\n".join(out).encode("latin-1")

    @classmethod
    def parse(cls, raw: bytes) -> _Head:
        """Parse a head as returned by :meth:`_Conn.read_head`."""
        text = raw.decode("latin-1")
        first, *rest = text[:-4].split("\r\n")
        lines: list[tuple[str, str]] = []
        for line in rest:
            if not line:
                continue
            if line[0] in " \t" and lines:  # obsolete line folding
                key, value = lines[-1]
                lines[-1] = (key, f"{value} {line.strip()}")
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise _Dropped(f"malformed header line {line!r}")
            lines.append((key.strip(), value.strip()))
        return cls(first, lines)


class CountingProxy:
    """A threaded HTTP/1.1 reverse proxy that records and optionally throttles traffic.

    Args:
        upstream_port: port of the server to forward to.
        upstream_host: its address (loopback by default).
        per_conn_bytes_per_s: bandwidth cap per client connection (None = off).
        total_bytes_per_s: bandwidth cap shared by all connections (None = off).
        latency_s: delay added before forwarding each request (0 = off).
        record_headers: keep request/response headers in each record (turn off
            for long benchmarks with very many requests, to bound memory).

    The proxy's threads live in the calling process; socket calls release the
    GIL, so an in-process client still gets several hundred MB/s through it.

    The three throttle settings are plain attributes and may be changed while
    the proxy runs; the change applies to the next slice of data forwarded.
    """

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        per_conn_bytes_per_s: float | None = None,
        total_bytes_per_s: float | None = None,
        latency_s: float = 0.0,
        record_headers: bool = True,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.per_conn_bytes_per_s = per_conn_bytes_per_s
        self.total_bytes_per_s = total_bytes_per_s
        self.latency_s = latency_s
        self.record_headers = record_headers
        self._total_bucket = _TokenBucket(total_bytes_per_s or 1.0)
        self._lock = threading.Lock()
        self._records: list[ProxyRecord] = []
        self._socks: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._down = False
        self._stopping = False
        self._port = 0
        #: Connections reset on arrival because the proxy was down.
        self.refused_connections = 0

    # ----------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        """The port the proxy listens on (valid after :meth:`start`)."""
        if not self._port:
            raise RuntimeError("CountingProxy is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CountingProxy:
        """Bind a free loopback port and start accepting connections; return self."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._stopping = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"proxy-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop every open connection and wait for the workers."""
        self._stopping = True
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone may not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._drop_all()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_down(self, down: bool) -> None:
        """Simulate an outage: when True, reset new connections and drop open ones."""
        self._down = down
        if down:
            self._drop_all()

    @property
    def is_down(self) -> bool:
        """Whether the simulated outage is on."""
        return self._down

    # ------------------------------------------------------------------- records
    def records(self) -> list[ProxyRecord]:
        """Return a snapshot of the recorded requests, in completion order."""
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget every recorded request."""
        with self._lock:
            self._records.clear()

    def count(
        self,
        method: str | None = None,
        predicate: Callable[[ProxyRecord], bool] | None = None,
    ) -> int:
        """Count recorded requests, optionally only those of ``method`` matching ``predicate``."""
        return sum(
            1
            for r in self.records()
            if (method is None or r.method == method.upper())
            and (predicate is None or predicate(r))
        )

    def bytes_out(self, predicate: Callable[[ProxyRecord], bool] | None = None) -> int:
        """Sum the response body bytes sent to clients, optionally filtered by ``predicate``."""
        return sum(r.response_bytes for r in self.records() if predicate is None or predicate(r))

    def bytes_in(self, predicate: Callable[[ProxyRecord], bool] | None = None) -> int:
        """Sum the request body bytes received from clients, optionally filtered."""
        return sum(r.request_bytes for r in self.records() if predicate is None or predicate(r))

    # ------------------------------------------------------------------ internals
    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _drop_all(self) -> None:
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            _abort(sock, close=False)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            if self._down or self._stopping:
                self.refused_connections += 1  # only this thread writes it
                _abort(client, close=True)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(client,), name="proxy-conn", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, client_sock: socket.socket) -> None:
        """Serve one client connection: a keep-alive loop of request/response exchanges."""
        self._register(client_sock)
        client_sock.settimeout(_IDLE_TIMEOUT_S)
        client = _Conn(client_sock)
        upstream: _Conn | None = None
        conn_bucket = _TokenBucket(self.per_conn_bytes_per_s or 1.0)
        try:
            while not (self._down or self._stopping):
                try:
                    raw = client.read_head()
                except _Dropped:
                    break
                if raw is None:
                    break
                try:
                    keep_going, upstream = self._exchange(client, raw, upstream, conn_bucket)
                except (_Dropped, ValueError):
                    break  # unparsable request: nothing sensible to forward
                if not keep_going:
                    break
        finally:
            if upstream is not None:
                self._unregister(upstream.sock)
            self._unregister(client_sock)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _connect_upstream(self) -> _Conn:
        sock = socket.create_connection(
            (self.upstream_host, self.upstream_port), timeout=_CONNECT_TIMEOUT_S
        )
        sock.settimeout(_IDLE_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._register(sock)
        if self._down or self._stopping:  # lost a race with set_down()/stop()
            self._unregister(sock)
            raise _Dropped("proxy is down")
        return _Conn(sock)

    def _throttle(self, n: int, conn_bucket: _TokenBucket) -> None:
        delay = 0.0
        per_conn = self.per_conn_bytes_per_s
        if per_conn:
            delay = conn_bucket.take(n, per_conn)
        total = self.total_bytes_per_s
        if total:
            delay = max(delay, self._total_bucket.take(n, total))
        if delay > 0:
            time.sleep(delay)

    def _slice_size(self) -> int:
        # Under a throttle, forward in slices of ~20 ms worth of data so the
        # rate is smooth instead of 1 MiB bursts followed by long sleeps.
        rates = [r for r in (self.per_conn_bytes_per_s, self.total_bytes_per_s) if r]
        if not rates:
            return _READ_SIZE
        return max(4096, min(_READ_SIZE, int(min(rates) / 50)))

    def _commit(self, tally: _Tally, *, complete: bool) -> None:
        """Publish (or, after a late failure, correct) the record of an exchange.

        Called *before* the last byte of a response goes out: once a client has
        the whole response it may immediately ask the proxy for its counts, so
        the record must already be there.
        """
        rec = tally.to_record(complete)
        with self._lock:
            if tally.published is None:
                self._records.append(rec)
            else:
                # Replace the earlier version in place, unless reset() dropped it.
                for i in range(len(self._records) - 1, -1, -1):
                    if self._records[i] is tally.published:
                        self._records[i] = rec
                        break
                else:
                    return
            tally.published = rec

    def _pump(
        self,
        src: _Conn,
        dst: socket.socket,
        framing: str,
        length: int,
        conn_bucket: _TokenBucket,
        add: Callable[[int], None],
        on_last: Callable[[], None] | None = None,
    ) -> None:
        """Copy one message body from ``src`` to ``dst``, counting payload bytes via ``add``.

        ``framing`` is "length" (``length`` bytes), "chunked" or "close" (until
        EOF). ``on_last`` runs just before the final bytes that complete the
        message are sent (for "close" framing the caller handles it).
        """
        if framing == "length":
            if length == 0:
                if on_last is not None:
                    on_last()
                return
            self._copy(src, dst, length, conn_bucket, add, on_last)
        elif framing == "close":
            self._copy(src, dst, None, conn_bucket, add, None)
        elif framing == "chunked":
            while True:
                size_line = src.read_line()
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise _Dropped(f"bad chunk size line {size_line!r}") from exc
                if size == 0:
                    # Last chunk, then trailer lines up to an empty line. The
                    # record is committed before the client can see the end.
                    trailer = [size_line]
                    while trailer[-1] not in (b"\r\n", b"\n"):
                        trailer.append(src.read_line())
                    if on_last is not None:
                        on_last()
                    _send(dst, b"".join(trailer))
                    return
                _send(dst, size_line)
                self._copy(src, dst, size, conn_bucket, add, None)
                _send(dst, src.read_line())  # the CRLF closing the chunk
        else:  # pragma: no cover - internal misuse
            raise AssertionError(framing)

    def _copy(
        self,
        src: _Conn,
        dst: socket.socket,
        limit: int | None,
        conn_bucket: _TokenBucket,
        add: Callable[[int], None],
        on_last: Callable[[], None] | None,
    ) -> None:
        left = limit
        for data in src.chunks(limit):
            if self.per_conn_bytes_per_s or self.total_bytes_per_s:
                # Re-slice under a throttle so each sleep covers only a small piece.
                step = self._slice_size()
                view = memoryview(data)
                pieces: list[bytes | memoryview] = [
                    view[off : off + step] for off in range(0, len(view), step)
                ]
            else:
                pieces = [data]
            for piece in pieces:
                if self.per_conn_bytes_per_s or self.total_bytes_per_s:
                    self._throttle(len(piece), conn_bucket)
                add(len(piece))
                if left is not None:
                    left -= len(piece)
                    if left == 0 and on_last is not None:
                        on_last()
                _send(dst, piece)
            if self._down or self._stopping:
                raise _Dropped("proxy is down")

    def _exchange(
        self,
        client: _Conn,
        raw_head: bytes,
        upstream: _Conn | None,
        conn_bucket: _TokenBucket,
    ) -> tuple[bool, _Conn | None]:
        """Forward one request and its response; return (keep client alive, upstream conn)."""
        req = _Head.parse(raw_head)
        parts = req.first_line.split(" ")
        if len(parts) != 3:
            raise _Dropped(f"malformed request line {req.first_line!r}")
        method, target, version = parts
        path, _, query = target.partition("?")
        keep_headers = self.record_headers
        tally = _Tally(method.upper(), path, query, req.as_dict() if keep_headers else {})

        def add_req(n: int) -> None:
            tally.request_bytes += n

        def add_resp(n: int) -> None:
            tally.response_bytes += n

        def commit() -> None:
            self._commit(tally, complete=True)

        # Request body framing (RFC 9112 section 6): chunked wins over a length.
        if "chunked" in req.tokens("transfer-encoding"):
            req_framing, req_len = "chunked", 0
        else:
            req_framing, req_len = "length", int(req.get("content-length") or 0)
        expect_continue = "100-continue" in req.tokens("expect")
        if expect_continue:
            req.lines = [(k, v) for k, v in req.lines if k.lower() != "expect"]
        client_close = "close" in req.tokens("connection") or (
            version == "HTTP/1.0" and "keep-alive" not in req.tokens("connection")
        )
        resp_framing = "length"
        resp_version = "HTTP/1.1"
        resp: _Head | None = None

        try:
            if self.latency_s > 0:
                time.sleep(self.latency_s)
            if self._down:
                raise _Dropped("proxy is down")
            head_bytes = req.encode()
            # A kept-alive upstream connection may have been closed by the
            # server while idle; detect that before sending, and reconnect.
            if upstream is not None and (upstream.eof or _peer_closed(upstream.sock)):
                self._unregister(upstream.sock)
                upstream = None
            if upstream is None:
                try:
                    upstream = self._connect_upstream()
                except OSError as exc:
                    raise _Dropped(f"upstream unreachable: {exc}") from exc
            _send(upstream.sock, head_bytes)
            if expect_continue:
                _send(client.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            self._pump(client, upstream.sock, req_framing, req_len, conn_bucket, add_req)

            # Response: forward interim 1xx heads and keep reading to the final one.
            while True:
                raw = upstream.read_head()
                if raw is None:
                    raise _Dropped("upstream closed without a response")
                resp = _Head.parse(raw)
                status_parts = resp.first_line.split(" ", 2)
                status = int(status_parts[1])
                resp_version = status_parts[0]
                if 100 <= status < 200 and status != 101:
                    _send(client.sock, raw)
                    continue
                tally.status = status
                if keep_headers:
                    tally.response_headers = resp.as_dict()
                break

            if method.upper() == "HEAD" or status in (204, 304) or status == 101:
                resp_framing, resp_len = "length", 0
            elif "chunked" in resp.tokens("transfer-encoding"):
                resp_framing, resp_len = "chunked", 0
            elif resp.get("content-length") is not None:
                resp_framing, resp_len = "length", int(resp.get("content-length") or 0)
            else:
                resp_framing, resp_len = "close", 0
            self._rewrite_location(resp)
            if resp_framing == "length" and resp_len == 0:
                commit()  # the head is all the client will get
            _send(client.sock, resp.encode())
            self._pump(upstream, client.sock, resp_framing, resp_len, conn_bucket, add_resp, commit)
            if resp_framing == "close":
                commit()  # the client sees the end only when we close it
        except (_Dropped, OSError, ValueError):
            self._commit(tally, complete=False)
            if upstream is not None:
                self._unregister(upstream.sock)
            if tally.status == 0 and not self._down and not self._stopping:
                # Upstream refused or broke before answering: tell the client
                # with a 502 rather than a reset, as a real gateway would.
                with contextlib.suppress(OSError):
                    client.sock.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
            return False, None

        upstream_close = (
            resp_framing == "close"
            or "close" in resp.tokens("connection")
            or (resp_version == "HTTP/1.0" and "keep-alive" not in resp.tokens("connection"))
        )
        if upstream_close:
            self._unregister(upstream.sock)
            upstream = None
        # The client was told whatever the upstream said about the connection;
        # if the upstream announced a close, the client expects one from us too.
        keep = not client_close and not upstream_close
        return keep, upstream

    def _rewrite_location(self, resp: _Head) -> None:
        upstream_addr = f"{self.upstream_host}:{self.upstream_port}"
        own_addr = f"127.0.0.1:{self._port}"
        resp.lines = [
            (k, v.replace(upstream_addr, own_addr) if k.lower() == "location" else v)
            for k, v in resp.lines
        ]


def _send(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise _Dropped(str(exc)) from exc


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _abort(sock: socket.socket, *, close: bool) -> None:
    """Cut a connection at once so peers fail fast, as in an outage.

    ``shutdown`` wakes any thread blocked on the socket. Sockets owned by a
    worker thread are left for that thread to close: closing a descriptor
    another thread is using could hit a reused descriptor number.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if close:
        with contextlib.suppress(OSError):
            sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    """Return True if an idle connection has been closed (or reset) by its peer."""
    try:
        sock.setblocking(False)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        finally:
            sock.setblocking(True)
            sock.settimeout(_IDLE_TIMEOUT_S)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    # Empty data is EOF; stray bytes from an idle upstream mean a broken
    # exchange. Either way the connection is unusable.
    del data
    return True
