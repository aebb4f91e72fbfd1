"""The ``cacheagent`` command: warm, inspect, verify and evict the cache; install into Triton."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from cacheagent import __version__
from cacheagent.cache import Cache, Snapshot
from cacheagent.errors import CacheAgentError, InvalidLocationError, InvalidParameterError
from cacheagent.local.atomic import write_text_atomically
from cacheagent.remote.transfer import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, FetchSettings
from cacheagent.sizes import ACCEPTED_SIZE_FORMS, format_size, parse_size
from cacheagent.triton.params import (
    MAX_CONCURRENCY,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    default_cache_dir,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT, EXIT_REPAIRED = 0, 1, 2, 3, 4


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or EXIT_OK)
    except CacheAgentError as exc:
        print(f"cacheagent: error: {exc}", file=sys.stderr)
        usage = isinstance(exc, (InvalidParameterError, InvalidLocationError))
        return EXIT_USAGE if usage else EXIT_ERROR
    except KeyboardInterrupt:
        print("cacheagent: interrupted; the cache is consistent", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per action."""
    parser = argparse.ArgumentParser(
        prog="cacheagent",
        description="A local, content-addressed cache of Triton model repositories in S3, GCS "
        "and Azure. See 'cacheagent COMMAND --help'.",
    )
    parser.add_argument("--version", action="version", version=f"cacheagent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    warm = _command(commands, "warm", cmd_warm, "fetch a model directory into the cache")
    warm.add_argument("location", help="s3://..., gs://..., as://... or a local path")
    warm.add_argument("--json", action="store_true", help="print one JSON object")
    warm.add_argument("--max-size", type=_size_arg("--max-size"), help="cache budget")
    warm.add_argument(
        "--verify", choices=("size", "hash", "none"), default="size", help="check on a hit"
    )
    warm.add_argument(
        "--no-stale",
        action="store_true",
        help="fail when storage is unreachable instead of serving the last good snapshot",
    )
    warm.add_argument(
        "--concurrency",
        type=_int_arg("--concurrency", 1, MAX_CONCURRENCY),
        default=DEFAULT_CONCURRENCY,
        help=f"parallel requests (1-{MAX_CONCURRENCY}, default {DEFAULT_CONCURRENCY})",
    )
    warm.add_argument(
        "--part-size",
        type=_size_arg("--part-size", MIN_PART_SIZE, MAX_PART_SIZE),
        default=DEFAULT_PART_SIZE,
        help="bytes per ranged request (1MiB-1GiB, default 8MiB)",
    )
    warm.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    ls = _command(commands, "ls", cmd_ls, "list cached snapshots")
    ls.add_argument("--json", action="store_true", help="print JSON")

    stats = _command(commands, "stats", cmd_stats, "show hit ratio, bytes saved, cache size")
    stats.add_argument("--json", action="store_true", help="print JSON (same as --format json)")
    stats.add_argument(
        "--format", choices=("text", "json", "prometheus"), default=None, help="output format"
    )
    stats.add_argument(
        "--output",
        type=_output_file_arg,
        help="write to this file atomically (e.g. for node-exporter's textfile collector)",
    )
    stats.add_argument(
        "--top", type=_int_arg("--top", 0, 1000), default=5, help="snapshots to list (default 5)"
    )
    stats.add_argument("--max-size", type=_size_arg("--max-size"), help="budget to report against")

    evict = _command(commands, "evict", cmd_evict, "evict least-recently-used snapshots")
    evict.add_argument(
        "--max-size",
        type=_size_arg("--max-size"),
        required=True,
        help="size to shrink the cache to",
    )
    evict.add_argument("--dry-run", action="store_true", help="show what would go; delete nothing")
    evict.add_argument("--json", action="store_true", help="print JSON")

    purge = _command(commands, "purge", cmd_purge, "remove everything not in use")
    purge.add_argument("--json", action="store_true", help="print JSON")

    verify = _command(commands, "verify", cmd_verify, "re-hash every blob; repair corruption")
    verify.add_argument("--no-repair", action="store_true", help="report only")
    verify.add_argument("--json", action="store_true", help="print JSON")

    stub = _command(
        commands,
        "stub",
        cmd_stub,
        "write a local stub repository (configs only) whose models the agent fetches from LOCATION",
    )
    stub.add_argument("location", help="the cloud model repository (s3://, gs://, as://, path)")
    stub.add_argument(
        "--out", type=_out_dir_arg, required=True, help="directory to write the stub into"
    )
    stub.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="agent parameter for every model (repeatable), e.g. --param max_size=200GiB",
    )
    stub.add_argument("--json", action="store_true", help="print JSON")

    check = _command(commands, "check", cmd_check, "lint a model repository (local or cloud)")
    check.add_argument("location", help="a model repository or one model directory")
    check.add_argument("--json", action="store_true", help="print JSON")

    install = commands.add_parser(
        "install-triton",
        help="install libtritonrepoagent_cacheagent.so for tritonserver --repoagent-directory",
    )
    install.add_argument("--repoagent-dir", required=True, type=Path, help="Triton's repoagent dir")
    install.set_defaults(run=cmd_install_triton)
    return parser


def _command(
    commands: Any, name: str, run: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument(
        "--cache-dir",
        type=_cache_dir_arg,
        default=None,
        help=f"cache directory (default $CACHEAGENT_CACHE_DIR, else {default_cache_dir()})",
    )
    sub.set_defaults(run=run)
    return sub


def _expand(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~user" naming no user
        raise argparse.ArgumentTypeError(f"{text!r}: '~' names no known user") from None


def _cache_dir_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("the cache directory must not be empty")
    path = _expand(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def _output_file_arg(text: str) -> Path:
    path = _expand(text)
    if not text.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file to write")
    return path


def _out_dir_arg(text: str) -> Path:
    path = _expand(text)
    if not text.strip() or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def _size_arg(flag: str, low: int = 0, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = parse_size(text, name=flag)
        except InvalidParameterError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a size; use {ACCEPTED_SIZE_FORMS}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range ({format_size(low)} to {format_size(high or 0)})"
            )
        return value

    return parse


def _int_arg(flag: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {low} to {high}")
        return int(text)

    return parse


def _open(args: argparse.Namespace, **kwargs: Any) -> Cache:
    return Cache(args.cache_dir, **kwargs)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=None, default=str) if getattr(args, "json", False) else text)


# -- commands ---------------------------------------------------------------


def cmd_warm(args: argparse.Namespace) -> int:
    """Fetch a model directory; print the snapshot path (or JSON)."""
    with _open(
        args,
        max_size=args.max_size,
        verify=args.verify,
        stale_if_error=not args.no_stale,
        fetch_settings=FetchSettings(args.concurrency, args.part_size),
    ) as cache:
        bar = ProgressBar(sys.stderr, enabled=not args.no_progress and sys.stderr.isatty())
        snapshot = cache.fetch(args.location, progress=bar.advance, on_plan=bar.plan)
        bar.close()
    if snapshot.warning:
        print(f"cacheagent: warning: {snapshot.warning}", file=sys.stderr)
    _emit(args, snapshot_json(snapshot), str(snapshot.path))
    return EXIT_OK


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The JSON form of a fetch result."""
    return {
        "path": str(snapshot.path),
        "key": snapshot.key,
        "source": snapshot.source,
        "hit": snapshot.hit,
        "stale": snapshot.stale,
        "bytes_fetched": snapshot.bytes_fetched,
        "files_fetched": snapshot.files_fetched,
        "files": snapshot.files,
        "size": snapshot.size,
        "seconds": round(snapshot.seconds, 4),
        **({"warning": snapshot.warning} if snapshot.warning else {}),
    }


def cmd_ls(args: argparse.Namespace) -> int:
    """List snapshots: source, model, versions, size, last use, leases."""
    with _open(args) as cache:
        leases = cache.leases()
        rows = []
        for record in cache.snapshots():
            live = [lease for lease in leases if lease.key == record.key and lease.is_live()]
            rows.append(
                {
                    "key": record.key,
                    "source": record.source,
                    "model": record.model,
                    "versions": record.versions,
                    "files": len(record.files),
                    "size": record.size,
                    "last_used": record.last_used,
                    "leases": [{"id": lease.lease_id, "pid": lease.pid} for lease in live],
                    "path": str(cache.store.snapshot_path(record.key)),
                }
            )
    lines = [
        f"{'KEY':12}  {'MODEL':16} {'VERSIONS':10} {'SIZE':>10}  {'LAST USE':19} LEASES SOURCE"
    ]
    for row in rows:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["last_used"]))
        lines.append(
            f"{row['key'][:12]}  {row['model'][:16]:16} {','.join(row['versions'])[:10]:10} "
            f"{format_size(row['size']):>10}  {used:19} {len(row['leases']):6} {row['source']}"
        )
    if not rows:
        lines.append("(no snapshots)")
    _emit(args, rows, "\n".join(lines))
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """Show counters and sizes (text, JSON or Prometheus), optionally into a file."""
    fmt = args.format or ("json" if args.json else "text")
    with _open(args, max_size=args.max_size) as cache:
        stats = cache.stats()
        snapshots = cache.snapshots()
    top_size = sorted(snapshots, key=lambda r: r.size, reverse=True)[: args.top]
    top_recent = snapshots[: args.top]
    data = {
        **stats.counters,
        "hit_ratio": round(stats.hit_ratio, 4),
        "size": stats.size,
        "max_size": stats.max_size,
        "snapshots": stats.snapshots,
        "blobs": stats.blobs,
        "live_leases": stats.live_leases,
    }
    data["top_by_size"] = [_snapshot_brief(r) for r in top_size]
    data["top_by_last_use"] = [_snapshot_brief(r) for r in top_recent]
    budget = f" of {format_size(stats.max_size)}" if stats.max_size else ""
    lines = (
        [
            f"hit ratio        {stats.hit_ratio:.1%} ({stats.counters['hits']} hits, "
            f"{stats.counters['misses']} misses, {stats.counters['stale_served']} stale)",
            f"bytes fetched    {format_size(stats.counters['bytes_fetched'])}",
            f"bytes saved      {format_size(stats.counters['bytes_served_from_cache'])}",
            f"evictions        {stats.counters['evictions']} "
            f"({format_size(stats.counters['bytes_evicted'])})",
            f"cache size       {format_size(stats.size)}{budget} in {stats.blobs} blobs, "
            f"{stats.snapshots} snapshots, {stats.live_leases} live leases",
        ]
        + (["", "largest snapshots:"] if top_size else [])
        + [f"  {format_size(r.size):>10}  {r.model:20} {r.source}" for r in top_size]
        + (["", "most recently used:"] if top_recent else [])
        + [f"  {_when(r.last_used)}  {r.model:20} {r.source}" for r in top_recent]
    )
    if fmt == "prometheus":
        output = prometheus_text(data)
    elif fmt == "json":
        output = json.dumps(data, default=str)
    else:
        output = "\n".join(lines)
    if args.output:
        write_text_atomically(args.output, output + "\n")
    else:
        print(output)
    return EXIT_OK


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _snapshot_brief(record: Any) -> dict[str, Any]:
    return {
        "key": record.key,
        "model": record.model,
        "source": record.source,
        "size": record.size,
        "last_used": record.last_used,
    }


PROMETHEUS_COUNTERS = {
    "hits": "Snapshot lookups served from the cache",
    "misses": "Snapshot lookups that fetched from storage",
    "stale_served": "Loads served a possibly stale snapshot because storage was unreachable",
    "bytes_fetched": "Bytes of model files downloaded from storage",
    "bytes_served_from_cache": "Bytes of model files served from the cache instead of storage",
    "evictions": "Snapshots evicted to keep the cache within budget",
    "bytes_evicted": "Bytes of snapshots evicted",
    "corrupt_repaired": "Corrupt snapshots detected and dropped for re-fetch",
}
PROMETHEUS_GAUGES = {
    "size": ("cache_size_bytes", "Bytes the cache holds on disk"),
    "max_size": ("cache_max_size_bytes", "The cache budget (absent when unlimited)"),
    "snapshots": ("snapshots", "Snapshots in the cache"),
    "blobs": ("blobs", "Distinct blobs in the cache"),
    "live_leases": ("live_leases", "Snapshots leased by running processes"),
    "hit_ratio": ("hit_ratio", "Hits over hits plus misses"),
}


def prometheus_text(data: dict[str, Any]) -> str:
    """The stats in Prometheus text exposition format (counters and gauges)."""
    lines: list[str] = []
    for key, help_text in PROMETHEUS_COUNTERS.items():
        metric = f"cacheagent_{key}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        lines.append(f"{metric} {int(data.get(key, 0))}")
    for key, (name, help_text) in PROMETHEUS_GAUGES.items():
        if data.get(key) is None:
            continue
        metric = f"cacheagent_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {data[key]}"]
    return "\n".join(lines)


def cmd_evict(args: argparse.Namespace) -> int:
    """Evict LRU snapshots until the cache fits --max-size."""
    with _open(args) as cache:
        report = cache.evict(args.max_size, dry_run=args.dry_run)
    verb = "would evict" if report.dry_run else "evicted"
    lines = [
        f"{verb} {record.key[:12]} {record.model} {format_size(record.size)} {record.source}"
        for record in report.evicted
    ]
    lines.append(
        f"{verb} {len(report.evicted)} snapshot(s), freeing {format_size(report.freed_bytes)}: "
        f"{format_size(report.size_before)} -> {format_size(report.size_after)} "
        f"(budget {format_size(args.max_size)}; {report.kept_leased} leased kept)"
    )
    data = {
        "dry_run": report.dry_run,
        "evicted": [
            {"key": r.key, "model": r.model, "source": r.source, "size": r.size}
            for r in report.evicted
        ],
        "freed_bytes": report.freed_bytes,
        "size_before": report.size_before,
        "size_after": report.size_after,
        "kept_leased": report.kept_leased,
    }
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove every snapshot and blob no live process uses."""
    with _open(args) as cache:
        freed = cache.purge()
        left = len(cache.snapshots())
    _emit(
        args,
        {"freed_bytes": freed, "snapshots_left": left},
        f"purged {format_size(freed)}; {left} leased snapshot(s) kept",
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every blob, report corruption, and repair it unless --no-repair."""
    with _open(args) as cache:
        report = cache.verify(repair=not args.no_repair)
    bad = bool(report.corrupt_blobs or report.broken_snapshots)
    text = f"checked {report.blobs_checked} blobs and {report.snapshots_checked} snapshots: " + (
        f"{len(report.corrupt_blobs)} corrupt blob(s), {len(report.broken_snapshots)} broken "
        "snapshot(s)"
        + (
            "; removed, they are fetched again at the next load"
            if report.repaired
            else "; run without --no-repair to repair"
        )
        if bad
        else "all intact"
    )
    _emit(
        args,
        {
            "blobs_checked": report.blobs_checked,
            "snapshots_checked": report.snapshots_checked,
            "corrupt_blobs": report.corrupt_blobs,
            "broken_snapshots": report.broken_snapshots,
            "repaired": report.repaired,
        },
        text,
    )
    if not bad:
        return EXIT_OK
    # Non-zero even when repaired: monitoring should hear that a disk corrupted data.
    return EXIT_REPAIRED if report.repaired else EXIT_CORRUPT


def cmd_stub(args: argparse.Namespace) -> int:
    """Write a stub repository of LOCATION's configs into --out."""
    from cacheagent.triton.stub import write_stub

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidParameterError(f"--param {item!r}: use KEY=VALUE, e.g. max_size=200GiB")
        params[key.strip()] = value.strip()
    if args.cache_dir:
        params.setdefault("cache_dir", str(args.cache_dir.absolute()))
    try:
        report = write_stub(args.location, args.out, params)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"--param: {exc}") from None
    lines = [f"wrote {args.out / name / 'config.pbtxt'}" for name in report.written]
    lines += [f"skipped {name}: {why}" for name, why in report.skipped.items()]
    lines.append(
        f"{len(report.written)} model(s) stubbed; start Triton with "
        f"--model-repository={args.out.absolute()} and the agent installed"
    )
    _emit(args, {"written": report.written, "skipped": report.skipped}, "\n".join(lines))
    return EXIT_OK if report.written else EXIT_ERROR


def cmd_check(args: argparse.Namespace) -> int:
    """Lint a repository; exit 1 on errors."""
    from cacheagent.triton.check import check_repository, format_report, report_json

    report = check_repository(args.location)
    _emit(args, report_json(report), format_report(report))
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_install_triton(args: argparse.Namespace) -> int:
    """Install the agent library and its worker launcher for Triton."""
    from cacheagent.triton.install import install_triton

    target = install_triton(args.repoagent_dir)
    print(f"installed {target}; start tritonserver with --repoagent-directory={args.repoagent_dir}")
    return EXIT_OK


class ProgressBar:
    """A one-line progress bar on a terminal; silent elsewhere."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self.total = self.done = 0
        self.files = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._last_draw = 0.0

    def plan(self, files: int, total: int) -> None:
        """Learn what will be downloaded."""
        self.files, self.total = files, total
        self._draw(force=True)

    def advance(self, amount: int) -> None:
        """Count ``amount`` more bytes."""
        with self._lock:
            self.done += amount
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        fraction = self.done / self.total if self.total else 1.0
        width = 30
        filled = int(width * fraction)
        rate = self.done / max(now - self.started, 1e-6)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%} "
            f"{format_size(self.done)}/{format_size(self.total)} of {self.files} files "
            f"{format_size(rate)}/s "
        )
        self.stream.flush()

    def close(self) -> None:
        """Finish the line."""
        if self.enabled and self.total:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
