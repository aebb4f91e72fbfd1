"""The Python side of the Triton bridge, run as ``python -m cacheagent.triton.worker``.

Triton loads the small C shim ``libtritonrepoagent_cacheagent.so`` (source:
``cacheagent/triton/shim/cacheagent_shim.c``). On the first agent action the shim starts
this worker through the launcher ``<repoagent-dir>/cacheagent/cacheagent-worker``
and keeps it for every later action. All agent logic runs here, in
:func:`cacheagent.triton.actions.handle`; nothing Python ever runs inside Triton.

Protocol (stdin/stdout pipes, one line per message, UTF-8):

Shim -> worker, one JSON object per line::

    {"action": "LOAD"|"LOAD_COMPLETE"|"LOAD_FAIL"|"UNLOAD"|"UNLOAD_COMPLETE",
     "artifact_type": "FILESYSTEM"|"REMOTE_FILESYSTEM", "location": "...",
     "handle": "0x...", "server_pid": 1234, "params": {"key": "value"},
     "config": {...model config as Triton serialized it...} | null}

``config`` is sent for LOAD only. ``handle`` identifies the model across actions.

Worker -> shim, tagged text lines (no JSON, so the C side stays trivial)::

    READY <version>       once, when the worker can take requests
    HB                    every second while a request is being handled
    LOG <level> <text>    level is INFO, WARN, ERROR or VERBOSE; lands in Triton's log
    LEASE <token path>    (LOAD only, just before its OK) the lease token of the
                          snapshot: the shim holds it too (a shared flock, until the
                          model's LOAD_FAIL, UNLOAD_COMPLETE or finalize), so the lease
                          outlives a crashed worker
    OK <path>             done; an empty path leaves the model alone, a path on LOAD
                          makes Triton load the model from that local directory
    ERR <text>            failed; on LOAD the model fails with this message

Every request gets exactly one ``OK`` or ``ERR``. Text never contains newlines.

Rules that keep the bridge robust:

* stdout carries protocol lines only. At startup the real stdout is kept on a
  private, non-inheritable descriptor and fd 1 (and ``sys.stdout``) is pointed at
  stderr, so stray prints, C libraries and subprocesses cannot corrupt the
  protocol. stdin is likewise moved away and fd 0 becomes ``/dev/null``.
* The worker exits on EOF on stdin (Triton finalized the agent or died), and a
  watchdog thread exits it when its parent pid changes (checked every second).
* Heartbeats come from their own thread, so a busy main thread never looks hung;
  only a stopped or wedged process does, and the shim then kills it after
  ``CACHEAGENT_WORKER_IDLE_TIMEOUT`` seconds. Heartbeats are sent only while a
  request is in flight: while Triton is idle nobody reads the pipe, and lines
  written then would pile up until the pipe is full and block the writer.
* For the same reason, ``log`` calls made while no request is in flight (e.g.
  from a background thread) go to stderr, which is Triton's console.
* SIGINT is ignored: a Ctrl-C in Triton's terminal reaches the whole process
  group, and Triton still needs the worker for the UNLOAD actions of its
  graceful shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from cacheagent import __version__
from cacheagent.errors import CacheAgentError
from cacheagent.triton.prestart import ENV_FIRST

HEARTBEAT_INTERVAL = 1.0
#: At exit, how long the worker waits for the bookkeeping of its last hits.
EXIT_SETTLE_S = 2.0
WATCHDOG_INTERVAL = 1.0
MAX_TEXT = 32 * 1024  # the shim accepts far longer lines; this keeps Triton's log sane

LEVELS = {"INFO", "WARN", "ERROR", "VERBOSE"}
_LEVEL_ALIASES = {"WARNING": "WARN", "DEBUG": "VERBOSE", "CRITICAL": "ERROR"}

Handler = Callable[[dict[str, Any], Callable[[str, str], None]], str | None]


def one_line(text: str, limit: int = MAX_TEXT) -> str:
    """Return ``text`` as a single protocol-safe line (no CR/LF), cut to ``limit`` chars."""
    flat = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    if len(flat) > limit:
        flat = flat[: limit - 3] + "..."
    return flat


class Channel:
    """The worker's protocol output: whole lines, one writer at a time."""

    def __init__(self, out_fd: int) -> None:
        self._fd = out_fd
        self._lock = threading.Lock()
        self._busy = False

    @property
    def busy(self) -> bool:
        """True while a request is in flight (between :meth:`begin` and :meth:`finish`)."""
        return self._busy

    def _write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "surrogateescape")
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except BrokenPipeError:
            # Triton is gone (or the shim gave up on us and closed the pipe): nobody
            # will ever read another line, so there is nothing left to do.
            os._exit(0)

    def send(self, line: str) -> None:
        """Write one protocol line."""
        with self._lock:
            self._write(line)

    def begin(self) -> None:
        """Mark a request as in flight: heartbeats and LOG lines go to the shim."""
        with self._lock:
            self._busy = True

    def finish(self, line: str) -> None:
        """Write the request's final OK/ERR line and mark the worker idle, atomically."""
        with self._lock:
            self._write(line)
            self._busy = False

    def heartbeat(self) -> None:
        """Send ``HB`` if a request is in flight."""
        with self._lock:
            if self._busy:
                self._write("HB")

    def log(self, level: str, msg: str) -> None:
        """Emit a log line now: to Triton's log during a request, else to stderr."""
        lvl = str(level).upper()
        lvl = _LEVEL_ALIASES.get(lvl, lvl)
        if lvl not in LEVELS:
            lvl = "INFO"
        text = one_line(str(msg))
        with self._lock:
            if self._busy:
                self._write(f"LOG {lvl} {text}")
                return
        print(f"cacheagent worker [{lvl}]: {text}", file=sys.stderr, flush=True)


class BridgeLogHandler(logging.Handler):
    """Send the package's ``logging`` records to Triton's log, levels mapped.

    DEBUG becomes VERBOSE (shown with ``--log-verbose``), WARNING becomes WARN;
    records from background threads, while no request is in flight, go to
    Triton's console (see :meth:`Channel.log`).
    """

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record as a LOG line (or to stderr when idle)."""
        try:
            self._channel.log(record.levelname, f"cacheagent: {self.format(record)}")
        except Exception:  # logging must never take an action down
            self.handleError(record)


def install_log_handler(channel: Channel, level: int = logging.INFO) -> logging.Handler:
    """Route the ``cacheagent`` logger to the bridge; return the handler installed."""
    handler = BridgeLogHandler(channel)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cacheagent")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def _heartbeat_loop(channel: Channel) -> None:
    while True:
        time.sleep(HEARTBEAT_INTERVAL)
        channel.heartbeat()


def _watchdog_loop(parent: int) -> None:
    # PR_SET_PDEATHSIG is unusable here (it fires when the forking *thread* exits),
    # so poll: when Triton dies we are re-parented and the parent pid changes.
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        if os.getppid() != parent:
            print(
                "cacheagent worker: Triton (the parent process) is gone; exiting",
                file=sys.stderr,
                flush=True,
            )
            os._exit(0)


class LeasedPath(str):
    """A LOAD answer: the directory Triton loads from, and the lease token of its snapshot.

    A ``str``, so it is a path to every caller; :func:`respond` also sends the
    token to the shim in a ``LEASE`` line.
    """

    lease_token: str

    def __new__(cls, path: str, lease_token: str) -> LeasedPath:
        """The answer ``path``, leased through the token file ``lease_token``."""
        answer = super().__new__(cls, path)
        answer.lease_token = lease_token
        return answer


def respond(request_line: bytes, handler: Handler, channel: Channel) -> str:
    """Run one request line through ``handler`` and return its answer.

    That is one OK/ERR line, preceded by a LEASE line when the handler returned
    a :class:`LeasedPath` (the two are written together).
    """
    try:
        request = json.loads(request_line.decode("utf-8", "surrogateescape"))
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        return "ERR " + one_line(
            f"bad request from the shim ({exc}); this is a bug, please report it"
        )
    try:
        result = handler(request, channel.log)
    except CacheAgentError as exc:
        return "ERR " + one_line(str(exc) or type(exc).__name__)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return "ERR " + one_line(
            f"internal error in the cacheagent worker during {request.get('action')} of "
            f"'{request.get('location')}': {type(exc).__name__}: {exc} (this is a bug; please "
            "report it with the traceback from Triton's console)"
        )
    if result is None:
        return "OK "
    lease = str(getattr(result, "lease_token", ""))
    if isinstance(result, os.PathLike):
        result = os.fspath(result)
    if not isinstance(result, str) or "\n" in result or "\r" in result:
        return "ERR " + one_line(f"internal error: the action returned {result!r}, not a path")
    if lease and "\n" not in lease and "\r" not in lease:
        return f"LEASE {lease}\nOK {result}"
    return "OK " + result


def _take_stdio() -> tuple[int, int]:
    """Move the protocol pipes to private fds; point fds 0/1 at /dev/null and stderr."""
    in_fd = os.dup(0)  # os.dup makes non-inheritable (close-on-exec) copies
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return in_fd, out_fd


def serve(in_fd: int, out_fd: int, handler: Handler | None = None) -> int:
    """Answer requests from ``in_fd`` on ``out_fd`` until EOF; return the exit code."""
    if handler is None:
        handler = _actions_handler()
    channel = Channel(out_fd)
    install_log_handler(channel, _log_level(os.environ))
    channel.send(f"READY {__version__}")
    threading.Thread(target=_heartbeat_loop, args=(channel,), name="heartbeat", daemon=True).start()
    with open(in_fd, "rb") as requests:
        for line in requests:
            if not line.strip():
                continue
            channel.begin()
            channel.finish(respond(line, handler, channel))
    return 0


def _actions_handler(*, prefetch: bool = True) -> Handler:
    """The real agent's handler; its hit path is imported meanwhile on a thread.

    Imported before READY, so a broken install fails fast; the rest (the cache,
    its index, with ``prefetch`` the prefetcher) would lengthen the first LOAD,
    so it loads while the worker waits.
    """
    from cacheagent.triton import actions

    threading.Thread(
        target=actions.preload, kwargs={"prefetch": prefetch}, name="preload", daemon=True
    ).start()
    return actions.handle


def take_environment(in_fd: int) -> bool:
    """Read the one environment line ``cacheagent run`` sends first and make it this
    process's; False on EOF (the launcher let this worker go unused).

    Nothing else can be in the pipe yet: the shim writes only after READY, which
    comes after this.
    """
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(in_fd, 65536)
        if not chunk:
            return False
        data += chunk
    env = {
        str(k): str(v)
        for k, v in json.loads(data.decode("utf-8", "surrogateescape"))["env"].items()
    }
    # Changed in place, never cleared first: the preload thread runs meanwhile (and
    # must not read the environment: it is the launcher's until this returns).
    for name in [n for n in os.environ if n not in env]:
        del os.environ[name]
    os.environ.update(env)
    return True


def _log_level(env: dict[str, str] | os._Environ[str]) -> int:
    # CACHEAGENT_LOG_LEVEL=DEBUG shows fallbacks and retries in Triton's verbose log.
    name = str(env.get("CACHEAGENT_LOG_LEVEL", "INFO")).upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def main(handler: Handler | None = None) -> int:
    """Entry point of ``python -m cacheagent.triton.worker`` (started by the shim only).

    ``handler`` replaces :func:`cacheagent.triton.actions.handle`; tests use it to run
    the real bridge with scripted behaviour (crash, hang, redirect).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    in_fd, out_fd = _take_stdio()
    threading.Thread(target=_watchdog_loop, args=(parent,), name="watchdog", daemon=True).start()
    if ENV_FIRST in sys.argv[1:]:  # started early by cacheagent run (triton.prestart)
        real = handler is None
        if handler is None:
            # The prefetcher only if the environment says this start needs it.
            handler = _actions_handler(prefetch=False)  # while the launcher prepares
        if not take_environment(in_fd):
            return 0
        if real:
            _open_cache_soon()
    return serve(in_fd, out_fd, handler)


def _open_cache_soon() -> None:
    """Ready the cache ``cacheagent run`` named on a thread, while Triton reaches its first LOAD."""
    from cacheagent.triton import actions

    env = dict(os.environ)
    threading.Thread(target=actions.open_cache, args=(env,), name="open-cache", daemon=True).start()


def run() -> None:
    """Run the worker to its end and exit the process (how the shim's launcher starts it)."""
    code = main()
    actions = sys.modules.get("cacheagent.triton.actions")  # only if a LOAD may have queued
    if actions is not None:
        # The last hits' counters, queued after their LOADs were answered; bounded
        # well within the shim's wait at Finalize.
        actions.settle_open_caches(EXIT_SETTLE_S)
    sys.stderr.flush()
    # Exit now even if actions left non-daemon threads running: the shim waits only
    # 5 s at Finalize, and on-disk state is crash-safe by design (temp file + rename).
    os._exit(code)


if __name__ == "__main__":
    run()
