"""Talking to storage: list a model directory and read byte ranges, with bounded retries.

Every storage failure leaves this module as one of the package's errors,
worded for an operator, with secrets scrubbed from anything quoted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from cacheagent.errors import (
    CacheAgentError,
    RemoteAccessDeniedError,
    RemoteChangedError,
    RemoteNotFoundError,
    StorageUnavailableError,
)
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import Manifest, build_manifest
from cacheagent.remote.s3 import can_read, fast_cat, fast_find, fast_read, fast_subdirs

if TYPE_CHECKING:
    import fsspec

T = TypeVar("T")
# Bounded backoff on top of each SDK's own (also bounded, see clients.py).
# Listing is what decides between a fresh and a stale-if-error snapshot, so
# it gives up sooner than a download, which has already made progress.
RETRY_DELAYS = (0.25, 1.0, 3.0)
LIST_RETRY_DELAYS = (0.5,)


def list_manifest(
    location: Location,
    fs: fsspec.AbstractFileSystem | None = None,
    select: Callable[[Iterable[str]], set[str]] | None = None,
) -> Manifest:
    """List ``location`` recursively (one listing) and build its manifest."""
    fast = fast_find(location) if location.scheme == "s3" else None
    if fast is not None:
        return _manifest_or_not_found(location, fast, select)
    fs = fs or location.filesystem()

    def listing() -> dict[str, dict[str, Any]]:
        if location.is_remote:
            # A listing must reflect storage now, not fsspec's memory of it.
            fs.invalidate_cache()
        # Azure folder markers (hdi_isfolder blobs) are reported only as directories;
        # S3 and GCS markers ("name/" objects) come with the files. Elsewhere inferred
        # directories are left out: one could share its name with a file and hide it.
        return fs.find(location.root, detail=True, withdirs=location.scheme == "as")

    found = with_retries(listing, location, "list", LIST_RETRY_DELAYS)
    return _manifest_or_not_found(location, found, select)


def start_listing(
    location: Location, select: Callable[[Iterable[str]], set[str]] | None = None
) -> Callable[[], Manifest]:
    """Start :func:`list_manifest` in a thread; the returned call waits for its result.

    The result is the manifest, or the listing's error raised again in the caller.
    A fresh worker starts its first listing this way before it imports and opens
    the cache, so the storage round trip overlaps that work instead of adding to it.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(list_manifest(location, None, select))
        except BaseException as exc:  # handed to the caller, who handles it as usual
            outcome.append(exc)

    thread = threading.Thread(target=run, name="cacheagent-listing", daemon=True)
    thread.start()

    def result() -> Manifest:
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    return result


def _manifest_or_not_found(
    location: Location,
    found: dict[str, dict[str, Any]],
    select: Callable[[Iterable[str]], set[str]] | None,
) -> Manifest:
    manifest = build_manifest(location.url, location.root, found, select)
    if not manifest.files and not manifest.empty_dirs:
        raise RemoteNotFoundError(
            f"no model files under {location.url}: the directory is empty, does not exist, or the "
            "bucket/container is missing; check the repository path and the model name"
        )
    return manifest


def list_model_names(
    repository: Location,
    fs: fsspec.AbstractFileSystem | None = None,
    delays: tuple[float, ...] | None = None,
) -> list[str]:
    """The names of the directories directly below a repository (its models), sorted.

    Local directories and S3 with static credentials are listed without fsspec:
    the prefetcher calls this while Triton starts its backends, and importing an
    SDK then would take CPU from Triton's own start.
    """
    if fs is None and not repository.is_remote:
        return with_retries(lambda: _local_subdirs(repository.root), repository, "list", delays)
    if fs is None and repository.scheme == "s3":
        fast = fast_subdirs(repository)
        if fast is not None:
            return fast
    fs = fs or repository.filesystem()
    entries = with_retries(lambda: fs.ls(repository.root, detail=True), repository, "list", delays)
    return sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
    )


def _local_subdirs(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def read_file(
    location: Location,
    relpath: str,
    fs: fsspec.AbstractFileSystem | None = None,
    delays: tuple[float, ...] | None = None,
) -> bytes:
    """The whole (small) file ``relpath`` below ``location``, e.g. a model's config.pbtxt.

    Raises the package's errors, :class:`RemoteNotFoundError` if it does not exist.
    Like :func:`list_model_names`, it avoids fsspec where it can.
    """
    if fs is None and not location.is_remote:
        path = os.path.join(location.root, relpath)
        return with_retries(lambda: _read_local(path), location, "read", delays)
    if fs is None and can_read(location):
        return with_retries(lambda: fast_cat(location, relpath), location, "read", delays)
    filesystem = fs or location.filesystem()
    path = f"{location.root}/{relpath}"
    return with_retries(lambda: filesystem.cat_file(path), location, "read", delays)


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_range(
    fs: fsspec.AbstractFileSystem | None, location: Location, relpath: str, start: int, end: int
) -> bytes:
    """Read bytes [start, end) of a file below ``location``; exactly that many or an error.

    With ``fs`` None, S3 locations with static credentials use the fast client
    (no SDK import); anything else uses the location's fsspec filesystem.
    """
    path = f"{location.root}/{relpath}"
    if fs is None and can_read(location):

        def read() -> bytes:
            return fast_read(location, relpath, start, end)

    else:
        filesystem = fs or location.filesystem()

        def read() -> bytes:
            return filesystem.cat_file(path, start=start, end=end)

    data = with_retries(read, location, f"read {relpath}")
    if len(data) != end - start:
        raise RemoteChangedError(
            f"{location.url}/{relpath} returned {len(data)} bytes for a {end - start}-byte range: "
            "the object changed while it was being downloaded; retry the load"
        )
    return data


def with_retries(
    call: Callable[[], T],
    location: Location,
    what: str,
    delays: tuple[float, ...] | None = None,
) -> T:
    """Run ``call``, retrying transient storage errors with bounded backoff."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except Exception as exc:
            error = translate_error(exc, location, what, len(delays) + 1)
            if not isinstance(error, StorageUnavailableError) or attempt == len(delays):
                raise error from None
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def translate_error(
    exc: BaseException, location: Location, what: str, attempts: int = 1
) -> CacheAgentError:
    """Map a storage client's exception onto the package's errors, secrets scrubbed."""
    if isinstance(exc, CacheAgentError):
        return exc
    detail = scrub(f"{type(exc).__name__}: {exc}", location)[:300]
    status = _http_status(exc)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return RemoteNotFoundError(
            f"{what} failed: {location.url} was not found ({detail}); check that the bucket or "
            "container exists and the path is right"
        )
    if isinstance(exc, PermissionError) or status in (401, 403):
        return RemoteAccessDeniedError(
            f"{what} failed: access to {location.url} was denied ({detail}); check the "
            "credentials (environment variables or TRITON_CLOUD_CREDENTIAL_PATH) and their rights"
        )
    return StorageUnavailableError(
        f"{what} failed: storage for {location.url} is unreachable or failing ({detail}) after "
        f"{attempts} attempt(s); check the endpoint, network and storage status"
    )


def _http_status(exc: BaseException) -> int | None:
    # SDKs carry the HTTP status under different names; an authorization
    # failure must never pass for an outage (stale-if-error would hide it).
    for name in ("status_code", "status", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def scrub(text: str, location: Location) -> str:
    """Replace every secret of the location's storage options in ``text`` with ***."""
    for secret in _secrets(location.storage_options):
        text = text.replace(secret, "***")
    return text


def _secrets(options: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key, value in options.items():
        if isinstance(value, dict):
            found.extend(_secrets(value))
        elif (
            isinstance(value, str)
            and key
            in {
                "secret",
                "key",
                "token",
                "account_key",
                "connection_string",
                "sas_token",
                "credential",
            }
            and len(value) >= 4
        ):
            found.append(value)
    return sorted(found, key=len, reverse=True)
