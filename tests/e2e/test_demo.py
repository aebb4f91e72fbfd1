"""The demo (README's first command) runs end to end and shows what it claims."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| ([^|]+) \| +([0-9.]+) \| +(\d+) \| +([^|]+) \|", re.M)


def test_demo_runs_and_the_cached_starts_fetch_no_model_bytes():
    done = subprocess.run(
        [sys.executable, "-m", "demo.demo", "--size-mb", "2", "--models", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {
        m.group(1).strip(): (int(m.group(3)), m.group(4).strip()) for m in ROW.finditer(done.stdout)
    }
    assert list(rows) == [
        "Triton native (S3)",
        "cacheagent, cold cache",
        "cacheagent, cached (restart)",
        "cacheagent, cached, stub repo",
    ]
    assert rows["Triton native (S3)"][1].endswith("MiB")
    assert rows["cacheagent, cold cache"][1].endswith("MiB")
    # A cached start moves listings and Triton's own config.pbtxt only: KiB, not MiB.
    assert rows["cacheagent, cached (restart)"][1].endswith(("KiB", " B"))
    assert rows["cacheagent, cached, stub repo"][0] == 1  # the agent's one listing
