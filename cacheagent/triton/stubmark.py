"""The first line of a stub config: the remote config it was made from, and its hash.

``cacheagent stub`` writes it (see :mod:`cacheagent.triton.stub`); the agent reads it on
every LOAD from a stub to warn when the remote config.pbtxt has changed since.
Kept apart from the stub writer so that this check, on the hit path of a fresh
worker, imports nothing but the standard library and xxhash.
"""

from __future__ import annotations

import re
from pathlib import Path

import xxhash

_MARK_RE = re.compile(r"^# cacheagent stub of (\S+); remote config xxh3-128 ([0-9a-f]{32})$", re.M)


def config_digest(text: bytes) -> str:
    """The hash a stub records of the remote config it was made from."""
    return xxhash.xxh3_128_hexdigest(text)


def mark_line(source: str, remote_text: bytes) -> str:
    """The stub config's first line for a remote config ``remote_text`` read from ``source``."""
    return f"# cacheagent stub of {source}; remote config xxh3-128 {config_digest(remote_text)}"


def recorded_digest(stub_config: str) -> tuple[str, str] | None:
    """(source, digest) from a stub config's mark line, or None for a hand-written config."""
    match = _MARK_RE.search(stub_config)
    return (match.group(1), match.group(2)) if match else None


def remote_config_changed(stub_config_text: str, snapshot_dir: Path) -> str | None:
    """A warning if the snapshot's config.pbtxt differs from the one the stub was made from."""
    recorded = recorded_digest(stub_config_text)
    remote = snapshot_dir / "config.pbtxt"
    if recorded is None or not remote.is_file():
        return None
    source, digest = recorded
    if config_digest(remote.read_bytes()) == digest:
        return None
    return (
        f"the remote config.pbtxt of {source} has changed since the stub was written; Triton "
        "is still using the stub's copy: run 'cacheagent stub' again to update it"
    )
