"""Version-aware fetch: keep only the version directories the model's policy loads.

Triton copies every version directory of a cloud model, even when its
version_policy loads one. The rules here are Triton's: a version directory
is a top-level directory with a numeric name; a name with a leading zero is
ignored; the default policy is ``latest { num_versions: 1 }``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

Selector = Callable[[Iterable[str]], set[str]]


def version_of(top: str) -> int | None:
    """The version number a top-level directory name denotes, or None if it is no version."""
    if not top.isdigit() or not top.isascii():
        return None
    if len(top) > 1 and top.startswith("0"):
        return None
    return int(top)


def is_ignored_version_dir(top: str) -> bool:
    """True for numeric names Triton skips (leading zero)."""
    return top.isdigit() and top.isascii() and len(top) > 1 and top.startswith("0")


def selected_versions(policy: Mapping[str, Any] | None, available: Iterable[int]) -> set[int]:
    """The versions a Triton ``version_policy`` (as JSON) selects from ``available``."""
    versions = sorted(set(available))
    policy = policy or {}
    if "all" in policy:
        return set(versions)
    if "specific" in policy:
        listed = (policy["specific"] or {}).get("versions", [])
        # Triton's JSON gives a list; a parsed config.pbtxt gives one value when only one is set.
        wanted = {int(v) for v in (listed if isinstance(listed, list) else [listed])}
        return wanted & set(versions)
    latest = policy.get("latest") or {}
    count = int(latest.get("num_versions", 1) or 1)
    return set(versions[-count:]) if versions else set()


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
