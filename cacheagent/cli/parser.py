"""The ``cacheagent`` command line: subcommands, flags, help texts and flag validation.

Flags that set a cache setting (``--max-size``, ``--verify``, ``--concurrency``,
``--part-size``) are validated by :func:`cacheagent.settings.parse_value`, the
validator of config.pbtxt parameters, so a value is accepted or refused with
the same words in both places. Building the parser imports no storage SDK and
no index: ``cacheagent --help`` works even where only the package is installed.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from cacheagent import __version__
from cacheagent.errors import InvalidParameterError
from cacheagent.settings import default_cache_dir, parse_value

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT, EXIT_REPAIRED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  the command failed (storage, disk, a leased snapshot kept by rm)
  2  bad usage: a bad flag or value, or no cache at --cache-dir"""

FORMAT_HELP = "output format (default %(default)s); --json is short for --format json"


class CliParser(argparse.ArgumentParser):
    """argparse with examples kept as written and flag errors that name the flag once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print usage and the message, exit 2; "argument --x: --x = ..." says --x once."""
        match = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match and match.group(2).startswith(match.group(1).split("/")[-1]):
            message = match.group(2)
        super().error(message)


def build_parser() -> CliParser:
    """The argument parser, one subcommand per action."""
    parser = CliParser(
        prog="cacheagent",
        description="A local, content-addressed cache of Triton model repositories in S3, GCS "
        "and Azure. See 'cacheagent COMMAND --help'.",
        epilog=EXIT_CODES_HELP + "\n  3, 4  verify: corruption found (cacheagent verify --help)",
    )
    parser.add_argument("--version", action="version", version=f"cacheagent {__version__}")
    _verbosity(parser, default=0)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_warm(commands)
    _add_ls(commands)
    _add_stats(commands)
    _add_evict(commands)
    _add_purge(commands)
    _add_rm(commands)
    _add_verify(commands)
    _add_stub(commands)
    _add_check(commands)
    _add_install(commands)
    _add_run(commands)
    return parser


def _verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    # On the main parser and on every subcommand, so both `cacheagent -v ls` and
    # `cacheagent ls -v` work; a subcommand's default must not undo the main one's.
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log more to stderr: -v for INFO, -vv for DEBUG (default: warnings and errors)",
    )


def _command(
    commands: Any,
    name: str,
    help_text: str,
    epilog: str,
    *,
    cache_dir: bool = True,
    description: str = "",
) -> CliParser:
    sub: CliParser = commands.add_parser(
        name,
        help=help_text,
        description=description or help_text,
        epilog=epilog.rstrip() + "\n\n" + EXIT_CODES_HELP,
    )
    if cache_dir:
        sub.add_argument(
            "--cache-dir",
            type=_cache_dir_arg,
            default=None,
            help=f"cache directory (default $CACHEAGENT_CACHE_DIR, else {default_cache_dir()})",
        )
    _verbosity(sub, default=argparse.SUPPRESS)
    sub.set_defaults(command_name=name)
    return sub


def _format(sub: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    sub.add_argument("--format", choices=choices, default=choices[0], help=FORMAT_HELP)
    sub.add_argument(
        "--json", dest="format", action="store_const", const="json", help="same as --format json"
    )


def _add_warm(commands: Any) -> None:
    warm = _command(
        commands,
        "warm",
        "fetch a model directory into the cache",
        """examples:
  cacheagent warm s3://bucket/models/resnet
  cacheagent warm gs://bucket/models/bert --versions all --json

Only the version directories the model's config.pbtxt version_policy loads are
fetched (latest 1 by default), as the agent does at Triton's LOAD, so a node
warmed here gets a hit at Triton's first load. The cache is created if missing.""",
    )
    warm.add_argument("location", help="s3://..., gs://..., as://... or a local path")
    _format(warm, ("text", "json"))
    warm.add_argument(
        "--versions",
        choices=("policy", "all"),
        default="policy",
        help="policy (default): the versions the model's version_policy loads; all: every one",
    )
    warm.add_argument(
        "--max-size",
        type=_setting_arg("max_size", "--max-size"),
        default=argparse.SUPPRESS,
        help="cache budget, e.g. 200GiB, 200Gi or none (default $CACHEAGENT_MAX_SIZE, else none)",
    )
    warm.add_argument(
        "--verify",
        type=_setting_arg("verify", "--verify"),
        default="size",
        help="check of a cached snapshot on a hit: size (default), hash or none",
    )
    warm.add_argument(
        "--no-stale",
        action="store_true",
        help="fail when storage is unreachable instead of serving the last good snapshot",
    )
    warm.add_argument(
        "--concurrency",
        type=_setting_arg("concurrency", "--concurrency"),
        default=None,
        help="most parallel requests (the agent's concurrency parameter and its default)",
    )
    warm.add_argument(
        "--part-size",
        type=_setting_arg("part_size", "--part-size"),
        default=None,
        help="bytes per ranged request, 1MiB-1GiB (the agent's part_size and its default)",
    )
    warm.add_argument(
        "--timeout",
        type=_setting_arg("timeout", "--timeout"),
        default=None,
        help="seconds one storage operation may take, retries included (the agent's timeout)",
    )
    warm.add_argument(
        "--shared-cache",
        type=_setting_arg("shared_cache", "--shared-cache"),
        default=None,
        metavar="LOCATION",
        help="a shared tier the fleet reads and fills, so that each blob leaves the origin "
        "once: s3://, gs://, as:// or an absolute path on a shared filesystem (default "
        "$CACHEAGENT_SHARED_CACHE, else none)",
    )
    warm.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_ls(commands: Any) -> None:
    from cacheagent.cli.targets import DEFAULT_SORT, FILTER_EXAMPLES, SORT_KEYS

    ls = _command(
        commands,
        "ls",
        "list cached snapshots",
        f"""examples:
  cacheagent ls
  cacheagent ls --filter 'size>1GB' --filter 'accessed>30d' --sort=-size
  cacheagent ls --filter 'source=s3://bucket/models/*' --format csv
  cacheagent rm $(cacheagent ls -q --filter 'accessed>90d') --yes

filters: FIELD OP VALUE with FIELD size, accessed, model or source, e.g.
  {FILTER_EXAMPLES}
accessed>30d means last used more than 30 days ago; model= and source= take globs.
Sort keys: {", ".join(SORT_KEYS)}, ascending; a leading '-' (write --sort=-size)
or --reverse sorts descending.""",
    )
    ls.add_argument(
        "--filter",
        action="append",
        default=[],
        type=_filter_arg,
        metavar="EXPR",
        help="keep snapshots matching EXPR (repeatable: all must match)",
    )
    ls.add_argument(
        "--sort",
        choices=_sort_choices(),
        default=DEFAULT_SORT,
        metavar="KEY",
        help=f"size, accessed, model or source; -KEY descending (default {DEFAULT_SORT})",
    )
    ls.add_argument("--reverse", action="store_true", help="reverse the order")
    ls.add_argument(
        "--limit", type=_int_arg("--limit", 0, 10**9), default=None, help="print at most N rows"
    )
    _format(ls, ("table", "json", "csv"))
    ls.add_argument("-q", "--quiet", action="store_true", help="print only full keys, one a line")


def _sort_choices() -> tuple[str, ...]:
    from cacheagent.cli.targets import SORT_CHOICES

    return SORT_CHOICES


def _add_stats(commands: Any) -> None:
    stats = _command(
        commands,
        "stats",
        "show hit ratio, bytes saved, cache size; export them to Prometheus",
        """examples:
  cacheagent stats
  cacheagent stats --format prometheus --output /var/lib/node_exporter/cacheagent.prom
  cacheagent stats --serve 127.0.0.1:9400      # live /metrics until Ctrl-C or SIGTERM""",
    )
    _format(stats, ("text", "json", "prometheus"))
    stats.add_argument(
        "--output",
        type=_output_file_arg,
        help="write to this file atomically (e.g. for node-exporter's textfile collector)",
    )
    stats.add_argument(
        "--serve",
        type=_address_arg,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics, computed per scrape",
    )
    stats.add_argument(
        "--top", type=_int_arg("--top", 0, 1000), default=5, help="snapshots to list (default 5)"
    )
    stats.add_argument(
        "--max-size",
        type=_setting_arg("max_size", "--max-size"),
        default=argparse.SUPPRESS,
        help="budget to report against (default $CACHEAGENT_MAX_SIZE)",
    )


def _add_evict(commands: Any) -> None:
    evict = _command(
        commands,
        "evict",
        "evict least-recently-used snapshots until the cache fits a size",
        """examples:
  cacheagent evict --max-size 100GiB --dry-run
  cacheagent evict --max-size 100Gi""",
    )
    evict.add_argument(
        "--max-size",
        type=_setting_arg("max_size", "--max-size"),
        required=True,
        help="size to shrink the cache to (none: only collect unreferenced blobs)",
    )
    evict.add_argument("--dry-run", action="store_true", help="show what would go; delete nothing")
    _format(evict, ("text", "json"))


def _confirmation(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--dry-run", action="store_true", help="show what would go; delete nothing")
    sub.add_argument(
        "-y", "--yes", action="store_true", help="do not ask (required when stdin is no terminal)"
    )


def _add_purge(commands: Any) -> None:
    purge = _command(
        commands,
        "purge",
        "remove every snapshot no running process uses",
        """examples:
  cacheagent purge --dry-run
  cacheagent purge --yes

Asks for confirmation on a terminal; elsewhere pass --yes.""",
    )
    _confirmation(purge)
    _format(purge, ("text", "json"))


def _add_rm(commands: Any) -> None:
    rm = _command(
        commands,
        "rm",
        "remove snapshots by key, model name or source",
        """examples:
  cacheagent rm 3f2a9c1e            # a key, or a unique prefix of one, as ls shows it
  cacheagent rm resnet --dry-run    # every snapshot of model resnet
  cacheagent rm s3://bucket/models/resnet --yes

A snapshot leased by a running Triton is kept and reported (exit 1). Asks for
confirmation on a terminal; elsewhere pass --yes.""",
    )
    rm.add_argument("targets", nargs="+", metavar="TARGET", help="key, key prefix, model or source")
    _confirmation(rm)
    _format(rm, ("text", "json"))


def _add_verify(commands: Any) -> None:
    verify = _command(
        commands,
        "verify",
        "re-hash blobs; report and repair corruption",
        """examples:
  cacheagent verify                  # the whole cache
  cacheagent verify resnet           # the snapshots of one model (or a key, or a source)
  cacheagent verify --no-repair --json

A corrupt snapshot is removed (repaired) and fetched again at the next load;
as blobs are shared, a repair re-checks the whole cache.

verify's own exit codes:
  3  corruption found and left in place (--no-repair)
  4  corruption found and repaired""",
    )
    verify.add_argument(
        "targets", nargs="*", metavar="TARGET", help="key, key prefix, model or source (all)"
    )
    verify.add_argument("--no-repair", action="store_true", help="report only")
    _format(verify, ("text", "json"))


def _add_stub(commands: Any) -> None:
    stub = _command(
        commands,
        "stub",
        "write a local stub repository (configs only) whose models the agent fetches from LOCATION",
        """examples:
  cacheagent stub s3://bucket/models --out /srv/stub --param cache_dir=/var/cache/cacheagent
  tritonserver --model-repository=/srv/stub --repoagent-directory=/opt/tritonserver/repoagents""",
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
    _format(stub, ("text", "json"))


def _add_check(commands: Any) -> None:
    check = _command(
        commands,
        "check",
        "lint a model repository (local or cloud) against Triton's layout",
        """examples:
  cacheagent check s3://bucket/models
  cacheagent check ./models/resnet --json

check exits 1 when it finds an error (a gate for uploads in CI), 0 otherwise.""",
        cache_dir=False,
    )
    check.add_argument("location", help="a model repository or one model directory")
    _format(check, ("text", "json"))


def _add_install(commands: Any) -> None:
    _command(
        commands,
        "install-triton",
        "install the agent for tritonserver --repoagent-directory",
        """example:
  cacheagent install-triton --repoagent-dir /opt/tritonserver/repoagents
  tritonserver --repoagent-directory=/opt/tritonserver/repoagents ...

Re-run it after moving or recreating this Python environment: the launcher
records this interpreter's path.""",
        cache_dir=False,
        description="Put libtritonrepoagent_cacheagent.so and the cacheagent-worker launcher "
        "(which runs the worker with this Python) into DIR/cacheagent/, where tritonserver "
        "--repoagent-directory=DIR finds the agent named cacheagent. Both files are replaced "
        "atomically, so it is safe under a running Triton.",
    ).add_argument(
        "--repoagent-dir", required=True, type=Path, help="Triton's --repoagent-directory"
    )


# -- argument types -------------------------------------------------------------


def _add_run(commands: Any) -> None:
    # 'cacheagent run' parses its own options (cacheagent.triton.launcher), and every
    # argument after "--" belongs to tritonserver: this parser takes them all verbatim.
    run = commands.add_parser(
        "run",
        help="start tritonserver with each cloud repository served from a stub kept current "
        "(cacheagent run [--cache-dir DIR] [--max-size SIZE] [--param K=V] -- tritonserver ...)",
        prefix_chars="\0",
        add_help=False,
    )
    run.add_argument("run_args", nargs=argparse.REMAINDER)
    run.set_defaults(command_name="run")


def _setting_arg(name: str, flag: str) -> Callable[[str], Any]:
    """A flag that sets cache setting ``name``: validated by settings.parse_value."""

    def parse(text: str) -> Any:
        try:
            return parse_value(name, text, where=flag)
        except InvalidParameterError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _int_arg(flag: str, low: int, high: int) -> Callable[[str], int]:
    """A count only this command has (not a cache setting)."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r} is not an integer from {low} to {high}"
            )
        return int(text)

    return parse


def _filter_arg(text: str) -> Any:
    from cacheagent.cli.targets import parse_filter

    try:
        return parse_filter(text)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address_arg(text: str) -> Any:
    from cacheagent.cli.prometheus import parse_address

    try:
        return parse_address(text)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
