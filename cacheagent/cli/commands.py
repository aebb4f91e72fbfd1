"""What each ``cacheagent`` subcommand does; :mod:`cacheagent.cli.parser` defines their flags.

The cache and its index are imported inside the commands, never at import
time, so ``--help`` and ``install-triton`` need none of the storage SDKs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cacheagent.cli.output import (
    Column,
    confirm,
    csv_text,
    emit,
    iso_time,
    stdin_is_terminal,
    table,
    when,
)
from cacheagent.cli.parser import EXIT_CORRUPT, EXIT_ERROR, EXIT_OK, EXIT_REPAIRED
from cacheagent.errors import CacheAgentError, InvalidParameterError
from cacheagent.settings import default_cache_dir
from cacheagent.sizes import format_size
from cacheagent.triton.layout import version_dirs

if TYPE_CHECKING:
    from cacheagent.cache import Cache
    from cacheagent.local.index import SnapshotRecord

log = logging.getLogger("cacheagent.cli")


class NoCacheError(CacheAgentError):
    """A read-only command was pointed at a directory that holds no cache (exit 2)."""


class NotConfirmedError(CacheAgentError):
    """A destructive command was not confirmed (exit 2: nothing was changed)."""


# -- opening the cache --------------------------------------------------------------


def cache_root(args: argparse.Namespace) -> Path:
    """The cache directory the command acts on (absolute)."""
    return Path(args.cache_dir or default_cache_dir()).absolute()


def require_cache(root: Path) -> None:
    """Refuse a directory that holds no cache: inspecting it must not create one."""
    where = (
        "pass the --cache-dir that `cacheagent warm` or the agent's cache_dir parameter uses "
        "(default $CACHEAGENT_CACHE_DIR, else ~/.cache/cacheagent)"
    )
    if not root.exists():
        raise NoCacheError(f"no cache at {root}: the directory does not exist; {where}")
    if not (root / "index").is_dir() and not (root / "snapshots").is_dir():
        raise NoCacheError(f"{root} holds no cacheagent cache (no index, no snapshots); {where}")


def existing_cache(args: argparse.Namespace) -> Cache:
    """The cache at --cache-dir, which must exist already (read-only commands)."""
    root = cache_root(args)
    require_cache(root)
    from cacheagent.cache import Cache

    log.info("cache %s", root)
    return Cache(root)


# -- ls --------------------------------------------------------------------------------

LS_COLUMNS = (
    Column("KEY", 12),
    Column("MODEL", 16),
    Column("VERSIONS", 10),
    Column("SIZE", 10, right=True),
    Column("LAST USE", 19),
    Column("LEASES", 6, right=True),
    Column("SOURCE"),
)
LS_CSV_HEADER = ("key", "model", "versions", "files", "size", "last_used", "leases", "source")


def cmd_ls(args: argparse.Namespace) -> int:
    """List snapshots: filtered, sorted, limited; as a table, JSON, CSV or keys."""
    from cacheagent.cli.targets import apply_filters, sort_records

    with existing_cache(args) as cache:
        records = cache.snapshots()
        live = _live_leases(cache)
        paths = {r.key: str(cache.store.snapshot_path(r.key)) for r in records}
    chosen = sort_records(apply_filters(records, args.filter), args.sort, args.reverse)
    if args.limit is not None:
        chosen = chosen[: args.limit]
    if args.quiet:
        if chosen:
            print("\n".join(r.key for r in chosen))
        return EXIT_OK
    rows = [_ls_row(r, live.get(r.key, []), paths[r.key]) for r in chosen]
    if args.format == "csv":
        print(csv_text(LS_CSV_HEADER, [_csv_cells(row) for row in rows]))
    else:
        emit(args.format, rows, _ls_table(rows, filtered=len(chosen) < len(records)))
    return EXIT_OK


def _live_leases(cache: Cache) -> dict[str, list[Any]]:
    leases: dict[str, list[Any]] = {}
    for lease in cache.leases():
        if lease.is_live():
            leases.setdefault(lease.key, []).append(lease)
    return leases


def _ls_row(record: SnapshotRecord, leases: list[Any], path: str) -> dict[str, Any]:
    return {
        "key": record.key,
        "source": record.source,
        "model": record.model,
        "versions": version_dirs([row[0] for row in record.files], record.empty_dirs),
        "files": len(record.files),
        "size": record.size,
        "last_used": record.last_used,
        "leases": [{"id": lease.lease_id, "pid": lease.pid} for lease in leases],
        "path": path,
    }


def _csv_cells(row: dict[str, Any]) -> list[Any]:
    return [
        row["key"],
        row["model"],
        " ".join(row["versions"]),
        row["files"],
        row["size"],
        iso_time(row["last_used"]),
        len(row["leases"]),
        row["source"],
    ]


def _ls_table(rows: list[dict[str, Any]], filtered: bool) -> str:
    cells = [
        [
            row["key"],
            row["model"],
            ",".join(row["versions"]),
            format_size(row["size"]),
            when(row["last_used"]),
            str(len(row["leases"])),
            row["source"],
        ]
        for row in rows
    ]
    text = table(LS_COLUMNS, cells)
    if not rows:
        text += "\n(no snapshots match)" if filtered else "\n(no snapshots)"
    return text


# -- stats -------------------------------------------------------------------------------


def stats_data(cache: Cache, max_size: int | None, top: int) -> tuple[dict[str, Any], list[str]]:
    """Counters, sizes and top snapshots, as ``stats --format json`` prints them.

    Also returns the names of the counters among the keys (for Prometheus).
    """
    stats = cache.stats(max_size)
    snapshots = cache.snapshots()
    top_size = sorted(snapshots, key=lambda r: r.size, reverse=True)[:top]
    data = {
        **stats.counters,
        "hit_ratio": round(stats.hit_ratio, 4),
        "size": stats.size,
        "max_size": stats.max_size,
        "snapshots": stats.snapshots,
        "blobs": stats.blobs,
        "live_leases": stats.live_leases,
        "top_by_size": [_snapshot_brief(r) for r in top_size],
        "top_by_last_use": [_snapshot_brief(r) for r in snapshots[:top]],
    }
    return data, list(stats.counters)


def _snapshot_brief(record: SnapshotRecord) -> dict[str, Any]:
    return {
        "key": record.key,
        "model": record.model,
        "source": record.source,
        "size": record.size,
        "last_used": record.last_used,
    }


def _stats_text(data: dict[str, Any]) -> str:
    budget = f" of {format_size(data['max_size'])}" if data["max_size"] else ""
    lines = [
        f"hit ratio        {data['hit_ratio']:.1%} ({data['hits']} hits, "
        f"{data['misses']} misses, {data['stale_served']} stale)",
        f"bytes fetched    {format_size(data['bytes_fetched'])}",
        f"bytes saved      {format_size(data['bytes_served_from_cache'])}",
        f"evictions        {data['evictions']} ({format_size(data['bytes_evicted'])})",
        f"cache size       {format_size(data['size'])}{budget} in {data['blobs']} blobs, "
        f"{data['snapshots']} snapshots, {data['live_leases']} live leases",
    ]
    if data["top_by_size"]:
        lines += ["", "largest snapshots:"]
        lines += [
            f"  {format_size(r['size']):>10}  {r['model']:20} {r['source']}"
            for r in data["top_by_size"]
        ]
    if data["top_by_last_use"]:
        lines += ["", "most recently used:"]
        lines += [
            f"  {when(r['last_used'])}  {r['model']:20} {r['source']}"
            for r in data["top_by_last_use"]
        ]
    return "\n".join(lines)


def prometheus_for(args: argparse.Namespace, max_size: int | None) -> str:
    """The Prometheus exposition of the cache at --cache-dir, read now."""
    from cacheagent.cli.prometheus import exposition

    with existing_cache(args) as cache:
        data, counters = stats_data(cache, max_size, top=0)
    return exposition(data, {name: data[name] for name in counters}, str(cache_root(args)))


def cmd_stats(args: argparse.Namespace) -> int:
    """Show counters and sizes (text, JSON or Prometheus), into a file, or serve them."""
    # None: the cache reports against the node's budget ($CACHEAGENT_MAX_SIZE).
    max_size = getattr(args, "max_size", None)
    if args.serve is not None:
        return _serve_stats(args, max_size)
    if args.format == "prometheus":
        output = prometheus_for(args, max_size).rstrip("\n")
    else:
        with existing_cache(args) as cache:
            data, _ = stats_data(cache, max_size, args.top)
        output = emitted(args.format, data, _stats_text(data))
    if args.output:
        from cacheagent.local.atomic import write_text_atomically

        write_text_atomically(args.output, output + "\n")
    else:
        print(output)
    return EXIT_OK


def emitted(fmt: str, data: Any, text: str) -> str:
    """What :func:`emit` would print, as a string."""
    import json

    return json.dumps(data, default=str) if fmt == "json" else text


def _serve_stats(args: argparse.Namespace, max_size: int | None) -> int:
    from cacheagent.cli.prometheus import serve_metrics

    if args.output or args.format not in ("text", "prometheus"):
        raise InvalidParameterError(
            "--serve serves the Prometheus format on /metrics; drop --output and --format"
        )
    require_cache(cache_root(args))  # refuse now, not at the first scrape
    serve_metrics(args.serve, lambda: prometheus_for(args, max_size))
    return EXIT_OK


# -- evict, purge, rm --------------------------------------------------------------------


def cmd_evict(args: argparse.Namespace) -> int:
    """Evict LRU snapshots until the cache fits --max-size."""
    with existing_cache(args) as cache:
        report = cache.evict(args.max_size, dry_run=args.dry_run)
    verb = "would evict" if report.dry_run else "evicted"
    lines = [
        f"{verb} {record.key[:12]} {record.model} {format_size(record.size)} {record.source}"
        for record in report.evicted
    ]
    budget = format_size(args.max_size) if args.max_size is not None else "none"
    lines.append(
        f"{verb} {len(report.evicted)} snapshot(s), freeing {format_size(report.freed_bytes)}: "
        f"{format_size(report.size_before)} -> {format_size(report.size_after)} "
        f"(budget {budget}; {report.kept_leased} leased kept)"
    )
    data = {
        "dry_run": report.dry_run,
        "evicted": [_snapshot_brief(r) for r in report.evicted],
        "freed_bytes": report.freed_bytes,
        "size_before": report.size_before,
        "size_after": report.size_after,
        "kept_leased": report.kept_leased,
    }
    emit(args.format, data, "\n".join(lines))
    return EXIT_OK


def bytes_freed_by(removed: Sequence[SnapshotRecord], records: Sequence[SnapshotRecord]) -> int:
    """Bytes removing ``removed`` frees: their blobs that no other snapshot links."""
    gone = {r.key for r in removed}
    kept = {row[4] for r in records if r.key not in gone for row in r.files}
    sizes = {row[4]: int(row[1]) for r in removed for row in r.files}
    return sum(size for digest, size in sizes.items() if digest not in kept)


def confirm_removal(args: argparse.Namespace, what: str) -> None:
    """Ask before removing, on a terminal; without one, insist on --yes."""
    if args.yes or args.dry_run:
        return
    if not stdin_is_terminal():
        raise NotConfirmedError(
            f"not removing {what}: there is no terminal to confirm on; pass --yes to remove "
            "without asking, or --dry-run to see what would go"
        )
    if not confirm(f"remove {what}?"):
        raise NotConfirmedError(f"nothing removed: {what} kept")


def _describe(records: Sequence[SnapshotRecord], freed: int) -> str:
    count = f"{len(records)} snapshot{'s' if len(records) != 1 else ''}"
    return f"{count} ({format_size(freed)})"


def _brief_line(verb: str, record: SnapshotRecord) -> str:
    return f"{verb} {record.key[:12]}  {record.model}  {format_size(record.size)}  {record.source}"


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove every snapshot and blob no live process uses."""
    with existing_cache(args) as cache:
        records = cache.snapshots()
        leased = set(_live_leases(cache))
        doomed = [r for r in records if r.key not in leased]
        estimate = bytes_freed_by(doomed, records)
        data: dict[str, Any] = {
            "dry_run": args.dry_run,
            "removed": [_snapshot_brief(r) for r in doomed],
            "snapshots_left": len(records) - len(doomed),
        }
        if args.dry_run:
            data["freed_bytes"] = estimate
            lines = [_brief_line("would remove", r) for r in doomed]
            lines.append(
                f"would purge {_describe(doomed, estimate)}; "
                f"{len(leased & {r.key for r in records})} leased snapshot(s) kept"
            )
            emit(args.format, data, "\n".join(lines))
            return EXIT_OK
        confirm_removal(args, f"all {_describe(doomed, estimate)} not in use")
        freed = cache.purge()
        left = len(cache.snapshots())
    data.update(freed_bytes=freed, snapshots_left=left)
    emit(args.format, data, f"purged {format_size(freed)}; {left} leased snapshot(s) kept")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove the snapshots the TARGETs name; leased ones are kept and reported (exit 1)."""
    from cacheagent.cli.targets import resolve_targets

    with existing_cache(args) as cache:
        records = cache.snapshots()
        chosen = resolve_targets(records, args.targets)
        estimate = bytes_freed_by(chosen, records)
        if args.dry_run:
            lines = [_brief_line("would remove", r) for r in chosen]
            lines.append(f"would remove {_describe(chosen, estimate)}")
            data = {
                "dry_run": True,
                "removed": [_snapshot_brief(r) for r in chosen],
                "kept_leased": [],
                "freed_bytes": estimate,
            }
            emit(args.format, data, "\n".join(lines))
            return EXIT_OK
        confirm_removal(args, _describe(chosen, estimate))
        before = cache.size()
        removed: list[SnapshotRecord] = []
        kept: list[SnapshotRecord] = []
        for record in chosen:
            (removed if cache.remove(record.key) else kept).append(record)
        freed = before - cache.size()
        holders = _live_leases(cache)
    lines = [_brief_line("removed", r) for r in removed]
    for record in kept:
        pids = ", ".join(str(lease.pid) for lease in holders.get(record.key, [])) or "?"
        lines.append(
            _brief_line("kept", record) + f"  (leased by running process {pids}; "
            "unload the model or stop that server, then run rm again)"
        )
    lines.append(f"removed {len(removed)} snapshot(s), freed {format_size(freed)}")
    data = {
        "dry_run": False,
        "removed": [_snapshot_brief(r) for r in removed],
        "kept_leased": [_snapshot_brief(r) for r in kept],
        "freed_bytes": freed,
    }
    emit(args.format, data, "\n".join(lines))
    return EXIT_ERROR if kept else EXIT_OK


# -- verify --------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash blobs (all, or the TARGETs'); report corruption; repair unless --no-repair."""
    from cacheagent.cli.targets import resolve_targets

    with existing_cache(args) as cache:
        keys = [r.key for r in resolve_targets(cache.snapshots(), args.targets)]
        report = cache.verify(repair=not args.no_repair, keys=keys if args.targets else None)
    data = {
        "blobs_checked": report.blobs_checked,
        "snapshots_checked": report.snapshots_checked,
        "corrupt_blobs": report.corrupt_blobs,
        "broken_snapshots": report.broken_snapshots,
        "leased_left": report.leased_left,
        "relinked_blobs": report.relinked_blobs,
        "repaired": report.repaired,
    }
    bad = bool(report.corrupt_blobs or report.broken_snapshots or report.leased_left)
    emit(args.format, data, _verify_text(data, bad))
    if not bad:
        return EXIT_OK
    # Non-zero even when repaired: monitoring should hear that a disk corrupted data.
    return EXIT_REPAIRED if report.repaired else EXIT_CORRUPT


def _verify_text(data: dict[str, Any], bad: bool) -> str:
    checked = f"checked {data['blobs_checked']} blobs and {data['snapshots_checked']} snapshots: "
    if not bad:
        return checked + "all intact"
    broken, leased = data["broken_snapshots"], data["leased_left"]
    text = (
        checked + f"{len(data['corrupt_blobs'])} corrupt blob(s), "
        f"{len(broken) + len(leased)} broken snapshot(s)"
    )
    if data["repaired"] or (leased and broken):
        text += "; removed, they are fetched again at the next load"
    elif not leased:
        text += "; run without --no-repair to repair"
    if leased:
        keys = ", ".join(key[:12] for key in leased)
        text += (
            f"; left {keys}: leased by a running server (unload the model, then run verify again)"
        )
    return text


# -- stub, check, install-triton -------------------------------------------------------------


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
    emit(args.format, {"written": report.written, "skipped": report.skipped}, "\n".join(lines))
    return EXIT_OK if report.written else EXIT_ERROR


def cmd_check(args: argparse.Namespace) -> int:
    """Lint a repository; exit 1 on errors."""
    from cacheagent.triton.check import check_repository, format_report, report_json

    report = check_repository(args.location)
    emit(args.format, report_json(report), format_report(report))
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_install_triton(args: argparse.Namespace) -> int:
    """Install the agent library and its worker launcher for Triton."""
    from cacheagent.triton.install import install_triton

    target = install_triton(args.repoagent_dir)
    print(f"installed {target}; start tritonserver with --repoagent-directory={args.repoagent_dir}")
    return EXIT_OK


def cmd_warm(args: argparse.Namespace) -> int:
    """Fetch a model directory into the cache (see :mod:`cacheagent.cli.warm`)."""
    from cacheagent.cli.warm import warm

    return warm(args)


def cmd_run(args: argparse.Namespace) -> int:
    """Run tritonserver through the launcher (see :mod:`cacheagent.triton.launcher`)."""
    from cacheagent.triton.launcher import main as run_main

    return run_main(args.run_args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "warm": cmd_warm,
    "ls": cmd_ls,
    "stats": cmd_stats,
    "evict": cmd_evict,
    "purge": cmd_purge,
    "rm": cmd_rm,
    "verify": cmd_verify,
    "stub": cmd_stub,
    "check": cmd_check,
    "install-triton": cmd_install_triton,
    "run": cmd_run,
}
