"""The requests the shim sends the worker, built the same way for every test and benchmark."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def agent_request(
    action: str,
    location: str | Path,
    params: Mapping[str, str],
    *,
    model: str = "add",
    artifact: str = "REMOTE_FILESYSTEM",
    handle: str = "0xabc",
) -> dict[str, Any]:
    """One agent action as ``cacheagent.triton.actions.handle`` receives it (no ``id``).

    Like the shim, it sends the model's config (here only its name) with LOAD only,
    and names this process as the Triton server that holds the lease.
    """
    return {
        "action": action,
        "artifact_type": artifact,
        "location": str(location),
        "handle": handle,
        "server_pid": os.getpid(),
        "params": dict(params),
        "config": {"name": model} if action == "LOAD" else None,
    }


def write_start_record(start: Path, source_dir: Path) -> None:
    """What ``cacheagent run`` writes for a model in its start directory ``start``: this
    start's listing of the model directory ``source_dir`` (a local "remote")."""
    import time

    from cacheagent.remote.listing import list_tree
    from cacheagent.remote.location import parse_location
    from cacheagent.triton.startlisting import ModelRecord, portable_info, record_name

    source = parse_location(str(source_dir))
    start.mkdir(parents=True, exist_ok=True)
    record = ModelRecord(
        start=start.name,
        source=source.url,
        entries={k: portable_info(v) for k, v in list_tree(source).items()},
        listed_at=time.time(),
        fresh_for=None,
        once=True,
    )
    (start / record_name(source.url)).write_text(record.to_json())
