"""Version directories and version policies: Triton's rules, in one place.

Triton copies every version directory of a cloud model, even when its
version_policy loads one. The rules here are Triton's (2.51, measured and
read from its source):

- a version directory is a top-level directory whose name is a decimal number
  that fits in 64 bits; ``0`` is one, but a name with a leading zero (``01``) is
  ignored, with a warning in Triton's log;
- Triton reads other names with ``std::stoll``, so ``2a`` is taken as version 2,
  which it then loads from a directory named ``2``;
- ``configs/``, ``warmup/`` and ``initial_state/`` may sit beside the versions;
- the policy comes in the JSON shape Triton hands an agent: no ``version_policy``
  means ``latest { num_versions: 1 }``, an empty one (``{}``) loads every version,
  and ``latest`` with ``num_versions`` 0 loads none (Triton then refuses the model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Selector = Callable[[Iterable[str]], set[str]]

#: Directories Triton expects beside the version directories, and skips without a word.
SPECIAL_DIRS = frozenset({"configs", "warmup", "initial_state"})
INT64_MAX = 2**63 - 1
# What std::stoll reads at the start of a name: optional space and sign, then digits.
_STOLL_PREFIX = re.compile(r"^[ \t\n\v\f\r]*([+-]?[0-9]+)")


@dataclass(frozen=True)
class TopDir:
    """What Triton makes of one top-level directory name of a model.

    ``kind`` is one of ``"version"`` (``number`` is the version), ``"special"``
    (configs/, warmup/, initial_state/), ``"leading_zero"`` (ignored),
    ``"too_large"`` (a number Triton cannot parse), ``"misread"`` (Triton reads
    ``number`` from its leading digits, then loads that version from another
    directory) or ``"other"`` (ignored).
    """

    name: str
    kind: str
    number: int | None = None


def classify(top: str) -> TopDir:
    """How Triton reads the top-level directory ``top`` of a model directory."""
    if top in SPECIAL_DIRS:
        return TopDir(top, "special")
    if len(top) > 1 and top.startswith("0"):
        return TopDir(top, "leading_zero")
    if top.isascii() and top.isdigit():
        number = int(top)
        if number > INT64_MAX:
            return TopDir(top, "too_large")
        return TopDir(top, "version", number)
    prefix = _STOLL_PREFIX.match(top)
    if prefix:
        return TopDir(top, "misread", int(prefix.group(1)))
    return TopDir(top, "other")


def version_of(top: str) -> int | None:
    """The version number a top-level directory name denotes, or None if it is no version."""
    found = classify(top)
    return found.number if found.kind == "version" else None


def is_ignored_version_dir(top: str) -> bool:
    """True for names Triton skips because they start with a zero (``01``, ``007``)."""
    return classify(top).kind == "leading_zero"


def version_dirs(files: Iterable[str], dirs: Iterable[str] = ()) -> list[str]:
    """The version directory names of a model, sorted by number.

    ``files`` are relative file paths (``1/model.py``), ``dirs`` relative
    directory paths (an ensemble's empty ``1``). Names Triton does not load as a
    version (``01``, ``v2``, ``configs``) are not versions.
    """
    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    tops |= {d.split("/", 1)[0] for d in dirs if d}
    numbered = {top: v for top in tops if (v := version_of(top)) is not None}
    return sorted(numbered, key=numbered.__getitem__)


def policy_choice(policy: Mapping[str, Any] | None) -> tuple[str, int | frozenset[int] | None]:
    """A ``version_policy`` in Triton's JSON shape, reduced to ``(choice, argument)``.

    ``("latest", n)``, ``("all", None)`` or ``("specific", versions)``. Raises
    ValueError for anything not in Triton's shape (``specific.versions`` must be a list).
    """
    if policy is None:
        return "latest", 1
    if not isinstance(policy, Mapping):
        raise ValueError(f"version_policy must be a JSON object, not {policy!r}")
    if "specific" in policy:
        listed = (policy["specific"] or {}).get("versions", [])
        if not isinstance(listed, list):
            raise ValueError(
                f"version_policy specific versions must be a list (Triton's shape), not {listed!r}"
            )
        return "specific", frozenset(int(v) for v in listed)
    if "latest" in policy:
        return "latest", int((policy["latest"] or {}).get("num_versions", 0) or 0)
    return "all", None  # {"all": {}}, and {} too: Triton loads every version without a choice


def selected_versions(policy: Mapping[str, Any] | None, available: Iterable[int]) -> set[int]:
    """The versions a Triton ``version_policy`` (Triton's JSON shape) selects from ``available``."""
    versions = sorted(set(available))
    choice, argument = policy_choice(policy)
    if choice == "all":
        return set(versions)
    if choice == "specific":
        assert isinstance(argument, frozenset)
        return set(argument) & set(versions)
    assert isinstance(argument, int)
    return set(versions[-argument:]) if argument > 0 else set()


def policy_selector(config: Mapping[str, Any] | None) -> Selector:
    """A selector keeping non-version files and the version dirs the config's policy loads."""
    policy = (config or {}).get("version_policy")

    def select(paths: Iterable[str]) -> set[str]:
        paths = list(paths)
        tops = {p.split("/", 1)[0] for p in paths if "/" in p}
        numbered = {top: version_of(top) for top in tops}
        keep = selected_versions(policy, [v for v in numbered.values() if v is not None])

        def wanted(path: str) -> bool:
            if "/" not in path:
                return True  # config.pbtxt, label files
            top = path.split("/", 1)[0]
            version = numbered[top]
            if version is None:
                return not is_ignored_version_dir(top)  # configs/, other non-version dirs
            return version in keep

        return {path for path in paths if wanted(path)}

    return select


def version_selection(config: Mapping[str, Any] | None, mode: str) -> tuple[Selector | None, str]:
    """How a model's LOAD selects its files: a selector (None: everything) and its name.

    The name identifies the selection across processes (one policy, however it is
    written, has one name), so stale-if-error can match a snapshot to the selection
    that made it. ``config`` is in Triton's JSON shape (see :func:`policy_choice`).
    """
    if mode == "all":
        return None, "all"
    return policy_selector(config), "policy:" + _policy_name((config or {}).get("version_policy"))


def _policy_name(policy: Mapping[str, Any] | None) -> str:
    choice, argument = policy_choice(policy)
    if choice == "specific":
        assert isinstance(argument, frozenset)
        return "specific:" + ",".join(str(v) for v in sorted(argument))
    return "all" if choice == "all" else f"latest:{argument}"
