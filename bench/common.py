"""Shared pieces of the benchmarks: storage rig, model generation, Triton runs, statistics.

Everything runs on 127.0.0.1: moto (patched for ranged reads, see
:mod:`bench.moto_ranged`) behind the tests' :class:`CountingProxy`, the
nvidia-pytriton wheel's tritonserver, and cacheagent installed into a private
repository-agent directory. Nothing here asserts a time; it measures and reports.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cacheagent.triton.install import LAUNCHER_NAME, install_triton
from harness.emulators import MotoS3, StorageRig
from harness.localhost import stat_fields
from harness.triton import MODEL_PY, TritonPaths, TritonServer, model_config, prepare_triton

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
MiB = 1 << 20
GiB = 1 << 30
WEIGHTS = (1.0, 2.0, 3.0, 4.0)
X = (10.0, 20.0, 30.0, 40.0)

# The agent's one INFO line per LOAD (cacheagent.triton.actions.load_line).
LOAD_LINE = re.compile(
    r"cacheagent: model '(?P<model>[^']+)' (?P<outcome>HIT|MISS|STALE): "
    r"(?P<fetched>[0-9.]+ ?[KMGT]?i?B) fetched \((?P<files_fetched>\d+) of (?P<files>\d+) files, "
    r"(?P<total>[^)]*) total\) in (?P<seconds>[0-9.]+) s from "
)
# Triton's log line prefix (glog): severity, month and day, local wall-clock time to the
# microsecond, thread id, source line. Only Triton writes such lines; the launcher's own
# lines on the same stderr start with "cacheagent run:".
GLOG_LINE = re.compile(
    r"^[IWEF](?P<month>\d\d)(?P<day>\d\d) (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)\.(?P<us>\d{6}) +"
    r"\d+ (?P<source>[\w.]+):\d+\] ?(?P<text>.*)$",
    re.M,
)
# A model that fails under --model-control-mode=none never makes the server ready;
# these lines say so at once instead of after the ready timeout.
FAILURE_LINES = ("failed to load", "Poll failed for model directory")


# --------------------------------------------------------------------------- storage


class RangedMotoS3(MotoS3):
    """:class:`MotoS3` whose ranged GETs cost what the range costs (see bench/moto_ranged.py)."""

    name = "moto-s3-ranged"

    def _command(self) -> list[str]:
        return [sys.executable, str(HERE / "moto_ranged.py"), "-H", self.host, "-p", str(self.port)]


def start_rig(stock_moto: bool = False) -> tuple[MotoS3, StorageRig]:
    """Start moto (ranged-read patch unless ``stock_moto``) and a rig with a fresh bucket."""
    moto: MotoS3 = MotoS3() if stock_moto else RangedMotoS3()
    moto.start()
    # Headers are not needed by the benchmark and would only grow memory.
    rig = StorageRig(moto, record_headers=False).start()
    return moto, rig


def set_link(
    rig: StorageRig,
    per_conn_bytes_per_s: float | None = None,
    total_bytes_per_s: float | None = None,
    latency_s: float = 0.0,
) -> None:
    """Set (or with no arguments clear) the proxy's cloud-like throttles."""
    rig.proxy.per_conn_bytes_per_s = per_conn_bytes_per_s
    rig.proxy.total_bytes_per_s = total_bytes_per_s
    rig.proxy.latency_s = latency_s


@dataclass(frozen=True)
class Traffic:
    """What crossed the proxy during one measurement.

    ``first_get`` and ``last_byte`` are ``time.monotonic()`` stamps (the proxy runs
    in this process) of the first object GET's start and the last one's end, so
    ``content_bytes / (last_byte - first_get)`` is the rate the link delivered
    while the download was under way, apart from listing before and disk after.
    """

    requests: int
    content_gets: int
    content_bytes: int
    response_bytes: int
    first_get: float = float("nan")
    last_byte: float = float("nan")

    @classmethod
    def of(cls, rig: StorageRig) -> Traffic:
        """Count the proxy's records since its last reset."""
        records = rig.proxy.records()
        content = rig.content_records("")
        return cls(
            requests=len(records),
            content_gets=len(content),
            content_bytes=sum(r.response_bytes for r in content),
            response_bytes=sum(r.response_bytes for r in records),
            first_get=min((r.started for r in content), default=float("nan")),
            last_byte=max((r.started + r.duration_s for r in content), default=float("nan")),
        )

    @property
    def wire_seconds(self) -> float:
        """From the first object GET's start to the last one's end."""
        return self.last_byte - self.first_get

    @property
    def wire_rate(self) -> float:
        """Object bytes per second over :attr:`wire_seconds` (NaN without GETs)."""
        secs = self.wire_seconds
        return self.content_bytes / secs if secs > 0 else float("nan")


# --------------------------------------------------------------------------- models


def random_bytes(size: int, seed: int) -> bytes:
    """``size`` incompressible bytes, fast (numpy's PCG64 generates about 1 GB/s)."""
    return np.random.default_rng(seed).bytes(size)


@dataclass(frozen=True)
class ModelSpec:
    """An add model (python backend) plus extra random files in its version directory."""

    name: str
    extra: tuple[tuple[str, int], ...]  # (path relative to the version dir, size)

    @property
    def extra_bytes(self) -> int:
        """Bytes of the extra files."""
        return sum(size for _, size in self.extra)

    def files(self, agent_params: Mapping[str, str] | None, seed: int) -> dict[str, bytes]:
        """All files of the model, ``{relative path: bytes}``; agent section iff params given."""
        files = {
            "config.pbtxt": model_config(self.name, agent_params).encode(),
            "1/model.py": MODEL_PY.encode(),
            "1/weights.bin": np.asarray(WEIGHTS, "<f4").tobytes(),
        }
        for i, (relpath, size) in enumerate(self.extra):
            files[f"1/{relpath}"] = random_bytes(size, seed * 100_003 + i)
        return files


@dataclass(frozen=True)
class Case:
    """One point of the sweep: the models of one repository."""

    name: str
    label: str
    models: tuple[ModelSpec, ...]
    # Fewer repetitions where Triton's own storage walk makes every start slow.
    max_reps: int | None = None

    @property
    def size(self) -> int:
        """Bytes of model data (the extra files) in the repository."""
        return sum(m.extra_bytes for m in self.models)

    @property
    def file_count(self) -> int:
        """Files per repository (config, model.py and weights.bin included)."""
        return sum(3 + len(m.extra) for m in self.models)


def one_file_case(name: str, size: int, label: str) -> Case:
    """One model with one large random file."""
    return Case(name, label, (ModelSpec(f"m{name}", (("extra.bin", size),)),))


def many_files_case(name: str, count: int, size_each: int, label: str) -> Case:
    """One model with ``count`` small random files."""
    extra = tuple((f"shards/shard-{i:04d}.bin", size_each) for i in range(count))
    return Case(name, label, (ModelSpec(f"m{name}", extra),), max_reps=3)


def many_models_case(name: str, count: int, size_each: int, label: str) -> Case:
    """``count`` models of one random file each, in one repository."""
    models = tuple(ModelSpec(f"m{name}-{i}", (("extra.bin", size_each),)) for i in range(count))
    return Case(name, label, models)


@dataclass
class Repos:
    """Where one case's models live, for each way of starting Triton."""

    native: str  # s3:// URL, configs without an agent section
    agent: str  # s3:// URL, configs naming cacheagent (default parameters)
    local: Path  # a local copy without an agent section (also the floor's redirect target)
    variants: dict[str, str] = field(default_factory=dict)  # extra agent repos by name
    stub: Path | None = None  # local configs only, each naming its ``agent`` model as ``source``


def upload_case(
    rig: StorageRig,
    case: Case,
    work: Path,
    prefix: str,
    agent_variants: Mapping[str, Mapping[str, str]] | None = None,
) -> Repos:
    """Put ``case`` in the bucket (native and agent repositories) and on local disk.

    ``agent_variants`` adds more agent repositories whose configs carry those
    parameters (e.g. ``{"noprefetch": {"prefetch": "false"}}``). A local stub
    repository (config.pbtxt only, the agent's ``source`` naming the model in the
    agent repository; what ``cacheagent stub`` writes) is made too. Uploads go
    straight to the emulator, so the proxy does not count them.
    """
    local = work / "local" / prefix
    repos = Repos(native=rig.url(f"{prefix}/native"), agent=rig.url(f"{prefix}/agent"), local=local)
    variants = {"agent": {}, **(agent_variants or {})}
    for seed, model in enumerate(case.models, start=1):
        native = model.files(None, seed)
        rig.put_tree(f"{prefix}/native/{model.name}", native)
        for variant, params in variants.items():
            files = dict(native)
            files["config.pbtxt"] = model_config(model.name, params).encode()
            rig.put_tree(f"{prefix}/{variant}/{model.name}", files)
        stub = work / "stub" / prefix / model.name / "config.pbtxt"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(model_config(model.name, {"source": f"{repos.agent}/{model.name}"}))
        for relpath, data in native.items():
            path = local / model.name / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        del native
    for variant in agent_variants or {}:
        repos.variants[variant] = rig.url(f"{prefix}/{variant}")
    repos.stub = work / "stub" / prefix
    return repos


def drop_case(rig: StorageRig, prefix: str, work: Path) -> None:
    """Delete a case's objects and local copy (frees moto's memory and disk)."""
    with contextlib.suppress(FileNotFoundError):
        rig.delete(prefix)
    force_rmtree(work / "local" / prefix)
    force_rmtree(work / "stub" / prefix)


# --------------------------------------------------------------------------- files


def force_rmtree(path: Path) -> None:
    """Remove a tree even with read-only dirs inside (cache snapshots are 0555)."""
    if not os.path.lexists(path):
        return
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            with contextlib.suppress(OSError):
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    os.chmod(full, stat.S_IRWXU)
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def make_workdir(base: str | None) -> Path:
    """A private scratch directory for one benchmark run."""
    return Path(tempfile.mkdtemp(prefix="cacheagent-bench-", dir=base))


# --------------------------------------------------------------------------- triton


@dataclass
class AgentLoad:
    """One parsed ``cacheagent: model ... in X s`` line."""

    model: str
    outcome: str
    seconds: float
    files: int
    files_fetched: int


@dataclass(frozen=True)
class LogPhases:
    """When a start reached two points of Triton's own start-up, from its log.

    Seconds after ``began`` (the moment the measured process was spawned); NaN
    when the log has no such line.
    """

    triton_s: float  # Triton's first log line: the server process is up
    loading_s: float  # its first "loading: <model>:<version>" line: a model's load begins
    # (with an agent, only once the agent's LOAD has answered)


def log_phases(log_text: str, began: float) -> LogPhases:
    """Where the time before READY went, by Triton's log timestamps (see :class:`LogPhases`).

    ``began`` is ``time.time()`` when the process was spawned. glog writes local
    time with month and day but no year: the year is ``began``'s, or the next one
    for a line that would otherwise fall long before ``began`` (a start across New
    Year's midnight).
    """
    year = dt.datetime.fromtimestamp(began).year
    first = loading = float("nan")
    for m in GLOG_LINE.finditer(log_text):
        fields = (int(m[k]) for k in ("month", "day", "h", "m", "s", "us"))
        when = dt.datetime(year, *fields)
        offset = when.timestamp() - began
        if offset < -86400:
            offset = when.replace(year=year + 1).timestamp() - began
        if first != first:
            first = offset
        if m["source"] == "model_lifecycle.cc" and m["text"].startswith('"loading: '):
            loading = offset
            break
    return LogPhases(first, loading)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of the whole machine and of the rig: so far, or between two samples.

    Two samples bracket a start (:func:`cpu_spent`): on a machine of a few cores
    the origin and the link-shaping proxy run beside Triton and the client, so a
    start whose cores were busy throughout waited for CPU, not for the link. NaN
    where /proc could not tell.
    """

    busy_s: float  # every core's user + system + interrupt time (/proc/stat)
    steal_s: float  # time the hypervisor gave this VM's cores to someone else
    rig_s: float  # the origin's process and this one (the proxy's threads live here)


def cpu_sample(origin_pid: int | None) -> CpuSample:
    """The machine's and the rig's CPU seconds so far (NaN fields off Linux).

    ``origin_pid`` None: no origin process to count (the rig is this process alone);
    a pid that cannot be read makes the rig's figure NaN, never an undercount.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = steal = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...; guest time is within user
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick
        steal = fields[7] / tick
    own = os.times()
    rig = own.user + own.system + _process_cpu_s(origin_pid, tick)
    return CpuSample(busy, steal, rig)


def _process_cpu_s(pid: int | None, tick: int) -> float:
    """User + system seconds of process ``pid`` and its reaped children (NaN if unreadable)."""
    if pid is None:
        return 0.0
    fields = stat_fields(f"/proc/{pid}/stat")
    if fields is None or len(fields) < 15:
        return float("nan")
    try:
        return sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    except ValueError:
        return float("nan")


def cpu_spent(before: CpuSample, after: CpuSample) -> CpuSample:
    """What was spent between two samples."""
    return CpuSample(
        after.busy_s - before.busy_s, after.steal_s - before.steal_s, after.rig_s - before.rig_s
    )


@dataclass
class TritonRun:
    """One Triton start: seconds to READY and the storage traffic it caused."""

    mode: str
    seconds: float
    traffic: Traffic
    loads: list[AgentLoad]
    error: str = ""

    @property
    def agent_seconds(self) -> float:
        """Sum of the agent's own LOAD seconds (0 without the agent)."""
        return sum(load.seconds for load in self.loads)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {**asdict(self), "agent_seconds": self.agent_seconds}


def parse_loads(log_text: str) -> list[AgentLoad]:
    """Every agent LOAD line in a Triton log."""
    return [
        AgentLoad(
            m["model"], m["outcome"], float(m["seconds"]), int(m["files"]), int(m["files_fetched"])
        )
        for m in LOAD_LINE.finditer(log_text)
    ]


def _ready(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/v2/health/ready", timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


class Harness:
    """Starts Triton in each mode against one rig and measures start-to-READY.

    ``agent`` is "none" (no --repoagent-directory), "real" (cacheagent, installed
    under the work dir) or "floor" (the real shim with :mod:`bench.floor_worker`).
    """

    def __init__(self, work: Path, rig: StorageRig, paths: TritonPaths | None = None) -> None:
        self.work = work
        self.rig = rig
        self.paths = paths or prepare_triton()
        self.real_agents = work / "repoagents"
        install_triton(self.real_agents)
        self.floor_agents = work / "floor-repoagents"
        install_triton(self.floor_agents)
        launcher = self.floor_agents / "cacheagent" / LAUNCHER_NAME
        launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "floor_worker.py"}"\n')
        self.triton_tmp = work / "triton-tmp"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._seq = 0

    def run(
        self,
        mode: str,
        repository: str | Path,
        models: Sequence[str],
        *,
        agent: str = "none",
        cache_dir: Path | None = None,
        floor_root: Path | None = None,
        timeout: float = 600.0,
    ) -> TritonRun:
        """Start Triton, wait until READY, check one inference, stop it; return the measurement."""
        self._seq += 1
        log_path = self.logs / f"{self._seq:04d}-{mode}.log"
        self.triton_tmp.mkdir(exist_ok=True)
        env = {
            **self.rig.env,
            # Every mode compiles model.py afresh: read-only snapshots cannot keep
            # a __pycache__, so no mode gets to keep one either.
            "PYTHONDONTWRITEBYTECODE": "1",
            # Triton's native copies land here, so a leak stays inside the work dir.
            "TRITON_AWS_MOUNT_DIRECTORY": str(self.triton_tmp),
            "CACHEAGENT_CACHE_DIR": str(cache_dir or (self.work / "unused-cache")),
        }
        if floor_root is not None:
            env["BENCH_FLOOR_ROOT"] = str(floor_root)
        repoagent = {"none": None, "real": self.real_agents, "floor": self.floor_agents}[agent]
        server = TritonServer(
            self.paths,
            repository,
            log_path,
            repoagent_dir=repoagent,
            model_control_mode="none",
            exit_on_error=False,
            log_verbose=0,
            env=env,
        )
        self.rig.proxy.reset()
        error = ""
        seconds = float("nan")
        try:
            started = time.monotonic()
            server.start()
            next_log_check = started + 0.5
            while True:
                if _ready(server.url):
                    seconds = time.monotonic() - started
                    break
                now = time.monotonic()
                if not server.running():
                    error = f"tritonserver exited ({server.proc and server.proc.returncode})"
                    break
                if now >= next_log_check:
                    next_log_check = now + 0.5
                    text = server.log_text()
                    if any(marker in text for marker in FAILURE_LINES):
                        error = "a model failed to load"
                        break
                if now - started > timeout:
                    error = f"not ready after {timeout:.0f} s"
                    break
                time.sleep(0.02)
            traffic = Traffic.of(self.rig)
            if not error:
                error = self._check(server, models)
        finally:
            server.stop(timeout=60)
            server.cleanup()
            force_rmtree(self.triton_tmp)
        text = server.log_text()
        if error:
            error += f" (log: {log_path})\n" + "\n".join(text.splitlines()[-15:])
        return TritonRun(mode, seconds, traffic, parse_loads(text), error)

    @staticmethod
    def _check(server: TritonServer, models: Sequence[str]) -> str:
        not_ready = [name for name in models if not server.model_ready(name)]
        if not_ready:
            return f"models not ready: {not_ready}"
        out = server.infer(models[0], "INPUT0", list(X))["OUTPUT0"]
        want = np.asarray(X, np.float32) + np.asarray(WEIGHTS, np.float32)
        if not np.allclose(out, want):
            return f"wrong inference result {out} (want {want})"
        return ""


# --------------------------------------------------------------------------- cacheagent warm


@dataclass
class WarmRun:
    """One ``cacheagent warm`` subprocess."""

    wall_seconds: float
    fetch_seconds: float  # the snapshot's own seconds (listing, fetch, publish)
    started: float  # time.monotonic() when the process was started
    peak_rss: int  # bytes: VmHWM of the process, read by itself just before it exits
    bytes_fetched: int
    traffic: Traffic
    error: str = ""
    ru_maxrss: int = 0  # bytes: what wait4() reports (includes the parent's RSS, see below)


# ``cacheagent warm`` exactly as the console script runs it (cacheagent.cli.main.main),
# plus one line with the process's own peak RSS. ru_maxrss from wait4() or
# RUSAGE_CHILDREN is no good here: at exec the kernel folds the forking parent's
# high-water RSS into the child's maxrss, so it reports the benchmark's own size.
# VmHWM belongs to the address space created by exec, so it is the child's alone.
_WARM = """
import sys
from cacheagent.cli.main import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status:
        kib = [line.split()[1] for line in status if line.startswith("VmHWM:")][0]
    sys.stderr.write("BENCH-VmHWM " + kib + "\\n")
sys.exit(code)
"""


def cacheagent_warm(
    rig: StorageRig,
    location: str,
    cache_dir: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 900.0,
) -> WarmRun:
    """Run ``cacheagent warm --json`` in a subprocess; time it and read its own peak RSS."""
    # (The child runs cacheagent.cli.main.main, what the ``cacheagent`` script runs.)
    argv = [
        sys.executable,
        "-c",
        _WARM,
        "warm",
        location,
        "--cache-dir",
        str(cache_dir),
        "--json",
        "--no-progress",
        *extra_args,
    ]
    env = {**os.environ, **rig.env}
    rig.proxy.reset()
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        deadline = started + timeout
        while True:
            # wait4 on this pid gives this child's own rusage (RUSAGE_CHILDREN would
            # mix in every Triton the benchmark has reaped before).
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    traffic = Traffic.of(rig)
    hwm = re.search(r"BENCH-VmHWM (\d+)", stderr)
    peak = int(hwm.group(1)) * 1024 if hwm else 0
    maxrss = usage.ru_maxrss * 1024
    if proc.returncode != 0:
        return WarmRun(wall, float("nan"), started, peak, 0, traffic, stderr[-2000:], maxrss)
    data = json.loads(stdout.strip().splitlines()[-1])
    return WarmRun(
        wall,
        float(data["seconds"]),
        started,
        peak,
        int(data["bytes_fetched"]),
        traffic,
        "",
        maxrss,
    )


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    """min / median / max of repeated measurements."""

    lo: float
    mid: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """Spread of the finite values (NaN when there are none)."""
        vals = [v for v in values if v == v and v not in (float("inf"), float("-inf"))]
        if not vals:
            nan = float("nan")
            return cls(nan, nan, nan, 0)
        return cls(min(vals), statistics.median(vals), max(vals), len(vals))

    def fmt(self, digits: int = 2, suffix: str = "") -> str:
        """``median (min-max)``, or just the value for one sample."""
        if self.n == 0:
            return "n/a"
        if self.n == 1 or self.lo == self.hi:
            return f"{self.mid:.{digits}f}{suffix}"
        return f"{self.mid:.{digits}f}{suffix} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log(message: str) -> None:
    """Progress on stderr, with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
