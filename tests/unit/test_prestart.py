"""The first worker of ``cacheagent run``: started before the launcher's work, handed over later.

Real worker processes on real pipes: what the shim would read is read here.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.triton.prestart import EarlyWorker, start_early
from cacheagent.triton.startlisting import START_ENV
from harness.agent_requests import agent_request, write_start_record

CLOUD_RUN = ["--cache-dir", "/unused", "--", "tritonserver", "--model-repository=s3://b/models"]


def read_line(fd: int, timeout: float = 30.0) -> str:
    """One line from ``fd``, bounded; "" on EOF."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no line from the worker within {timeout} s (so far: {data!r})"
        chunk = os.read(fd, 1)
        if not chunk:
            return data.decode()
        data += chunk
    return data.decode().rstrip("\n")


@contextlib.contextmanager
def early_worker() -> Iterator[EarlyWorker]:
    """A worker started as 'cacheagent run' starts its first one; killed if still running."""
    early = start_early(CLOUD_RUN)
    assert isinstance(early, EarlyWorker)
    try:
        yield early
    finally:
        early.discard()
        if early.process.poll() is None:
            early.process.kill()
            early.process.wait()


@pytest.mark.parametrize(
    "argv",
    [
        ["--cache-dir", "/c", "--", "tritonserver", "--model-repository=/local/models"],
        ["--cache-dir", "/c", "tritonserver", "--model-repository=s3://b/m"],  # no "--"
        [*CLOUD_RUN, "--repoagent-directory=/opt/agents"],
        ["--help"],
    ],
)
def test_no_worker_is_started_when_the_launcher_would_not_use_it(argv: list[str]) -> None:
    assert start_early(argv) is None


def test_the_worker_takes_the_launchers_environment_before_it_says_ready(tmp_path: Path) -> None:
    with early_worker() as early:
        # It waits, silent, until it has its environment: READY means "ready for Triton".
        ready, _, _ = select.select([early._from_worker], [], [], 0.5)
        assert not ready
        cmdline = Path(f"/proc/{early.process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--env-first" in cmdline and b"-I" in cmdline
        # Triton's environment names this start: the LOAD must find its record there.
        model = tmp_path / "remote" / "add"
        (model / "1").mkdir(parents=True)
        (model / "1" / "model.py").write_text("# v1")
        (model / "config.pbtxt").write_text("name: 'add'")
        start = tmp_path / "cache" / "starts" / "1-ab"
        write_start_record(start, model)
        env = {"PATH": os.environ["PATH"], START_ENV: str(start)}
        to_worker, from_worker = early.hand_over(env)
        assert read_line(from_worker).startswith("READY ")
        request = agent_request(
            "LOAD",
            tmp_path / "stub" / "add",
            {"cache_dir": str(tmp_path / "cache"), "source": str(model)},
            artifact="FILESYSTEM",
        )
        os.write(to_worker, json.dumps(request).encode() + b"\n")
        lines = [read_line(from_worker)]
        while lines[-1].startswith(("LOG ", "HB", "LEASE ")):
            lines.append(read_line(from_worker))
        assert lines[-1].startswith("OK " + str(tmp_path / "cache")), lines
        assert any("validated by this start's listing" in line for line in lines), lines
        os.close(to_worker)  # EOF: the worker ends, as when Triton exits
        assert early.process.wait(30) == 0
        os.close(from_worker)


def test_a_discarded_worker_exits_without_a_word() -> None:
    early = start_early(CLOUD_RUN)
    assert early is not None
    from_worker = os.dup(early._from_worker)
    early.discard()
    assert early.process.wait(30) == 0
    assert read_line(from_worker) == ""  # no READY: it never served
    os.close(from_worker)
    with pytest.raises(OSError):
        early.hand_over({})


def test_a_worker_gone_before_the_hand_over_is_an_oserror_and_is_let_go() -> None:
    """The launcher then starts the installed worker instead (and reaps this one)."""
    early = start_early(CLOUD_RUN)
    assert early is not None
    early.process.kill()
    early.process.wait(30)
    with pytest.raises(OSError):
        early.hand_over({"PATH": "/bin"})
    with pytest.raises(OSError):  # discarded: its pipes are closed
        early.hand_over({"PATH": "/bin"})


def test_no_early_worker_when_the_agent_runs_another_python(monkeypatch) -> None:
    monkeypatch.setenv("CACHEAGENT_PYTHON", "/usr/bin/python3-elsewhere")
    assert start_early(CLOUD_RUN) is None
    monkeypatch.setenv("CACHEAGENT_PYTHON", sys.executable)
    early = start_early(CLOUD_RUN)
    assert early is not None
    early.discard()
    early.reap(30)
    assert early.process.returncode == 0


def test_the_environment_line_replaces_the_whole_environment() -> None:
    """What Triton's env lacks, the worker lacks too; what it adds, the worker has."""
    code = (
        "import os; from cacheagent.triton.worker import take_environment; "
        "ok = take_environment(0); "
        "print(ok, os.environ.get('CACHEAGENT_START_DIR'), 'ONLY_IN_LAUNCHER' in os.environ)"
    )
    line = json.dumps({"env": {"CACHEAGENT_START_DIR": "/c/starts/1-ab", "PATH": "/bin"}}) + "\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=line,
        capture_output=True,
        text=True,
        env={**os.environ, "ONLY_IN_LAUNCHER": "1"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "/c/starts/1-ab", "False"]
    eof = subprocess.run(
        [sys.executable, "-c", code], input="", capture_output=True, text=True, timeout=60
    )
    assert eof.stdout.split()[0] == "False"


def test_the_worker_readies_the_launchers_cache_and_leaves_its_database_to_later(
    tmp_path: Path,
) -> None:
    """The cache exists once the worker has its environment; the index database does not:
    a hit needs none (its bookkeeping opens it after the LOAD has been answered)."""
    cache_dir = tmp_path / "cache"
    with early_worker() as early:
        env = {"PATH": os.environ["PATH"], "CACHEAGENT_CACHE_DIR": str(cache_dir)}
        to_worker, from_worker = early.hand_over(env)
        assert read_line(from_worker).startswith("READY ")
        deadline = time.monotonic() + 30
        while not cache_dir.is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache_dir.is_dir()
        time.sleep(0.5)  # the old worker opened the database right after making the directory
        assert not (cache_dir / "index" / "cache.db").exists()
        os.close(to_worker)
        assert early.process.wait(30) == 0
        os.close(from_worker)


def test_opening_the_cache_early_never_raises(tmp_path: Path) -> None:
    from cacheagent.triton import actions

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    actions.open_cache({"CACHEAGENT_CACHE_DIR": str(blocker / "cache")})  # cannot be made
    actions.open_cache({"CACHEAGENT_CACHE_DIR": str(tmp_path / "cache")})
    assert (tmp_path / "cache").is_dir()
    assert actions.cache_for(tmp_path / "cache").index._db_handle is None
