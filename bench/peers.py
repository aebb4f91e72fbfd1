"""cacheagent against its peers: seconds from process start to READY on shaped links.

One command on a fresh machine (after ``pip install -e '.[test,bench]'``)::

    .venv/bin/python -m bench.peers --smoke              # tiny sizes, one link: < 3 minutes
    .venv/bin/python -m bench.peers --quick --clouds     # 3 cases x 3 links, 1 rep: ~7 minutes
    .venv/bin/python -m bench.peers --clouds             # 4 x 3, 3 reps: ~40 min, + clouds

The origin is SeaweedFS (``weed mini``, :class:`harness.seaweed.SeaweedS3`)
behind the link-shaping :class:`harness.proxy.CountingProxy`. Each link shape
caps bytes per connection and in total and adds a latency per request; it is
named by how many connections it takes to fill it (``fill8``: 20 MB/s per
connection, 160 MB/s in total; ``fill32``: 5 / 160; ``fill64``: 2.5 / 160; each
with 20 ms per request). Before the sweep the rig measures what the proxy can
move with 64 concurrent ranged GETs (unshaped and under each shape) and scales
every shape down by one factor when the unshaped rate is not comfortably above
the largest total cap.

For each case (python-backend models plus random weights: 1 x 256 MiB,
1 x 1 GiB, 8 models x 32 MiB, one model of 300 files x 32 KiB), each link and
each repetition, these starts are timed from process start to the first
``/v2/health/ready`` = 200 (then every model must be ready and one inference
must be right), in an order rotated per repetition:

* ``native``: tritonserver straight on ``s3://127.0.0.1:<proxy>/<bucket>/<case>``;
* ``cold`` / ``warm``: cacheagent with default settings (no parameter but the
  cache directory), on an empty cache, then on the cache the cold start filled.
  Through the launcher as users run it (``cacheagent run --cache-dir DIR --
  tritonserver ARGS``, the venv's console script) when the module exists;
  otherwise through what the launcher
  automates: ``cacheagent stub`` of the bucket into a local stub repository, then
  tritonserver on the stub with the installed agent (``--repoagent-directory``),
  both timed, as the launcher would do both in one process;
* ``s5cmd-cold`` / ``s5cmd-warm``: ``s5cmd sync`` of the bucket into an empty
  directory plus a local start, then the same again on the synced directory
  (s5cmd checks every object and copies nothing), timed as sync seconds plus
  start seconds of the same run;
* ``local``: tritonserver on a local copy; ``local + bytes/link`` adds the
  repository's bytes over the link's total cap (the bound a perfect cold start
  approaches).

Native is not one of the targets and is slow on narrow links (Triton reads one
object at a time over one connection, and walks the bucket request by request),
so it runs in the first ``--native-reps`` repetitions only (default 1), and not
at all where its predicted length (bytes / per-connection cap + 12 requests per
file x latency, the rate measured on SeaweedFS) exceeds ``--native-budget``
seconds; the report then shows local + that prediction, marked as predicted.

``--clouds`` adds a warm-hit comparison across clouds: ``cacheagent warm`` in a
fresh process on a cached model, on moto S3, fake-gcs-server and Azurite, each
behind its own proxy with the links' per-request latency.

Results: ``bench/results/peers-{smoke,quick,full}.{md,png,json}``; the markdown
is printed too. ``--render FILE.json`` re-renders a saved run. Nothing here
asserts a time: the benchmark measures and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from cacheagent.triton.install import install_triton
from harness.emulators import Azurite, Emulator, FakeGcs, MotoS3, StorageRig
from harness.peers import PeerError, s5cmd_sync
from harness.proxy import ProxyRecord
from harness.seaweed import SeaweedS3
from harness.triton import TritonPaths, TritonServer, prepare_triton

from .common import (
    FAILURE_LINES,
    REPO_ROOT,
    RESULTS_DIR,
    WEIGHTS,
    AgentLoad,
    Case,
    CpuSample,
    GiB,
    LogPhases,
    MiB,
    Spread,
    Traffic,
    X,
    cacheagent_warm,
    cpu_sample,
    cpu_spent,
    fmt_bytes,
    force_rmtree,
    free_disk,
    log,
    log_phases,
    make_workdir,
    many_files_case,
    many_models_case,
    md_table,
    one_file_case,
    parse_loads,
)

NAN = float("nan")
NO_PHASES = LogPhases(NAN, NAN)
MIN_CPU_WINDOW_S = 0.05  # shorter spans before the first load get no CPU figures
MB = 1e6
KiB_32 = 32 * 1024
LAUNCHER_MODULE = "cacheagent.triton.launcher"


def run_command() -> list[str]:
    """``cacheagent run`` as users start it: the console script beside this Python."""
    script = Path(sys.executable).with_name("cacheagent")
    if script.is_file():
        return [str(script), "run"]
    return [sys.executable, "-m", "cacheagent.cli.main", "run"]


#: Every column of a (case, link, repetition), in report order.
COLUMNS = ("local", "native", "cold", "warm", "s5cmd-cold", "s5cmd-warm")
#: Columns run back to back; each warm reuses the state its cold start left.
BLOCKS: tuple[tuple[str, ...], ...] = (
    ("native",),
    ("cold", "warm"),
    ("s5cmd-cold", "s5cmd-warm"),
    ("local",),
)
HEADINGS = {
    "local": "local",
    "native": "native",
    "cold": "cacheagent cold",
    "warm": "cacheagent warm",
    "s5cmd-cold": "s5cmd cold",
    "s5cmd-warm": "s5cmd warm",
    "bound": "local + bytes/link",
}
# Triton's own walk of an S3 model directory on SeaweedFS, requests per file
# (512 for 43 files, measured): used only to predict a native start's length.
_NATIVE_REQUESTS_PER_FILE = 12.0
# The unshaped proxy should move this much more than the largest total cap, or
# every shape is scaled down (the clients need CPU too).
_HEADROOM = 1.25
_SCALES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)


# --------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    """A link shape: caps per connection and in total, latency per request."""

    name: str
    per_conn_Bps: float
    total_Bps: float
    latency_s: float

    def scaled(self, factor: float) -> Link:
        """Both caps times ``factor`` (the latency stays)."""
        return Link(self.name, self.per_conn_Bps * factor, self.total_Bps * factor, self.latency_s)

    @property
    def fill(self) -> float:
        """Connections needed to fill the total cap."""
        return self.total_Bps / self.per_conn_Bps

    def describe(self) -> str:
        """``5 MB/s per connection, 160 MB/s total, 20 ms per request``."""
        return (
            f"{self.per_conn_Bps / MB:g} MB/s per connection, {self.total_Bps / MB:g} MB/s total, "
            f"{self.latency_s * 1000:g} ms per request"
        )


LINKS: dict[str, Link] = {
    "fill8": Link("fill8", 20 * MB, 160 * MB, 0.020),
    "fill32": Link("fill32", 5 * MB, 160 * MB, 0.020),
    "fill64": Link("fill64", 2.5 * MB, 160 * MB, 0.020),
}


def shape(rig: StorageRig, link: Link | None) -> None:
    """Put ``link``'s throttles on the rig's proxy (None: unshaped loopback)."""
    proxy = rig.proxy
    proxy.per_conn_bytes_per_s = link.per_conn_Bps if link else None
    proxy.total_bytes_per_s = link.total_Bps if link else None
    proxy.latency_s = link.latency_s if link else 0.0


# --------------------------------------------------------------------------- cases


def every_case(profile: str) -> list[Case]:
    """The cases of a profile (``smoke`` has tiny stand-ins for the real four)."""
    if profile == "smoke":
        return [
            one_file_case("s8mb", 8 * MiB, "1 x 8 MiB (smoke)"),
            many_models_case("s4x4mb", 4, 4 * MiB, "4 models x 4 MiB (smoke)"),
            many_files_case("s40files", 40, KiB_32, "40 files x 32 KiB (smoke)"),
        ]
    return [
        one_file_case("256mb", 256 * MiB, "1 x 256 MiB"),
        one_file_case("1gb", 1 * GiB, "1 x 1 GiB"),
        many_models_case("8x32mb", 8, 32 * MiB, "8 models x 32 MiB"),
        many_files_case("300files", 300, KiB_32, "300 files x 32 KiB"),
    ]


def cases_for(profile: str, names: Sequence[str] | None) -> list[Case]:
    """The cases to run: ``names`` if given (from either profile), else the profile's."""
    if names:
        pool = {c.name: c for c in every_case("full") + every_case("smoke")}
        unknown = [n for n in names if n not in pool]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; have {sorted(pool)}")
        return [pool[n] for n in names]
    cases = every_case(profile)
    if profile == "quick":
        return [c for c in cases if c.name in ("256mb", "8x32mb", "300files")]
    return cases


@dataclass
class Staged:
    """One case in the bucket and on local disk."""

    case: Case
    s3_url: str  # s3://127.0.0.1:<proxy>/<bucket>/<case>: what Triton and cacheagent get
    s5cmd_url: str  # s3://<bucket>/<case>: s5cmd's form (its endpoint names the proxy)
    local: Path
    models: list[str]
    bytes: int  # every file of the repository
    files: int


def stage(rig: StorageRig, case: Case, work: Path) -> Staged:
    """Upload ``case`` (configs without an agent section) and write its local copy.

    Uploads go straight to SeaweedFS, so the proxy does not count them.
    """
    local = work / "local" / case.name
    total = 0
    count = 0
    for seed, model in enumerate(case.models, start=1):
        files = model.files(None, seed)
        rig.put_tree(f"{case.name}/{model.name}", files)
        for relpath, data in files.items():
            path = local / model.name / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            total += len(data)
            count += 1
        del files
    return Staged(
        case=case,
        s3_url=rig.url(case.name),
        s5cmd_url=f"s3://{rig.bucket}/{case.name}",
        local=local,
        models=[m.name for m in case.models],
        bytes=total,
        files=count,
    )


def unstage(rig: StorageRig, staged: Staged) -> None:
    """Delete a case's objects and local copy."""
    with contextlib.suppress(Exception):
        rig.delete(staged.case.name)
    force_rmtree(staged.local)


# --------------------------------------------------------------------------- raw link

# A client in its own process (its own GIL), standard library only: THREADS
# connections pull PART-byte ranges of one object off a queue and discard them.
_RAW_CLIENT = r"""
import http.client, json, sys, threading, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size, part, threads = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
offsets = list(range(0, size, part))
lock = threading.Lock()
done = {"bytes": 0, "errors": 0, "peak": 0}
def worker():
    conn = http.client.HTTPConnection(host, port, timeout=120)
    buf = bytearray(1 << 20)
    got = 0
    while True:
        with lock:
            if not offsets:
                break
            off = offsets.pop()
        last = min(size, off + part) - 1
        conn.request("GET", path, headers={"Range": "bytes=%d-%d" % (off, last)})
        resp = conn.getresponse()
        if resp.status != 206:
            resp.read()
            with lock:
                done["errors"] += 1
            continue
        while True:
            n = resp.readinto(buf)
            if not n:
                break
            got += n
    conn.close()
    with lock:
        done["bytes"] += got
pool = [threading.Thread(target=worker) for _ in range(threads)]
start = time.monotonic()
for t in pool:
    t.start()
for t in pool:
    t.join()
done["seconds"] = time.monotonic() - start
print(json.dumps(done))
"""


def measure_link(
    rig: StorageRig, key: str, size: int, threads: int = 64, timeout: float = 300.0
) -> dict[str, float]:
    """Bytes/s ``threads`` concurrent ranged GETs get through the proxy as it is shaped now."""
    part = max(256 * 1024, size // (4 * threads))
    argv = [
        sys.executable,
        "-c",
        _RAW_CLIENT,
        "127.0.0.1",
        str(rig.proxy.port),
        f"/{rig.bucket}/{key}",
        str(size),
        str(part),
        str(threads),
    ]
    rig.proxy.reset()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"Bps": NAN, "seconds": NAN, "errors": -1, "peak": 0}
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        log(f"raw link client failed: {done.stderr[-500:]}")
        return {"Bps": NAN, "seconds": NAN, "errors": -1, "peak": 0}
    secs = float(out["seconds"])
    return {
        "Bps": out["bytes"] / secs if secs > 0 else NAN,
        "seconds": secs,
        "errors": int(out["errors"]),
        "peak": peak_in_flight(rig.proxy.records()),
        "threads": threads,
        "part": part,
    }


def pick_scale(raw_Bps: float, links: Iterable[Link]) -> float:
    """The largest of :data:`_SCALES` that leaves the proxy :data:`_HEADROOM` over every cap."""
    top = max(link.total_Bps for link in links)
    if raw_Bps != raw_Bps:  # NaN: measurement failed; keep the shapes as given
        return 1.0
    for factor in _SCALES:
        if raw_Bps >= _HEADROOM * top * factor:
            return factor
    return _SCALES[-1]


def rig_check(
    rig: StorageRig, links: list[Link], size: int, forced_scale: float | None
) -> tuple[dict[str, Any], list[Link]]:
    """Measure the unshaped proxy and each (scaled) shape with 64 concurrent ranged GETs."""
    key = "rigcheck/blob.bin"
    rig.put(key, np.random.default_rng(7).bytes(size))
    try:
        shape(rig, None)
        raw = max((measure_link(rig, key, size) for _ in range(2)), key=lambda m: m["Bps"])
        log(f"rig: unshaped proxy, 64 ranged GETs: {raw['Bps'] / MB:.0f} MB/s")
        scale = forced_scale if forced_scale else pick_scale(raw["Bps"], links)
        scaled = [link.scaled(scale) for link in links]
        shaped: dict[str, Any] = {}
        for link in scaled:
            shape(rig, link)
            got = measure_link(rig, key, size)
            shaped[link.name] = {**got, "cap_Bps": link.total_Bps}
            log(
                f"rig: {link.name} ({link.describe()}), 64 ranged GETs: "
                f"{got['Bps'] / MB:.0f} MB/s = {got['Bps'] / link.total_Bps:.2f} of the cap"
            )
    finally:
        shape(rig, None)
        with contextlib.suppress(Exception):
            rig.delete(key)
    info = {
        "object": size,
        "raw": raw,
        "scale": scale,
        "scale_forced": bool(forced_scale),
        "shaped": shaped,
    }
    return info, scaled


# --------------------------------------------------------------------------- one start


def peak_in_flight(records: Sequence[ProxyRecord]) -> int:
    """Most requests in flight at once, from the records' start and end times."""
    events: list[tuple[float, int]] = []
    for rec in records:
        events.append((rec.started, 1))
        events.append((rec.started + rec.duration_s, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


@dataclass
class Start:
    """One measured start of one column: seconds to READY and what crossed the link."""

    column: str
    rep: int
    seconds: float = NAN  # pre-step + Triton; the column's figure
    pre_seconds: float = 0.0  # s5cmd sync or `cacheagent stub` (0 otherwise)
    triton_seconds: float = NAN  # Triton (or the launcher) process start to READY
    requests: int = 0
    content_gets: int = 0
    content_bytes: int = 0
    response_bytes: int = 0
    peak_in_flight: int = 0
    peak_gets_in_flight: int = 0
    mean_gets_in_flight: float = NAN  # object GET seconds over first GET .. last byte
    first_get_s: float = NAN  # after the start's beginning
    last_byte_s: float = NAN
    wire_Bps: float = NAN  # content bytes over first GET .. last byte
    # From Triton's log (bench.common.LogPhases), seconds after the start began (the
    # pre-step included): Triton's first line, and its first model load beginning.
    triton_up_s: float = NAN
    loading_s: float = NAN
    loads: list[dict[str, Any]] = field(default_factory=list)
    # CPU seconds from the start's beginning to its first model load, where the
    # columns differ (bench.common.cpu_spent): every core's, the hypervisor's steal,
    # and the rig's own (origin + proxy), over ``cpu_window_s`` seconds (the sample
    # nearest the first load; the samples are about 20 ms apart).
    cpu_window_s: float = NAN
    cpu_busy_s: float = NAN
    cpu_steal_s: float = NAN
    rig_cpu_s: float = NAN
    via: str = ""
    copied: int = 0  # files s5cmd copied
    skipped: bool = False  # native over budget: not run
    estimate: float = NAN  # its predicted seconds beyond a local start, when skipped
    error: str = ""

    @property
    def agent_seconds(self) -> float:
        """Sum of the agent's LOAD seconds from its log lines."""
        return sum(float(load["seconds"]) for load in self.loads)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {**asdict(self), "agent_seconds": self.agent_seconds}


def _ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/v2/health/ready", timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _check(server: TritonServer, models: Sequence[str]) -> str:
    """Every model ready and one inference right, or what was wrong."""
    try:
        not_ready = [name for name in models if not server.model_ready(name)]
        if not_ready:
            return f"models not ready: {not_ready[:5]}"
        out = server.infer(models[0], "INPUT0", list(X))["OUTPUT0"]
    except Exception as exc:  # a benchmark reports, it does not raise
        return f"check failed: {exc}"
    want = np.asarray(X, np.float32) + np.asarray(WEIGHTS, np.float32)
    if not np.allclose(out, want):
        return f"wrong inference result {out} (want {want})"
    return ""


def _log_excerpt(text: str, count: int = 12) -> list[str]:
    """The lines of a Triton log that say what failed (errors, the agent's lines)."""
    lines = text.splitlines()
    wanted = [
        line
        for line in lines
        if line.startswith("E") or "cacheagent" in line or "failed" in line.lower()
    ]
    return (wanted or lines)[-count:]


def native_prediction(total_bytes: int, files: int, link: Link) -> float:
    """Seconds Triton native should take beyond a local start on ``link`` (a rough guess)."""
    walk = _NATIVE_REQUESTS_PER_FILE * files * link.latency_s
    return total_bytes / link.per_conn_Bps + walk


class Bench:
    """Starts Triton in each column against one rig and measures start to READY."""

    def __init__(self, work: Path, rig: StorageRig, via: str, paths: TritonPaths) -> None:
        self.work = work
        self.rig = rig
        self.via = via
        self.paths = paths
        self.agents = work / "repoagents"
        if via == "stub":
            install_triton(self.agents)
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.triton_tmp = work / "triton-tmp"
        self._seq = 0
        # (monotonic time, CPU so far) at a start's beginning and at each readiness poll
        self._cpu_trace: list[tuple[float, CpuSample]] = []

    def cpu_now(self) -> CpuSample:
        """The machine's and the rig's CPU seconds so far."""
        return cpu_sample(self.rig.emulator.pid)

    # ------------------------------------------------------------ environment
    def _env(self, cache: Path | None) -> dict[str, str]:
        return {
            **self.rig.env,
            # Every start compiles model.py afresh (read-only snapshots keep no
            # __pycache__, so no column gets to keep one).
            "PYTHONDONTWRITEBYTECODE": "1",
            "TRITON_AWS_MOUNT_DIRECTORY": str(self.triton_tmp),
            "CACHEAGENT_CACHE_DIR": str(cache or (self.work / "unused-cache")),
        }

    # ------------------------------------------------------------ triton
    def triton(
        self,
        label: str,
        repository: str | Path,
        models: Sequence[str],
        *,
        cache: Path | None = None,
        launcher: bool = False,
        agent_dir: Path | None = None,
        timeout: float = 600.0,
    ) -> tuple[float, str, list[AgentLoad], LogPhases]:
        """One Triton start: (seconds to READY, error, agent LOADs, phases). Always stopped."""
        self._seq += 1
        log_path = self.logs / f"{self._seq:04d}-{label}.log"
        self.triton_tmp.mkdir(exist_ok=True)
        server = TritonServer(
            self.paths,
            repository,
            log_path,
            repoagent_dir=agent_dir,
            model_control_mode="none",
            exit_on_error=False,
            log_verbose=0,
            env=self._env(cache),
        )
        if launcher:
            assert cache is not None
            server.args = [
                *run_command(),
                "--cache-dir",
                str(cache),
                "--",
                *server.args,
            ]
        seconds, error = NAN, ""
        try:
            started = time.monotonic()
            began = time.time()
            server.start()
            next_log_check = started + 0.5
            while True:
                self._cpu_trace.append((time.monotonic(), self.cpu_now()))
                if _ready(server.url):
                    seconds = time.monotonic() - started
                    break
                now = time.monotonic()
                if not server.running():
                    error = f"process exited ({server.proc and server.proc.returncode})"
                    break
                if now >= next_log_check:
                    next_log_check = now + 0.5
                    if any(marker in server.log_text() for marker in FAILURE_LINES):
                        error = "a model failed to load"
                        break
                if now - started > timeout:
                    error = f"not ready after {timeout:.0f} s"
                    break
                time.sleep(0.02)
            if not error:
                error = _check(server, models)
        finally:
            with contextlib.suppress(Exception):
                server.stop(timeout=60)
            with contextlib.suppress(Exception):
                server.cleanup()
            force_rmtree(self.triton_tmp)
        text = server.log_text()
        if error:
            error += f" (log: {log_path})\n" + "\n".join(_log_excerpt(text))
        return seconds, error, parse_loads(text), log_phases(text, began)

    # ------------------------------------------------------------ stub (pre-launcher)
    def write_stub(
        self, staged: Staged, cache: Path, out: Path, timeout: float
    ) -> tuple[float, str]:
        """``cacheagent stub`` of the bucket into ``out``: (seconds, error)."""
        force_rmtree(out)
        argv = [
            sys.executable,
            "-m",
            "cacheagent.cli",
            "stub",
            staged.s3_url,
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--param",
            f"cache_dir={cache}",
        ]
        env = {**os.environ, **self._env(cache)}
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return time.monotonic() - started, f"cacheagent stub: not done after {timeout:.0f} s"
        seconds = time.monotonic() - started
        if done.returncode != 0:
            return seconds, f"cacheagent stub failed ({done.returncode}): {done.stderr[-1500:]}"
        return seconds, ""

    # ------------------------------------------------------------ columns
    def run(
        self, column: str, rep: int, staged: Staged, link: Link, state: Path, budget: float
    ) -> Start:
        """Measure one column once; ``state`` holds the case's cache and s5cmd directories."""
        cache = state / "cache"
        stub = state / "stub"
        synced = state / "s5cmd"
        per_conn_s = staged.bytes / link.per_conn_Bps
        timeout = min(1800.0, 120.0 + 2.0 * per_conn_s)
        start = Start(column, rep)
        self.rig.proxy.reset()
        began = time.monotonic()
        self._cpu_trace = [(began, self.cpu_now())]
        models = staged.models
        if column == "native":
            predicted = native_prediction(staged.bytes, staged.files, link)
            if predicted > budget:
                start.skipped = True
                start.estimate = predicted  # the report adds the local start
                start.error = f"not run: predicted {predicted:.0f} s > --native-budget {budget:g}"
                return start
            start.via = "tritonserver on s3://"
            secs, err, loads, phases = self.triton(column, staged.s3_url, models, timeout=timeout)
        elif column in ("cold", "warm"):
            if column == "cold":
                force_rmtree(cache)
                force_rmtree(stub)
            if self.via == "launcher":
                start.via = "cacheagent run --cache-dir DIR -- tritonserver"
                secs, err, loads, phases = self.triton(
                    column, staged.s3_url, models, cache=cache, launcher=True, timeout=timeout
                )
            else:
                start.via = "cacheagent stub + tritonserver --repoagent-directory"
                pre, err = self.write_stub(staged, cache, stub, timeout)
                start.pre_seconds = pre
                secs, loads, phases = NAN, [], NO_PHASES
                if not err:
                    secs, err, loads, phases = self.triton(
                        column, stub, models, cache=cache, agent_dir=self.agents, timeout=timeout
                    )
        elif column in ("s5cmd-cold", "s5cmd-warm"):
            if column == "s5cmd-cold":
                force_rmtree(synced)
            start.via = "s5cmd sync + tritonserver on the directory"
            secs, loads, phases = NAN, [], NO_PHASES
            try:
                sync = s5cmd_sync(
                    staged.s5cmd_url,
                    synced,
                    self.rig.proxy.url,
                    env={"AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any"},
                    timeout_s=timeout,
                )
                start.pre_seconds = sync.seconds
                start.copied = len(sync.copied)
                err = ""
            except PeerError as exc:
                err = str(exc)[-1500:]
            if not err:
                secs, err, loads, phases = self.triton(column, synced, models, timeout=timeout)
        elif column == "local":
            start.via = "tritonserver on a local copy"
            secs, err, loads, phases = self.triton(column, staged.local, models, timeout=timeout)
        else:
            raise ValueError(f"unknown column {column!r}")
        start.triton_seconds = secs
        start.seconds = start.pre_seconds + secs
        start.triton_up_s = start.pre_seconds + phases.triton_s
        start.loading_s = start.pre_seconds + phases.loading_s
        start.error = err
        start.loads = [asdict(load) for load in loads]
        self._traffic(start, began)
        self._cpu_before_first_load(start, began)
        return start

    def _cpu_before_first_load(self, start: Start, began: float) -> None:
        """CPU spent from ``began`` to the trace's sample nearest the first model load."""
        if start.loading_s != start.loading_s or len(self._cpu_trace) < 2:
            return
        at = began + start.loading_s
        when, sample = min(self._cpu_trace[1:], key=lambda point: abs(point[0] - at))
        if when - began < MIN_CPU_WINDOW_S:
            return  # too short to say anything (a local start loads within ~15 ms)
        spent = cpu_spent(self._cpu_trace[0][1], sample)
        start.cpu_window_s = when - began
        start.cpu_busy_s, start.cpu_steal_s = spent.busy_s, spent.steal_s
        start.rig_cpu_s = spent.rig_s

    def _traffic(self, start: Start, began: float) -> None:
        records = self.rig.proxy.records()
        traffic = Traffic.of(self.rig)
        content = self.rig.content_records("")
        start.requests = traffic.requests
        start.content_gets = traffic.content_gets
        start.content_bytes = traffic.content_bytes
        start.response_bytes = traffic.response_bytes
        start.peak_in_flight = peak_in_flight(records)
        start.peak_gets_in_flight = peak_in_flight(content)
        start.first_get_s = traffic.first_get - began
        start.last_byte_s = traffic.last_byte - began
        start.wire_Bps = traffic.wire_rate
        span = traffic.wire_seconds
        if span > 0:
            start.mean_gets_in_flight = sum(r.duration_s for r in content) / span


# --------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class Plan:
    """What the sweep runs."""

    links: tuple[Link, ...]
    reps: int
    columns: tuple[str, ...]
    native_budget: float
    native_reps: int


def run_case(bench: Bench, staged: Staged, plan: Plan) -> dict[str, Any]:
    """Every column on every link, ``plan.reps`` times, block order rotated per repetition."""
    case = staged.case
    reps = min(plan.reps, case.max_reps or plan.reps)
    blocks = [tuple(c for c in b if c in plan.columns) for b in BLOCKS]
    blocks = [b for b in blocks if b]
    out: dict[str, Any] = {}
    for link in plan.links:
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in COLUMNS if c in plan.columns}
        shape(bench.rig, link)
        try:
            for rep in range(reps):
                state = bench.work / "state" / f"{case.name}-{link.name}-{rep}"
                order = blocks[rep % len(blocks) :] + blocks[: rep % len(blocks)]
                for block in order:
                    for column in block:
                        if column == "native" and rep >= plan.native_reps:
                            continue
                        start = bench.run(column, rep, staged, link, state, plan.native_budget)
                        runs[column].append(start.as_dict())
                        _log_start(case.name, link.name, rep, reps, start)
                force_rmtree(state)
        finally:
            shape(bench.rig, None)
        out[link.name] = {"runs": runs}
    return {
        "label": case.label,
        "bytes": staged.bytes,
        "files": staged.files,
        "models": len(case.models),
        "reps": reps,
        "links": out,
    }


def _log_start(case: str, link: str, rep: int, reps: int, start: Start) -> None:
    if start.skipped:
        log(f"{case} {link} rep {rep + 1}/{reps} {start.column:10}: {start.error}")
        return
    pre = f" (pre {start.pre_seconds:.2f} s)" if start.pre_seconds else ""
    agent = f", agent LOADs {start.agent_seconds:.2f} s" if start.loads else ""
    cores = start.cpu_busy_s / start.cpu_window_s  # NaN where no window was measured
    cpu = f", {cores:.2f} cores busy before the first load" if cores == cores else ""
    log(
        f"{case} {link} rep {rep + 1}/{reps} {start.column:10}: {start.seconds:.2f} s{pre}, "
        f"{start.requests} requests, {fmt_bytes(start.content_bytes)}, "
        f"peak {start.peak_in_flight} in flight{agent}{cpu}"
        + (f" ERROR {start.error}" if start.error else "")
    )


# --------------------------------------------------------------------------- clouds


def run_clouds(work: Path, latency_s: float, reps: int) -> dict[str, Any]:
    """A fresh process's warm hit through ``cacheagent warm`` on S3, GCS and Azure emulators."""
    model_files = one_file_case("clouds", 4 * MiB, "1 x 4 MiB").models[0].files(None, 1)
    emulators: list[Emulator] = []
    rigs: dict[str, StorageRig] = {}
    out: dict[str, Any] = {"latency_s": latency_s, "reps": reps, "runs": {}, "errors": {}}
    try:
        candidates: list[tuple[str, Emulator]] = [
            ("s3", MotoS3()),
            ("gs", FakeGcs()),
            ("as", Azurite()),
        ]
        for cloud, emulator in candidates:
            try:
                emulator.start()
            except Exception as exc:  # report, go on with the others
                out["errors"][cloud] = f"{emulator.name} did not start: {exc}"
                continue
            emulators.append(emulator)
            rig = StorageRig(cast(Any, emulator), record_headers=False, latency_s=latency_s)
            try:
                rig.start()
                rig.put_tree("clouds/mclouds", model_files)
            except Exception as exc:  # report, go on with the others
                out["errors"][cloud] = f"cannot set up {emulator.name}: {exc}"
                with contextlib.suppress(Exception):
                    rig.close()
                continue
            rigs[cloud] = rig
            out["runs"][cloud] = []
        names = list(rigs)
        caches = {c: work / f"clouds-cache-{c}" for c in names}
        for cloud in names:  # fill each cache once (a miss, not reported)
            first = cacheagent_warm(rigs[cloud], rigs[cloud].url("clouds/mclouds"), caches[cloud])
            if first.error:
                out["errors"][cloud] = first.error[-1500:]
        for rep in range(reps):
            for cloud in names[rep % len(names) :] + names[: rep % len(names)]:
                if cloud in out["errors"]:
                    continue
                w = cacheagent_warm(rigs[cloud], rigs[cloud].url("clouds/mclouds"), caches[cloud])
                out["runs"][cloud].append(
                    {
                        "wall_s": w.wall_seconds,
                        "fetch_s": w.fetch_seconds,
                        "bytes_fetched": w.bytes_fetched,
                        "requests": w.traffic.requests,
                        "content_gets": w.traffic.content_gets,
                        "error": w.error[-1500:],
                    }
                )
                log(
                    f"clouds rep {rep + 1}/{reps} {cloud}: hit {w.wall_seconds:.3f} s wall, "
                    f"{w.fetch_seconds:.3f} s own, {w.traffic.requests} requests"
                    + (f" ERROR {w.error[-300:]}" if w.error else "")
                )
        for cache in caches.values():
            force_rmtree(cache)
    finally:
        for rig in rigs.values():
            with contextlib.suppress(Exception):
                rig.close()
        for emulator in emulators:
            with contextlib.suppress(Exception):
                emulator.close()
    return out


# --------------------------------------------------------------------------- statistics


def _ok(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in runs if not r.get("error") and not r.get("skipped")]


def _med(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in _ok(runs) if r.get(key) is not None]
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else NAN


def _secs(run: Mapping[str, Any]) -> float:
    return NAN if run.get("error") or run.get("skipped") else float(run["seconds"])


def bound_series(entry: Mapping[str, Any], total_bytes: int, total_Bps: float) -> list[float]:
    """Per repetition: that repetition's local start plus the bytes at the link's total cap."""
    return [_secs(r) + total_bytes / total_Bps for r in entry["runs"].get("local", [])]


def series(
    entry: Mapping[str, Any], column: str, total_bytes: int, total_Bps: float
) -> list[float]:
    """Per-repetition seconds of a column (``bound``: local + bytes/link)."""
    if column == "bound":
        return bound_series(entry, total_bytes, total_Bps)
    return [_secs(r) for r in entry["runs"].get(column, [])]


def ratio(a: Sequence[float], b: Sequence[float]) -> Spread:
    """Within-repetition ratios a/b as median (min-max)."""
    return Spread.of(x / y for x, y in zip(a, b, strict=False) if y > 0)


#: (name, numerator, denominator, target): the issue's four ratios.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("cold / (local + bytes/link)", "cold", "bound", 1.3),
    ("cold / s5cmd cold", "cold", "s5cmd-cold", 1.0),
    ("warm / local", "warm", "local", 1.1),
    ("warm / s5cmd warm", "warm", "s5cmd-warm", 1.0),
)


# --------------------------------------------------------------------------- report


def _fmt_s(spread: Spread) -> str:
    return spread.fmt(2)


def _verdict(spread: Spread, target: float) -> str:
    if spread.n == 0:
        return "n/a"
    text = spread.fmt(2)
    return f"{text} ok" if spread.mid <= target else f"**{text} missed**"


def _native_predicted(entry: Mapping[str, Any]) -> float:
    """Local median plus the skipped native's prediction (NaN if native ran)."""
    runs = entry["runs"].get("native", [])
    if not runs or not all(r.get("skipped") for r in runs):
        return NAN
    local = Spread.of(_secs(r) for r in entry["runs"].get("local", []))
    return local.mid + float(runs[0]["estimate"])


def _native_cell(entry: Mapping[str, Any]) -> str:
    predicted = _native_predicted(entry)
    if predicted == predicted:
        return f"~{predicted:.0f} *predicted*"
    return _fmt_s(Spread.of(_secs(r) for r in entry["runs"].get("native", [])))


def _links_of(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {link["name"]: link for link in results["meta"]["links"]}


def render(results: Mapping[str, Any]) -> str:
    """The markdown report."""
    meta = results["meta"]
    links = _links_of(results)
    rig = results.get("rig", {})
    lines = [
        f"# cacheagent against its peers ({meta['profile']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Date: {meta['date']}; run time {meta['runtime_s'] / 60:.1f} min",
        f"- Code: {meta['code']}",
        f"- Machine: {meta['machine']}",
        "- Origin: SeaweedFS `weed mini` behind the link-shaping CountingProxy, 127.0.0.1",
        f"- cacheagent columns went through: **{meta['via_text']}**",
        f"- Repetitions: {meta['reps']} (interleaved, block order rotated per repetition; "
        "cells are median (min-max) seconds from process start to READY)",
        f"- Native (not a target) ran in the first {meta.get('native_reps', 1)} repetition(s), "
        f"and not where its predicted length (bytes / per-connection cap + "
        f"{_NATIVE_REQUESTS_PER_FILE:g} requests per file x latency) exceeds "
        f"{meta['native_budget']:g} s (`--native-budget`): such cells show local + that "
        "prediction, marked *predicted*.",
    ]
    if rig:
        raw = rig["raw"]
        lines += [
            f"- Rig check, 64 concurrent ranged GETs of a {fmt_bytes(rig['object'])} object: "
            f"unshaped proxy {raw['Bps'] / MB:.0f} MB/s; "
            + "; ".join(
                f"{name} {got['Bps'] / MB:.0f} MB/s ({got['Bps'] / got['cap_Bps']:.2f} of its cap)"
                for name, got in rig["shaped"].items()
            ),
        ]
        if rig["scale"] != 1.0:
            why = (
                "forced with --scale"
                if rig["scale_forced"]
                else (
                    f"the unshaped proxy moved {raw['Bps'] / MB:.0f} MB/s, less than "
                    f"{_HEADROOM}x the largest total cap"
                )
            )
            lines.append(
                f"- **Every link shape was scaled by {rig['scale']:g}** ({why}); "
                "the shapes below are the scaled ones."
            )
    lines += ["", "Link shapes:", ""]
    lines += [f"- `{name}`: {describe(link)}" for name, link in links.items()]
    cases = results.get("cases", {})
    for name, link in links.items():
        rows = []
        for case in cases.values():
            entry = case["links"].get(name)
            if entry is None:
                continue
            total = case["bytes"]
            cells = [case["label"]]
            for column in COLUMNS:
                if column == "native":
                    cells.append(_native_cell(entry))
                elif column in entry["runs"]:
                    cells.append(_fmt_s(Spread.of(_secs(r) for r in entry["runs"][column])))
                else:
                    cells.append("-")
            cells.append(_fmt_s(Spread.of(bound_series(entry, total, link["total_Bps"]))))
            errors = sum(
                1
                for runs in entry["runs"].values()
                for r in runs
                if r.get("error") and not r.get("skipped")
            )
            if errors:
                cells[0] += f" ({errors} failed)"
            rows.append(cells)
        if not rows:
            continue
        lines += ["", f"## `{name}`: {describe(link)}", ""]
        lines.append(md_table(["case", *(HEADINGS[c] for c in COLUMNS), HEADINGS["bound"]], rows))
    lines += ["", "## Ratios against the targets (within-repetition ratios, median (min-max))", ""]
    ratio_rows = []
    misses: list[tuple[str, str, str, str, str]] = []
    for case_name, case in cases.items():
        for name, link in links.items():
            entry = case["links"].get(name)
            if entry is None:
                continue
            cells = [case["label"], name]
            for target_name, num, den, target in TARGETS:
                a = series(entry, num, case["bytes"], link["total_Bps"])
                b = series(entry, den, case["bytes"], link["total_Bps"])
                spread = ratio(a, b)
                cells.append(_verdict(spread, target))
                if spread.n and spread.mid > target:
                    misses.append((case_name, name, target_name, num, den))
            ratio_rows.append(cells)
    lines.append(
        md_table(
            ["case", "link", *(f"{t[0]} (<= {t[3]:g})" for t in TARGETS)],
            ratio_rows,
        )
    )
    if misses:
        lines += ["", "## Where a target is missed: the breakdown of those starts", ""]
        lines += [
            "Medians over the repetitions. *pre*: `cacheagent stub` or `s5cmd sync` seconds "
            "(included in the start); *first GET* / *last byte*: when the first object GET "
            "began and the last ended, seconds after the start began; *wire MB/s*: object "
            "bytes over that span; *Triton up* / *first load*: Triton's first log line, and its "
            "first `loading: <model>` line (with cacheagent: once the agent's LOAD has "
            "answered), seconds after the start began, by Triton's own timestamps: the span "
            "between them is what Triton waited for before it could load a model, and the "
            "rest of the start (first load to READY) is Triton loading models; "
            "*peak in flight*: most requests open at once at the proxy "
            "(from its records' start and end times); *mean GETs*: object GETs in flight on "
            "average between first GET and last byte; *agent LOADs*: count, sum and longest "
            "of the agent's `cacheagent: model ... in X s` lines; *cores busy*: the "
            "machine's CPU seconds from the start's beginning to its first load (where the "
            "columns differ) over those seconds, out of its "
            f"{meta.get('cpus') or '?'} (/proc/stat: everything on it, the rig included; "
            "*steal*, in cores too, is time the hypervisor took); *rig CPU s*: what the origin "
            "and the link-shaping proxy (the benchmark's own process) used of it.",
            "",
        ]
        rows = []
        seen: set[tuple[str, str, str]] = set()
        for case_name, link_name, target_name, num, den in misses:
            case = cases[case_name]
            entry = case["links"][link_name]
            for column in (num, "local" if den == "bound" else den):
                if (case_name, link_name, column) in seen:
                    continue
                seen.add((case_name, link_name, column))
                head = [case["label"], link_name, f"{HEADINGS[column]} ({target_name})"]
                rows.append([*head, *_breakdown(entry["runs"].get(column, []))])
        lines.append(
            md_table(
                [
                    "case",
                    "link",
                    "start",
                    "seconds",
                    "pre",
                    "Triton up",
                    "first load",
                    "requests",
                    "object GETs",
                    "MiB",
                    "first GET",
                    "last byte",
                    "wire MB/s",
                    "peak in flight",
                    "mean GETs",
                    "agent LOADs",
                    "cores busy",
                    "steal",
                    "rig CPU s",
                ],
                rows,
            )
        )
    clouds = results.get("clouds")
    if clouds:
        lines += _render_clouds(clouds)
    failed = [
        f"- {case['label']}, {link_name}, {column} rep {r['rep'] + 1}: "
        + r["error"].splitlines()[0][:300]
        for case in cases.values()
        for link_name, entry in case["links"].items()
        for column, runs in entry["runs"].items()
        for r in runs
        if r.get("error") and not r.get("skipped")
    ]
    if failed:
        lines += ["", "## Failed starts", "", *failed]
    chart = f"chart: `{meta['png']}`" if meta.get("png") else "no chart (matplotlib missing)"
    lines += ["", f"Raw data: `{meta['json']}`; {chart}.", ""]
    return "\n".join(lines)


def describe(link: Mapping[str, Any]) -> str:
    """A link dict from the results, in words."""
    return Link(**link).describe()


def _breakdown(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    ok = _ok(runs)
    if not ok:
        return ["n/a"] * 16
    loads = [r["loads"] for r in ok]
    n_loads = statistics.median(len(x) for x in loads)
    load_sum = statistics.median(sum(float(x["seconds"]) for x in ls) for ls in loads)
    load_max = statistics.median(
        max((float(x["seconds"]) for x in ls), default=0.0) for ls in loads
    )
    outcomes: dict[str, int] = {}
    for load in loads[0]:
        outcomes[load["outcome"]] = outcomes.get(load["outcome"], 0) + 1
    agent = (
        f"{n_loads:g}, {load_sum:.2f} s, max {load_max:.2f} s "
        f"({', '.join(f'{v} {k}' for k, v in sorted(outcomes.items()))})"
        if n_loads
        else "-"
    )

    def cell(key: str, digits: int, unit: float = 1.0) -> str:
        value = _med(ok, key)
        return f"{value / unit:.{digits}f}" if value == value else "-"

    return [
        cell("seconds", 2),
        cell("pre_seconds", 2),
        cell("triton_up_s", 3),
        cell("loading_s", 3),
        cell("requests", 0),
        cell("content_gets", 0),
        cell("content_bytes", 1, MiB),
        cell("first_get_s", 2),
        cell("last_byte_s", 2),
        cell("wire_Bps", 1, MB),
        cell("peak_in_flight", 0),
        cell("mean_gets_in_flight", 1),
        agent,
        _per_second(ok, "cpu_busy_s"),
        _per_second(ok, "cpu_steal_s"),
        cell("rig_cpu_s", 2),
    ]


def _per_second(runs: Sequence[Mapping[str, Any]], key: str) -> str:
    """Median over ``runs`` of ``key`` (CPU seconds) per second of its window: cores busy."""
    vals = [
        float(r[key]) / float(r["cpu_window_s"])
        for r in runs
        if r.get(key) is not None and float(r.get("cpu_window_s", NAN)) > 0
    ]
    vals = [v for v in vals if v == v]
    return f"{statistics.median(vals):.2f}" if vals else "-"


def _render_clouds(clouds: Mapping[str, Any]) -> list[str]:
    runs = clouds["runs"]
    lines = [
        "",
        "## Warm hit across clouds: `cacheagent warm` in a fresh process",
        "",
        f"One model (3 small files + 4 MiB), cached; {clouds['reps']} hits per cloud, "
        f"interleaved; each emulator behind its own CountingProxy adding "
        f"{clouds['latency_s'] * 1000:g} ms per request. *wall*: process spawn to exit; "
        "*own*: the seconds the command reports for the snapshot.",
        "",
    ]
    names = {"s3": "S3 (moto)", "gs": "GCS (fake-gcs-server)", "as": "Azure (Azurite)"}
    s3_wall = [r["wall_s"] if not r["error"] else NAN for r in runs.get("s3", [])]
    rows = []
    for cloud in ("s3", "gs", "as"):
        if cloud not in runs:
            continue
        rs = runs[cloud]
        wall = [r["wall_s"] if not r["error"] else NAN for r in rs]
        vs = "-" if cloud == "s3" else _verdict(ratio(wall, s3_wall), 1.1)
        rows.append(
            [
                names[cloud],
                _fmt_s(Spread.of(wall)),
                Spread.of(r["fetch_s"] for r in rs if not r["error"]).fmt(3),
                f"{_med(rs, 'requests'):.0f}",
                f"{_med(rs, 'content_gets'):.0f}",
                vs,
            ]
        )
    lines.append(
        md_table(["cloud", "wall s", "own s", "requests", "object GETs", "/ S3 (<= 1.1)"], rows)
    )
    for cloud, err in clouds.get("errors", {}).items():
        lines.append(f"\n- {names.get(cloud, cloud)}: ERROR {err.splitlines()[0][:300]}")
    return lines


def plot(results: Mapping[str, Any], path: Path) -> bool:
    """Bars per case and column, one panel per link; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    links = _links_of(results)
    cases = results.get("cases", {})
    if not cases:
        return False
    fig, axes = plt.subplots(1, len(links), figsize=(6.5 * len(links), 4.8), squeeze=False)
    colors = {
        "local": "#999999",
        "native": "#d62728",
        "cold": "#1f77b4",
        "warm": "#6baed6",
        "s5cmd-cold": "#ff7f0e",
        "s5cmd-warm": "#fdae6b",
    }
    width = 0.8 / len(COLUMNS)
    for ax, (name, link) in zip(axes[0], links.items(), strict=True):
        labels: list[str] = []
        labelled: set[str] = set()

        def label(key: str, labelled: set[str] = labelled) -> str | None:
            if key in labelled:
                return None
            labelled.add(key)
            return key

        for case in cases.values():
            entry = case["links"].get(name)
            if entry is None:
                continue
            labels.append(case["label"])
            x = len(labels) - 1
            for j, column in enumerate(COLUMNS):
                runs = entry["runs"].get(column, [])
                pos = x - 0.4 + (j + 0.5) * width
                predicted = _native_predicted(entry) if column == "native" else NAN
                if predicted == predicted:
                    ax.bar(
                        pos,
                        predicted,
                        width,
                        color="none",
                        edgecolor=colors[column],
                        hatch="//",
                        label=label("native (predicted, not run)"),
                    )
                    continue
                spread = Spread.of(_secs(r) for r in runs)
                if spread.n == 0:
                    continue
                ax.bar(
                    pos,
                    spread.mid,
                    width,
                    color=colors[column],
                    yerr=[[spread.mid - spread.lo], [spread.hi - spread.mid]],
                    capsize=2,
                    label=label(HEADINGS[column]),
                )
            bound = Spread.of(bound_series(entry, case["bytes"], link["total_Bps"])).mid
            ax.hlines(bound, x - 0.42, x + 0.42, colors="k", linestyles="dashed",
                      label=label(HEADINGS["bound"]))  # fmt: skip
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("seconds to READY (median, min-max)")
        ax.set_title(f"{name}: {link['per_conn_Bps'] / MB:g}/{link['total_Bps'] / MB:g} MB/s, "
                     f"{link['latency_s'] * 1000:g} ms")  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle("Triton start to READY from SeaweedFS, cacheagent vs s5cmd sync vs native")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 cases, 1 repetition: < 15 min")
    size.add_argument(
        "--smoke", action="store_true", help="tiny cases, 1 repetition, fill32 only: < 3 min"
    )
    p.add_argument("--cases", nargs="*", default=None, help="case names (default: the profile's)")
    p.add_argument(
        "--links", nargs="*", default=None, choices=sorted(LINKS), help="link shapes (default all)"
    )
    p.add_argument("--columns", nargs="*", default=None, choices=COLUMNS, help="default all")
    p.add_argument(
        "--reps", type=int, default=None, help="repetitions (default 1 smoke/quick, 3 full)"
    )
    p.add_argument(
        "--native-budget",
        type=float,
        default=None,
        help="skip native starts predicted longer than this many seconds (default 30 quick, 60)",
    )
    p.add_argument(
        "--native-reps", type=int, default=1, help="repetitions that run native (default 1)"
    )
    p.add_argument(
        "--scale", type=float, default=None, help="scale every link shape (default: from rig check)"
    )
    p.add_argument(
        "--via",
        choices=("auto", "launcher", "stub"),
        default="auto",
        help="cacheagent columns: the launcher if it exists (auto), or cacheagent stub + Triton",
    )
    p.add_argument("--clouds", action="store_true", help="add the S3/GCS/Azure warm-hit section")
    p.add_argument("--clouds-only", action="store_true", help="only the clouds section")
    p.add_argument("--clouds-reps", type=int, default=None, help="hits per cloud (default 3/5/9)")
    p.add_argument("--workdir", default=None, help="scratch parent directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) for debugging")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--tag", default=None, help="results name tag (default smoke/quick/full)")
    p.add_argument("--render", type=Path, default=None, help="re-render a results JSON and exit")
    return p.parse_args(argv)


def _via(choice: str) -> str:
    has = importlib.util.find_spec(LAUNCHER_MODULE) is not None
    if choice == "auto":
        return "launcher" if has else "stub"
    if choice == "launcher" and not has:
        raise SystemExit(f"--via launcher: no module {LAUNCHER_MODULE} in this checkout")
    return choice


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # Once: a second SIGTERM must not cut short the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write markdown, JSON and PNG; print the markdown."""
    args = parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        png = args.render.with_suffix(".png")
        saved["meta"]["png"] = png.name if _chart(saved, png) else None
        md = render(saved)
        args.render.with_suffix(".md").write_text(md)
        print(md)
        return 0
    # A plain SIGTERM (timeout, kill) would skip every finally: SeaweedFS, Triton and
    # the work directory would outlive the run.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    tag = args.tag or profile
    reps = args.reps or {"smoke": 1, "quick": 1, "full": 3}[profile]
    budget = args.native_budget or (30.0 if profile == "quick" else 60.0)
    link_names = args.links or (["fill32"] if profile == "smoke" else list(LINKS))
    links = [LINKS[n] for n in link_names]
    columns = tuple(args.columns or COLUMNS)
    plan = Plan(tuple(links), reps, columns, budget, args.native_reps)
    cases = [] if args.clouds_only else cases_for(profile, args.cases)
    via = _via(args.via)
    clouds_reps = args.clouds_reps or {"smoke": 3, "quick": 5, "full": 9}[profile]
    work = make_workdir(args.workdir)
    biggest = max((c.size for c in cases), default=0)
    need = 4 * biggest + 2 * GiB  # origin + local copy + cache + s5cmd copy, plus slack
    if free_disk(work) < need:
        force_rmtree(work)
        raise SystemExit(f"need about {need / GiB:.1f} GiB free under {work.parent}")
    started = time.monotonic()
    log(f"peers: profile {profile}, cacheagent via {via}, work dir {work}")
    results: dict[str, Any] = {"cases": {}}
    try:
        if cases:
            results.update(_sweep(work, cases, plan, via, args.scale, profile))
        if args.clouds or args.clouds_only:
            results["clouds"] = run_clouds(work, links[0].latency_s, clouds_reps)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            force_rmtree(work)
    base = args.out / f"peers-{tag}"
    scaled_links = results.pop("links", links)
    results["meta"] = {
        "profile": profile,
        "command": " ".join([".venv/bin/python -m bench.peers", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runtime_s": time.monotonic() - started,
        "code": _code_version(),
        "cpus": os.cpu_count(),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, Triton 2.51 (nvidia-pytriton)",
        "via": via,
        "via_text": (
            "the launcher (`cacheagent run --cache-dir DIR -- tritonserver ...`)"
            if via == "launcher"
            else "`cacheagent stub` + tritonserver with the installed agent (the launcher "
            f"module {LAUNCHER_MODULE} did not exist; this is what it automates), both timed"
        ),
        "reps": reps,
        "native_budget": budget,
        "native_reps": args.native_reps,
        "links": [asdict(link) for link in scaled_links],
        "json": str(base.with_suffix(".json").relative_to(REPO_ROOT))
        if base.is_relative_to(REPO_ROOT)
        else str(base.with_suffix(".json")),
        "png": str(base.with_suffix(".png").name),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if not _chart(results, base.with_suffix(".png")):
        results["meta"]["png"] = None
    base.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    md = render(results)
    base.with_suffix(".md").write_text(md)
    print(md)
    written = "md/.json/.png" if results["meta"]["png"] else "md/.json (no chart)"
    log(f"wrote {base}.{written} in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def _chart(results: Mapping[str, Any], path: Path) -> bool:
    """Draw the chart to ``path``; False, said loudly, when it cannot be drawn."""
    if plot(results, path):
        return True
    log(
        f"matplotlib unavailable or no cases: no chart, and {path.name} is left as it was "
        "(install it: pip install -e '.[bench]', which scripts/setup.sh does)"
    )
    return False


def _sweep(
    work: Path,
    cases: list[Case],
    plan: Plan,
    via: str,
    forced_scale: float | None,
    profile: str,
) -> dict[str, Any]:
    """The rig check and every case on every link, on one SeaweedFS origin."""
    out: dict[str, Any] = {"cases": {}}
    paths = prepare_triton()
    with _seaweed_rig() as rig:
        check_size = 64 * MiB if profile == "smoke" else 256 * MiB
        out["rig"], scaled = rig_check(rig, list(plan.links), check_size, forced_scale)
        out["links"] = scaled
        plan = Plan(tuple(scaled), plan.reps, plan.columns, plan.native_budget, plan.native_reps)
        bench = Bench(work, rig, via, paths)
        for case in cases:
            log(f"case {case.name}: uploading {fmt_bytes(case.size)} in {case.file_count} files")
            t0 = time.monotonic()
            staged = stage(rig, case, work)
            log(f"case {case.name}: staged in {time.monotonic() - t0:.1f} s")
            try:
                out["cases"][case.name] = run_case(bench, staged, plan)
            finally:
                unstage(rig, staged)
    return out


@contextlib.contextmanager
def _seaweed_rig() -> Iterator[StorageRig]:
    """SeaweedFS plus a fresh bucket seen through a CountingProxy; both stopped on exit."""
    weed = SeaweedS3()
    weed.start()
    try:
        rig = StorageRig(cast(Any, weed), record_headers=False)
        rig.start()
        try:
            yield rig
        finally:
            shape(rig, None)
            rig.close()
    finally:
        weed.close()


def _code_version() -> str:
    """The commit measured, and which cacheagent files differ from it."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.rstrip("\n")

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "cacheagent").splitlines()]
    if not dirty:
        return head
    shown = ", ".join(dirty[:6]) + (f" and {len(dirty) - 6} more" if len(dirty) > 6 else "")
    return f"{head} + uncommitted changes to {len(dirty)} cacheagent files ({shown})"


if __name__ == "__main__":
    sys.exit(main())
