"""A rollout to N nodes, with and without a shared tier: origin egress and time.

One command (after ``pip install -e '.[test,bench]'``)::

    .venv/bin/python -m bench.fleet --smoke    # a 48 MiB model, N = 1, 2, 4, once: < 3 minutes
    .venv/bin/python -m bench.fleet            # 256 MiB, N = 1, 2, 4, 3 repetitions
    .venv/bin/python -m bench.fleet --nodes 1 2 4 8

The origin is moto (with the ranged-read fix, :mod:`bench.moto_ranged`) behind
the counting proxy with its link capped per connection and in total: the
origin is "not in-region". The tier is SeaweedFS (``weed mini``) behind a
counting proxy of its own, uncapped: the in-region bucket. A node is one
``cacheagent warm`` process with its own empty cache directory; a rollout
starts N of them at once and lasts until the last one exits, T(N). Each
rollout of the tier mode uses a fresh tier prefix, so the tier is cold too
(its bucket has been written once before, as a tier in use has: SeaweedFS
allocates a volume on a bucket's first write, about 1 s on this machine).

Reported, per N and mode (``origin``: no tier; ``tier``: ``--shared-cache``):
T(N) and T(N)/T(1) (medians over repetitions, the ratio taken within a
repetition), origin content bytes per rollout / model size, tier bytes read and
written / model size; and hashlib SHA-256 (and MD5, xxh3-128) throughput on one
core against the origin link, since every tier node hashes SHA-256 beside the
store's xxh3 in the same pass. Targets (issue 13): origin bytes / size <= 1.05
at N = 4 with the tier; T(4)/T(1) <= 1.5 with the tier, against about 4 without.

Results: ``bench/results/fleet.{md,json}`` (``--tag`` to rename); the markdown is
printed too. Nothing here asserts: it measures and reports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    MiB,
    force_rmtree,
    log,
    make_workdir,
    md_table,
    random_bytes,
    set_link,
    start_rig,
)
from harness.emulators import StorageRig
from harness.seaweed import SeaweedS3

MODES = ("origin", "tier")


@dataclass(frozen=True)
class Profile:
    """How big and how often."""

    size: int  # bytes of the model's weights
    reps: int
    per_conn: float  # origin link, bytes/s per connection
    total: float  # origin link, bytes/s in all


PROFILES = {
    "smoke": Profile(48 * MiB, 1, 8 * MiB, 16 * MiB),
    "full": Profile(256 * MiB, 3, 8 * MiB, 32 * MiB),
}


# --------------------------------------------------------------------------- hashing


def hash_rates(megabytes: int = 128) -> dict[str, float]:
    """Bytes per second of SHA-256, MD5 and xxh3-128 on one core (best of 3)."""
    data = random_bytes(megabytes * MiB, 7)
    rates = {}
    makers: dict[str, Any] = {
        "sha256": hashlib.sha256,
        "md5": hashlib.md5,
        "xxh3_128": xxhash.xxh3_128,
    }
    for name, make in makers.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            make(data).hexdigest()
            best = min(best, time.perf_counter() - started)
        rates[name] = len(data) / best
    return rates


# --------------------------------------------------------------------------- rollouts


def node_command(url: str, cache_dir: Path, shared: str | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "cacheagent.cli.main",
        "warm",
        url,
        "--cache-dir",
        str(cache_dir),
        "--versions",
        "all",
        "--json",
        "--no-progress",
    ]
    return argv + (["--shared-cache", shared] if shared else [])


def rollout(
    origin: StorageRig,
    tier: StorageRig,
    work: Path,
    nodes: int,
    mode: str,
    label: str,
) -> dict[str, Any]:
    """Start ``nodes`` warm processes at once; what crossed each proxy, and how long."""
    url = origin.url("models/m")
    shared = tier.url(f"fleet-{label}") if mode == "tier" else None
    env = {k: v for k, v in os.environ.items() if k != "CACHEAGENT_SHARED_CACHE"}
    env.update(origin.env)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    origin.proxy.reset()
    tier.proxy.reset()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            node_command(url, work / f"{label}-node{i}", shared),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(nodes)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"a node failed ({proc.returncode}):\n{err[-3000:]}")
        outs.append(json.loads(out))
    seconds = time.monotonic() - started
    for i in range(nodes):
        force_rmtree(work / f"{label}-node{i}")
    return {
        "nodes": nodes,
        "mode": mode,
        "seconds": seconds,
        "origin_bytes": origin.object_bytes("models/"),
        "tier_read": tier.proxy.bytes_out(),
        "tier_written": tier.proxy.bytes_in(),
        "tier_requests": len(tier.proxy.records()),
        "node_seconds": [o["seconds"] for o in outs],
        "from_tier": [o.get("bytes_from_tier", 0) for o in outs],
        "from_origin": [o.get("bytes_from_origin", o["bytes_fetched"]) for o in outs],
    }


def run(profile: Profile, nodes: list[int], work: Path) -> dict[str, Any]:
    moto, origin = start_rig()
    seaweed = SeaweedS3().start()
    tier = StorageRig(seaweed, record_headers=False).start()  # type: ignore[arg-type]
    try:
        files = {
            "config.pbtxt": b'name: "m"\nbackend: "python"\n',
            "1/model.bin": random_bytes(profile.size, 1),
        }
        origin.put_tree("models/m", files)
        # SeaweedFS allocates a volume on a bucket's first write (about 1 s here): a
        # tier in use has its volumes, so that cost is paid before the clock runs.
        tier.put("primed", b"x")
        size = sum(map(len, files.values()))
        set_link(origin, profile.per_conn, profile.total)
        runs: list[dict[str, Any]] = []
        for rep in range(profile.reps):
            for n in nodes:
                # Interleaved, rotated per repetition: drift hits both modes alike.
                for mode in MODES if rep % 2 == 0 else reversed(MODES):
                    label = f"{mode}-{n}-{rep}"
                    result = rollout(origin, tier, work, n, mode, label)
                    result["rep"] = rep
                    runs.append(result)
                    log(
                        f"fleet: {label}: {result['seconds']:.2f} s, origin "
                        f"{result['origin_bytes'] / size:.3f} x size, tier read "
                        f"{result['tier_read'] / size:.2f} x"
                    )
        return {"size": size, "runs": runs}
    finally:
        tier.close()
        seaweed.close()
        origin.close()
        moto.close()


# --------------------------------------------------------------------------- report


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (mode, N): medians, and T(N)/T(1) taken within each repetition."""
    runs, size = results["runs"], results["size"]
    rows = []
    for mode in MODES:
        for n in sorted({r["nodes"] for r in runs}):
            mine = [r for r in runs if r["mode"] == mode and r["nodes"] == n]
            ratios = []
            for r in mine:
                one = [
                    x
                    for x in runs
                    if x["mode"] == mode and x["nodes"] == 1 and x["rep"] == r["rep"]
                ]
                if one:
                    ratios.append(r["seconds"] / one[0]["seconds"])
            rows.append(
                {
                    "mode": mode,
                    "nodes": n,
                    "seconds": statistics.median(r["seconds"] for r in mine),
                    "ratio": statistics.median(ratios) if ratios else float("nan"),
                    "origin": max(r["origin_bytes"] for r in mine) / size,
                    "tier_read": statistics.median(r["tier_read"] for r in mine) / size,
                    "tier_written": statistics.median(r["tier_written"] for r in mine) / size,
                }
            )
    return rows


def render(results: dict[str, Any]) -> str:
    rows = summary(results)
    link = results["link"]
    lines = [
        "# Fleet rollout: origin egress and time, with and without a shared tier",
        "",
        f"Profile **{results['profile']}**, cacheagent {results['version']}, "
        f"{os.cpu_count()} cores; model {results['size'] / MiB:.1f} MiB (one config, "
        f"one weights file); origin: moto behind a link of {link['per_conn'] / MiB:.0f} MiB/s "
        f"per connection, {link['total'] / MiB:.0f} MiB/s in all; tier: SeaweedFS, uncapped. "
        f"{results['reps']} repetition(s); every node is a `cacheagent warm` process with an "
        "empty cache, all N started at once; T(N) is until the last one exits.",
        "",
        md_table(
            [
                "mode",
                "N",
                "T(N) s",
                "T(N)/T(1)",
                "origin bytes / size",
                "tier read / size",
                "tier written / size",
            ],
            [
                [
                    r["mode"],
                    r["nodes"],
                    f"{r['seconds']:.2f}",
                    f"{r['ratio']:.2f}",
                    f"{r['origin']:.3f}",
                    f"{r['tier_read']:.2f}",
                    f"{r['tier_written']:.2f}",
                ]
                for r in rows
            ],
        ),
        "",
    ]
    by = {(r["mode"], r["nodes"]): r for r in rows}
    top = max(r["nodes"] for r in rows)
    checks = []
    if ("tier", 4) in by:
        checks.append(
            f"- origin bytes / size at N=4 with the tier: {by[('tier', 4)]['origin']:.3f} "
            f"(target <= 1.05): {'met' if by[('tier', 4)]['origin'] <= 1.05 else 'NOT met'}"
        )
        checks.append(
            f"- T(4)/T(1) with the tier: {by[('tier', 4)]['ratio']:.2f} (target <= 1.5): "
            f"{'met' if by[('tier', 4)]['ratio'] <= 1.5 else 'NOT met'}; without: "
            f"{by[('origin', 4)]['ratio']:.2f} (about 4 expected)"
        )
    if top != 4:
        checks.append(f"- largest N: {top}")
    rates = results["hashing"]
    checks.append(
        f"- hashing on one core: SHA-256 {rates['sha256'] / 1e6:.0f} MB/s, MD5 "
        f"{rates['md5'] / 1e6:.0f} MB/s, xxh3-128 {rates['xxh3_128'] / 1e6:.0f} MB/s; the "
        f"origin link here is {link['total'] / 1e6:.0f} MB/s in all, so SHA-256 runs at "
        f"{rates['sha256'] / link['total']:.0f}x it (and at "
        f"{rates['sha256'] / (1.25e9):.2f}x a 10 Gbit/s link)"
    )
    lines += ["Targets:", "", *checks, ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, one repetition (< 3 min)")
    p.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 4], help="N values")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 1 smoke, 3)")
    p.add_argument("--size-mb", type=int, default=None, help="model size in MiB")
    p.add_argument("--workdir", default=None, help="scratch parent directory (default /tmp)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--tag", default="fleet", help="results file name (default fleet)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write markdown and JSON; print the markdown."""
    args = parse_args(argv)
    name = "smoke" if args.smoke else "full"
    profile = PROFILES[name]
    if args.reps or args.size_mb:
        profile = Profile(
            (args.size_mb * MiB) if args.size_mb else profile.size,
            args.reps or profile.reps,
            profile.per_conn,
            profile.total,
        )
    nodes = sorted(set(args.nodes) | {1})
    work = make_workdir(args.workdir)
    log(f"fleet: profile {name}, N = {nodes}, work dir {work}")
    try:
        results = run(profile, nodes, work)
    finally:
        force_rmtree(work)
    results.update(
        profile=name,
        reps=profile.reps,
        link={"per_conn": profile.per_conn, "total": profile.total},
        hashing=hash_rates(32 if args.smoke else 128),
        version=_version(),
    )
    md = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{args.tag}.md").write_text(md)
    print(md)
    return 0


def _version() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+changes"


if __name__ == "__main__":
    sys.exit(main())
