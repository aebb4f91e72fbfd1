"""The benchmark's start breakdown reads Triton's own log timestamps (bench.common.log_phases)."""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
import time

import pytest

from bench.common import cpu_sample, cpu_spent, log_phases

# The lines of a real launcher start's log (Triton 2.51, glog format; the launcher's
# own line has no glog prefix and must be skipped).
LOG = """\
W1202 15:54:55.808467 24578 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory"
I1202 15:54:55.808528 24578 cuda_memory_manager.cc:117] "CUDA memory pool disabled"
I1202 15:54:55.814199 24578 cacheagent_shim.c:537] "cacheagent: worker pid 24575 started"
cacheagent run: s3://127.0.0.1:42891/b/s8mb: 1 model(s) -> /tmp/stubs/6075 (0 new config(s))
I1202 15:54:55.861439 24578 cacheagent_shim.c:400] "cacheagent: model 'ms8mb' HIT: 0 B fetched"
I1202 15:54:55.861769 24578 model_lifecycle.cc:472] "loading: ms8mb:1"
I1202 15:54:57.205810 24578 model_lifecycle.cc:839] "successfully loaded 'ms8mb'"
"""


def _local(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_phases_are_offsets_of_the_first_line_and_the_first_model_load() -> None:
    began = _local("2026-12-02 15:54:55.758467")
    phases = log_phases(LOG, began)
    assert math.isclose(phases.triton_s, 0.050, abs_tol=1e-6)
    assert math.isclose(phases.loading_s, 0.103302, abs_tol=1e-6)


def test_a_log_without_a_model_load_gives_nan_for_it() -> None:
    head = "\n".join(LOG.splitlines()[:3])
    phases = log_phases(head, _local("2026-12-02 15:54:55.800000"))
    assert math.isclose(phases.triton_s, 0.008467, abs_tol=1e-6)
    assert math.isnan(phases.loading_s)
    assert math.isnan(log_phases("", 0.0).triton_s)


def test_a_start_just_before_midnight_reads_lines_after_it() -> None:
    text = 'I1203 00:00:00.020000 1 model_lifecycle.cc:472] "loading: m:1"\n'
    phases = log_phases(text, _local("2026-12-02 23:59:59.990000"))
    assert math.isclose(phases.triton_s, 0.030, abs_tol=1e-6)
    assert math.isclose(phases.loading_s, 0.030, abs_tol=1e-6)


def test_a_start_just_before_new_year_reads_lines_of_the_next_year() -> None:
    text = 'I0101 00:00:00.020000 1 model_lifecycle.cc:472] "loading: m:1"\n'
    phases = log_phases(text, _local("2026-12-31 23:59:59.990000"))
    assert math.isclose(phases.loading_s, 0.030, abs_tol=1e-6)


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_cpu_spent_counts_this_process_as_rig_and_the_machine_as_busy() -> None:
    before = cpu_sample(None)
    _burn(0.3)
    spent = cpu_spent(before, cpu_sample(None))
    # This process is where the proxy's threads run: its CPU is the rig's.
    assert spent.rig_s >= 0.25
    assert spent.busy_s >= 0.25  # the machine saw it too (and whatever else ran)
    assert spent.steal_s >= 0.0


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")
def test_the_origins_cpu_is_read_from_its_process() -> None:
    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.4\n"
            "while time.process_time() < end: pass\ntime.sleep(30)",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        seen = 0.0
        while time.monotonic() < deadline:
            seen = cpu_sample(burner.pid).rig_s - cpu_sample(None).rig_s
            if seen >= 0.35:
                break
            time.sleep(0.05)
        assert seen >= 0.35
    finally:
        burner.kill()
        burner.wait()
    assert math.isnan(cpu_sample(burner.pid).rig_s)  # gone: unknown, not zero
