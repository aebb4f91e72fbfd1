"""The do-nothing agent: the real shim and worker bridge, answering LOAD with a ready copy.

The benchmark's private launcher runs this file instead of ``cacheagent.triton.worker``.
Every LOAD is redirected to ``$BENCH_FLOOR_ROOT/<model>`` (a local copy that is
already complete), with no listing, no cache and no storage access, so a Triton
start with it costs what any agent must: Triton's own listings and HEADs, the
worker process start and one round trip per model. That is the floor a warm
cacheagent start is compared with.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from cacheagent.triton import worker


def handler(request: dict[str, Any], log: Any) -> str | None:
    """Redirect LOAD to the ready local copy of the model; ignore every other action."""
    if request.get("action") != "LOAD":
        return None
    name = os.path.basename(str(request.get("location", "")).rstrip("/"))
    return os.path.join(os.environ["BENCH_FLOOR_ROOT"], name)


if __name__ == "__main__":
    sys.exit(worker.main(handler))
