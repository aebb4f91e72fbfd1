"""The four operations every tier backend offers, and the retry rule they share.

A backend stores small-to-medium objects (chunks of at most a few MiB, JSON
records) under ``/``-separated keys below its root, and offers exactly:

- :meth:`Backend.get`: the whole object, or None when there is none;
- :meth:`Backend.create`: write an object only if the key is free, atomically
  (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
  ``If-None-Match: *``, a ``link()`` on a shared filesystem); True if this
  call created it. It is what elects one leader per blob across the fleet;
- :meth:`Backend.put`: write or replace an object (a claim's heartbeat);
- :meth:`Backend.delete`: remove an object (gone already is fine).

Readers never see half an object: every backend makes a write visible whole.
Failures are raised as :class:`~cacheagent.tier.errors.TierUnavailableError`
(an outage: the caller falls back to the origin), ``TierAccessDeniedError``
(credentials, or a read-only tier) or ``TierConfigError``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from cacheagent.remote.faults import OUTAGE, chain, classify
from cacheagent.tier.errors import TierTimeoutError, TierUnavailableError

_log = logging.getLogger(__name__)

T = TypeVar("T")

# A tier is in-region and quick, and an origin fallback is always there: a few
# short, jittered retries (so that a fleet hit by one 503 does not retry in step),
# then the caller gives up on the tier for the blob.
RETRY_DELAYS = (0.1, 0.4, 1.2)
# One tier operation (connect, send, read the answer) may take this long: a tier is
# in-region, and a slow one is worth less than the origin's own fetch.
OP_TIMEOUT = 5.0


class Backend(Protocol):
    """Where a tier keeps its objects (see the module docstring for the contract)."""

    @property
    def url(self) -> str:
        """The tier's location as configured, without secrets (for messages)."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object at ``key``, or None if there is none."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there; True if this call wrote it."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key``, replacing what is there."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object at ``key`` (no error if there is none)."""
        ...


def retrying(operation: Callable[[], T], url: str, what: str) -> T:
    """Run ``operation``; retry outages with jittered backoff, a few times.

    Backends raise :class:`TierUnavailableError` for an outage (5xx, 429/503,
    resets); it is raised again once the retries are spent. A timeout
    (:class:`TierTimeoutError`) and the other failures (TierAccessDeniedError,
    TierConfigError) pass at once.
    """
    for attempt in range(len(RETRY_DELAYS) + 1):
        try:
            return operation()
        except TierTimeoutError:
            raise  # a silent tier would cost every retry its whole timeout
        except TierUnavailableError as exc:
            if attempt == len(RETRY_DELAYS):
                raise
            pause = RETRY_DELAYS[attempt] * random.uniform(0.5, 1.5)
            _log.debug("tier %s: %s failed (%s); retrying in %.2f s", url, what, exc, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def translate(exc: BaseException, url: str, what: str, detail: str) -> Exception:
    """``exc`` (raised by a storage client) as the tier error that names its cause.

    ``detail`` is the failure as text with secrets already scrubbed.
    """
    from cacheagent.remote.faults import DENIED
    from cacheagent.tier.errors import TierAccessDeniedError, TierConfigError

    kind = classify(exc).kind
    if any(isinstance(link, TimeoutError) for link in chain(exc)):
        return TierTimeoutError(
            f"{what} on the shared tier {url} got no answer within {OP_TIMEOUT:g} s "
            f"({detail}); nodes fetch from the origin meanwhile; check the tier's endpoint",
            url=url,
        )
    if kind == OUTAGE:
        return TierUnavailableError(
            f"{what} on the shared tier {url} failed ({detail}); nodes fetch from the origin "
            "meanwhile; check the tier's endpoint and health",
            url=url,
        )
    if kind == DENIED:
        return TierAccessDeniedError(
            f"{what} on the shared tier {url} was denied ({detail}); give this node's "
            "credentials read (and, for a node that fills the tier, write) access to the "
            "tier's prefix",
            url=url,
        )
    return TierConfigError(
        f"{what} on the shared tier {url} failed ({detail}); check the shared_cache location, "
        "its endpoint and credentials",
        url=url,
    )
