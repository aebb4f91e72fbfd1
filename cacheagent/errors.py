"""The exception hierarchy of cacheagent.

Every error the package raises on purpose is a :class:`CacheAgentError`. Each
subclass also derives from the built-in exception a caller would naturally
catch (``ValueError`` for bad input, ``FileNotFoundError`` for a missing
object, ...), so code that knows nothing of cacheagent still handles it well.
Messages say what happened, to what, and what to do next; they never carry
credentials.

Only :class:`StorageUnavailableError` means an outage (stale-if-error may serve
a cached snapshot then); every other storage error is the operator's to fix.
"""

from __future__ import annotations


class CacheAgentError(Exception):
    """Root of every error raised by cacheagent on purpose.

    ``url`` is the location (or object) concerned, ``status`` the HTTP status
    storage answered, ``path`` the object's path relative to the location; each
    is None when it does not apply. The code that raises the error sets them, so
    callers can act on the cause without parsing the message.
    """

    def __init__(
        self,
        message: str = "",
        *,
        url: str | None = None,
        status: int | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.path = path


class InvalidLocationError(CacheAgentError, ValueError):
    """A repository location string does not match any accepted form."""


class InvalidParameterError(CacheAgentError, ValueError):
    """An agent parameter, CLI option or credential file entry has a bad name or value."""


class UnsafePathError(CacheAgentError, ValueError):
    """A remote object name would escape, or cannot live in, the cache directory."""


class RemoteNotFoundError(CacheAgentError, FileNotFoundError):
    """The remote model directory, bucket or container does not exist or is empty."""


class RemoteAccessDeniedError(CacheAgentError, PermissionError):
    """Storage refused the credentials or the access."""


class RemoteConfigError(CacheAgentError, ValueError):
    """Storage cannot be used as configured: credentials missing, profile unknown,
    wrong region or endpoint, a rejected token or request. Never an outage."""


class StorageUnavailableError(CacheAgentError, ConnectionError):
    """Storage could not be reached, or kept failing after retries (an outage)."""


class RemoteChangedError(CacheAgentError, RuntimeError):
    """An object changed (or vanished) between the listing and its download."""


class CacheFullError(CacheAgentError, OSError):
    """The model does not fit in the cache budget or on the disk."""


class UnsafeCacheDirError(CacheAgentError, PermissionError):
    """The cache directory is world-writable, owned by someone else, or unusable."""
