"""The first worker of ``cacheagent run``, started before anything else the launcher does.

A worker needs about 50 ms to be READY (a Python start and its imports), while
Triton reaches its first LOAD about 15 ms after it starts. Started beside Triton,
the worker is what that LOAD waits for. So ``cacheagent run`` starts it first
thing, before its own imports, and hands it to Triton later, once the launcher
knows Triton's environment (the cache, this start's directory): the worker's
first line on stdin is then that environment (``--env-first``), and only after
it has taken it does the worker say READY, to the shim, which adopts it
(``CACHEAGENT_WORKER_FDS``).

This module is imported before the launcher's own modules: it imports only
what starting a process needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# The worker's argument that makes it read its environment before it says READY.
ENV_FIRST = "--env-first"
_CLOUD_MARK = "://"
#: How long the launcher waits for the early worker to take its environment.
HAND_OVER_TIMEOUT_S = 10.0


def worker_boot_code(python: str) -> str:
    """Python code that starts the worker under ``python -I -S``, or "" when it cannot.

    Only for the interpreter running this code (its paths are known here): the
    directory holding the cacheagent package, then that interpreter's site-packages,
    exactly what ``site`` would have put on ``sys.path``, minus the .pth hooks.
    Code with a quote or a newline in a path is refused (it goes inside sh's single
    quotes in the installed launcher script).
    """
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        return ""
    import site

    import cacheagent

    package_root = os.path.dirname(os.path.dirname(os.path.realpath(cacheagent.__file__)))
    paths = [package_root, *(p for p in site.getsitepackages() if p != package_root)]
    code = (
        f"import sys; sys.path[:0] = {json.dumps(paths)}; "
        "from cacheagent.triton.worker import run; run()"
    )
    if any(c in code for c in "'\n\\"):
        return ""
    return code


class EarlyWorker:
    """A worker started ahead of the launcher's work, waiting for its environment."""

    def __init__(self, process: subprocess.Popen[bytes], to_worker: int, from_worker: int) -> None:
        self.process = process
        self._to_worker: int | None = to_worker
        self._from_worker: int | None = from_worker

    def hand_over(
        self, env: Mapping[str, str], timeout: float = HAND_OVER_TIMEOUT_S
    ) -> tuple[int, int]:
        """Give the worker its environment; return (its stdin's write end, its stdout's
        read end) for Triton to inherit. The caller owns (and closes) both from now on.

        Raises OSError when the worker is gone, or takes no line for ``timeout``
        seconds (an environment over a pipe's 64 KiB waits for the worker to read);
        the worker is then discarded.
        """
        if self._to_worker is None or self._from_worker is None:
            raise OSError("the early worker was already handed over or discarded")
        line = json.dumps({"env": dict(env)}).encode("utf-8", "surrogateescape") + b"\n"
        try:
            _write_within(self._to_worker, line, timeout)
        except OSError:
            self.discard()
            raise
        fds = (self._to_worker, self._from_worker)
        self._to_worker = self._from_worker = None
        return fds

    def discard(self) -> None:
        """Let the worker go unused: on EOF on its stdin it exits (see :meth:`reap`)."""
        for fd in (self._to_worker, self._from_worker):
            if fd is not None:
                os.close(fd)
        self._to_worker = self._from_worker = None

    def reap(self, timeout: float) -> None:
        """Wait for a discarded (or handed-over) worker's end; kill it after ``timeout`` s."""
        reap(self.process, timeout)


def spawn_worker(
    argv: Sequence[str], env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start a worker on two new pipes: (it, its stdin's write end, its stdout's read end).

    The caller owns both ends. Raises OSError (and leaves no descriptor open).
    """
    import subprocess  # not at import time: the worker imports ENV_FIRST from here

    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    try:
        process = subprocess.Popen(argv, stdin=to_r, stdout=from_w, env=env)
    except OSError:
        os.close(to_w)
        os.close(from_r)
        raise
    finally:
        os.close(to_r)  # the worker's ends: it holds them now (or never will)
        os.close(from_w)
    return process, to_w, from_r


def reap(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait at most ``timeout`` s for a worker's end, then kill it; True if it was killed."""
    import subprocess

    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False


def _write_within(fd: int, data: bytes, timeout: float) -> None:
    import select

    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError(f"the early worker took no environment within {timeout:.0f} s")
        view = view[os.write(fd, view[: select.PIPE_BUF]) :]


def start_early(argv: Sequence[str]) -> EarlyWorker | None:
    """Start the worker for ``cacheagent run ARGV`` now, or None when it would go unused.

    Used only when the command names a cloud repository and no repoagent directory
    of its own (the launcher then installs and uses this package's agent); the
    launcher decides for certain later, and discards a worker it does not use.
    """
    if "--" not in argv:
        return None
    other = os.environ.get("CACHEAGENT_PYTHON", "")
    if other and os.path.realpath(other) != os.path.realpath(sys.executable):
        return None  # the agent's workers run that Python: so must the first one
    from cacheagent.triton import tritonargs  # the one reading of Triton's arguments

    command = list(argv[argv.index("--") + 2 :])
    if tritonargs.names_repoagent_directory(command) or not any(
        _CLOUD_MARK in repo for repo in tritonargs.repositories(command)
    ):
        return None
    code = worker_boot_code(sys.executable)
    argv_worker = (
        [sys.executable, "-I", "-S", "-c", code, ENV_FIRST]
        if code
        else [sys.executable, "-I", "-m", "cacheagent.triton.worker", ENV_FIRST]
    )
    try:
        return EarlyWorker(*spawn_worker(argv_worker))
    except OSError:
        return None
