"""cacheagent: a content-addressed local cache for Triton's cloud model repositories."""

from __future__ import annotations

__version__ = "0.1.0"
