"""What a storage failure means: an outage to retry, or a cause for the operator to fix.

Only outages are retried and only outages let stale-if-error serve a cached
snapshot: connections refused, reset or timed out, 5xx answers, 429 and
throttling. Everything else (no credentials, an unknown profile, a wrong region
or endpoint, a rejected token, a request storage calls invalid) becomes an
error that names the cause and says what to change, because serving stale
would hide a mistake that no amount of waiting fixes.

The SDKs wrap the causes differently (s3fs chains botocore's ClientError under
an OSError, gcsfs raises its HttpError or bare OSErrors, Azure has its own
hierarchy), so :func:`classify` walks the whole exception chain and reads
classes by name: the fast S3 path must be able to classify without importing
any SDK.

This module also holds the deadline every storage operation runs under.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cacheagent.settings import DEFAULT_TIMEOUT

OUTAGE, NOT_FOUND, DENIED, CHANGED, CONFIG = "outage", "not found", "denied", "changed", "config"

# Within one deadline an attempt may wait this long to connect and this long for
# each read, so that a black hole still leaves time for another attempt.
MAX_CONNECT_TIMEOUT_S = 10.0
MIN_ATTEMPT_TIMEOUT_S = 0.5

_NETWORK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
}
_OUTAGE_CLASSES = {
    # by the names several libraries give them (requests, botocore, asyncio)
    "ConnectionError",
    "TimeoutError",
    "Timeout",
    # botocore
    "HTTPClientError",
    "EndpointConnectionError",
    "ProxyConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    # aiohttp
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientPayloadError",
    "ClientConnectorError",
    "ClientOSError",
    # requests (gcsfs turns a 502 into ProxyError), google-auth's network failures
    "ChunkedEncodingError",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "TransportError",
    # azure-core
    "ServiceRequestError",
    "ServiceResponseError",
    # fsspec's deadline, http.client's cut bodies
    "FSTimeoutError",
    "IncompleteRead",
}
_OUTAGE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "ServerBusy",
    "OperationTimedOut",
}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "BlobNotFound", "ContainerNotFound"}
_REDIRECT_CODES = {"PermanentRedirect", "TemporaryRedirect", "Redirect", "301", "307"}

_ASK_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give the "
    "location an entry in TRITON_CLOUD_CREDENTIAL_PATH"
)
_ASK_REGION = (
    'set AWS_DEFAULT_REGION (or "region" in TRITON_CLOUD_CREDENTIAL_PATH) to the bucket\'s region'
)
# What to change, for the causes that are named by their exception's class.
_CONFIG_CLASSES = {
    "NoCredentialsError": f"no credentials were found: {_ASK_CREDENTIALS}",
    "PartialCredentialsError": f"the credentials are incomplete: {_ASK_CREDENTIALS}",
    "ProfileNotFound": (
        'the AWS profile named by AWS_PROFILE (or "profile" in TRITON_CLOUD_CREDENTIAL_PATH) '
        "is in neither ~/.aws/config nor ~/.aws/credentials: fix the name or add the profile"
    ),
    "NoRegionError": f"no region is configured: {_ASK_REGION}",
    "InvalidRegionError": f"the configured region is not a valid region name: {_ASK_REGION}",
    "CredentialRetrievalError": f"the credentials could not be obtained: {_ASK_CREDENTIALS}",
    "DefaultCredentialsError": (
        "no Google credentials were found: set GOOGLE_APPLICATION_CREDENTIALS to a service "
        "account key file, or give the location an entry in TRITON_CLOUD_CREDENTIAL_PATH"
    ),
    "SSLCertVerificationError": (
        "the endpoint's TLS certificate could not be verified: point AWS_CA_BUNDLE (S3) or "
        "SSL_CERT_FILE at the CA that signed it, or fix the endpoint's host name"
    ),
    "ClientConnectorCertificateError": (
        "the endpoint's TLS certificate could not be verified: point SSL_CERT_FILE at the "
        "CA that signed it, or fix the endpoint's host name"
    ),
}
_DENIED_CLASSES = {"ClientAuthenticationError", "RefreshError", "NoAuthenticationInformation"}


@dataclass(frozen=True)
class Diagnosis:
    """The meaning of one failure: its kind, HTTP status and error code, and the fix."""

    kind: str  # OUTAGE, NOT_FOUND, DENIED, CHANGED or CONFIG
    status: int | None = None
    code: str | None = None
    hint: str = ""  # for CONFIG: what to change

    @property
    def retryable(self) -> bool:
        """Only outages are worth another attempt."""
        return self.kind == OUTAGE


class Deadline:
    """One end-to-end bound on a storage operation, retries and fallbacks included."""

    def __init__(self, seconds: float = DEFAULT_TIMEOUT) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.expires - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once the operation has used up its time."""
        return self.remaining() <= 0.0

    def connect_timeout(self) -> float:
        """How long the next connection attempt may take."""
        return self._bounded(connect_timeout(self.seconds))

    def read_timeout(self) -> float:
        """How long the next socket read may wait for data."""
        return self._bounded(read_timeout(self.seconds))

    def _bounded(self, limit: float) -> float:
        remaining = self.remaining()
        if remaining <= 0.0:
            raise TimeoutError(f"the {self.seconds:g} s deadline of this storage operation expired")
        return min(limit, remaining)


def connect_timeout(timeout: float) -> float:
    """Connect timeout of one attempt under an operation ``timeout``: a quarter, at most 10 s."""
    return max(MIN_ATTEMPT_TIMEOUT_S, min(MAX_CONNECT_TIMEOUT_S, timeout / 4))


def read_timeout(timeout: float) -> float:
    """Idle-read timeout of one attempt: a third of ``timeout``, so two or three attempts fit."""
    return max(MIN_ATTEMPT_TIMEOUT_S, timeout / 3)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> Diagnosis:
    """What ``exc``, raised by a storage client, means.

    The most specific link of the chain wins: an HTTP answer (s3fs raises
    OSError(EIO) from the ClientError that says what really happened), then a
    named configuration cause (botocore's SSLError wraps the certificate
    failure), then whatever the outermost recognisable link says.
    """
    diagnoses = [found for link in chain(exc) if (found := _classify_one(link)) is not None]
    for diagnosis in diagnoses:
        if diagnosis.code or diagnosis.status:
            return diagnosis
    for diagnosis in diagnoses:
        if diagnosis.kind == CONFIG and diagnosis.hint:
            return diagnosis
    return diagnoses[0] if diagnoses else Diagnosis(CONFIG)


def _classify_one(exc: BaseException) -> Diagnosis | None:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "HttpProcessingError" in names:
        # aiohttp's parser errors (a body cut short, a garbled head) carry a "code" of
        # 400 that no server sent: the answer was broken in transit, an outage.
        return Diagnosis(OUTAGE)
    status, code, message = _http_facts(exc)
    if code or status:
        return _by_answer(status, code, message, exc)
    for name, hint in _CONFIG_CLASSES.items():
        if name in names:
            return Diagnosis(CONFIG, hint=hint)
    if names & _DENIED_CLASSES:
        return Diagnosis(DENIED)
    if isinstance(exc, socket.gaierror):
        # A temporary DNS failure is an outage; a name that does not resolve is a typo.
        if exc.errno == socket.EAI_AGAIN:
            return Diagnosis(OUTAGE)
        return Diagnosis(CONFIG, hint="the endpoint's host name does not resolve: fix it")
    if isinstance(exc, (ConnectionError, TimeoutError)) or names & _OUTAGE_CLASSES:
        return Diagnosis(OUTAGE)
    if isinstance(exc, ssl.SSLError):
        return Diagnosis(OUTAGE)  # not a certificate problem (that is named above): a cut
    if isinstance(exc, FileNotFoundError):
        return Diagnosis(NOT_FOUND, status=404)
    if isinstance(exc, PermissionError):
        return Diagnosis(DENIED)
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return Diagnosis(OUTAGE)
    if isinstance(exc, OSError) and str(exc).startswith("Forbidden"):
        return Diagnosis(DENIED, status=403)  # gcsfs words a 403 so, with nothing else
    return None


def _by_answer(status: int | None, code: str | None, message: str, exc: BaseException) -> Diagnosis:
    """Classify an HTTP answer by its S3-style error code first, then its status."""
    if code in _OUTAGE_CODES or (status is not None and (status >= 500 or status in (408, 429))):
        return Diagnosis(OUTAGE, status, code)
    if code in _NOT_FOUND_CODES or status == 404:
        return Diagnosis(NOT_FOUND, status or 404, code)
    if code in _DENIED_CODES or status in (401, 403):
        return Diagnosis(DENIED, status, code)
    if status in (409, 412, 416):
        return Diagnosis(CHANGED, status, code)
    return Diagnosis(CONFIG, status, code, _config_hint(code, status, message, exc))


def _config_hint(code: str | None, status: int | None, message: str, exc: BaseException) -> str:
    facts = _error_fields(exc)
    if code == "AuthorizationHeaderMalformed" or "region is wrong" in message:
        expected = facts.get("Region") or _expected_region(message)
        where = f"; storage expects '{expected}'" if expected else ""
        return f"the request was signed for the wrong region{where}: {_ASK_REGION}"
    if code in _REDIRECT_CODES or (status is not None and 300 <= status < 400):
        endpoint = facts.get("Endpoint")
        region = facts.get("Region") or facts.get("x-amz-bucket-region")
        facts_named = [
            f"endpoint {endpoint}" if endpoint else "",
            f"region {region}" if region else "",
        ]
        named = ", ".join(part for part in facts_named if part)
        return (
            "the bucket must be addressed through another endpoint or region"
            f"{f' ({named})' if named else ''}: {_ASK_REGION}, or name its endpoint in the "
            "location (s3://host:port/bucket/path)"
        )
    if code in ("InvalidToken", "ExpiredToken", "TokenRefreshRequired"):
        return (
            "storage rejected the session token: refresh AWS_SESSION_TOKEN (or "
            '"session_token" in TRITON_CLOUD_CREDENTIAL_PATH), or unset it when the keys '
            "are long-term ones"
        )
    if code == "InvalidRequest":
        return (
            "storage called the request invalid: check that the endpoint is an S3 service "
            "that accepts Signature Version 4, and the region"
        )
    return "check the endpoint, the region and the credentials"


def _expected_region(message: str) -> str | None:
    match = re.search(r"expecting '([0-9a-z-]+)'", message)
    return match.group(1) if match else None


def _http_facts(exc: BaseException) -> tuple[int | None, str | None, str]:
    """(HTTP status, error code, server message) as far as ``exc`` carries them."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        code = error.get("Code")
        return (
            status if isinstance(status, int) else None,
            str(code) if code else None,
            str(error.get("Message") or ""),
        )
    code = getattr(exc, "error_code", None) or getattr(exc, "s3_code", None)
    for name in ("status_code", "status", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, str(code) if code else None, str(exc)
    return None, str(code) if code else None, str(exc)


def _error_fields(exc: BaseException) -> dict[str, Any]:
    """The extra fields of an S3-style error answer (Region, Endpoint, ...), wherever they are."""
    for link in chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            fields = dict(response.get("Error") or {})
            headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
            if headers.get("x-amz-bucket-region"):
                fields.setdefault("x-amz-bucket-region", headers["x-amz-bucket-region"])
            return fields
        carried = getattr(link, "fields", None)  # the fast S3 client's HTTPStatusError
        if isinstance(carried, dict):
            return carried
    return {}
