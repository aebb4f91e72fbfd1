"""Show what cacheagent does, with no cloud account: a local S3 emulator and a real Triton.

It starts moto (S3, with ranged reads served in proportion to the range, as
real object stores do: see bench/moto_ranged.py) behind a counting proxy, uploads a sample model
repository as Triton users have it (no cacheagent section in any config.pbtxt), then
starts Triton:

1. native: ``tritonserver --model-repository=s3://...``; Triton downloads the models
   from S3 itself;
2. ``s5cmd sync`` of the repository into an empty directory, then ``tritonserver`` on
   that directory (only when the ``s5cmd`` binary is installed: the test extra has it);
3. ``cacheagent run --cache-dir DIR -- tritonserver --model-repository=s3://...``
   with an empty cache: the launcher lists the repository once, writes a local stub
   repository and the agent fetches the models;
4. the same command again, a restart: one listing, and every model served from the cache.

It prints seconds to READY, and the requests and bytes storage served, for each
(counted at the proxy, so the launcher's, the agent's and Triton's own requests all are).

By default the proxy shapes the link like a cloud bucket seen from one VM: 20 MB/s per
connection, 160 MB/s in all, 20 ms per request (a real cloud's ~50 / 400 MB/s scaled
to what two cores running the emulator, the proxy and Triton can move). On bare
loopback (``--link loopback``) the emulator hands Triton's one-object-at-a-time
download a few hundred MB/s, which no cloud does.

Run: ``python -m demo.demo [--size-mb 128] [--models 2] [--link cloud|loopback]``
(README's first command does it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RangedMotoS3, set_link  # noqa: E402
from cacheagent.sizes import format_size  # noqa: E402
from harness.emulators import StorageRig  # noqa: E402
from harness.peers import PeerError, find_s5cmd, s5cmd_sync  # noqa: E402
from harness.triton import (  # noqa: E402
    MODEL_PY,
    TritonServer,
    model_config,
    prepare_triton,
    weights_bytes,
)


def sample_model(name: str, size: int) -> dict[str, bytes]:
    """A python-backend model: OUTPUT0 = INPUT0 + weights, plus ``size`` bytes of parameters."""
    weights = weights_bytes([1.0, 2.0, 3.0, 4.0])
    params = np.random.default_rng(sum(name.encode())).integers(
        0, 2**63, size // 8 + 1, dtype=np.int64
    )
    return {
        "config.pbtxt": model_config(name, None).encode(),
        "1/model.py": MODEL_PY.encode(),
        "1/weights.bin": weights,
        "1/parameters.bin": params.tobytes()[:size],
    }


def timed_start(server: TritonServer, models: list[str]) -> float:
    """Start Triton and return seconds until every model is ready."""
    started = time.monotonic()
    server.start()
    server.wait_ready(timeout=600)
    for name in models:
        if not server.model_ready(name):
            raise SystemExit(f"model {name} is not ready; Triton's log:\n{server.log_tail()}")
    return time.monotonic() - started


def check_inference(server: TritonServer, name: str) -> None:
    """Fail loudly unless the model answers INPUT0 + [1, 2, 3, 4]."""
    out = server.infer(name, "INPUT0", np.array([10, 20, 30, 40], dtype=np.float32))
    got = out["OUTPUT0"].tolist()
    if got != [11.0, 22.0, 33.0, 44.0]:
        raise SystemExit(f"model {name} answered {got}, expected [11, 22, 33, 44]")


#: (per-connection bytes/s, total bytes/s, seconds per request) of the cloud-like link.
CLOUD_LINK = (20e6, 160e6, 0.020)

NATIVE = "Triton native (S3)"
S5CMD = "s5cmd sync + local start"
COLD = "cacheagent run, cold cache"
CACHED = "cacheagent run, cached (restart)"


@dataclass(frozen=True)
class Row:
    """One start: seconds to READY and what storage served for it (counted at the proxy)."""

    label: str
    seconds: float
    requests: int
    response_bytes: int  # every response: listings, HEADs and model files
    model_bytes: int  # the bytes of model files (object GETs) among them


def cacheagent_run(cache_dir: Path) -> list[str]:
    """``cacheagent run --cache-dir DIR --``, the launcher with its default settings."""
    script = Path(sys.executable).parent / "cacheagent"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "cacheagent.cli"]
    return [*command, "run", "--cache-dir", str(cache_dir), "--"]


def run(size: int, model_count: int, workdir: Path, cloud_link: bool = True) -> list[Row]:
    """Run the starts; return one row each."""
    paths = prepare_triton()
    cache_dir = workdir / "cache"
    names = [f"model{i}" for i in range(model_count)]
    try:
        s5cmd: Path | None = find_s5cmd()
    except PeerError as exc:
        s5cmd = None
        print(f"no s5cmd row: {exc}", flush=True)
    rows: list[Row] = []
    # Stock moto copies the whole object to answer each ranged GET; real object
    # stores do not. bench/moto_ranged.py fixes that one thing (and only for
    # ranged reads), so the demo measures cacheagent rather than the emulator.
    with RangedMotoS3() as s3, StorageRig(s3) as rig:
        print(
            f"S3 emulator on {rig.endpoint}; uploading {model_count} models "
            f"of {format_size(size)}...",
            flush=True,
        )
        for name in names:
            rig.put_tree(f"models/{name}", sample_model(name, size))
        if cloud_link:
            per_conn, total, latency = CLOUD_LINK
            set_link(rig, per_conn, total, latency)
            print(
                f"link shaped like a cloud bucket: {per_conn / 1e6:.0f} MB/s per connection, "
                f"{total / 1e6:.0f} MB/s in all, {latency * 1000:.0f} ms per request "
                "(--link loopback for none)",
                flush=True,
            )
        repository = rig.url("models")
        # (label, repository Triton gets, wrapper command, local copy to sync first)
        starts: list[tuple[str, str, list[str], Path | None]] = [(NATIVE, repository, [], None)]
        if s5cmd is not None:
            starts.append((S5CMD, str(workdir / "synced"), [], workdir / "synced"))
        starts += [
            (COLD, repository, cacheagent_run(cache_dir), None),
            (CACHED, repository, cacheagent_run(cache_dir), None),
        ]
        for label, model_repository, wrapper, synced in starts:
            rig.proxy.reset()
            server = TritonServer(
                paths,
                model_repository,
                workdir / f"triton-{len(rows)}.log",
                model_control_mode="none",
                env=rig.env,
                wrapper=wrapper,
            )
            try:
                seconds = 0.0
                if synced is not None:
                    assert s5cmd is not None
                    # s5cmd never sends a loopback endpoint through an HTTP proxy:
                    # its endpoint is the counting proxy itself.
                    seconds = s5cmd_sync(
                        f"s3://{rig.bucket}/models", synced, rig.endpoint, env=rig.env, s5cmd=s5cmd
                    ).seconds
                seconds += timed_start(server, names)
                for name in names:
                    check_inference(server, name)
            finally:
                server.stop()
                server.cleanup()
            records = rig.proxy.records()
            rows.append(
                Row(
                    label,
                    seconds,
                    len(records),
                    sum(r.response_bytes for r in records),
                    rig.object_bytes("models/"),
                )
            )
            print(f"  {label:32} READY in {seconds:6.2f} s", flush=True)
    return rows


def print_table(rows: list[Row]) -> None:
    """The result table, with the speed-up against native, and what the cached start moved."""
    native = rows[0]
    print()
    print(
        f"| {'start':32} | {'seconds to READY':>16} | {'requests':>8} | {'bytes from S3':>13} |"
        f" {'vs native':>9} |"
    )
    print(f"|{'-' * 34}|{'-' * 18}:|{'-' * 9}:|{'-' * 14}:|{'-' * 10}:|")
    for row in rows:
        ratio = f"{native.seconds / row.seconds:.1f}x" if row.seconds else "-"
        print(
            f"| {row.label:32} | {row.seconds:16.2f} | {row.requests:8d} |"
            f" {format_size(row.response_bytes):>13} | {ratio:>9} |"
        )
    cached = next(row for row in rows if row.label == CACHED)
    print()
    print(
        f"The cached start through `cacheagent run` made {cached.requests} request(s) "
        f"({format_size(cached.response_bytes)}, the launcher's listing of the repository) "
        f"and moved {format_size(cached.model_bytes)} of model files, against "
        f"{format_size(native.model_bytes)} for Triton native."
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=128, help="parameter MiB per model")
    parser.add_argument("--models", type=int, default=2, help="models in the repository")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--link",
        choices=("cloud", "loopback"),
        default="cloud",
        help="shape the emulator's link like a cloud bucket (default) or leave it bare",
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cacheagent-demo-"))
    try:
        rows = run(args.size_mb * 1024 * 1024, args.models, workdir, args.link == "cloud")
        print_table(rows)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
