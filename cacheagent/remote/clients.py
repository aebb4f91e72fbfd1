"""SDK storage clients whose timeouts follow one deadline, and the proxy rule for all clients.

The SDKs retry on their own, and some for a long time: gcsfs hard-codes six
attempts with backoff up to 32 s; the Azure SDK backs off 15 s and more;
s3fs loops over botocore's own attempts. Stacked under our retry loop, each
with a 60 s read timeout, a black-holed endpoint stalled a LOAD for over 12
minutes. Here every SDK makes exactly one attempt per call, with connect and
read timeouts derived from the operation's ``timeout``; the retries, their
backoff and the deadline around them all belong to :mod:`cacheagent.remote.listing`,
which also hands each fsspec call the time left (fsspec cancels the call then).

Proxies: HTTP_PROXY / HTTPS_PROXY / NO_PROXY (either case, lower case wins, as
in urllib) are honoured by every client. S3's are resolved here from the
environment the location was parsed with and given to the fast client and
botocore explicitly; gcsfs and the Azure SDK use aiohttp, which reads the
process environment once ``trust_env`` is on (the Azure SDK turns it on itself).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cacheagent.settings import DEFAULT_TIMEOUT

# gcsfs probes Hierarchical-Namespace support with extra calls that stall for
# a minute against anything but real GCS; a read-only cache never needs it.
# It must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from cacheagent.remote.location import Location


def proxy_for(url: str, env: Mapping[str, str]) -> str | None:
    """The proxy ``env`` names for requests to ``url``, or None (none set, or NO_PROXY matches).

    The same rule as urllib and botocore: ``<scheme>_proxy`` for the URL's scheme,
    lower case before upper case, and NO_PROXY entries matching the host (or
    host:port) exactly or as a domain suffix; ``*`` bypasses every host.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = _env_value(env, f"{parts.scheme}_proxy")
    if not proxy or not parts.hostname:
        return None
    if _bypassed(parts.hostname.lower(), parts.port, _env_value(env, "no_proxy") or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """True if a NO_PROXY entry names ``host`` (or a domain above it), on any or this port."""
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name.lower()) or env.get(name.upper()) or None


def _attempt_timeouts(timeout: float) -> tuple[float, float]:
    from cacheagent.remote.faults import connect_timeout, read_timeout

    return connect_timeout(timeout), read_timeout(timeout)


def _single_attempt_gcs_class() -> type[AbstractFileSystem]:
    from gcsfs import GCSFileSystem

    class SingleAttemptGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
        """gcsfs without its own retry loop (six attempts, backoff up to 32 s)."""

        # The undecorated request: one attempt; cacheagent.remote.listing retries.
        _request = GCSFileSystem._request.__wrapped__

    return SingleAttemptGCSFileSystem


def _single_attempt_azure_class() -> type[AbstractFileSystem]:
    from adlfs import AzureBlobFileSystem

    class SingleAttemptAzureBlobFileSystem(AzureBlobFileSystem):  # type: ignore[misc]
        """adlfs whose Azure SDK client never retries and gives up on a silent socket."""

        def do_connect(self) -> None:
            super().do_connect()
            config = getattr(self.service_client, "_config", None)
            policy = getattr(config, "retry_policy", None)
            if policy is not None:
                policy.total_retries = 0  # cacheagent.remote.listing retries instead
            # adlfs passes its timeouts to some calls only (not to listings): make them
            # the transport's defaults, so every request gives up on a silent socket.
            connection = getattr(getattr(config, "transport", None), "connection_config", None)
            timeouts = getattr(self, "_timeout_kwargs", {})
            if connection is not None:
                connection.timeout = timeouts.get("connection_timeout", connection.timeout)
                connection.read_timeout = timeouts.get("read_timeout", connection.read_timeout)

    return SingleAttemptAzureBlobFileSystem


_CLASSES: dict[str, type[AbstractFileSystem]] = {}  # built on first use


def filesystem(
    scheme: str, options: dict[str, Any], timeout: float = DEFAULT_TIMEOUT
) -> AbstractFileSystem:
    """An fsspec filesystem for ``scheme`` ("s3", "gs", "as", "file") making single attempts.

    Each request may take ``timeout``'s connect and read timeouts
    (:func:`cacheagent.remote.faults.connect_timeout`, ``read_timeout``); the
    whole operation is bounded by the caller passing ``timeout=`` to fsspec.
    """
    connect, read = _attempt_timeouts(timeout)
    if scheme == "gs":
        from aiohttp import ClientTimeout

        cls = _CLASSES.get(scheme) or _CLASSES.setdefault(scheme, _single_attempt_gcs_class())
        return cls(
            **options,
            requests_timeout=ClientTimeout(total=None, connect=connect, sock_read=read),
            session_kwargs={"trust_env": True},
        )
    if scheme == "as":
        cls = _CLASSES.get(scheme) or _CLASSES.setdefault(scheme, _single_attempt_azure_class())
        return cls(**options, connection_timeout=connect, read_timeout=read)
    import fsspec  # imported here: the hit path (see s3.py) never needs it

    if scheme == "s3":
        options = _s3_with_timeouts(options, connect, read)
    fs = fsspec.filesystem(scheme, **options)
    if scheme == "s3":
        fs.retries = 1  # s3fs's own loop makes one attempt; botocore is told the same
    return fs


def _s3_with_timeouts(options: dict[str, Any], connect: float, read: float) -> dict[str, Any]:
    config = dict(options.get("config_kwargs") or {})
    config.update(
        connect_timeout=connect,
        read_timeout=read,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    return {**options, "config_kwargs": config}


def filesystem_for(location: Location, timeout: float = DEFAULT_TIMEOUT) -> AbstractFileSystem:
    """The fsspec filesystem that reaches ``location``, its SDK timeouts set from ``timeout``.

    Instances are cached by fsspec (one per location options and timeout).
    """
    return filesystem(location.scheme, location.storage_options, timeout)
