"""The cache's stats in Prometheus' text format, written to a file or served on ``/metrics``.

Names follow Prometheus' conventions: the unit before ``_total``
(``cacheagent_fetched_bytes_total``), base units (bytes), no ratio gauge (a
ratio is computed at query time from the two counters, see README), and a
``cache_dir`` label on every series so that two caches on one node stay apart in
node-exporter's textfile collector.
"""

from __future__ import annotations

import http.server
import signal
import socketserver
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cacheagent import __version__
from cacheagent.errors import CacheAgentError, InvalidParameterError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# counter in the index -> (metric name, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("cacheagent_hits_total", "Snapshot lookups served from the cache"),
    "misses": ("cacheagent_misses_total", "Snapshot lookups that fetched from storage"),
    "stale_served": (
        "cacheagent_stale_served_total",
        "Loads served a possibly stale snapshot because storage was unreachable",
    ),
    "bytes_fetched": (
        "cacheagent_fetched_bytes_total",
        "Bytes of model files downloaded from storage",
    ),
    "bytes_served_from_cache": (
        "cacheagent_served_from_cache_bytes_total",
        "Bytes of model files served from the cache instead of storage",
    ),
    "evictions": (
        "cacheagent_evictions_total",
        "Snapshots evicted to keep the cache within budget",
    ),
    "bytes_evicted": ("cacheagent_evicted_bytes_total", "Bytes of snapshots evicted"),
    "corrupt_repaired": (
        "cacheagent_corrupt_repaired_total",
        "Corrupt snapshots detected and dropped for re-fetch",
    ),
}
# stats field -> (metric name, help)
GAUGES: dict[str, tuple[str, str]] = {
    "size": ("cacheagent_cache_size_bytes", "Bytes the cache holds on disk"),
    "max_size": ("cacheagent_cache_max_size_bytes", "The cache budget (absent when unlimited)"),
    "snapshots": ("cacheagent_snapshots", "Snapshots in the cache"),
    "blobs": ("cacheagent_blobs", "Distinct blobs in the cache"),
    "live_leases": ("cacheagent_live_leases", "Snapshots leased by running processes"),
}
BUILD_INFO = "cacheagent_build_info"


def label_value(text: str) -> str:
    """``text`` escaped for a label value (backslash, double quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _counter_metric(key: str) -> tuple[str, str]:
    """Name and help of a counter, also for one a newer index counts and this table lacks."""
    if key in COUNTERS:
        return COUNTERS[key]
    base = f"{key.removeprefix('bytes_')}_bytes" if key.startswith("bytes_") else key
    return f"cacheagent_{base}_total", f"The cache's {key.replace('_', ' ')} counter"


def exposition(stats: Mapping[str, Any], counters: Mapping[str, int], cache_dir: str) -> str:
    """The text exposition of one cache's ``counters`` and gauges in ``stats``."""
    labels = f'{{cache_dir="{label_value(cache_dir)}"}}'
    lines = [
        f"# HELP {BUILD_INFO} The cacheagent version that produced these metrics",
        f"# TYPE {BUILD_INFO} gauge",
        f'{BUILD_INFO}{{version="{label_value(__version__)}",'
        f'cache_dir="{label_value(cache_dir)}"}} 1',
    ]
    for key, value in counters.items():
        name, help_text = _counter_metric(key)
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines.append(f"{name}{labels} {int(value)}")
    for key, (name, help_text) in GAUGES.items():
        if stats.get(key) is None:
            continue  # e.g. no budget: absent, not a fake zero
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines.append(f"{name}{labels} {int(stats[key])}")
    return "\n".join(lines) + "\n"


# -- the live endpoint ---------------------------------------------------------

# A scrape computes the stats afresh (a walk of the blob directory), so a
# handful of scrapers at once is plenty; more wait for a slot, never pile up.
MAX_CONCURRENT_SCRAPES = 4
SCRAPE_SLOT_WAIT_S = 10.0
MAX_CONNECTIONS = 16  # one thread each; a connection beyond them is closed at once
REQUEST_TIMEOUT_S = 30.0  # a client that stops sending is dropped


@dataclass(frozen=True)
class Address:
    """Where ``stats --serve`` listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[::1]:PORT``; raise if malformed."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise InvalidParameterError(
            f"--serve {text!r} is not an address; use HOST:PORT, e.g. 127.0.0.1:9400 "
            "(or :9400 for every interface)"
        )
    return Address(host or "0.0.0.0", int(port))


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True  # a stuck client never keeps the process alive at exit
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` in a thread, or close it when all threads are busy."""
        if not self._connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


def metrics_handler(render: Callable[[], str]) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler that answers ``GET /metrics`` with ``render()``, computed per scrape."""
    slots = threading.BoundedSemaphore(MAX_CONCURRENT_SCRAPES)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S
        server_version = f"cacheagent/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._reply(200, "text/plain; charset=utf-8", "cacheagent metrics: /metrics\n")
                return
            if path != "/metrics":
                self._reply(404, "text/plain; charset=utf-8", "not found; try /metrics\n")
                return
            if not slots.acquire(timeout=SCRAPE_SLOT_WAIT_S):
                self._reply(503, "text/plain; charset=utf-8", "too many scrapes at once\n")
                return
            try:
                body = render()
            except Exception as exc:  # a broken cache is an answer, not a dead server
                self._reply(500, "text/plain; charset=utf-8", f"cannot read the cache: {exc}\n")
                return
            finally:
                slots.release()
            self._reply(200, CONTENT_TYPE, body)

        def _reply(self, status: int, content_type: str, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return  # one line per scrape would drown the real messages

    return Handler


@contextmanager
def _stop_on_signals(server: http.server.HTTPServer) -> Iterator[None]:
    # serve_forever blocks this thread; shutdown() must come from another one,
    # and a signal handler runs on this one, so it starts a thread to call it.
    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_metrics(address: Address, render: Callable[[], str]) -> None:
    """Serve ``/metrics`` at ``address`` until SIGINT or SIGTERM; return once stopped."""
    try:
        server = _Server((address.host, address.port), metrics_handler(render))
    except OSError as exc:
        raise CacheAgentError(
            f"cannot listen on {address}: {exc.strerror or exc}; choose another --serve address"
        ) from exc
    host, port = server.server_address[:2]
    shown = Address(str(host), int(port))
    print(f"serving metrics on http://{shown}/metrics; stop with Ctrl-C", file=sys.stderr)
    sys.stderr.flush()
    with server, _stop_on_signals(server):
        server.serve_forever(poll_interval=0.5)
    print("metrics server stopped", file=sys.stderr)
