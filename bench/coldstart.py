"""The cold-start benchmark: seconds from tritonserver's start to READY, five ways.

One command on a fresh machine (after ``pip install -e '.[test,bench]'``)::

    .venv/bin/python -m bench.coldstart --quick     # a few minutes
    .venv/bin/python -m bench.coldstart             # the full sweep, about half an hour

For each case (one model of 4 MiB / 256 MiB / 1 GiB in one file, one model of
300 small files, 8 models of 64 MiB) and each repetition, Triton is started
in every mode below, in an order rotated per repetition so slow drift of a
shared machine hits every mode alike; ratios are taken within a repetition.

* ``native``: Triton reads the S3 repository itself (no agent section);
* ``cold``: S3 + cacheagent with an empty cache (a fresh cache dir per run);
* ``warm``: S3 + cacheagent again, on the cache the cold run just filled;
* ``floor``: S3 + a do-nothing agent (the real shim and worker bridge, whose
  LOAD answers at once with a ready local copy: bench/floor_worker.py);
* ``local``: Triton on a local directory holding the same models.

Storage is moto (with ranged reads fixed, see bench/moto_ranged.py) behind the
tests' CountingProxy, which counts requests and bytes. The "cloud-like link"
part throttles that proxy (per-connection and total bandwidth, per-request
latency) and sweeps the fetcher's part size and concurrency. Results go to
``bench/results/coldstart-{quick,full}.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness.emulators import StorageRig

from .common import (
    RESULTS_DIR,
    Case,
    GiB,
    Harness,
    MiB,
    Spread,
    TritonRun,
    cacheagent_warm,
    drop_case,
    fmt_bytes,
    force_rmtree,
    free_disk,
    log,
    make_workdir,
    many_files_case,
    many_models_case,
    md_table,
    one_file_case,
    set_link,
    start_rig,
    upload_case,
)

NAN = float("nan")
MODES = ("local", "floor", "warm", "cold", "native")
# The same three with the "source" layout (cases with many files only).
STUB_MODES = ("floor-stub", "warm-stub", "cold-stub")
# Blocks of modes run back to back; cold and warm stay adjacent (warm reuses cold's cache).
BLOCKS = (("native",), ("cold", "warm"), ("floor",), ("local",))
STUB_BLOCKS = (("cold-stub", "warm-stub"), ("floor-stub",))


def cases_for(quick: bool, names: list[str] | None) -> list[Case]:
    """The sweep's cases (``names`` picks some by name)."""
    every = [
        one_file_case("4mb", 4 * MiB, "1 file, 4 MiB"),
        one_file_case("256mb", 256 * MiB, "1 file, 256 MiB"),
        one_file_case("1gb", 1 * GiB, "1 file, 1 GiB"),
        many_files_case("300files", 300, 32 * 1024, "300 files x 32 KiB"),
        many_models_case("8x64mb", 8, 64 * MiB, "8 models x 64 MiB"),
    ]
    if names:
        unknown = set(names) - {c.name for c in every}
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}; have {[c.name for c in every]}")
        return [c for c in every if c.name in names]
    if quick:
        return [c for c in every if c.name in ("4mb", "256mb", "300files")]
    return every


def prefetch_supported() -> bool:
    """Whether this cacheagent knows the ``prefetch`` agent parameter."""
    from cacheagent.triton.params import PARAMETERS

    return "prefetch" in PARAMETERS


# --------------------------------------------------------------------------- sweep


def run_case(harness: Harness, rig: StorageRig, case: Case, reps: int, work: Path) -> dict:
    """All five modes, ``reps`` times, interleaved; returns runs by mode."""
    reps = min(reps, case.max_reps or reps)
    log(f"case {case.name}: uploading {fmt_bytes(case.size)} in {case.file_count} files")
    started = time.monotonic()
    repos = upload_case(rig, case, work, case.name)
    log(f"case {case.name}: uploaded in {time.monotonic() - started:.1f} s")
    models = [m.name for m in case.models]
    modes = MODES + STUB_MODES
    every = BLOCKS + STUB_BLOCKS
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for rep in range(reps):
            blocks = every[rep % len(every) :] + every[: rep % len(every)]
            cache = work / f"cache-{case.name}-{rep}"
            for block in blocks:
                for mode in block:
                    run = _start(harness, mode, repos, models, cache)
                    runs[mode].append(run.as_dict())
                    extra = f", agent {run.agent_seconds:.3f} s" if run.loads else ""
                    log(
                        f"case {case.name} rep {rep + 1}/{reps} {mode:6}: "
                        f"{run.seconds:.2f} s, {run.traffic.requests} requests, "
                        f"{fmt_bytes(run.traffic.content_bytes)}{extra}"
                        + (f" ERROR {run.error}" if run.error else "")
                    )
            force_rmtree(cache)
    finally:
        drop_case(rig, case.name, work)
    return {
        "case": {
            "name": case.name,
            "label": case.label,
            "size": case.size,
            "files": case.file_count,
            "models": len(case.models),
        },
        "runs": runs,
    }


def _start(harness: Harness, mode: str, repos: Any, models: list[str], cache: Path) -> TritonRun:
    if mode.endswith("-stub"):
        if mode == "floor-stub":
            return harness.run(mode, repos.stub, models, agent="floor", floor_root=repos.local)
        if mode == "cold-stub":
            force_rmtree(cache)
        return harness.run(mode, repos.stub, models, agent="real", cache_dir=cache)
    if mode == "native":
        return harness.run(mode, repos.native, models)
    if mode == "cold":
        force_rmtree(cache)
        return harness.run(mode, repos.agent, models, agent="real", cache_dir=cache)
    if mode == "warm":
        return harness.run(mode, repos.agent, models, agent="real", cache_dir=cache)
    if mode == "floor":
        return harness.run(mode, repos.agent, models, agent="floor", floor_root=repos.local)
    return harness.run(mode, repos.local, models)


def case_ratios(result: dict) -> dict[str, Spread]:
    """Per-repetition ratios, as min/median/max."""
    runs = result["runs"]
    secs = {
        m: [r["seconds"] if not r["error"] else float("nan") for r in rs] for m, rs in runs.items()
    }
    n = min(len(v) for v in secs.values())

    def ratio(a: list[float], b: list[float]) -> Spread:
        return Spread.of(a[i] / b[i] for i in range(n))

    def minus_agent(mode: str) -> list[float]:
        return [secs[mode][i] - runs[mode][i]["agent_seconds"] for i in range(n)]

    out = {
        "native/warm": ratio(secs["native"], secs["warm"]),
        "warm/local": ratio(secs["warm"], secs["local"]),
        "cold/native": ratio(secs["cold"], secs["native"]),
        "warm/floor": ratio(secs["warm"], secs["floor"]),
        "warm/(warm-agent)": ratio(secs["warm"], minus_agent("warm")),
    }
    if "warm-stub" in secs:
        out.update(
            {
                "native/warm-stub": ratio(secs["native"], secs["warm-stub"]),
                "warm-stub/local": ratio(secs["warm-stub"], secs["local"]),
                "cold-stub/native": ratio(secs["cold-stub"], secs["native"]),
                "warm-stub/floor-stub": ratio(secs["warm-stub"], secs["floor-stub"]),
                "warm-stub/(warm-stub-agent)": ratio(secs["warm-stub"], minus_agent("warm-stub")),
            }
        )
    return out


# --------------------------------------------------------------------------- cloud-like link


def run_link(
    harness: Harness, rig: StorageRig, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Triton native vs cacheagent on a throttled link, the part-size x concurrency sweep,
    and many models (with and without prefetch)."""
    per_conn = args.per_conn_mbps * 1e6
    total = args.total_mbps * 1e6
    latency = args.latency_ms / 1000
    size = 256 * MiB if args.quick else 1 * GiB
    reps = args.link_reps or (2 if args.quick else 3)
    out: dict[str, Any] = {
        "per_conn_Bps": per_conn,
        "total_Bps": total,
        "latency_s": latency,
        "size": size,
        "ideal_s": size / total,
    }
    case = one_file_case("link", size, f"1 file, {fmt_bytes(size)}")
    log(f"link: uploading {fmt_bytes(size)}")
    repos = upload_case(rig, case, work, "link")
    model = case.models[0].name
    location = f"{repos.agent}/{model}"
    # What this machine can move at all, unthrottled: the cap only means something below it.
    ceiling = []
    for _ in range(2):
        force_rmtree(work / "link-cache")
        w = cacheagent_warm(rig, location, work / "link-cache")
        ceiling.append(size / w.fetch_seconds if w.fetch_seconds == w.fetch_seconds else 0.0)
    force_rmtree(work / "link-cache")
    out["ceiling_Bps"] = max(ceiling)
    log(f"link: rig ceiling (cacheagent warm, unthrottled) {max(ceiling) / 1e6:.0f} MB/s")
    set_link(rig, per_conn, total, latency)
    runs: dict[str, list[dict]] = {"native": [], "cold": [], "warm-cli": []}
    try:
        for rep in range(reps):
            order = ["native", "cold", "warm-cli"]
            order = order[rep % 3 :] + order[: rep % 3]
            for mode in order:
                cache = work / "link-cache"
                force_rmtree(cache)
                if mode == "warm-cli":
                    w = cacheagent_warm(rig, location, cache)
                    runs[mode].append(_warm_dict(w))
                    log(
                        f"link rep {rep + 1}: cacheagent warm {w.fetch_seconds:.2f} s "
                        f"(wall {w.wall_seconds:.2f} s) {w.error}"
                    )
                else:
                    kw: dict[str, Any] = {}
                    if mode == "cold":
                        kw = {"agent": "real", "cache_dir": cache}
                    repo = repos.native if mode == "native" else repos.agent
                    run = harness.run(mode, repo, [model], **kw)
                    runs[mode].append(run.as_dict())
                    log(
                        f"link rep {rep + 1}: triton {mode} {run.seconds:.2f} s "
                        f"(agent {run.agent_seconds:.2f} s) {run.error}"
                    )
                force_rmtree(cache)
        out["runs"] = runs

        # Part size x concurrency, with `cacheagent warm` (fetch seconds as it reports them).
        grid = [(p, c) for p in args.part_sizes for c in args.concurrencies]
        sweep: dict[str, list[dict]] = {f"{p}x{c}": [] for p, c in grid}
        sweep_reps = args.sweep_reps or (1 if args.quick else 2)
        shuffler = random.Random(4)
        for rep in range(sweep_reps):
            shuffler.shuffle(grid)
            for part, conc in grid:
                cache = work / "sweep-cache"
                force_rmtree(cache)
                extra = ["--part-size", f"{part}MiB", "--concurrency", str(conc)]
                w = cacheagent_warm(rig, location, cache, extra)
                force_rmtree(cache)
                sweep[f"{part}x{conc}"].append(_warm_dict(w))
                log(
                    f"link sweep rep {rep + 1}: part {part} MiB x {conc}: "
                    f"{w.fetch_seconds:.2f} s, {w.peak_rss / MiB:.0f} MiB RSS {w.error}"
                )
        out["sweep"] = sweep
    finally:
        set_link(rig)
        drop_case(rig, "link", work)

    sizes = [4 * MiB] if args.quick else [4 * MiB, 256 * MiB]
    out["sizes"] = run_link_sizes(harness, rig, work, sizes, reps, (per_conn, total, latency))
    out["many"] = run_link_many(harness, rig, work, args, per_conn, total, latency)
    return out


def run_link_sizes(
    harness: Harness,
    rig: StorageRig,
    work: Path,
    sizes: list[int],
    reps: int,
    link: tuple[float, float, float],
) -> dict[str, dict[str, list[dict]]]:
    """Triton native vs cacheagent cold on the throttled link for smaller one-file models.

    On loopback the emulator hands Triton's single stream a few hundred MB/s, so
    a cold start there is bounded by the rig (see the loopback cold/native rows);
    on the cloud-like link the same comparison shows what the agent changes.
    """
    out: dict[str, dict[str, list[dict]]] = {}
    for size in sizes:
        name = f"link{size // MiB}m"
        case = one_file_case(name, size, f"1 file, {fmt_bytes(size)}")
        repos = upload_case(rig, case, work, name)
        model = case.models[0].name
        runs: dict[str, list[dict]] = {"native": [], "cold": []}
        set_link(rig, *link)
        try:
            for rep in range(reps):
                for mode in ("native", "cold") if rep % 2 == 0 else ("cold", "native"):
                    cache = work / "sizes-cache"
                    force_rmtree(cache)
                    kw: dict[str, Any] = {"agent": "real", "cache_dir": cache}
                    repo = repos.native if mode == "native" else repos.agent
                    run = harness.run(mode, repo, [model], **(kw if mode == "cold" else {}))
                    force_rmtree(cache)
                    runs[mode].append(run.as_dict())
                    log(
                        f"link {fmt_bytes(size)} rep {rep + 1}: triton {mode} {run.seconds:.2f} s "
                        f"(agent {run.agent_seconds:.2f} s) {run.error}"
                    )
        finally:
            set_link(rig)
            drop_case(rig, name, work)
        out[str(size)] = runs
    return out


def _warm_dict(w: Any) -> dict[str, Any]:
    return {
        "wall_s": w.wall_seconds,
        "fetch_s": w.fetch_seconds,
        "first_get_s": w.traffic.first_get - w.started,
        "wire_s": w.traffic.wire_seconds,
        "wire_Bps": w.traffic.wire_rate,
        "peak_rss": w.peak_rss,
        "bytes_fetched": w.bytes_fetched,
        "requests": w.traffic.requests,
        "content_gets": w.traffic.content_gets,
        "error": w.error,
    }


def run_link_many(
    harness: Harness,
    rig: StorageRig,
    work: Path,
    args: argparse.Namespace,
    per_conn: float,
    total: float,
    latency: float,
) -> dict[str, Any]:
    """8 x 64 MiB models on the throttled link: native, floor, cold with prefetch on and off,
    in the S3 layout and in the stub layout."""
    from harness.triton import model_config

    case = many_models_case("link8", 8, 64 * MiB, "8 models x 64 MiB")
    has_prefetch = prefetch_supported()
    variants = {"noprefetch": {"prefetch": "false"}} if has_prefetch else {}
    log(f"link many: uploading {fmt_bytes(case.size)} (prefetch parameter: {has_prefetch})")
    repos = upload_case(rig, case, work, "link8", variants)
    models = [m.name for m in case.models]
    assert repos.stub is not None
    stub_noprefetch = work / "stub" / "link8-noprefetch"
    for name in models:
        path = stub_noprefetch / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {"source": f"{repos.agent}/{name}", "prefetch": "false"}
        path.write_text(model_config(name, params))
    # The naive agent of the issue: one model after another (no prefetch), each
    # fetched over one connection (concurrency 1), i.e. the sum of N downloads.
    stub_naive = work / "stub" / "link8-naive"
    for name in models:
        path = stub_naive / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {"source": f"{repos.agent}/{name}", "prefetch": "false", "concurrency": "1"}
        path.write_text(model_config(name, params))
    # (mode, repository, agent); the cold modes get a fresh cache each.
    plan: dict[str, tuple[str | Path, str]] = {
        "native": (repos.native, "none"),
        "floor": (repos.agent, "floor"),
        "cold": (repos.agent, "real"),
        "floor-stub": (repos.stub, "floor"),
        "cold-stub": (repos.stub, "real"),
    }
    if has_prefetch:
        plan["cold-noprefetch"] = (repos.variants["noprefetch"], "real")
        plan["cold-stub-noprefetch"] = (stub_noprefetch, "real")
        plan["cold-stub-naive"] = (stub_naive, "real")
    modes = list(plan)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    reps = args.link_reps or (1 if args.quick else 3)
    set_link(rig, per_conn, total, latency)
    try:
        for rep in range(reps):
            for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
                cache = work / "many-cache"
                force_rmtree(cache)
                repo, agent = plan[mode]
                run = harness.run(
                    mode, repo, models, agent=agent, cache_dir=cache, floor_root=repos.local
                )
                force_rmtree(cache)
                runs[mode].append(run.as_dict())
                log(
                    f"link many rep {rep + 1}: {mode} {run.seconds:.2f} s "
                    f"(agent LOADs {run.agent_seconds:.2f} s) {run.error}"
                )
    finally:
        set_link(rig)
        drop_case(rig, "link8", work)
        force_rmtree(stub_noprefetch)
        force_rmtree(stub_naive)
    return {"prefetch_supported": has_prefetch, "size": case.size, "runs": runs}


# --------------------------------------------------------------------------- report


def _secs(runs: list[dict], key: str = "seconds") -> Spread:
    return Spread.of(r.get(key, NAN) for r in runs if not r.get("error"))


def _median(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if not r.get("error")]
    return statistics.median(vals) if vals else float("nan")


def _traffic(run: dict) -> dict:
    return run["traffic"]


def targets(results: dict) -> list[list[str]]:
    """Each target of the issue, with the measured value and met/missed."""
    rows: list[list[str]] = []

    def add(name: str, spread: Spread | None, ok: bool | None, how: str, digits: int = 2) -> None:
        value = spread.fmt(digits) if spread is not None else "n/a"
        verdict = "n/a" if ok is None else ("met" if ok else "**missed**")
        rows.append([name, value, how, verdict])

    def at_most(name: str, spread: Spread, limit: float, how: str, digits: int = 2) -> None:
        add(name, spread, spread.mid <= limit if spread.n else None, how, digits)

    sweep = results.get("sweep", {})
    for name, res in sweep.items():
        ratios = case_ratios(res)
        for key in ("warm/floor", "warm-stub/floor-stub"):
            if key in ratios:
                wf = ratios[key]
                at_most(
                    f"warm within 1.1x of floor ({name}, {key})",
                    wf,
                    1.1,
                    "ratio, median (min-max)",
                )
    for name, limit in (("300files", 0.15), ("4mb", 0.05), ("256mb", 0.05), ("1gb", 0.05)):
        for mode in ("warm", "warm-stub"):
            if name in sweep and mode in sweep[name]["runs"]:
                agent = Spread.of(r["agent_seconds"] for r in sweep[name]["runs"][mode])
                at_most(
                    f"agent's share of a hit <= {limit} s ({name}, {mode})",
                    agent,
                    limit,
                    "LOAD seconds from its log line (first LOAD of the worker)",
                    3,
                )
    if "1gb" in sweep:
        nw = case_ratios(sweep["1gb"])["native/warm"]
        add("native/warm >= 5x (1 GiB)", nw, nw.mid >= 5 if nw.n else None, "ratio")
    raw_link = _raw_link_Bps(results)
    for name, res in sweep.items():
        cn = case_ratios(res)["cold/native"]
        limit = 0.6 if name in ("256mb", "1gb") else 1.0
        how = "ratio, loopback"
        bound = _rig_bound(res, raw_link)
        if bound == bound:
            how += (
                "; rig estimate, (median warm + bytes at raw link rate) / median native: "
                f"{bound:.2f}"
            )
        at_most(f"cold/native <= {limit} ({name})", cn, limit, how)
    link = results.get("link")
    link_sizes = dict((link or {}).get("sizes") or {})
    if link:
        link_sizes[str(link["size"])] = link["runs"]
    for size_text, runs in sorted(link_sizes.items(), key=lambda kv: int(kv[0])):
        size = int(size_text)
        cn = _pair_ratio(runs, "cold", "native")
        limit = 0.6 if size >= 256 * MiB else 1.0
        at_most(
            f"cold/native <= {limit} ({fmt_bytes(size)}, cloud-like link)",
            cn,
            limit,
            "ratio, Triton start to READY",
        )
    if link:
        ideal = link["ideal_s"]
        cli = Spread.of(r["fetch_s"] / ideal for r in link["runs"]["warm-cli"] if not r["error"])
        at_most(
            f"throttled cold {fmt_bytes(link['size'])} within 1.3x of size/cap (`cacheagent warm`)",
            cli,
            1.3,
            f"fetch s / {ideal:.2f} s",
        )
        wire_ratio = Spread.of(
            r.get("wire_s", NAN) / ideal for r in link["runs"]["warm-cli"] if not r["error"]
        )
        at_most(
            "... the same, download phase only (first GET to last byte)",
            wire_ratio,
            1.3,
            f"wire s / {ideal:.2f} s",
        )
        tri = Spread.of(r["agent_seconds"] / ideal for r in link["runs"]["cold"] if not r["error"])
        at_most(
            f"throttled cold {fmt_bytes(link['size'])} within 1.3x of size/cap (through Triton)",
            tri,
            1.3,
            f"agent LOAD s / {ideal:.2f} s",
        )
        many = link.get("many")
        if many:
            runs = many["runs"]
            if "cold-noprefetch" in runs:
                for layout in ("", "-stub"):
                    for key, how in (
                        ("seconds", "Triton start to READY, ratio"),
                        ("over_floor", "start minus floor, ratio"),
                        ("agent_seconds", "agent LOAD seconds, ratio"),
                    ):
                        sp = _many_ratio(runs, key, layout)
                        if not sp.n:
                            continue
                        at_most(
                            f"8x64 MiB cold <= 0.5x sequential ({'stub' if layout else 'S3'}, "
                            "prefetch / prefetch=false)",
                            sp,
                            0.5,
                            how,
                        )
            if "cold-stub-naive" in runs:
                for key, how in (
                    ("seconds", "Triton start to READY, ratio"),
                    ("agent_seconds", "agent LOAD seconds, ratio"),
                ):
                    sp = _pair_ratio(runs, "cold-stub", "cold-stub-naive", key)
                    at_most(
                        "8x64 MiB cold <= 0.5x one model after another (stub, defaults / "
                        "prefetch=false + concurrency 1)",
                        sp,
                        0.5,
                        how,
                    )
            if "cold-noprefetch" not in runs:
                at_most(
                    "8x64 MiB cold <= 0.5x sequential",
                    None,
                    None,
                    "prefetch not in this build: only the sequential baseline measured",
                )
    micro = results.get("micro")
    if micro:
        for name, limit in (("h300", 0.15), ("h1", 0.05)):
            hit = micro["hit"].get(name, {})
            if "loads_s" in hit:
                sp = Spread.of(hit["loads_s"])
                add(
                    f"steady-state hit <= {limit} s ({hit['label']}, worker already warm)",
                    sp,
                    limit,
                    "actions.handle seconds, micro-benchmark",
                    3,
                )
        rss = micro["rss"][0]
        add(
            f"worker peak RSS < 300 MB fetching {fmt_bytes(rss['size'])}",
            Spread.of([rss["peak_rss"] / 1e6]),
            rss["peak_rss"] < 300e6,
            "MB (VmHWM)",
            0,
        )
        hash_gbps = micro["hash"]["xxh3_128_GBps"]
        link_mbps = rss.get("raw_link_MBps") or 0
        add(
            "hashing never the bottleneck",
            Spread.of([hash_gbps * 1000 / max(link_mbps, 1)]),
            hash_gbps * 1000 > 2 * link_mbps,
            "xxh3 rate / raw link rate (x)",
            1,
        )
    return rows


def render(results: dict) -> str:
    """The whole report as markdown."""
    meta = results["meta"]
    out = [
        f"# cacheagent cold-start benchmark ({meta['mode']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; {meta['machine']}; "
        f"total runtime {meta['runtime_s'] / 60:.1f} min  ",
        f"Storage: {meta['storage']}  ",
        f"Code: cacheagent {meta.get('code', 'unknown')}  ",
        "Seconds are from tritonserver's process start to `/v2/health/ready` = 200 "
        "(`--model-control-mode=none`, all models ready, one inference checked), "
        "median (min-max) over the interleaved repetitions.",
        "",
    ]
    sweep = results.get("sweep", {})
    if sweep:
        reps = max(len(r["runs"]["warm"]) for r in sweep.values())
        out += [f"## Start to READY, seconds ({reps} repetitions)", ""]
        rows = []
        for res in sweep.values():
            c = res["case"]
            rows.append(
                [c["label"], fmt_bytes(c["size"]), c["files"]]
                + [_secs(res["runs"][m]).fmt() for m in MODES]
            )
        out += [md_table(["case", "data", "files", *MODES], rows), ""]

        out += ["## Ratios (per repetition, then median (min-max))", ""]
        rows = []
        for res in sweep.values():
            ratios = case_ratios(res)
            rows.append([res["case"]["label"]] + [ratios[k].fmt() for k in list(ratios)[:5]])
        out += [
            md_table(
                [
                    "case",
                    "native/warm",
                    "warm/local",
                    "cold/native",
                    "warm/floor",
                    "warm/(warm - agent LOAD s)",
                ],
                rows,
            ),
            "",
            "`floor` is measured: a separate Triton start with the do-nothing agent "
            "(bench/floor_worker.py: the real shim and worker bridge, LOAD answered at once "
            "with the ready local copy). The last column is the other estimate of the "
            "floor, the warm start minus the agent's own LOAD seconds from its log line; "
            "the gap between the two is what the real worker pays outside its LOAD (importing "
            "cacheagent.triton.actions, opening the cache index), once per Triton start.",
            "",
        ]

        stub = [res for res in sweep.values() if "warm-stub" in res["runs"]]
        if stub:
            out += [
                "## The stub layout: a local repository of configs, the models in S3",
                "",
                "Before it calls any agent, Triton walks each model directory in storage, one "
                "request at a time (about 7 requests per file: listings and HEADs; 60 for a "
                "4-file model, 2161 for the 300-file one). In a stub repository (what "
                "`cacheagent stub` writes) Triton reads only a local `config.pbtxt` per model, "
                "whose agent parameter `source` names the model directory in S3; only the agent "
                "talks to storage. `floor-stub` is the do-nothing agent on the same stub.",
                "",
            ]
            rows = []
            for res in stub:
                r = case_ratios(res)
                rows.append(
                    [res["case"]["label"]]
                    + [_secs(res["runs"][m]).fmt() for m in STUB_MODES]
                    + [
                        r[k].fmt()
                        for k in (
                            "native/warm-stub",
                            "warm-stub/local",
                            "cold-stub/native",
                            "warm-stub/floor-stub",
                            "warm-stub/(warm-stub-agent)",
                        )
                    ]
                )
            out += [
                md_table(
                    [
                        "case",
                        *STUB_MODES,
                        "native/warm-stub",
                        "warm-stub/local",
                        "cold-stub/native",
                        "warm-stub/floor-stub",
                        "warm-stub/(warm-stub - agent)",
                    ],
                    rows,
                ),
                "",
            ]

        out += ["## Storage traffic per start (median)", ""]
        rows = []
        for res in sweep.values():
            for mode in ("native", "cold", "warm", "floor", *STUB_MODES):
                runs = [r for r in res["runs"].get(mode, []) if not r["error"]]
                if not runs:
                    continue
                t = [_traffic(r) for r in runs]
                rows.append(
                    [
                        res["case"]["label"],
                        mode,
                        int(statistics.median(x["requests"] for x in t)),
                        int(statistics.median(x["content_gets"] for x in t)),
                        fmt_bytes(statistics.median(x["content_bytes"] for x in t)),
                    ]
                )
        out += [md_table(["case", "mode", "requests", "object GETs", "object bytes"], rows), ""]

        out += ["## The agent's own LOAD seconds (sum over models, from its log lines)", ""]
        rows = []
        for res in sweep.values():
            for suffix in ("", "-stub"):
                if f"warm{suffix}" not in res["runs"]:
                    continue
                rows.append(
                    [
                        res["case"]["label"] + (" (stub)" if suffix else ""),
                        _secs(res["runs"][f"warm{suffix}"], "agent_seconds").fmt(3),
                        _secs(res["runs"][f"cold{suffix}"], "agent_seconds").fmt(3),
                    ]
                )
        out += [
            md_table(["case", "warm (HIT)", "cold (MISS)"], rows),
            "",
            "A start's first LOAD is the first request of a fresh worker process, so it "
            "includes any one-time setup on the LOAD path (e.g. building a storage client); "
            "the micro-benchmarks show a fresh process's first LOAD next to the steady state.",
            "",
        ]

    link = results.get("link")
    if link:
        out += _render_link(link)
    if results.get("micro"):
        from .micro import render_micro

        out += [render_micro(results["micro"]), ""]
    out += ["## Targets", ""]
    out += [md_table(["target", "measured", "how", "verdict"], targets(results)), ""]
    for note in results.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def _render_link(link: dict) -> list[str]:
    mb = 1e6
    out = [
        f"## Cloud-like link: {link['per_conn_Bps'] / mb:.0f} MB/s per connection, "
        f"{link['total_Bps'] / mb:.0f} MB/s total, {link['latency_s'] * 1000:.0f} ms per request",
        "",
        f"One model, one file of {fmt_bytes(link['size'])}; size / total cap = "
        f"{link['ideal_s']:.2f} s. The same fetch unthrottled (`cacheagent warm`) ran at "
        f"{link.get('ceiling_Bps', 0) / mb:.0f} MB/s on this machine: moto, the Python proxy "
        "and the client share 2 cores, so the caps are scaled down from a real cloud "
        "(e.g. 50 / 400 MB/s) keeping the ratio total = 8 x per connection, so that the cap, "
        "not the rig, is what binds.",
        "",
    ]
    runs = link["runs"]

    def wire(rs: list[dict], key: str = "") -> str:
        vals = []
        for r in rs:
            if r.get("error"):
                continue
            if "traffic" in r:
                t = r["traffic"]
                secs = t.get("last_byte", NAN) - t.get("first_get", NAN)
                vals.append(t["content_bytes"] / secs / mb if secs > 0 else NAN)
            else:
                vals.append(r.get("wire_Bps", NAN) / mb)
        return Spread.of(vals).fmt(0)

    rows = [
        ["Triton native, start to READY", _secs(runs["native"]).fmt(), wire(runs["native"])],
        ["Triton + cacheagent cold, start to READY", _secs(runs["cold"]).fmt(), wire(runs["cold"])],
        ["... the agent's LOAD (its log line)", _secs(runs["cold"], "agent_seconds").fmt(), ""],
        [
            "`cacheagent warm` (defaults): fetch seconds (its JSON)",
            _secs(runs["warm-cli"], "fetch_s").fmt(),
            wire(runs["warm-cli"]),
        ],
        [
            "... of which before the first object GET (imports, client, listing)",
            _secs(runs["warm-cli"], "first_get_s").fmt(),
            "",
        ],
        ["... process wall seconds", _secs(runs["warm-cli"], "wall_s").fmt(), ""],
    ]
    out += [
        md_table(["what", "seconds", "link MB/s while downloading"], rows),
        "",
        "Link MB/s = object bytes / (end of the last object GET - start of the first), from "
        "the proxy's records: how full the link was kept while the download ran.",
        "",
    ]
    sizes = link.get("sizes") or {}
    if sizes:
        out += ["### Smaller models on the same link (start to READY, seconds)", ""]
        rows = []
        for size_text, rs in sorted(sizes.items(), key=lambda kv: int(kv[0])):
            rows.append(
                [
                    fmt_bytes(int(size_text)),
                    _secs(rs["native"]).fmt(),
                    _secs(rs["cold"]).fmt(),
                    _secs(rs["cold"], "agent_seconds").fmt(),
                    _pair_ratio(rs, "cold", "native").fmt(),
                ]
            )
        header = ["one file", "native", "cacheagent cold", "agent LOAD", "cold/native"]
        out += [md_table(header, rows), ""]
    sweep = link.get("sweep") or {}
    if sweep:
        parts = sorted({int(k.split("x")[0]) for k in sweep})
        concs = sorted({int(k.split("x")[1]) for k in sweep})
        out += [
            "### Part size x concurrency (`cacheagent warm`: link MB/s while downloading / "
            "MB/s over its whole fetch seconds, median; peak RSS)",
            "",
        ]
        rows = []
        for p in parts:
            row: list[object] = [f"{p} MiB"]
            for c in concs:
                rs = [r for r in sweep.get(f"{p}x{c}", []) if not r["error"]]
                if not rs:
                    row.append("n/a")
                    continue
                rate = link["size"] / statistics.median(r["fetch_s"] for r in rs) / mb
                wire_rate = statistics.median(r.get("wire_Bps", NAN) for r in rs) / mb
                rss = max(r["peak_rss"] for r in rs) / MiB
                row.append(f"{wire_rate:.0f} / {rate:.0f} MB/s, {rss:.0f} MiB")
            rows.append(row)
        out += [md_table(["part size", *(f"concurrency {c}" for c in concs)], rows), ""]
    many = link.get("many")
    if many:
        out += ["### 8 models x 64 MiB on the same link (start to READY, seconds)", ""]
        rows = [
            [mode, _secs(rs).fmt(), _secs(rs, "agent_seconds").fmt()]
            for mode, rs in many["runs"].items()
        ]
        out += [md_table(["mode", "seconds", "agent LOAD seconds (sum)"], rows), ""]
        runs_m = many["runs"]
        for layout, name in (("", "S3 repository"), ("-stub", "stub repository")):
            if f"cold{layout}-noprefetch" in runs_m and f"floor{layout}" in runs_m:
                out += [
                    f"{name}: ratios per repetition, prefetch on / prefetch=false: Triton "
                    f"start to READY {_many_ratio(runs_m, 'seconds', layout).fmt()}; the "
                    f"agent's LOAD seconds {_many_ratio(runs_m, 'agent_seconds', layout).fmt()}; "
                    "start minus the floor (the part the agent can change) "
                    f"{_many_ratio(runs_m, 'over_floor', layout).fmt()}.",
                    "",
                ]
        if "cold-stub-naive" in runs_m:
            out += [
                "stub repository, defaults / the naive agent (`prefetch: false`, `concurrency: "
                "1`: one model after another over one connection, the sum of N downloads): "
                f"Triton start to READY {_pair_ratio(runs_m, 'cold-stub', 'cold-stub-naive').fmt()}"
                "; the agent's LOAD seconds "
                f"{_pair_ratio(runs_m, 'cold-stub', 'cold-stub-naive', 'agent_seconds').fmt()}.",
                "",
            ]
        cap_s = many["size"] / link["total_Bps"]
        floor_s = _median(runs_m.get("floor-stub", []), "seconds")
        link_use = [
            f"{mode} {(_median(runs_m[mode], 'seconds') - floor_s) / cap_s:.2f}x"
            for mode in ("cold-stub", "cold-stub-noprefetch")
            if mode in runs_m and floor_s == floor_s
        ]
        if link_use:
            out += [
                "Stub repository, start minus floor-stub over the bytes at the total cap "
                f"(medians): {', '.join(link_use)}. Each model's parts already fill the link, "
                "so with or without prefetch the start is bound by the link; prefetch can only "
                "save what lies between models.",
                "",
            ]
        out += [
            f"Fetching the {fmt_bytes(many['size'])} at the total cap takes "
            f"{many['size'] / link['total_Bps']:.2f} s; one model after another at one "
            f"connection's cap, {many['size'] / link['per_conn_Bps']:.1f} s.",
            "",
        ]
        if not many["prefetch_supported"]:
            out += [
                "This build of cacheagent has no `prefetch` parameter yet, so `cold` is the "
                "sequential baseline (Triton's serial LOADs, one model after another).",
                "",
            ]
    return out


def _pair_ratio(runs: dict[str, list[dict]], a: str, b: str, key: str = "seconds") -> Spread:
    """``a`` / ``b`` per repetition (runs of one repetition share an index)."""
    if a not in runs or b not in runs:
        return Spread.of([])
    n = min(len(runs[a]), len(runs[b]))

    def val(mode: str, i: int) -> float:
        run = runs[mode][i]
        return float("nan") if run.get("error") else float(run[key])

    return Spread.of(val(a, i) / val(b, i) for i in range(n))


def _raw_link_Bps(results: dict) -> float:
    """The micro-benchmark's raw loopback link rate (8 ranged GETs at once), or NaN."""
    rss = ((results.get("micro") or {}).get("rss") or [{}])[0]
    mbps = rss.get("raw_link_MBps")
    return mbps * 1e6 if mbps else NAN


def _rig_bound(result: dict, raw_link_Bps: float) -> float:
    """The lowest cold/native this rig allows: a warm start plus moving the bytes at the
    raw link rate, over native (medians)."""
    runs = result["runs"]
    if raw_link_Bps != raw_link_Bps or "warm" not in runs or "native" not in runs:
        return NAN
    size = result.get("size") or (result.get("case") or {}).get("size") or 0
    warm, native = _median(runs["warm"], "seconds"), _median(runs["native"], "seconds")
    return (warm + size / raw_link_Bps) / native if size and native else NAN


def _many_ratio(runs: dict[str, list[dict]], key: str, layout: str = "") -> Spread:
    """prefetch / no-prefetch per repetition; ``over_floor`` subtracts that rep's floor.

    ``layout`` is "" (the S3 repository) or "-stub" (the local stub repository).
    """
    cold, nopf, floor = f"cold{layout}", f"cold{layout}-noprefetch", f"floor{layout}"
    if floor not in runs:
        return Spread.of([])
    if key != "over_floor":
        return _pair_ratio(runs, cold, nopf, key)
    over = {
        mode: [
            {**run, "over": run["seconds"] - runs[floor][i]["seconds"]}
            for i, run in enumerate(runs[mode][: len(runs[floor])])
        ]
        for mode in (cold, nopf)
        if mode in runs
    }
    return _pair_ratio(over, cold, nopf, "over")


def plot(results: dict, path: Path) -> bool:
    """A PNG: start-to-READY per case and mode; the link sweep as a heat map. False if no mpl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = results.get("sweep", {})
    link_sweep = (results.get("link") or {}).get("sweep") or {}
    panels = (1 if sweep else 0) + (1 if link_sweep else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
    ax_i = 0
    if sweep:
        ax = axes[0][ax_i]
        ax_i += 1
        names = list(sweep)
        width = 0.8 / len(MODES)
        for j, mode in enumerate(MODES):
            mids, los, his = [], [], []
            for name in names:
                s = _secs(sweep[name]["runs"][mode])
                mids.append(s.mid)
                los.append(s.mid - s.lo)
                his.append(s.hi - s.mid)
            xs = [i + (j - (len(MODES) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, mids, width, yerr=[los, his], label=mode, capsize=2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([sweep[n]["case"]["label"] for n in names], rotation=15, fontsize=8)
        ax.set_ylabel("seconds to READY (median, min-max)")
        ax.set_yscale("log")
        from matplotlib.ticker import ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title("Triton start to READY")
        ax.legend(fontsize=8)
    if link_sweep:
        ax = axes[0][ax_i]
        link = results["link"]
        parts = sorted({int(k.split("x")[0]) for k in link_sweep})
        concs = sorted({int(k.split("x")[1]) for k in link_sweep})
        grid = []
        for p in parts:
            row = []
            for c in concs:
                rs = [r for r in link_sweep.get(f"{p}x{c}", []) if not r["error"]]
                med = statistics.median(r.get("wire_Bps", NAN) for r in rs) if rs else NAN
                row.append(med / 1e6)
            grid.append(row)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                ax.text(j, i, f"{val:.0f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(concs)))
        ax.set_xticklabels([str(c) for c in concs])
        ax.set_yticks(range(len(parts)))
        ax.set_yticklabels([f"{p} MiB" for p in parts])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("part size")
        ax.set_title(
            f"link MB/s while fetching (cap {link['per_conn_Bps'] / 1e6:.0f}/conn, "
            f"{link['total_Bps'] / 1e6:.0f} total)"
        )
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.coldstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller, fewer: a few minutes")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 2 quick, 5 full)")
    p.add_argument("--cases", nargs="*", default=None, help="case names (default: all for mode)")
    p.add_argument("--skip-sweep", action="store_true", help="no size/file-count sweep")
    p.add_argument("--skip-link", action="store_true", help="no cloud-like link section")
    p.add_argument("--skip-micro", action="store_true", help="no micro-benchmarks")
    p.add_argument("--per-conn-mbps", type=float, default=20.0, help="link: MB/s per connection")
    p.add_argument("--total-mbps", type=float, default=160.0, help="link: MB/s in total")
    p.add_argument("--latency-ms", type=float, default=20.0, help="link: ms added per request")
    p.add_argument("--link-reps", type=int, default=None, help="link: repetitions")
    p.add_argument("--sweep-reps", type=int, default=None, help="link: sweep repetitions")
    p.add_argument("--part-sizes", type=int, nargs="*", default=[4, 8, 16, 32], help="MiB")
    p.add_argument("--concurrencies", type=int, nargs="*", default=[4, 8, 16])
    p.add_argument("--stock-moto", action="store_true", help="moto without the ranged-read fix")
    p.add_argument("--workdir", default=None, help="scratch parent directory (default /tmp)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--tag", default=None, help="results file name tag (default quick/full)")
    p.add_argument("--render", type=Path, default=None, help="re-render a results JSON and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write markdown, JSON and PNG; print the markdown."""
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        md = render(results)
        args.render.with_suffix(".md").write_text(md)
        plot(results, args.render.with_suffix(".png"))
        print(md)
        return 0
    tag = args.tag or ("quick" if args.quick else "full")
    reps = args.reps or (2 if args.quick else 5)
    work = make_workdir(args.workdir)
    need = (6 if args.quick else 14) * GiB
    if free_disk(work) < need:
        force_rmtree(work)
        raise SystemExit(f"need about {need >> 30} GiB free under {work.parent}; see df -h")
    started = time.monotonic()
    code_version = _code_version()
    results: dict[str, Any] = {"notes": []}
    moto, rig = start_rig(stock_moto=args.stock_moto)
    try:
        harness = Harness(work, rig)
        if not args.skip_sweep:
            results["sweep"] = {}
            for case in cases_for(args.quick, args.cases):
                results["sweep"][case.name] = run_case(harness, rig, case, reps, work)
        if not args.skip_link:
            results["link"] = run_link(harness, rig, work, args)
        if not args.skip_micro:
            from .micro import run_micro

            results["micro"] = run_micro(rig, work, args.quick)
    finally:
        rig.close()
        moto.close()
        force_rmtree(work)
    results["meta"] = {
        "mode": tag,
        "command": " ".join([".venv/bin/python -m bench.coldstart", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPUs, {_mem_gib():.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, Triton 2.51 (nvidia-pytriton)",
        "storage": (
            "stock moto"
            if args.stock_moto
            else "moto with the ranged-read fix (bench/moto_ranged.py)"
        )
        + " behind CountingProxy on 127.0.0.1",
        "runtime_s": time.monotonic() - started,
        "prefetch_supported": prefetch_supported(),
        "code": code_version,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"coldstart-{tag}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    md = render(results)
    base.with_suffix(".md").write_text(md)
    if not plot(results, base.with_suffix(".png")):
        log("matplotlib unavailable: no PNG (pip install -e '.[bench]')")
    print(md)
    log(f"wrote {base}.md/.json/.png in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def _code_version() -> str:
    """The commit measured, and which cacheagent files differ from it (work in progress)."""
    import subprocess

    from .common import REPO_ROOT

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.rstrip("\n")

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "cacheagent").splitlines()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / (1 << 20)
    except OSError:
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
