"""Talking to storage: list a model directory and read byte ranges, each within one deadline.

Every storage operation (a listing, a small read, one ranged read) runs under
one :class:`~cacheagent.remote.faults.Deadline` of ``timeout`` seconds that
covers everything it does: a fast client, a fallback to the SDK, every
retry and the pauses between them. Only outages are retried, with jittered
backoff; any other failure is reported at once as the error that names its
cause (:mod:`cacheagent.remote.faults`).

Locations a fast, SDK-free client can reach are served by it: S3 with static
credentials (:mod:`cacheagent.remote.s3`), GCS anonymously (an emulator:
:mod:`cacheagent.remote.gcs`) and Azure with an account key
(:mod:`cacheagent.remote.azure`; for these two, listings and small whole
reads only). A fast client serves a location until it meets something it
cannot handle (a region it signs wrongly, a redirect, refused credentials, an
answer it does not understand); the location's
:class:`~cacheagent.remote.location.Route` then sends its listings and reads
to the SDK for good, so one client serves each location.

Every storage failure leaves this module as one of the package's errors,
worded for an operator, with secrets scrubbed from anything quoted.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cacheagent.errors import (
    CacheAgentError,
    RemoteAccessDeniedError,
    RemoteChangedError,
    RemoteConfigError,
    RemoteNotFoundError,
    StorageUnavailableError,
)
from cacheagent.remote import s3
from cacheagent.remote.clients import filesystem_for
from cacheagent.remote.faults import (
    CHANGED,
    CONFIG,
    DENIED,
    NOT_FOUND,
    OUTAGE,
    Deadline,
    classify,
)
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import Manifest, _is_directory_marker, build_manifest
from cacheagent.settings import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    import fsspec

_log = logging.getLogger(__name__)

T = TypeVar("T")
# Backoff between attempts, each pause jittered by +-50% so that many workers hit
# by one outage do not retry in step. Listing decides between a fresh and a
# stale-if-error snapshot, so it gives up sooner than a download, which has
# already made progress. The deadline cuts both short.
RETRY_DELAYS = (0.25, 1.0, 3.0)
LIST_RETRY_DELAYS = (0.5,)
# A background listing's result is waited for this much longer than its deadline.
_JOIN_GRACE_S = 5.0


def list_manifest(
    location: Location,
    fs: fsspec.AbstractFileSystem | None = None,
    select: Callable[[Iterable[str]], set[str]] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Manifest:
    """List ``location`` recursively (one listing, within ``timeout`` s) and build its manifest."""
    found = list_tree(location, fs, LIST_RETRY_DELAYS, timeout)
    return _manifest_or_not_found(location, found, select)


def list_tree(
    location: Location,
    fs: fsspec.AbstractFileSystem | None = None,
    delays: tuple[float, ...] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, dict[str, Any]]:
    """Everything below ``location`` from one recursive listing, as ``find(detail=True)`` gives it.

    Directory entries (:func:`is_directory_entry`) are included where storage has
    real ones: local directories and Azure folder markers. The fetch and
    ``cacheagent check`` both see a model through this one listing.
    """

    def listing(deadline: Deadline) -> dict[str, dict[str, Any]]:
        if fs is None:
            fast = _fast(location, "list", lambda: _fast_tree(location, deadline))
            if fast is not None:
                return fast
        filesystem = fs or filesystem_for(location, timeout)
        if location.is_remote:
            # A listing must reflect storage now, not fsspec's memory of it.
            filesystem.invalidate_cache()
        # Azure folder markers (hdi_isfolder blobs) are reported only as directories,
        # and local directories are real (an ensemble's empty version directory); S3
        # and GCS markers ("name/" objects) come with the files. There, inferred
        # directories are left out: one could share its name with a file and hide it.
        found: dict[str, dict[str, Any]] = _call(
            filesystem,
            "find",
            deadline,
            location.root,
            detail=True,
            withdirs=location.scheme == "as" or not location.is_remote,
        )
        return found

    return _retrying(listing, location, "list", delays, Deadline(timeout))


def _fast_tree(location: Location, deadline: Deadline) -> dict[str, dict[str, Any]] | None:
    """The fast client's recursive listing of ``location``; None where it has none."""
    if location.scheme == "s3":
        listed = s3.list_objects(location, deadline)
        return None if listed is None else listed[0]
    # The GCS and Azure clients (XML, e-mail date parsing) are imported only where
    # used: an S3 worker's first LOAD does not pay for them.
    if location.scheme == "gs":
        from cacheagent.remote import gcs

        return gcs.list_objects(location, deadline)
    if location.scheme == "as":
        from cacheagent.remote import azure

        return azure.list_blobs(location, deadline)
    return None


def is_directory_entry(name: str, info: Mapping[str, Any]) -> bool:
    """True if an entry of :func:`list_tree` is a directory or a folder marker, not a file."""
    return _is_directory_marker(name, info)


def start_listing(
    location: Location,
    select: Callable[[Iterable[str]], set[str]] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Callable[[], Manifest]:
    """Start :func:`list_manifest` in a thread; the returned call waits for its result.

    The result is the manifest, or the listing's error raised again in the caller.
    A fresh worker starts its first listing this way before it imports and opens
    the cache, so the storage round trip overlaps that work instead of adding to it.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(list_manifest(location, None, select, timeout))
        except BaseException as exc:  # handed to the caller, who handles it as usual
            outcome.append(exc)

    thread = threading.Thread(target=run, name="cacheagent-listing", daemon=True)
    thread.start()

    def result() -> Manifest:
        thread.join(timeout + _JOIN_GRACE_S)
        if not outcome:
            _log.warning("cacheagent: listing %s outlived its %g s deadline", location.url, timeout)
            raise StorageUnavailableError(
                f"list failed: storage for {location.url} is unreachable or failing (no answer "
                f"within the {timeout:g} s timeout); check the endpoint, network and storage "
                "status, or raise the timeout setting",
                url=location.url,
            )
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        manifest: Manifest = outcome[0]
        return manifest

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
            "bucket/container is missing; check the repository path and the model name",
            url=location.url,
        )
    return manifest


def list_model_names(
    repository: Location,
    fs: fsspec.AbstractFileSystem | None = None,
    delays: tuple[float, ...] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[str]:
    """The names of the directories directly below a repository (its models), sorted.

    Local directories and S3 with static credentials are listed without fsspec:
    the prefetcher calls this while Triton starts its backends, and importing an
    SDK then would take CPU from Triton's own start.
    """
    if fs is None and not repository.is_remote:
        return with_retries(lambda: _local_subdirs(repository.root), repository, "list", delays)

    def listing(deadline: Deadline) -> list[str]:
        if fs is None and repository.scheme == "s3":
            fast = _fast(repository, "list", lambda: s3.list_objects(repository, deadline, "/"))
            if fast is not None:
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fast[1])
        filesystem = fs or filesystem_for(repository, timeout)
        entries = _call(filesystem, "ls", deadline, repository.root, detail=True)
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in entries
            if e.get("type") == "directory"
        )

    return _retrying(listing, repository, "list", delays, Deadline(timeout))


def _local_subdirs(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def read_file(
    location: Location,
    relpath: str,
    fs: fsspec.AbstractFileSystem | None = None,
    delays: tuple[float, ...] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """The whole (small) file ``relpath`` below ``location``, e.g. a model's config.pbtxt.

    Raises the package's errors, :class:`RemoteNotFoundError` if it does not exist.
    Like :func:`list_model_names`, it avoids fsspec where it can.
    """
    if fs is None and not location.is_remote:
        path = os.path.join(location.root, relpath)
        return with_retries(lambda: _read_local(path), location, "read", delays)

    def read(deadline: Deadline) -> bytes:
        if fs is None:
            data = _fast(location, "read", lambda: _fast_whole(location, relpath, deadline))
            if data is not None:
                return data
        filesystem = fs or filesystem_for(location, timeout)
        data = _call(filesystem, "cat_file", deadline, f"{location.root}/{relpath}")
        return bytes(data)

    return _retrying(read, location, "read", delays, Deadline(timeout), relpath)


def _fast_whole(location: Location, relpath: str, deadline: Deadline) -> bytes | None:
    """The whole small file by the fast client; None where it cannot serve the location."""
    if location.scheme == "gs":
        from cacheagent.remote import gcs

        return gcs.read_object(location, relpath, deadline)
    if location.scheme == "as":
        from cacheagent.remote import azure

        return azure.read_blob(location, relpath, deadline)
    if not s3.can_read(location):
        return None
    body = s3.open_object(location, relpath, None, deadline)
    try:
        return body.read_all(deadline)
    finally:
        body.close()


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _Stream(Protocol):
    def read(self, size: int, deadline: Deadline) -> bytes: ...

    def close(self) -> None: ...


class _Buffered:
    """An answer the SDK has already read into memory, read on like a stream."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._at = 0

    def read(self, size: int, deadline: Deadline) -> bytes:
        if self._at + size > len(self._view):
            raise EOFError(f"{size} bytes asked, {len(self._view) - self._at} left")
        piece = bytes(self._view[self._at : self._at + size])
        self._at += size
        return piece

    def close(self) -> None:
        self._view.release()


class WholeObject:
    """The answer of a server that ignored Range: the whole object, from byte 0.

    Read it in order, ``part_size`` bytes at a time, each read bounded by the
    timeout; then :meth:`close` it. Errors are the package's, like every read's.
    """

    def __init__(self, stream: _Stream, location: Location, relpath: str) -> None:
        self._stream, self.location, self.relpath = stream, location, relpath

    def read(self, size: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """The next ``size`` bytes of the object."""
        try:
            data = self._stream.read(size, Deadline(timeout))
        except Exception as exc:
            error = translate_error(exc, self.location, f"read {self.relpath}", path=self.relpath)
            if error is exc:
                raise
            raise error from exc
        return data

    def close(self) -> None:
        """Release the connection (it is not reused unless the body was read to its end)."""
        self._stream.close()


def read_tagged_part(
    location: Location,
    relpath: str,
    start: int,
    end: int,
    size: int | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[bytes | WholeObject, str | None]:
    """Bytes [start, end) of the ``size``-byte file ``relpath`` below ``location``, and
    the ETag the answer carried (None when unseen: the SDKs hide it).

    ``size`` is the file's size as listed (None if unknown: then it is not checked).
    With the ETag a download refuses a part of another version than it listed
    (:func:`cacheagent.remote.manifest.contradicts_listing`).

    A server that ignores Range answers with the whole object: that answer is
    returned as a :class:`WholeObject` to stream from byte 0 (the caller closes
    it), instead of being read, whole, once per part. An object that is gone
    or has another size than listed raises :class:`RemoteChangedError`.
    """
    what = f"read {relpath}"

    def read(deadline: Deadline) -> tuple[bytes | WholeObject, str | None]:
        def fast_read() -> tuple[bytes | WholeObject, str | None]:
            return _fast_part(location, relpath, start, end, size, deadline)

        if s3.can_read(location):
            fast = _fast(location, what, fast_read)
            if fast is not None:
                return fast
        return _sdk_part(location, relpath, start, end, size, deadline, timeout), None

    try:
        return _retrying(read, location, what, None, Deadline(timeout), relpath)
    except RemoteNotFoundError as exc:
        raise RemoteChangedError(
            f"{location.url}/{relpath} was listed but is gone now: it was deleted or replaced "
            "while the model was being downloaded; load the model again once the upload has "
            "finished",
            url=f"{location.url}/{relpath}",
            status=exc.status,
            path=relpath,
        ) from exc


def read_range(
    location: Location,
    relpath: str,
    start: int,
    end: int,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """Read bytes [start, end) of a file below ``location``; exactly that many or an error.

    S3 locations with static credentials use the fast client (no SDK import)
    unless their listing needed the SDK; anything else uses the location's SDK.
    """
    got = read_tagged_part(location, relpath, start, end, None, timeout)[0]
    if not isinstance(got, WholeObject):
        return got
    try:
        for offset in range(0, start, s3._BODY_PIECE):
            got.read(min(s3._BODY_PIECE, start - offset), timeout)
        return got.read(end - start, timeout)
    finally:
        got.close()


def _fast_part(
    location: Location,
    relpath: str,
    start: int,
    end: int,
    size: int | None,
    deadline: Deadline,
) -> tuple[bytes | WholeObject, str | None]:
    body = s3.open_object(location, relpath, (start, end), deadline)
    keep_open = False
    try:
        url = f"{location.url}/{relpath}"
        if body.total is not None and size is not None and body.total != size:
            raise _size_changed(location, relpath, body.total, size)
        if (body.start, body.length) == (start, end - start):
            return body.read(end - start, deadline), body.etag
        if body.start == 0 and (size is None or body.length in (size, None)):
            keep_open = True
            return WholeObject(body, location, relpath), body.etag
        raise RemoteConfigError(
            f"read {relpath} failed: {url} answered {body.length} bytes from offset "
            f"{body.start} to a request for bytes {start}-{end - 1}: storage, or a proxy in "
            "between, does not honour Range requests correctly; fix or bypass it (NO_PROXY)",
            url=url,
            status=body.status,
            path=relpath,
        )
    finally:
        if not keep_open:
            body.close()


def _sdk_part(
    location: Location,
    relpath: str,
    start: int,
    end: int,
    size: int | None,
    deadline: Deadline,
    timeout: float,
) -> bytes | WholeObject:
    filesystem = filesystem_for(location, timeout)
    path = f"{location.root}/{relpath}"
    data: bytes = _call(filesystem, "cat_file", deadline, path, start=start, end=end)
    if len(data) == end - start:
        return data
    if size is not None and len(data) == size and start > 0:
        # The server ignored Range and the SDK read the whole object: use it, once.
        return WholeObject(_Buffered(data), location, relpath)
    raise RemoteChangedError(
        f"{location.url}/{relpath} returned {len(data)} bytes for a {end - start}-byte range: "
        "the object changed while it was being downloaded; retry the load",
        url=f"{location.url}/{relpath}",
        path=relpath,
    )


def _size_changed(location: Location, relpath: str, now: int, listed: int) -> RemoteChangedError:
    return RemoteChangedError(
        f"{location.url}/{relpath} is {now} bytes now but was {listed} when listed: it changed "
        "while the model was being downloaded; load the model again once the upload has finished",
        url=f"{location.url}/{relpath}",
        path=relpath,
    )


def _fast(location: Location, what: str, call: Callable[[], T]) -> T | None:
    """Run ``call`` with the location's fast client; None when the SDK is to do it instead.

    Outages and missing objects are the same for every client: they are raised.
    Anything else the fast client cannot handle hands the location to the SDK.
    """
    if location.route.sdk:
        return None
    try:
        return call()
    except CacheAgentError:
        raise
    except Exception as exc:
        if classify(exc).kind in (OUTAGE, NOT_FOUND, CHANGED):
            raise
        location.route.sdk = True
        _log.info(
            "cacheagent: the fast %s client could not %s %s (%s); the SDK serves this "
            "location from now on",
            _CLIENT_NAMES.get(location.scheme, location.scheme),
            what,
            location.url,
            scrub(f"{type(exc).__name__}: {exc}", location)[:300],
        )
        return None


_CLIENT_NAMES = {"s3": "S3", "gs": "GCS", "as": "Azure"}


def _call(
    filesystem: fsspec.AbstractFileSystem,
    method: str,
    deadline: Deadline,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``filesystem.<method>(*args, **kwargs)``, cancelled by fsspec when the deadline expires."""
    if getattr(filesystem, "async_impl", False):
        remaining = deadline.remaining()
        if remaining <= 0:
            raise TimeoutError(f"the {deadline.seconds:g} s deadline expired before the request")
        kwargs["timeout"] = remaining
    return getattr(filesystem, method)(*args, **kwargs)


def with_retries(
    call: Callable[[], T],
    location: Location,
    what: str,
    delays: tuple[float, ...] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> T:
    """Run ``call``, retrying outages with jittered backoff for at most ``timeout`` s in all."""
    return _retrying(lambda _deadline: call(), location, what, delays, Deadline(timeout))


def _retrying(
    operation: Callable[[Deadline], T],
    location: Location,
    what: str,
    delays: tuple[float, ...] | None,
    deadline: Deadline,
    path: str | None = None,
) -> T:
    delays = RETRY_DELAYS if delays is None else delays
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation(deadline)
        except Exception as exc:
            error = translate_error(exc, location, what, attempt, deadline=deadline, path=path)
            if error is exc:
                raise
            if not isinstance(error, StorageUnavailableError) or attempt > len(delays):
                raise error from exc
            pause = delays[attempt - 1] * random.uniform(0.5, 1.5)
            cause = scrub(f"{type(exc).__name__}: {exc}", location)[:300]
            if pause >= deadline.remaining():
                _log.warning(
                    "cacheagent: %s of %s: the %g s deadline expires before attempt %d; "
                    "giving up (%s)",
                    what,
                    location.url,
                    deadline.seconds,
                    attempt + 1,
                    cause,
                )
                expired = translate_error(
                    exc, location, what, attempt, deadline=deadline, path=path, expired=True
                )
                raise expired from exc
            _log.warning(
                "cacheagent: %s of %s failed (attempt %d of %d): %s; retrying in %.2f s",
                what,
                location.url,
                attempt,
                len(delays) + 1,
                cause,
                pause,
            )
            time.sleep(pause)


def translate_error(
    exc: BaseException,
    location: Location,
    what: str,
    attempts: int = 1,
    *,
    deadline: Deadline | None = None,
    path: str | None = None,
    expired: bool = False,
) -> CacheAgentError:
    """Map a storage client's exception onto the package's errors, secrets scrubbed.

    Only an outage becomes :class:`StorageUnavailableError`; the other errors name
    their cause and what to change. ``path`` is the object's, when there is one.
    """
    if isinstance(exc, CacheAgentError):
        return exc
    diagnosis = classify(exc)
    detail = scrub(f"{type(exc).__name__}: {exc}", location)[:300]
    url = f"{location.url}/{path}" if path else location.url
    where: dict[str, Any] = {"url": url, "status": diagnosis.status, "path": path}
    if diagnosis.kind == NOT_FOUND:
        return RemoteNotFoundError(
            f"{what} failed: {url} was not found ({detail}); check that the bucket or "
            "container exists and the path is right",
            **where,
        )
    if diagnosis.kind == DENIED:
        return RemoteAccessDeniedError(
            f"{what} failed: access to {url} was denied ({detail}); check the "
            "credentials (environment variables or TRITON_CLOUD_CREDENTIAL_PATH) and their rights",
            **where,
        )
    if diagnosis.kind == CHANGED:
        return RemoteChangedError(
            f"{what} failed: {url} changed while it was being read ({detail}); load the model "
            "again once the upload has finished",
            **where,
        )
    if diagnosis.kind == CONFIG:
        hint = diagnosis.hint or "check the endpoint, the region and the credentials"
        return RemoteConfigError(
            f"{what} failed: {location.url} cannot be used as configured: {hint} ({detail}). "
            "This is not an outage, so no cached snapshot is served in its place",
            **where,
        )
    within = ""
    if deadline is not None and (expired or deadline.expired):
        within = f" within the {deadline.seconds:g} s timeout"
    return StorageUnavailableError(
        f"{what} failed: storage for {location.url} is unreachable or failing ({detail}) after "
        f"{attempts} attempt(s){within}; check the endpoint, network and storage status",
        **where,
    )


def scrub(text: str, location: Location) -> str:
    """Replace every secret of the location's storage options in ``text`` with ***."""
    for secret in _secrets(location.storage_options):
        text = text.replace(secret, "***")
    return text


_SECRET_KEYS = {
    "secret",
    "key",
    "token",
    "account_key",
    "connection_string",
    "sas_token",
    "credential",
}


def _secrets(options: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key, value in options.items():
        if key == "proxies" and isinstance(value, dict):
            found.extend(_proxy_secrets(value.values()))
        elif isinstance(value, dict):
            found.extend(_secrets(value))
        elif isinstance(value, str) and key in _SECRET_KEYS and len(value) >= 4:
            found.append(value)
            if key == "connection_string":
                found.extend(_connection_string_secrets(value))
    return sorted(found, key=len, reverse=True)


def _connection_string_secrets(text: str) -> list[str]:
    # Its key or SAS alone may be quoted too, not only the whole string.
    found = []
    for item in text.split(";"):
        name, _, value = item.partition("=")
        if name.strip() in ("AccountKey", "SharedAccessSignature") and len(value.strip()) >= 4:
            found.append(value.strip())
    return found


def _proxy_secrets(urls: Iterable[Any]) -> list[str]:
    # A proxy URL may carry a user and password; the password is a secret.
    found = []
    for url in urls:
        password = urllib.parse.urlsplit(str(url)).password
        if password:
            found.extend([password, urllib.parse.quote(password, safe="")])
    return [secret for secret in found if len(secret) >= 4]
