"""The ``cacheagent`` command: warm, inspect, verify and evict the cache; install into Triton.

This module runs a command line: it parses it (:mod:`cacheagent.cli.parser`),
sets up logging, runs the command (:mod:`cacheagent.cli.commands`) and turns
the package's errors into messages and exit codes. ``python -m
cacheagent.cli.main`` is the same as the ``cacheagent`` script.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

# Logging levels by the number of -v flags.
_LEVELS = {0: logging.WARNING, 1: logging.INFO}
_handler: logging.Handler | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["run"]:
        return _run(words[1:])
    # Imported here, not above: 'cacheagent run' never builds this parser.
    from cacheagent.cli.parser import (
        EXIT_ERROR,
        EXIT_INTERRUPTED,
        EXIT_OK,
        EXIT_USAGE,
        build_parser,
    )
    from cacheagent.errors import CacheAgentError, InvalidLocationError, InvalidParameterError

    args = build_parser().parse_args(words)
    configure_logging(args.verbose)
    from cacheagent.cli.commands import COMMANDS, NoCacheError, NotConfirmedError

    try:
        return int(COMMANDS[args.command_name](args) or EXIT_OK)
    except CacheAgentError as exc:
        print(f"cacheagent: error: {exc}", file=sys.stderr)
        usage = (InvalidParameterError, InvalidLocationError, NoCacheError, NotConfirmedError)
        return EXIT_USAGE if isinstance(exc, usage) else EXIT_ERROR
    except KeyboardInterrupt:
        print("cacheagent: interrupted; the cache is consistent", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: list[str]) -> int:
    """``cacheagent run``: its first worker starts before anything else (it is the
    slowest part of a cached start), then the launcher parses its own arguments."""
    from cacheagent.triton.prestart import start_early

    early = start_early(argv)
    try:
        from cacheagent.triton.launcher import main as run_main
    except KeyboardInterrupt:  # before the launcher's own signal handling is in place
        from cacheagent.cli.parser import EXIT_INTERRUPTED

        if early is not None:
            early.discard()
            early.reap(10.0)
        print("cacheagent run: interrupted before Triton was started", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run_main(argv, early=early)


def configure_logging(verbosity: int) -> None:
    """Send the package's log records to stderr: WARNING and up, INFO with -v, DEBUG with -vv."""
    global _handler
    logger = logging.getLogger("cacheagent")
    if _handler is not None:  # main() may run more than once in a process (tests)
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("cacheagent: %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(_LEVELS.get(verbosity, logging.DEBUG))
    # Records stop here: a host application's root handlers must not print them twice.
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
