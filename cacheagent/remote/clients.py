"""Storage clients with bounded retries, so an outage is reported in seconds, not minutes.

The SDKs retry on their own, and some for a long time: gcsfs hard-codes six
attempts with backoff up to 32 s; the Azure SDK backs off 15 s and more.
Stacked under our own retry loop (:mod:`cacheagent.remote.listing`), a dead endpoint
would stall a LOAD, and every model after it, for minutes. Here each SDK
is told to try at most twice, quickly; :mod:`cacheagent.remote.listing` owns the
backoff policy.
"""

from __future__ import annotations

import os
from typing import Any

# gcsfs probes Hierarchical-Namespace support with extra calls that stall for
# a minute against anything but real GCS; a read-only cache never needs it.
# It must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

SDK_RETRIES = 2


def _bounded_gcs_class() -> type[AbstractFileSystem]:
    from gcsfs import GCSFileSystem
    from gcsfs.retry import retry_request

    class BoundedRetryGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
        """gcsfs with at most SDK_RETRIES attempts per request."""

        _request = retry_request(retries=SDK_RETRIES)(GCSFileSystem._request.__wrapped__)

    return BoundedRetryGCSFileSystem


def _bounded_azure_class() -> type[AbstractFileSystem]:
    from adlfs import AzureBlobFileSystem

    class BoundedRetryAzureBlobFileSystem(AzureBlobFileSystem):  # type: ignore[misc]
        """adlfs whose Azure SDK client retries at most SDK_RETRIES times, quickly."""

        def do_connect(self) -> None:
            super().do_connect()
            config = getattr(self.service_client, "_config", None)
            policy = getattr(config, "retry_policy", None)
            if policy is not None:
                policy.total_retries = 0  # our loop in remote.py retries instead
                if hasattr(policy, "initial_backoff"):
                    policy.initial_backoff = 0.2
                    policy.increment_base = 1.5

    return BoundedRetryAzureBlobFileSystem


_CLASSES: dict[str, type[AbstractFileSystem]] = {}  # built on first use


def filesystem(scheme: str, options: dict[str, Any]) -> AbstractFileSystem:
    """An fsspec filesystem for ``scheme`` ("s3", "gs", "as", "file") with bounded retries."""
    if scheme == "gs":
        cls = _CLASSES.get(scheme) or _CLASSES.setdefault(scheme, _bounded_gcs_class())
        return cls(**options)
    if scheme == "as":
        cls = _CLASSES.get(scheme) or _CLASSES.setdefault(scheme, _bounded_azure_class())
        return cls(**options)
    import fsspec  # imported here: the hit path (see s3list.py) never needs it

    fs = fsspec.filesystem(scheme, **options)
    if scheme == "s3":
        fs.retries = SDK_RETRIES  # s3fs's own loop, on top of botocore's attempts
    return fs
