"""Show what cacheagent does, with no cloud account: a local S3 emulator and a real Triton.

It starts moto (S3, with ranged reads served in proportion to the range, as
real object stores do: see bench/moto_ranged.py) behind a counting proxy, uploads a sample model
repository twice (once as Triton users have it, once with the cacheagent
section in config.pbtxt), then starts Triton four times:

1. native: Triton downloads the models from S3 itself;
2. cacheagent, cold: the agent fetches them into an empty cache;
3. cacheagent, cached: a restart, served from the cache;
4. the same from a stub repository (``cacheagent stub``): Triton reads local configs
   and never walks the bucket itself; only the agent lists it.

It prints seconds to READY, and the requests and bytes storage served, for each.

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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RangedMotoS3, set_link  # noqa: E402
from cacheagent.sizes import format_size  # noqa: E402
from cacheagent.triton.install import install_triton  # noqa: E402
from cacheagent.triton.stub import write_stub  # noqa: E402
from harness.emulators import StorageRig  # noqa: E402
from harness.triton import (  # noqa: E402
    MODEL_PY,
    TritonServer,
    model_config,
    prepare_triton,
    weights_bytes,
)


def sample_model(name: str, size: int, agent_params: dict[str, str] | None) -> dict[str, bytes]:
    """A python-backend model: OUTPUT0 = INPUT0 + weights, plus ``size`` bytes of parameters."""
    weights = weights_bytes([1.0, 2.0, 3.0, 4.0])
    params = np.random.default_rng(sum(name.encode())).integers(
        0, 2**63, size // 8 + 1, dtype=np.int64
    )
    return {
        "config.pbtxt": model_config(name, agent_params).encode(),
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


def run(
    size: int, model_count: int, workdir: Path, cloud_link: bool = True
) -> list[tuple[str, float, int, int]]:
    """Run the four starts; return (label, seconds, requests, bytes) rows."""
    paths = prepare_triton()
    repoagent_dir = workdir / "repoagents"
    install_triton(repoagent_dir)
    cache_dir = workdir / "cache"
    names = [f"model{i}" for i in range(model_count)]
    rows = []
    # Stock moto copies the whole object to answer each ranged GET; real object
    # stores do not. bench/moto_ranged.py fixes that one thing (and only for
    # ranged reads), so the demo measures cacheagent rather than the emulator.
    with RangedMotoS3() as s3, StorageRig(s3) as rig:
        print(
            f"S3 emulator on {rig.endpoint}; uploading {model_count} models "
            f"of {format_size(size)} twice (native and with cacheagent)...",
            flush=True,
        )
        agent = {"cache_dir": str(cache_dir)}
        for name in names:
            rig.put_tree(f"native/{name}", sample_model(name, size, None))
            rig.put_tree(f"agent/{name}", sample_model(name, size, agent))
        if cloud_link:
            per_conn, total, latency = CLOUD_LINK
            set_link(rig, per_conn, total, latency)
            print(
                f"link shaped like a cloud bucket: {per_conn / 1e6:.0f} MB/s per connection, "
                f"{total / 1e6:.0f} MB/s in all, {latency * 1000:.0f} ms per request "
                "(--link loopback for none)",
                flush=True,
            )
        # `cacheagent stub`: a local repository of configs whose agent section names
        # the models in S3, so Triton itself never walks the bucket.
        stub_dir = workdir / "stub"
        write_stub(rig.url("agent"), stub_dir, env={**os.environ, **rig.env})
        starts = [
            ("Triton native (S3)", rig.url("native"), None),
            ("cacheagent, cold cache", rig.url("agent"), repoagent_dir),
            ("cacheagent, cached (restart)", rig.url("agent"), repoagent_dir),
            ("cacheagent, cached, stub repo", str(stub_dir), repoagent_dir),
        ]
        for label, repository, agent_dir in starts:
            rig.proxy.reset()
            server = TritonServer(
                paths,
                repository,
                workdir / f"triton-{len(rows)}.log",
                repoagent_dir=agent_dir,
                model_control_mode="none",
                env=rig.env,
            )
            try:
                seconds = timed_start(server, names)
                for name in names:
                    check_inference(server, name)
            finally:
                server.stop()
                server.cleanup()
            records = rig.proxy.records()
            rows.append((label, seconds, len(records), sum(r.response_bytes for r in records)))
            print(f"  {label:30} READY in {seconds:6.2f} s", flush=True)
    return rows


def print_table(rows: list[tuple[str, float, int, int]]) -> None:
    """The result table, with speed-up and saving against native."""
    native_seconds, native_bytes = rows[0][1], rows[0][3]
    print()
    print(
        f"| {'start':30} | {'seconds to READY':>16} | {'requests':>8} | {'bytes from S3':>13} |"
        f" {'vs native':>9} |"
    )
    print(f"|{'-' * 32}|{'-' * 18}:|{'-' * 9}:|{'-' * 14}:|{'-' * 10}:|")
    for label, seconds, requests, nbytes in rows:
        ratio = f"{native_seconds / seconds:.1f}x" if seconds else "-"
        print(
            f"| {label:30} | {seconds:16.2f} | {requests:8d} | {format_size(nbytes):>13} |"
            f" {ratio:>9} |"
        )
    cached, stub = rows[2], rows[3]
    print()
    print(
        f"The cached start pulled {format_size(cached[3])} instead of {format_size(native_bytes)}"
        " (Triton's own listings and config.pbtxt: zero bytes of model files); from the stub"
        f" repository {stub[2]} request(s) and {format_size(stub[3])} (the agent's listings only)."
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
