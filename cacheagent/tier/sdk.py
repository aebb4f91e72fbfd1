"""A tier in any bucket the SDKs reach: GCS, Azure Blob, and S3 the fast client cannot sign.

Every fsspec filesystem cacheagent uses writes exclusively with
``pipe_file(path, data, mode="create")``, each by its store's own conditional
create: s3fs sends ``If-None-Match: *``, gcsfs ``ifGenerationMatch=0``, adlfs
``If-None-Match: *`` (``overwrite=False``). A lost race comes back as a 412 (or
409, or adlfs's FileExistsError), which is what :meth:`FsspecBackend.create`
returns False for.

Credentials, endpoints and proxies are the origin's
(:meth:`cacheagent.remote.location.Location.filesystem`), with the SDKs making
single attempts: the retries and their jittered backoff are
:func:`cacheagent.tier.backend.retrying`'s.
"""

from __future__ import annotations

from typing import Any

from cacheagent.remote.clients import filesystem_for
from cacheagent.remote.faults import CHANGED, NOT_FOUND, chain, classify
from cacheagent.remote.listing import scrub
from cacheagent.remote.location import Location
from cacheagent.tier.backend import OP_TIMEOUT, retrying, translate


class FsspecBackend:
    """Objects below a cloud location, through its fsspec filesystem."""

    def __init__(self, location: Location, timeout: float = OP_TIMEOUT) -> None:
        self.location, self.timeout = location, timeout
        self._fs: Any = None

    @property
    def url(self) -> str:
        """The tier location (holds no secret)."""
        return self.location.url

    @property
    def fs(self) -> Any:
        """The location's filesystem, built on first use (importing an SDK is slow)."""
        if self._fs is None:
            self._fs = filesystem_for(self.location, self.timeout)
        return self._fs

    def _path(self, key: str) -> str:
        return f"{self.location.root.rstrip('/')}/{key}"

    def get(self, key: str) -> bytes | None:
        """The object at ``key``, or None when the store says it does not exist."""

        def attempt() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(self._path(key)))
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise self._translate(exc, f"GET {key}") from exc

        return retrying(attempt, self.url, f"GET {key}")

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (the store's conditional create)."""

        def attempt() -> bool:
            try:
                self.fs.pipe_file(self._path(key), _as_bytes(data), mode="create")
            except Exception as exc:
                if _lost_race(exc):
                    return False
                raise self._translate(exc, f"PUT {key}") from exc
            return True

        return retrying(attempt, self.url, f"PUT {key}")

    def put(self, key: str, data: bytes) -> None:
        """Write ``key``, replacing it."""

        def attempt() -> None:
            try:
                self.fs.pipe_file(self._path(key), _as_bytes(data))
            except Exception as exc:
                raise self._translate(exc, f"PUT {key}") from exc

        retrying(attempt, self.url, f"PUT {key}")

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing one is fine."""

        def attempt() -> None:
            try:
                self.fs.rm_file(self._path(key))
            except Exception as exc:
                if _is_missing(exc):
                    return
                raise self._translate(exc, f"DELETE {key}") from exc

        retrying(attempt, self.url, f"DELETE {key}")

    def _translate(self, exc: BaseException, what: str) -> Exception:
        detail = scrub(f"{type(exc).__name__}: {exc}", self.location)[:300]
        return translate(exc, self.url, what, detail)


def _is_missing(exc: BaseException) -> bool:
    return classify(exc).kind == NOT_FOUND


def _lost_race(exc: BaseException) -> bool:
    # 412 (precondition failed) and 409 (a concurrent conditional write) both mean
    # another node holds the key; adlfs raises FileExistsError for the same.
    if any(isinstance(link, FileExistsError) for link in chain(exc)):
        return True
    diagnosis = classify(exc)
    return diagnosis.kind == CHANGED and diagnosis.status in (409, 412)


def _as_bytes(data: bytes) -> bytes:
    # Ranged reads hand over bytearrays; the Azure SDK's upload takes only bytes.
    return data if type(data) is bytes else bytes(data)
