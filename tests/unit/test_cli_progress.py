"""`cacheagent warm`'s progress bar on a real (narrow) pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

COLUMNS = 60
RUN_TIMEOUT_S = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_pty(argv: list[str], columns: int) -> tuple[int, str]:
    """Run ``argv`` with stderr (and stdin) on a pseudo-terminal ``columns`` wide."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=terminal, stdout=subprocess.PIPE, stderr=terminal, close_fds=True
    )
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(controller)
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_progress_fits_a_60_column_terminal_with_rate_and_eta(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "1").mkdir(parents=True)
    for i in range(4):
        (model / "1" / f"part{i}.bin").write_bytes(os.urandom(24 * 1024 * 1024))
    (model / "config.pbtxt").write_text('name: "model"\n')
    argv = [sys.executable, "-m", "cacheagent.cli", "warm", str(model)]
    argv += ["--cache-dir", str(tmp_path / "c"), "--part-size", "1MiB", "--concurrency", "2"]
    code, screen = run_on_pty(argv, COLUMNS)
    assert code == 0, screen
    text = _ANSI.sub("", screen).replace("\r\n", "\n")
    # One bar, redrawn in place with \r: a bar wider than the terminal would wrap,
    # and each redraw would then leave a new line behind.
    lines = [line for line in text.split("\n") if line.strip()]
    assert len(lines) == 1, lines
    frames = [frame for frame in lines[0].split("\r") if frame.strip()]
    assert frames and all(len(frame) <= COLUMNS for frame in frames), max(frames, key=len)
    final = frames[-1]
    assert "100%" in final and "96.0M/96.0M" in final  # 4 x 24 MiB
    assert re.search(r"[0-9.]+[kMG]?B/s", final), final  # the rate
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", final), final  # elapsed<remaining (ETA)


def test_no_progress_off_a_terminal(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "1").mkdir(parents=True)
    (model / "1" / "w.bin").write_bytes(os.urandom(1024 * 1024))
    argv = [sys.executable, "-m", "cacheagent.cli", "warm", str(model)]
    done = subprocess.run(
        [*argv, "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stderr == ""
