"""Errors of the shared tier.

A tier is an optimisation: the origin stays the source of truth. So most of
these are caught inside :mod:`cacheagent.tier` and turned into a fallback to
the origin (logged); they reach a caller only from the explicit tier
operations (:func:`cacheagent.tier.open_tier` with a bad location, the
conformance checks of the tests).
"""

from __future__ import annotations

from cacheagent.errors import CacheAgentError


class TierUnavailableError(CacheAgentError, ConnectionError):
    """The tier could not be reached, or kept failing (5xx, 429/503, timeouts) after retries."""


class TierTimeoutError(TierUnavailableError):
    """A tier operation got no answer in time: a black hole or a hung mount, not retried."""


class TierAccessDeniedError(CacheAgentError, PermissionError):
    """The tier refused the credentials, or this node may only read it."""


class TierConfigError(CacheAgentError, ValueError):
    """The tier cannot be used as configured (unknown form, no conditional writes, ...)."""
