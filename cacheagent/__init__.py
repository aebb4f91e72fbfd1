"""cacheagent: a content-addressed local cache for Triton's cloud model repositories.

The public API::

    from cacheagent import Cache, Settings

    with Cache("/var/cache/cacheagent", max_size=200 * 2**30) as cache:
        snapshot = cache.fetch("s3://bucket/models/resnet")

Names are imported on first use (PEP 562), so ``import cacheagent`` stays cheap:
the Triton worker imports this package at every start and must not pay for the
cache's index or any storage SDK before it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ERRORS = (
    "CacheAgentError",
    "CacheFullError",
    "InvalidLocationError",
    "InvalidParameterError",
    "RemoteAccessDeniedError",
    "RemoteChangedError",
    "RemoteNotFoundError",
    "StorageUnavailableError",
    "UnsafeCacheDirError",
    "UnsafePathError",
)
_LAZY: dict[str, str] = {
    "Cache": "cacheagent.cache",
    "Snapshot": "cacheagent.cache",
    "EvictionReport": "cacheagent.cache",
    "VerifyReport": "cacheagent.cache",
    "CacheStats": "cacheagent.cache",
    "LeaseSpec": "cacheagent.cache",
    "Settings": "cacheagent.settings",
    **{name: "cacheagent.errors" for name in _ERRORS},
}

__all__ = [
    "Cache",
    "CacheAgentError",
    "CacheFullError",
    "CacheStats",
    "EvictionReport",
    "InvalidLocationError",
    "InvalidParameterError",
    "LeaseSpec",
    "RemoteAccessDeniedError",
    "RemoteChangedError",
    "RemoteNotFoundError",
    "Settings",
    "Snapshot",
    "StorageUnavailableError",
    "UnsafeCacheDirError",
    "UnsafePathError",
    "VerifyReport",
    "__version__",
]

if TYPE_CHECKING:
    from cacheagent.cache import (
        Cache,
        CacheStats,
        EvictionReport,
        LeaseSpec,
        Snapshot,
        VerifyReport,
    )
    from cacheagent.errors import (
        CacheAgentError,
        CacheFullError,
        InvalidLocationError,
        InvalidParameterError,
        RemoteAccessDeniedError,
        RemoteChangedError,
        RemoteNotFoundError,
        StorageUnavailableError,
        UnsafeCacheDirError,
        UnsafePathError,
    )
    from cacheagent.settings import Settings


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cacheagent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
