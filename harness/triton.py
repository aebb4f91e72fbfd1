"""Run the real tritonserver from the nvidia-pytriton wheel in tests.

Helpers only (no tests here): prepare the wheel's Triton, start and drive a
server over HTTP (urllib, no tritonclient), find the cacheagent worker among its
children, and write a small python-backend model whose output depends on a
weights file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cacheagent.sizes import format_size

from .localhost import free_port, stat_fields

WORKER_MARKER = "cacheagent.triton.worker"
_SHM_REGION = re.compile(r"triton_python_backend_shm_region_[0-9A-Za-z-]+")


@dataclass(frozen=True)
class TritonPaths:
    """Where the wheel's Triton lives."""

    root: Path  # .../site-packages/pytriton/tritonserver
    binary: Path  # root/bin/tritonserver
    backend_dir: Path  # root/backends, for --backend-directory


class TritonUnavailable(RuntimeError):
    """The nvidia-pytriton wheel (or its stub for this Python) is not installed."""


def prepare_triton() -> TritonPaths:
    """Locate the wheel's Triton and put the python-backend stub where it must be.

    The wheel keeps one ``triton_python_backend_stub`` per Python version under
    ``python_backend_stubs/<X.Y>/``; the backend looks for it beside
    ``libtriton_python.so``, and the stub finds its libraries relative to where it
    lies (a copy elsewhere fails). The copy is atomic so concurrent sessions agree.
    """
    try:
        import pytriton  # type: ignore[import-untyped]
    except ImportError as exc:
        raise TritonUnavailable("nvidia-pytriton is not installed") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    backend_dir = root / "backends"
    python_dir = backend_dir / "python"
    if not binary.is_file() or not (python_dir / "libtriton_python.so").is_file():
        raise TritonUnavailable(f"no tritonserver or python backend under {root}")
    stub = python_dir / "triton_python_backend_stub"
    if not stub.is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not source.is_file():
            raise TritonUnavailable(f"the wheel has no python backend stub for Python {version}")
        fd, tmp = tempfile.mkstemp(prefix=".stub.", dir=python_dir)
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, stub)
    return TritonPaths(root=root, binary=binary, backend_dir=backend_dir)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    return _proc_stat_path(f"/proc/{pid}/stat")


def _proc_stat_path(path: str) -> tuple[str, int] | None:
    fields = stat_fields(path)
    if not fields or len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """True until every thread of ``pid`` has exited (an unreaped zombie counts as exited).

    Threads matter: after SIGKILL the main thread turns zombie first, while the other
    threads, which still hold the process's file descriptors, take a moment longer.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        stat = _proc_stat_path(f"/proc/{pid}/task/{tid}/stat")
        if stat is not None and stat[0] not in ("Z", "X"):
            return True
    return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` exited (zombies count as exited); True if it did in time."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def cmdline(pid: int) -> str:
    """The command line of ``pid`` with spaces between arguments ('' if gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def child_pids(parent: int) -> list[int]:
    """Live direct children of ``parent``."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == parent and stat[0] not in ("Z", "X"):
                children.append(int(entry))
    return sorted(children)


def find_worker_pids(parent: int) -> list[int]:
    """Live cacheagent workers started by the Triton process ``parent``."""
    return [pid for pid in child_pids(parent) if WORKER_MARKER in cmdline(pid)]


class TritonHTTPError(RuntimeError):
    """Triton answered an HTTP request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


_DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DATATYPES.items()}


class TritonServer:
    """One tritonserver process, its log file and an HTTP/JSON client for it.

    Nothing listens on gRPC or metrics; HTTP binds 127.0.0.1 on a free port. The
    server runs in its own session (process group), so :meth:`stop` and
    :meth:`kill` can also clean up what it leaves behind (worker, stubs).
    """

    def __init__(
        self,
        paths: TritonPaths,
        model_repository: Path | str,
        log_path: Path,
        *,
        repoagent_dir: Path | None = None,
        model_control_mode: str = "explicit",
        exit_on_error: bool = False,
        log_verbose: int = 1,
        load_models: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        self.paths = paths
        self.cwd = cwd
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            str(paths.binary),
            f"--model-repository={model_repository}",
            f"--backend-directory={paths.backend_dir}",
            f"--model-control-mode={model_control_mode}",
            f"--exit-on-error={str(exit_on_error).lower()}",
            f"--log-verbose={log_verbose}",
            "--http-address=127.0.0.1",
            f"--http-port={self.port}",
            "--allow-grpc=false",
            "--allow-metrics=false",
            *(f"--load-model={name}" for name in load_models),
            *extra_args,
        ]
        if repoagent_dir is not None:
            args.append(f"--repoagent-directory={repoagent_dir}")
        # A wrapper command (``cacheagent run ... --``) runs tritonserver as its child:
        # it shares the session, so stop() and the cleanup reach both.
        self.args = [*wrapper, *args]
        environ = dict(os.environ)
        # The venv first: python-backend models import numpy from the venv.
        venv_bin = str(Path(sys.executable).parent)
        environ["PATH"] = venv_bin + os.pathsep + environ.get("PATH", "")
        environ.update(env or {})
        self.env = environ
        self.proc: subprocess.Popen[bytes] | None = None
        # Children seen (pid -> command line), killed at the end if still the same process.
        self.seen_pids: dict[int, str] = {}

    # ---- process control ----

    def start(self) -> TritonServer:
        """Start the process (stdout and stderr go to the log file)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=self.cwd,
            )
        return self

    @property
    def pid(self) -> int:
        """Triton's process id."""
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def running(self) -> bool:
        """True while the tritonserver process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def _remember(self, pids: Iterable[int]) -> None:
        for pid in pids:
            line = cmdline(pid)
            if line:
                self.seen_pids[pid] = line

    def _remember_children(self) -> None:
        if self.running():
            self._remember(child_pids(self.pid))

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful shutdown (SIGTERM), then SIGKILL after ``timeout``; reap everything."""
        if self.proc is None:
            return None
        self._remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_leftovers()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL tritonserver only (its children must notice on their own) and reap it."""
        if self.proc is None:
            return
        self._remember_children()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        """Stop the server if needed and kill anything it left behind."""
        if self.proc is None:
            return
        self.stop()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: stubs, worker
        for pid, line in self.seen_pids.items():
            if pid_alive(pid) and cmdline(pid) == line:  # not a recycled pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is not None:
            # A killed Triton leaves its python-backend shared memory behind; the
            # regions it created are named in its (verbose) log and stub command lines.
            text = self.log_text() + "\n".join(self.seen_pids.values())
            for name in set(_SHM_REGION.findall(text)):
                with contextlib.suppress(OSError):
                    os.unlink(f"/dev/shm/{name}")

    # ---- HTTP ----

    def _request(
        self, method: str, path: str, body: Any = None, timeout: float = 120.0
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @staticmethod
    def _error_text(payload: bytes) -> str:
        try:
            return str(json.loads(payload).get("error", payload.decode(errors="replace")))
        except (ValueError, AttributeError):
            return payload.decode(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/v2/health/ready`` until 200; raise with the log tail if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(
                    f"tritonserver exited with {self.proc.returncode if self.proc else None} "
                    f"before it was ready:\n{self.log_tail()}"
                )
            try:
                status, _ = self._request("GET", "/v2/health/ready", timeout=2.0)
                if status == 200:
                    self._remember_children()
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"tritonserver not ready after {timeout} s:\n{self.log_tail()}")

    def model_ready(self, name: str, version: str = "") -> bool:
        """True if ``name`` (optionally one version) is ready to serve."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        status, _ = self._request("GET", path, timeout=10.0)
        return status == 200

    def load(self, name: str, timeout: float = 120.0) -> None:
        """Explicit-mode load; raises :class:`TritonHTTPError` with Triton's message."""
        status, payload = self._request(
            "POST", f"/v2/repository/models/{name}/load", body={}, timeout=timeout
        )
        self._remember_children()
        if status != 200:
            raise TritonHTTPError(status, self._error_text(payload))

    def unload(self, name: str, timeout: float = 120.0) -> None:
        """Explicit-mode unload (asynchronous in Triton: poll :meth:`model_ready` after)."""
        self._remember_children()
        status, payload = self._request(
            "POST", f"/v2/repository/models/{name}/unload", body={}, timeout=timeout
        )
        if status != 200:
            raise TritonHTTPError(status, self._error_text(payload))

    def infer(
        self,
        model: str,
        input_name: str,
        array: np.ndarray | Iterable[float],
        *,
        version: str = "",
    ) -> dict[str, np.ndarray]:
        """One inference over the HTTP/JSON v2 protocol; returns the outputs by name."""
        # A plain sequence is FP32, the model's type; an ndarray keeps its dtype.
        arr = array if isinstance(array, np.ndarray) else np.asarray(list(array), np.float32)
        body = {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(arr.shape),
                    "datatype": _DATATYPES[arr.dtype],
                    "data": arr.flatten().tolist(),
                }
            ]
        }
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, payload = self._request("POST", path, body=body, timeout=60.0)
        if status != 200:
            raise TritonHTTPError(status, self._error_text(payload))
        outputs = json.loads(payload)["outputs"]
        return {
            out["name"]: np.asarray(out["data"], dtype=_DTYPES[out["datatype"]]).reshape(
                out["shape"]
            )
            for out in outputs
        }

    # ---- introspection ----

    def worker_pids(self) -> list[int]:
        """Live cacheagent workers that are children of this Triton."""
        if not self.running():
            return []
        pids = find_worker_pids(self.pid)
        self._remember(pids)
        return pids

    def wait_worker(self, timeout: float = 10.0) -> int:
        """Wait until exactly one worker runs; return its pid."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == 1:
                return pids[0]
            if time.monotonic() >= deadline:
                raise AssertionError(f"expected one cacheagent worker, found {pids}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """Everything Triton wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until ``needle`` appears in the log; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if needle in text:
                return text
            if time.monotonic() >= deadline:
                raise AssertionError(f"{needle!r} not in Triton's log:\n{self.log_tail()}")
            time.sleep(0.05)


# ---- a sample python-backend model ----

MODEL_PY = '''\
"""Adds the 4 float32 weights stored in weights.bin (beside this file) to INPUT0."""

import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(version_dir, "weights.bin")
        self.weights = np.fromfile(path, dtype="<f4", count=4)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x + self.weights).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
'''


def _pbtxt_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t") + '"'


def model_config(name: str, agent_params: Mapping[str, str] | None) -> str:
    """``config.pbtxt`` of the add model; names cacheagent if ``agent_params`` is given."""
    text = (
        f"name: {_pbtxt_string(name)}\n"
        'backend: "python"\n'
        "max_batch_size: 0\n"
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        "version_policy: { all { } }\n"
    )
    if agent_params is not None:
        params = ", ".join(
            f"{{ key: {_pbtxt_string(k)}, value: {_pbtxt_string(str(v))} }}"
            for k, v in agent_params.items()
        )
        text += (
            "model_repository_agents {\n"
            f'  agents [ {{ name: "cacheagent", parameters [ {params} ] }} ]\n'
            "}\n"
        )
    return text


def weights_bytes(weights: Sequence[float] | bytes) -> bytes:
    """The weights.bin content: raw bytes as given, or 4 little-endian float32 values."""
    if isinstance(weights, bytes | bytearray):
        return bytes(weights)
    if len(weights) != 4:
        raise ValueError(f"the add model takes 4 weights, got {len(weights)}")
    return struct.pack("<4f", *weights)


def write_add_model(
    directory: Path,
    name: str,
    weights: Sequence[float] | bytes,
    agent_params: Mapping[str, str] | None = None,
    versions: Sequence[int] = (1,),
) -> Path:
    """Write the python-backend model ``directory/name``: OUTPUT0 = INPUT0 + weights.

    Every version directory gets ``model.py`` and ``weights.bin`` (the first 16
    bytes are the 4 float32 weights, so a larger ``bytes`` payload still works).
    The config serves all versions (``version_policy: all``). Returns the model dir.
    """
    model_dir = Path(directory) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(model_config(name, agent_params))
    data = weights_bytes(weights)
    for version in versions:
        version_dir = model_dir / str(version)
        version_dir.mkdir(exist_ok=True)
        (version_dir / "model.py").write_text(MODEL_PY)
        (version_dir / "weights.bin").write_bytes(data)
    return model_dir


# ---- the add model in a cloud bucket ----


class _BucketWriter(Protocol):
    """What :func:`put_add_model` needs of a storage rig (``StorageRig.put_tree``)."""

    def put_tree(self, relpath_prefix: str, files: Mapping[str, bytes]) -> None: ...


#: The policy line :func:`model_config` writes; :func:`add_model_files` replaces it.
_ALL_VERSIONS = "version_policy: { all { } }\n"


def add_model_files(
    name: str,
    weights: Sequence[float] | bytes,
    agent_params: Mapping[str, str] | None = None,
    versions: Sequence[int] = (1,),
    version_policy: str | None = "all { }",
) -> dict[str, bytes]:
    """The files of the add model as ``{relative path: bytes}`` (see :func:`write_add_model`).

    ``version_policy`` is the body of the config's ``version_policy`` message, e.g.
    ``"latest { num_versions: 1 }"``; None leaves it out (Triton's default: latest 1).
    """
    config = model_config(name, agent_params)
    assert _ALL_VERSIONS in config, "model_config() changed its version_policy line"
    policy = "" if version_policy is None else f"version_policy: {{ {version_policy} }}\n"
    config = config.replace(_ALL_VERSIONS, policy)
    files = {"config.pbtxt": config.encode()}
    data = weights_bytes(weights)
    for version in versions:
        files[f"{version}/model.py"] = MODEL_PY.encode()
        files[f"{version}/weights.bin"] = data
    return files


def put_add_model(
    rig: _BucketWriter,
    repository: str,
    name: str,
    weights: Sequence[float] | bytes,
    agent_params: Mapping[str, str] | None = None,
    versions: Sequence[int] = (1,),
    version_policy: str | None = "all { }",
) -> dict[str, bytes]:
    """Upload the add model to ``<repository>/<name>/`` in a rig's bucket; return its files.

    The upload goes straight to the emulator, so the rig's proxy does not count it.
    """
    files = add_model_files(name, weights, agent_params, versions, version_policy)
    rig.put_tree(f"{repository.strip('/')}/{name}", files)
    return files


# ---- who downloaded what, through a rig's counting proxy ----

#: User-Agent prefixes of Triton's own storage clients (C++ SDKs linked into tritonserver).
TRITON_CLIENTS = ("aws-sdk-cpp/", "gcloud-cpp/", "azsdk-cpp-")
#: User-Agent prefixes of the clients the cacheagent worker uses (fsspec back ends).
AGENT_CLIENTS = (
    "aiobotocore/",
    "botocore/",
    "python-gcsfs/",
    "adlfs/",
    "azsdk-python-",
    "cacheagent/",  # the hit path's own S3 listing (cacheagent/s3list.py)
)


class _Record(Protocol):
    """The fields of a ``harness.proxy.ProxyRecord`` used here."""

    @property
    def request_headers(self) -> dict[str, str]: ...

    @property
    def response_bytes(self) -> int: ...


class _CountingRig(Protocol):
    """What the download tallies need of a ``harness.emulators.StorageRig``."""

    cloud: Any
    bucket: str

    def content_records(self, prefix: str = "", *, ok_only: bool = True) -> Sequence[Any]: ...


def client_of(record: _Record) -> str:
    """``"triton"`` or ``"agent"``: which process sent a proxied request (by User-Agent).

    Raises AssertionError for any other client, so a test never counts a request
    it cannot attribute.
    """
    agent = record.request_headers.get("user-agent", "")
    if agent.startswith(TRITON_CLIENTS):
        return "triton"
    if agent.startswith(AGENT_CLIENTS):
        return "agent"
    raise AssertionError(f"a request from an unknown client went through the proxy: {agent!r}")


def downloads(rig: _CountingRig, client: str, prefix: str = "") -> dict[str, tuple[int, int]]:
    """Content downloads by ``client`` (``"triton"`` or ``"agent"``) under key ``prefix``.

    Returns ``{object key: (number of GETs, body bytes)}``; keys are relative to
    the bucket. Listings, HEADs and metadata reads are not content downloads.
    """
    from harness.emulators import content_key

    tally: dict[str, tuple[int, int]] = {}
    for record in rig.content_records(prefix):
        if client_of(record) != client:
            continue
        key = content_key(rig.cloud, record, rig.bucket)
        assert key is not None
        count, size = tally.get(key, (0, 0))
        tally[key] = (count + 1, size + record.response_bytes)
    return tally


def agent_log_lines(log: str, model: str) -> list[str]:
    """The per-LOAD lines cacheagent wrote to Triton's log for ``model``, in order."""
    needle = f"cacheagent: model '{model}' "
    return [line for line in log.splitlines() if needle in line]


def live_leases(cache_dir: Path) -> list[Any]:
    """Leases in the cache at ``cache_dir`` whose holding process still runs."""
    # Imported here so the helpers above keep working while cache.py is being changed.
    from cacheagent.cache import Cache

    with Cache(cache_dir) as cache:
        return [lease for lease in cache.leases() if lease.is_live()]


def wait_live_leases(cache_dir: Path, count: int, timeout: float = 15.0) -> list[Any]:
    """Wait until exactly ``count`` live leases are held (a lease goes at UNLOAD_COMPLETE)."""
    deadline = time.monotonic() + timeout
    while True:
        leases = live_leases(cache_dir)
        if len(leases) == count:
            return leases
        if time.monotonic() >= deadline:
            raise AssertionError(f"expected {count} live lease(s) after {timeout} s: {leases}")
        time.sleep(0.1)


def wait_model_gone(server: TritonServer, name: str, timeout: float = 15.0) -> None:
    """Wait until ``name`` is no longer ready (explicit unloads finish asynchronously)."""
    deadline = time.monotonic() + timeout
    while server.model_ready(name):
        if time.monotonic() >= deadline:
            raise AssertionError(f"model {name!r} still ready {timeout} s after its unload")
        time.sleep(0.05)


def padded_weights(weights: Sequence[float], size: int) -> bytes:
    """A ``weights.bin`` of ``size`` bytes: the 4 float32 weights, then zeros.

    The add model reads only the first 16 bytes; the rest gives downloads a
    size worth counting.
    """
    data = weights_bytes(weights)
    return data + bytes(max(0, size - len(data)))


def expected_output(x: Sequence[float], weights: Sequence[float]) -> np.ndarray:
    """What the add model answers for input ``x`` with ``weights``."""
    return np.asarray(x, np.float32) + np.asarray(weights, np.float32)


@dataclass(frozen=True)
class StartMeasure:
    """What one Triton start cost at the storage emulator, split by client."""

    requests: int  # every request that crossed the proxy
    response_bytes: int  # their response bodies
    triton: dict[str, tuple[int, int]]  # content downloads by Triton: key -> (GETs, bytes)
    agent: dict[str, tuple[int, int]]  # content downloads by the agent
    log_line: str  # cacheagent's line for the model


def check_first_start_then_restart(
    start: Any,
    rig: Any,
    repoagent_dir: Path,
    cache_dir: Path,
    weights_size: int = 1 << 20,
    env: Mapping[str, str] | None = None,
) -> tuple[StartMeasure, StartMeasure]:
    """Shared scenario for every cloud: a cold start fetches through the agent, a restart hits.

    ``start`` is the ``triton_factory`` fixture, ``rig`` a ``StorageRig``. One model
    ``add`` is uploaded to ``models/`` and Triton runs with ``--model-repository``
    pointing at the rig (through its proxy), so Triton's own requests are counted
    too. Triton GETs ``config.pbtxt`` itself before calling the agent (it parses
    the config to find the agent); every other model file must come from the agent,
    exactly once, and a restart over the same cache must download no model file.
    ``env`` is added to Triton's environment after the rig's.
    """
    weights = [1.0, 2.0, 3.0, 4.0]
    x = [10.0, 20.0, 30.0, 40.0]
    files = put_add_model(
        rig, "models", "add", padded_weights(weights, weights_size), {"cache_dir": str(cache_dir)}
    )
    keys = {f"models/add/{name}": len(data) for name, data in files.items()}
    config_key = "models/add/config.pbtxt"
    measures = []
    for phase in ("first start", "restart"):
        rig.proxy.reset()
        server = start(
            rig.url("models"),
            repoagent_dir=repoagent_dir,
            model_control_mode="none",
            env={**rig.env, **(env or {})},
        )
        assert server.model_ready("add"), f"{phase}: model add is not ready"
        out = server.infer("add", "INPUT0", x)["OUTPUT0"]
        np.testing.assert_allclose(out, expected_output(x, weights), err_msg=phase)
        records = rig.proxy.records()
        triton = downloads(rig, "triton")
        agent = downloads(rig, "agent")
        lines = agent_log_lines(server.log_text(), "add")
        assert len(lines) == 1, f"{phase}: expected one cacheagent line for add: {lines}"
        # Triton reads config.pbtxt, once, whole, and no other file of the model.
        assert triton == {config_key: (1, keys[config_key])}, f"{phase}: Triton read {triton}"
        if phase == "first start":
            assert agent == {key: (1, size) for key, size in keys.items()}, (
                f"{phase}: the agent should read each model file once, whole: {agent}"
            )
            assert rig.object_gets("models/add/1/weights.bin") == 1
            assert f"MISS: {format_size(sum(keys.values()))} fetched (3 of 3 files" in lines[0]
            leases = live_leases(cache_dir)
            assert [(lease.model, lease.pid) for lease in leases] == [("add", server.pid)]
        else:
            assert agent == {}, f"{phase}: the agent downloaded {agent} on a hit"
            assert rig.object_gets("models/add/1/") == 0
            assert "HIT: 0 B fetched (0 of 3 files" in lines[0], lines[0]
        assert f"-> {cache_dir}/snapshots/" in lines[0], lines[0]
        measures.append(
            StartMeasure(
                requests=len(records),
                response_bytes=sum(r.response_bytes for r in records),
                triton=triton,
                agent=agent,
                log_line=lines[0],
            )
        )
        assert server.stop() == 0, f"{phase}: tritonserver did not exit cleanly"
        # UNLOAD_COMPLETE fires at shutdown: it removed the lease (not merely left one
        # whose process is dead), and the snapshot stays for the next start.
        from cacheagent.cache import Cache

        with Cache(cache_dir) as cache:
            assert cache.leases() == [], f"{phase}: leases left after shutdown"
            assert len(cache.snapshots()) == 1, "the snapshot must survive a shutdown"
    return measures[0], measures[1]


def put_weighted_model(
    rig: _BucketWriter, name: str, weights: Sequence[float], size: int = 0
) -> int:
    """Upload the add model ``models/<name>`` (weights.bin padded to ``size``); return its bytes."""
    data = struct.pack("<4f", *weights)
    data += os.urandom(max(size - len(data), 0))
    files = {
        "config.pbtxt": model_config(name, None).encode(),
        "1/model.py": MODEL_PY.encode(),
        "1/weights.bin": data,
    }
    rig.put_tree(f"models/{name}", files)
    return sum(map(len, files.values()))
