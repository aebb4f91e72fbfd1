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
