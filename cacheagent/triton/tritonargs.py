"""Reading and rewriting a tritonserver command line, for ``cacheagent run``.

Only the flags the launcher acts on are read; every other argument passes
through byte for byte, in its place. Triton parses its flags with
``getopt_long``, so a flag's value comes either after ``=`` in the same
argument or as the next argument, a later occurrence of a single-valued flag
overrides an earlier one, and ``--`` ends the options. (getopt_long also takes
unambiguous abbreviations such as ``--model-repo=``; those are passed through
unrewritten, so such a repository is simply read by Triton itself.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

REPOSITORY_FLAGS = ("--model-repository", "--model-store")
REPOAGENT_FLAG = "--repoagent-directory"
CONTROL_MODE_FLAG = "--model-control-mode"
POLL_SECS_FLAG = "--repository-poll-secs"
LOAD_MODEL_FLAG = "--load-model"
#: Triton's default ``--repository-poll-secs``.
DEFAULT_POLL_SECS = 15
_END_OF_OPTIONS = "--"


@dataclass(frozen=True)
class FlagValue:
    """One occurrence of a flag: where its value is, and how it was written."""

    flag: str
    value: str
    index: int  # position of the argument that holds the value
    joined: bool  # True for --flag=value, False for --flag value


def flag_values(args: Sequence[str], flags: Sequence[str]) -> list[FlagValue]:
    """Every occurrence of any of ``flags`` in ``args`` (Triton's arguments), in order.

    A flag given last, with no value after it, is left out: Triton refuses it itself.
    """
    found: list[FlagValue] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == _END_OF_OPTIONS:
            break
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                found.append(FlagValue(flag, args[i + 1], i + 1, joined=False))
                i += 1  # the value is no flag, even if it looks like one
                break
            if arg.startswith(flag + "="):
                found.append(FlagValue(flag, arg[len(flag) + 1 :], i, joined=True))
                break
        i += 1
    return found


def last_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last occurrence of ``flag`` (the one Triton uses), or None."""
    values = flag_values(args, [flag])
    return values[-1].value if values else None


def repositories(args: Sequence[str]) -> list[str]:
    """Every model repository the arguments name, in order (duplicates kept)."""
    return [v.value for v in flag_values(args, REPOSITORY_FLAGS)]


def control_mode(args: Sequence[str]) -> str:
    """Triton's ``--model-control-mode``, lower-cased (``none`` when not given)."""
    return (last_value(args, CONTROL_MODE_FLAG) or "none").strip().lower()


def poll_seconds(args: Sequence[str]) -> int:
    """Triton's ``--repository-poll-secs`` (default 15); an unreadable value is Triton's error.

    The launcher then uses the default, and Triton refuses the value and exits.
    """
    text = last_value(args, POLL_SECS_FLAG)
    try:
        return int(text) if text is not None else DEFAULT_POLL_SECS
    except ValueError:
        return DEFAULT_POLL_SECS


def load_models(args: Sequence[str]) -> list[str]:
    """The ``--load-model`` names (``*`` stands for every model), in order."""
    return [v.value for v in flag_values(args, [LOAD_MODEL_FLAG])]


def names_repoagent_directory(args: Sequence[str]) -> bool:
    """True if the arguments choose Triton's ``--repoagent-directory`` themselves."""
    return bool(flag_values(args, [REPOAGENT_FLAG]))


def rewrite(
    args: Sequence[str],
    replacements: Mapping[str, str],
    repoagent_dir: str | None = None,
) -> list[str]:
    """Triton's arguments with each repository in ``replacements`` swapped for its new value.

    Each occurrence keeps its form (``--flag=value`` or ``--flag value``). When
    ``repoagent_dir`` is given and the arguments name no ``--repoagent-directory``,
    one is added: before a ``--`` that ends the options, else at the end (the end,
    not the front, so a command that is not tritonserver still sees its own first
    arguments first).
    """
    out = list(args)
    for found in flag_values(args, REPOSITORY_FLAGS):
        if found.value not in replacements:
            continue
        new = replacements[found.value]
        out[found.index] = f"{found.flag}={new}" if found.joined else new
    if repoagent_dir is not None and not names_repoagent_directory(args):
        flag = f"{REPOAGENT_FLAG}={repoagent_dir}"
        end = _end_of_options(out)
        out.insert(end, flag)
    return out


def _end_of_options(args: Sequence[str]) -> int:
    i = 0
    while i < len(args):
        if args[i] == _END_OF_OPTIONS:
            return i
        # A separate value equal to "--" is a value, not the end of the options.
        if any(args[i] == flag for flag in (*REPOSITORY_FLAGS, REPOAGENT_FLAG)):
            i += 1
        i += 1
    return len(args)
