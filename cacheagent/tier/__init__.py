"""The shared tier: a fleet's nodes fetch each model from the origin once, together.

A tier is storage the fleet already runs, named by ``shared_cache`` (the
agent parameter, ``$CACHEAGENT_SHARED_CACHE``, ``cacheagent warm
--shared-cache``): a bucket in any form the origin accepts (``s3://``,
``gs://``, ``as://``), or an absolute path on a shared filesystem. Nodes keep
their own local cache; on a local miss they read what the tier holds, and the
first node to miss a blob downloads it from the origin for everyone (see
:mod:`cacheagent.tier.fetch` for the order of things, :mod:`~cacheagent.tier.layout`
for what the tier holds, :mod:`~cacheagent.tier.claims` for the election).

A local hit never touches the tier. Without ``shared_cache`` nothing here runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from cacheagent.tier.backend import Backend
from cacheagent.tier.errors import TierAccessDeniedError, TierConfigError, TierUnavailableError
from cacheagent.tier.fetch import Fetched, Tier

__all__ = [
    "Fetched",
    "Tier",
    "TierAccessDeniedError",
    "TierConfigError",
    "TierUnavailableError",
    "open_backend",
    "open_tier",
]

_TIERS: dict[tuple[str, tuple[tuple[str, str], ...]], Tier] = {}
_LOCK = threading.Lock()


def open_tier(spec: str, env: Mapping[str, str] | None = None) -> Tier:
    """The tier named ``spec`` (a location or an absolute path), one per process and spec.

    One object per tier keeps one heartbeat thread and one set of connections
    for every fetch of the process. Credentials come from ``env`` (default:
    the process environment) the way the origin's do.
    """
    env = dict(os.environ if env is None else env)
    cache_key = (spec, tuple(sorted(env.items())))
    with _LOCK:
        tier = _TIERS.get(cache_key)
        if tier is None:
            tier = _TIERS[cache_key] = Tier(open_backend(spec, env))
        return tier


def open_backend(spec: str, env: Mapping[str, str] | None = None) -> Backend:
    """The backend for ``spec``: a directory, the SDK-free S3 client, or an fsspec SDK."""
    backend: Backend
    if spec.startswith("/"):
        from cacheagent.tier.directory import DirectoryBackend

        backend = DirectoryBackend(spec)
        return backend
    from cacheagent.errors import InvalidLocationError
    from cacheagent.remote.location import parse_location
    from cacheagent.remote.s3 import endpoint_of

    try:
        location = parse_location(spec, env)
    except InvalidLocationError as exc:
        raise TierConfigError(f"shared_cache: {exc}") from exc
    if not location.is_remote:
        raise TierConfigError(
            f"shared_cache {spec!r} is neither a bucket location nor an absolute path; give "
            "s3://, gs://, as:// or the absolute path of a directory every node mounts"
        )
    endpoint = endpoint_of(location) if location.scheme == "s3" else None
    if endpoint is not None:
        from cacheagent.tier.s3 import FastS3Backend

        backend = FastS3Backend(location, endpoint)
    else:
        from cacheagent.tier.sdk import FsspecBackend

        backend = FsspecBackend(location)
    return backend
