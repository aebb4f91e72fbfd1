"""The exception hierarchy of cacheagent.

Every error the package raises on purpose is a :class:`CacheAgentError`. Each
subclass also derives from the built-in exception a caller would naturally
catch (``ValueError`` for bad input, ``FileNotFoundError`` for a missing
object, ...), so code that knows nothing of cacheagent still handles it well.
Messages say what happened, to what, and what to do next; they never carry
credentials.
"""

from __future__ import annotations


class CacheAgentError(Exception):
    """Root of every error raised by cacheagent on purpose."""


class InvalidLocationError(CacheAgentError, ValueError):
    """A repository location string does not match any accepted form."""


class InvalidParameterError(CacheAgentError, ValueError):
    """An agent parameter or CLI option has a bad name or value."""


class UnsafePathError(CacheAgentError, ValueError):
    """A remote object name would escape, or cannot live in, the cache directory."""


class RemoteNotFoundError(CacheAgentError, FileNotFoundError):
    """The remote model directory, bucket or container does not exist or is empty."""


class RemoteAccessDeniedError(CacheAgentError, PermissionError):
    """Storage refused the credentials or the access."""


class StorageUnavailableError(CacheAgentError, ConnectionError):
    """Storage could not be reached, or kept failing after retries."""


class RemoteChangedError(CacheAgentError, RuntimeError):
    """An object changed between the listing and its download."""


class CacheFullError(CacheAgentError, OSError):
    """The model does not fit in the cache budget or on the disk."""


class CacheCorruptError(CacheAgentError, RuntimeError):
    """A cached blob or snapshot does not match what the index recorded."""


class UnsafeCacheDirError(CacheAgentError, PermissionError):
    """The cache directory is world-writable, owned by someone else, or unusable."""


class WorkerError(CacheAgentError, RuntimeError):
    """The bridge between Triton and the Python worker failed."""
