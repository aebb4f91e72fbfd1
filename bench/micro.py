"""Micro-benchmarks of cacheagent's pieces: hashing, the hit path, the worker's memory.

Run alone with ``python -m bench.micro [--quick]`` (it starts its own moto), or as
part of ``python -m bench.coldstart``. What it measures:

* **hashing**: streaming xxh3-128 over 8 MiB parts in one thread (GB/s), and the
  store's write path (``BlobWriter.write`` = pwrite + hash, then ``commit`` =
  fsync + rename), next to the rig's raw link rate (concurrent ranged GETs
  through the proxy, no disk, no hash) and what ``cacheagent warm`` achieved.
* **hit path** of a LOAD, run in a fresh process the way the worker runs it
  (``cacheagent.triton.actions.handle``): imports, the first LOAD of a process (which
  builds the storage client), then steady-state LOADs split into the listing
  (``cacheagent.remote.listing.list_manifest``) and the rest (index lookup, size checks
  of every file, lease); plus publishing a 300-file snapshot from held blobs
  (the hardlinks a miss with all content already cached costs).
* **worker start**: the real worker (``python -m cacheagent.triton.worker``) and the
  benchmark's do-nothing worker (``floor_worker.py``), each spawned fresh and
  sent one hit LOAD the way the shim sends it, alternately: seconds from spawn
  to the answer. Their difference is what a warm Triton start pays for the real
  worker over any agent's floor.
* **peak RSS** of ``cacheagent warm`` while fetching one large file (2 GiB; 512
  MiB with ``--quick``), read from that process's own rusage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from harness.agent_requests import agent_request
from harness.emulators import StorageRig

from .common import (
    REPO_ROOT,
    GiB,
    MiB,
    cacheagent_warm,
    drop_case,
    force_rmtree,
    log,
    make_workdir,
    many_files_case,
    one_file_case,
    random_bytes,
    start_rig,
    upload_case,
)

PART = 8 * MiB


def hash_rate(total: int = 512 * MiB) -> dict[str, float]:
    """xxh3-128 over ``total`` bytes fed in 8 MiB parts, as the fetcher feeds it (GB/s)."""
    # Distinct data the size of a real file: hashing one 8 MiB part again and
    # again would run from the CPU cache and report an impossible rate.
    data = memoryview(random_bytes(total, 7))
    rates = []
    for _ in range(3):
        hasher = xxhash.xxh3_128()
        started = time.perf_counter()
        for offset in range(0, total, PART):
            hasher.update(data[offset : offset + PART])
        hasher.hexdigest()
        rates.append(total / (time.perf_counter() - started) / 1e9)
    return {"xxh3_128_GBps": max(rates), "xxh3_128_GBps_median": statistics.median(rates)}


def store_write_rate(work: Path, total: int = 512 * MiB) -> dict[str, float]:
    """The store's receive path: parts written with pwrite and hashed in order, then committed."""
    from cacheagent.local.store import Store

    store = Store(work / "micro-store")
    part = random_bytes(PART, 8)
    try:
        started = time.perf_counter()
        writer = store.new_blob(total)
        for offset in range(0, total, PART):
            writer.write(offset, part)
        write_done = time.perf_counter()
        writer.commit()
        done = time.perf_counter()
    finally:
        force_rmtree(work / "micro-store")
    return {
        "store_write_hash_GBps": total / (write_done - started) / 1e9,
        "store_write_hash_commit_GBps": total / (done - started) / 1e9,
        "commit_fsync_s": done - write_done,
    }


def small_blobs_rate(work: Path, count: int = 300, size: int = 32 * 1024) -> dict[str, float]:
    """Per-file local cost of storing many small blobs (write, hash, fsync, rename), no network."""
    from cacheagent.local.store import Store

    store = Store(work / "micro-small")
    data = [random_bytes(size, 1000 + i) for i in range(count)]
    try:
        started = time.perf_counter()
        for chunk in data:
            writer = store.new_blob(size)
            writer.write(0, chunk)
            writer.commit()
        elapsed = time.perf_counter() - started
    finally:
        force_rmtree(work / "micro-small")
    return {"small_blob_ms_each": elapsed / count * 1000, "small_blobs": count, "size": size}


def raw_link_rate(rig: StorageRig, key: str, size: int, concurrency: int = 8) -> float:
    """MB/s of concurrent 8 MiB ranged GETs through the proxy (no disk, no hashing)."""
    fs = rig.proxied_fs()
    path = rig.key(key)

    def read(i: int) -> int:
        return len(fs.cat_file(path, start=i * PART, end=min((i + 1) * PART, size)))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = sum(pool.map(read, range((size + PART - 1) // PART)))
    elapsed = time.perf_counter() - started
    assert got == size, (got, size)
    return size / elapsed / 1e6


# The hit-path probe runs in a fresh interpreter, as the worker does after Triton starts it.
_PROBE = r"""
import json, os, sys, time
T = time.perf_counter
t = T(); import cacheagent.triton.worker; imp_worker = T() - t
t = T(); from cacheagent.triton import actions; imp_actions = T() - t
from cacheagent.cache import Cache
from cacheagent.remote.location import parse_location
from cacheagent.remote.listing import list_manifest
from cacheagent.remote.clients import filesystem_for
location, model, cache_dir, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
request = {"action": "LOAD", "artifact_type": "REMOTE_FILESYSTEM", "location": location,
           "params": {"cache_dir": cache_dir}, "config": {"name": model},
           "server_pid": os.getpid(), "handle": "0xbench"}
lines = []
def load():
    t = T(); actions.handle(request, lambda level, msg: lines.append(msg)); return T() - t
first = load()
first_line = lines[-1]
loads = [load() for _ in range(repeat)]
loc = parse_location(location)
fs = filesystem_for(loc)
lists = []
for _ in range(repeat):
    t = T(); manifest = list_manifest(loc, fs); lists.append(T() - t)
cache = Cache(cache_dir)
record = cache.index.get_snapshot(manifest.key)
links = []
for i in range(3):
    items = sorted((f[0], f[4]) for f in record.files)
    t = T(); path = cache.store.publish_snapshot(f"bench-relink-{i}", items); links.append(T() - t)
    cache.store.remove_snapshot(f"bench-relink-{i}")
print(json.dumps({"import_worker_s": imp_worker, "import_actions_s": imp_actions,
                  "first_load_s": first, "first_line": first_line, "loads_s": loads,
                  "lists_s": lists, "publish_s": links, "files": len(record.files)}))
"""


def hit_probe(rig: StorageRig, location: str, model: str, cache_dir: Path, repeat: int) -> dict:
    """Run the hit-path probe in a fresh interpreter on a warmed cache; return its numbers."""
    env = {**os.environ, **rig.env}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, location, model, str(cache_dir), str(repeat)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    data = json.loads(done.stdout.strip().splitlines()[-1])
    # Also: the first s3fs import and first listing in a fresh process (the client build).
    first = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time,sys; T=time.perf_counter; t=T(); import s3fs; a=T()-t\n"
            "from cacheagent.remote.location import parse_location\n"
            "from cacheagent.remote.listing import list_manifest\n"
            "from cacheagent.remote.clients import filesystem_for\n"
            "loc=parse_location(sys.argv[1]); fs=filesystem_for(loc)\n"
            "t=T(); list_manifest(loc, fs); b=T()-t\n"
            "t=T(); list_manifest(loc, fs); c=T()-t\n"
            "print(a, b, c)",
            location,
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if first.returncode == 0:
        a, b, c = (float(x) for x in first.stdout.split())
        data.update(import_s3fs_s=a, first_list_s=b, second_list_s=c)
    return data


def worker_start_probe(
    rig: StorageRig, location: str, model: str, cache_dir: Path, floor_root: Path, repeat: int
) -> dict[str, list[float]]:
    """Spawn-to-answer seconds of one hit LOAD: the real worker and the floor worker."""
    request = agent_request("LOAD", location, {"cache_dir": str(cache_dir)}, model=model)
    line = (json.dumps({"id": 1, **request}) + "\n").encode()
    commands = {
        "real": [sys.executable, "-m", "cacheagent.triton.worker"],
        "floor": [sys.executable, str(REPO_ROOT / "bench" / "floor_worker.py")],
    }
    env = {**os.environ, **rig.env, "BENCH_FLOOR_ROOT": str(floor_root)}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            started = time.perf_counter()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=REPO_ROOT,
            )
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line)
            proc.stdin.flush()
            answer = b""
            while not answer.startswith((b"OK", b"ERR")):
                answer = proc.stdout.readline()
                if not answer:
                    break
            elapsed = time.perf_counter() - started
            proc.stdin.close()
            proc.wait(timeout=60)
            if answer.startswith(b"OK"):
                times[name].append(elapsed)
    return times


def rss_probe(rig: StorageRig, work: Path, size: int, settings: list[list[str]]) -> list[dict]:
    """Peak RSS of ``cacheagent warm`` fetching one ``size``-byte file, for each setting."""
    case = one_file_case("rss", size, "rss")
    log(f"micro: uploading {size >> 20} MiB for the RSS probe")
    repos = upload_case(rig, case, work, "rss")
    force_rmtree(repos.local)  # only the bucket copy is needed
    out = []
    try:
        for extra in settings:
            cache = work / "rss-cache"
            run = cacheagent_warm(rig, f"{repos.agent}/{case.models[0].name}", cache, extra)
            force_rmtree(cache)
            out.append(
                {
                    "args": " ".join(extra) or "(defaults)",
                    "size": size,
                    "peak_rss": run.peak_rss,
                    "ru_maxrss_wait4": run.ru_maxrss,
                    "wall_s": run.wall_seconds,
                    "fetch_s": run.fetch_seconds,
                    "MBps": size / run.fetch_seconds / 1e6 if run.fetch_seconds else None,
                    "error": run.error,
                }
            )
            log(
                f"micro: rss {out[-1]['args']}: {run.peak_rss / MiB:.0f} MiB peak, "
                f"{run.fetch_seconds:.2f} s"
            )
        key = f"rss/native/{case.models[0].name}/1/extra.bin"
        link = raw_link_rate(rig, key, size)
        for row in out:
            row["raw_link_MBps"] = link
    finally:
        drop_case(rig, "rss", work)
    return out


def run_micro(rig: StorageRig, work: Path, quick: bool) -> dict[str, Any]:
    """All micro-benchmarks on one rig; returns a JSON-able dict."""
    result: dict[str, Any] = {}
    log("micro: hashing")
    result["hash"] = hash_rate(256 * MiB if quick else 1 * GiB)
    result["store"] = store_write_rate(work, 256 * MiB if quick else 1 * GiB)
    result["small_blobs"] = small_blobs_rate(work)

    log("micro: hit path")
    cases = [
        many_files_case("h300", 300, 32 * 1024, "300 files"),
        one_file_case("h1", 4 * MiB, "1 file"),
    ]
    hits = {}
    for case in cases:
        repos = upload_case(rig, case, work, case.name)
        model = case.models[0].name
        cache_dir = work / f"hit-cache-{case.name}"
        try:
            warm = cacheagent_warm(rig, f"{repos.agent}/{model}", cache_dir)
            if warm.error:
                hits[case.name] = {"error": warm.error}
                continue
            hits[case.name] = hit_probe(
                rig, f"{repos.agent}/{model}", model, cache_dir, 5 if quick else 15
            )
            hits[case.name]["label"] = case.label
            hits[case.name]["worker_start"] = worker_start_probe(
                rig, f"{repos.agent}/{model}", model, cache_dir, work / "local" / case.name,
                7 if quick else 21,
            )  # fmt: skip
        finally:
            force_rmtree(cache_dir)
            drop_case(rig, case.name, work)
    result["hit"] = hits

    size = 512 * MiB if quick else 2 * GiB
    settings = [[]] if quick else [[], ["--concurrency", "16", "--part-size", "32MiB"]]
    result["rss"] = rss_probe(rig, work, size, settings)
    return result


def render_micro(micro: dict[str, Any]) -> str:
    """Markdown for the micro-benchmark results."""
    from .common import md_table

    out = ["## Micro-benchmarks", ""]
    h, s = micro["hash"], micro["store"]
    rss = micro.get("rss") or []
    link = rss[0].get("raw_link_MBps") if rss else None
    achieved = [r["MBps"] for r in rss if r.get("MBps")]
    rows = [
        ["xxh3-128, one thread, 8 MiB parts", f"{h['xxh3_128_GBps']:.2f} GB/s"],
        ["store receive path (pwrite + hash)", f"{s['store_write_hash_GBps']:.2f} GB/s"],
        ["... plus commit (fsync + rename)", f"{s['store_write_hash_commit_GBps']:.2f} GB/s"],
        [
            f"{micro['small_blobs']['small_blobs']} small blobs of 32 KiB, local cost each",
            f"{micro['small_blobs']['small_blob_ms_each']:.2f} ms",
        ],
    ]
    if link:
        rows.append(["raw link: 8 concurrent 8 MiB ranged GETs via proxy", f"{link:.0f} MB/s"])
    if achieved:
        rows.append(["`cacheagent warm`, defaults, unthrottled", f"{achieved[0]:.0f} MB/s"])
    out += [md_table(["what", "rate"], rows), ""]

    out += ["### Hit path of one LOAD (fresh worker-like process, `actions.handle`)", ""]
    rows = []
    for name, hit in micro["hit"].items():
        if "error" in hit:
            rows.append([name, "error", "", "", "", "", "", ""])
            continue
        loads = statistics.median(hit["loads_s"])
        lists = statistics.median(hit["lists_s"])
        rows.append(
            [
                f"{hit['label']} ({hit['files']} files)",
                f"{hit['import_actions_s']:.3f}",
                f"{hit.get('import_s3fs_s', float('nan')):.3f}",
                f"{hit['first_load_s']:.3f}",
                f"{loads:.3f}",
                f"{lists:.3f}",
                f"{max(loads - lists, 0.0):.3f}",
                f"{statistics.median(hit['publish_s']):.3f}",
            ]
        )
    out += [
        md_table(
            [
                "model",
                "import actions s",
                "import s3fs s (not on the S3 fast path)",
                "first LOAD s",
                "steady LOAD s",
                "listing s",
                "rest (index, size checks, lease) s",
                "publish = hardlink all files s",
            ],
            rows,
        ),
        "",
    ]
    starts = [
        (hit["label"], hit["worker_start"])
        for hit in micro["hit"].values()
        if "worker_start" in hit
    ]
    if starts:
        out += ["### A fresh worker: spawn to the answer of one hit LOAD (median seconds)", ""]
        rows = []
        for label, ws in starts:
            real = statistics.median(ws["real"]) if ws["real"] else float("nan")
            floor = statistics.median(ws["floor"]) if ws["floor"] else float("nan")
            rows.append([label, f"{real:.3f}", f"{floor:.3f}", f"{real - floor:.3f}"])
        header = ["model", "cacheagent worker", "do-nothing worker", "difference"]
        out += [md_table(header, rows), ""]
    if rss:
        out += ["### Peak RSS of `cacheagent warm` (one large file)", ""]
        out += [
            md_table(
                ["size", "settings", "peak RSS", "fetch s", "MB/s"],
                [
                    [
                        f"{r['size'] / GiB:.1f} GiB",
                        r["args"],
                        f"{r['peak_rss'] / MiB:.0f} MiB",
                        f"{r['fetch_s']:.2f}",
                        f"{r['MBps']:.0f}" if r.get("MBps") else "n/a",
                    ]
                    for r in rss
                ],
            ),
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the micro-benchmarks alone and print markdown."""
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--workdir", default=None, help="scratch parent dir (default: /tmp)")
    args = parser.parse_args(argv)
    work = make_workdir(args.workdir)
    moto, rig = start_rig()
    try:
        micro = run_micro(rig, work, args.quick)
    finally:
        rig.close()
        moto.close()
        force_rmtree(work)
    print(render_micro(micro))
    print(json.dumps(micro, indent=1, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
