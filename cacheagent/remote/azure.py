"""A fast Azure Blob client for account keys: Shared Key signed listings and reads, no SDK.

Listing through adlfs means importing it (with the Azure SDK and aiohttp) and
building a client first: about 0.4 s of every fresh worker's first hit. When
the location carries an account key (``AZURE_STORAGE_KEY``, the credential
file, or a connection string with ``AccountKey``) this module signs the
request itself (Shared Key: HMAC-SHA256 over the canonicalized request) and
sends it with :mod:`cacheagent.remote.plainhttp`. SAS tokens, Azure AD and
anything else stay with adlfs.

Listings return what ``adlfs.find(detail=True, withdirs=True)`` returns for
the fields the manifest and ``cacheagent check`` use (name, size, type, etag,
metadata, content_settings.content_md5), folder markers (``hdi_isfolder``)
and inferred parent directories included, so both clients give the same
snapshot key. Failures are raised as they are; :mod:`cacheagent.remote.listing`
decides what they mean.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cacheagent.remote import plainhttp
from cacheagent.remote.faults import Deadline
from cacheagent.remote.location import Location

# A service version every Azure region and Azurite (with --skipApiVersionCheck or
# newer) accept, and that lists folder-marker metadata as adlfs sees it.
API_VERSION = "2021-08-06"
# The string-to-sign's standard headers between the verb and the x-ms- headers, in order.
_SIGNED_STANDARD = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)
_FOLDER_KEYS = ("hdi_isfolder", "Hdi_isfolder")
_PAGE_SIZE = "5000"  # List Blobs' largest page


@dataclass(frozen=True)
class Container:
    """How to reach one location's container, and the account key that signs for it."""

    origin: plainhttp.Origin
    base_path: str  # the blob endpoint's own path ("/devstoreaccount1" on Azurite), or ""
    account: str
    key: bytes = field(repr=False)
    container: str = ""
    path: str = ""  # the location's directory below the container, without slashes


def container_of(location: Location) -> Container | None:
    """The fast client's view of ``location``; None where only adlfs can serve it.

    None without an account key (SAS, Azure AD, anonymous), once the location's
    route says the SDK serves it, or behind an https:// proxy.
    """
    if location.scheme != "as" or location.route.sdk:
        return None
    account = _account(location.storage_options)
    if account is None:
        return None
    name, key, endpoint = account
    origin = plainhttp.origin_of(endpoint)
    if origin is None:
        return None
    container, _, path = location.root.partition("/")
    base_path = urllib.parse.urlsplit(endpoint).path.rstrip("/")
    return Container(origin, base_path, name, key, container, path.strip("/"))


def can_serve(location: Location) -> bool:
    """True if the fast client serves this location (an account key)."""
    return container_of(location) is not None


def _account(options: Mapping[str, Any]) -> tuple[str, bytes, str] | None:
    """(account name, decoded key, blob endpoint URL) from the storage options, or None."""
    if options.get("connection_string"):
        return _from_connection_string(str(options["connection_string"]))
    name, key = options.get("account_name"), options.get("account_key")
    if not name or not key:
        return None
    decoded = _decode_key(str(key))
    if decoded is None:
        return None
    return str(name), decoded, f"https://{name}.blob.core.windows.net"


def _from_connection_string(text: str) -> tuple[str, bytes, str] | None:
    # "Key=Value;..." where a value (the base64 key) may itself hold "=".
    parts = dict(item.partition("=")[::2] for item in text.split(";") if "=" in item)
    parts = {k.strip(): v.strip() for k, v in parts.items()}
    name, key = parts.get("AccountName"), parts.get("AccountKey")
    if not name or not key or parts.get("SharedAccessSignature"):
        return None
    decoded = _decode_key(key)
    if decoded is None:
        return None
    endpoint = parts.get("BlobEndpoint")
    if not endpoint:
        protocol = parts.get("DefaultEndpointsProtocol") or "https"
        suffix = parts.get("EndpointSuffix") or "core.windows.net"
        endpoint = f"{protocol}://{name}.blob.{suffix}"
    return name, decoded, endpoint.rstrip("/")


def _decode_key(key: str) -> bytes | None:
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None  # adlfs reports what is wrong with it


# -- signing ---------------------------------------------------------------------


def sign(
    account: str,
    key: bytes,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    verb: str = "GET",
) -> str:
    """The ``Authorization`` header of a Shared Key signed request.

    ``path`` is the request's encoded path (with the endpoint's own path, if any),
    ``query`` its decoded parameters and ``headers`` every header it sends.
    """
    lower = {name.lower(): value.strip() for name, value in headers.items()}
    standard = [lower.get(name, "") for name in _SIGNED_STANDARD]
    if standard[2] == "0":
        standard[2] = ""  # a zero Content-Length is signed as empty (2015-02-21 and later)
    ms_headers = "".join(
        f"{name}:{lower[name]}\n" for name in sorted(lower) if name.startswith("x-ms-")
    )
    resource = f"/{account}{path}" + "".join(
        f"\n{name.lower()}:{value}"
        for name, value in sorted(query.items(), key=lambda kv: kv[0].lower())
    )
    string_to_sign = "\n".join([verb, *standard]) + "\n" + ms_headers + resource
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    return f"SharedKey {account}:{base64.b64encode(signature).decode()}"


def _get(where: Container, path: str, query: dict[str, str], deadline: Deadline) -> bytes:
    headers = {
        "x-ms-date": email.utils.formatdate(usegmt=True),
        "x-ms-version": API_VERSION,
    }
    headers["authorization"] = sign(where.account, where.key, path, query, headers)
    target = path + (
        "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else ""
    )
    response = plainhttp.get(where.origin, target, headers, deadline)
    if response.status != 200:
        code, message = _error_of(response)
        raise plainhttp.status_error(response.status, response.reason, code, message)
    return response.body


def _error_of(response: plainhttp.Response) -> tuple[str | None, str]:
    """(error code, message) of an error answer: the header, else the XML ``<Error>``."""
    code = response.headers.get("x-ms-error-code")
    try:
        root = ET.fromstring(response.body)
    except ET.ParseError:
        return code, ""
    message = (root.findtext("Message") or "").strip().splitlines()
    return code or root.findtext("Code"), message[0] if message else ""


# -- listings and reads ------------------------------------------------------------


def list_blobs(location: Location, deadline: Deadline) -> dict[str, dict[str, Any]] | None:
    """Everything below ``location``, as ``adlfs.find(detail=True, withdirs=True)`` gives it.

    One paginated List Blobs of the directory's prefix, with metadata (folder
    markers). None when the fast client cannot serve the location.
    """
    where = container_of(location)
    if where is None:
        return None
    target = f"{where.path}/" if where.path else ""
    query = {
        "restype": "container",
        "comp": "list",
        "include": "metadata",
        "maxresults": _PAGE_SIZE,
    }
    if target:
        query["prefix"] = target
    path = f"{where.base_path}/{urllib.parse.quote(where.container, safe='')}"
    infos: list[dict[str, Any]] = []
    while True:
        root = ET.fromstring(_get(where, path, query, deadline))
        infos.extend(_info(where.container, blob) for blob in root.iter("Blob"))
        marker = root.findtext("NextMarker")
        if not marker:
            break
        query = {**query, "marker": marker}
    return _with_directories(infos, f"{where.container}/{target}".rstrip("/"))


def read_blob(location: Location, relpath: str, deadline: Deadline) -> bytes | None:
    """The whole blob ``<location>/<relpath>`` (small files: configs); None if not served."""
    where = container_of(location)
    if where is None:
        return None
    name = "/".join(part for part in (where.path, relpath.strip("/")) if part)
    quoted = urllib.parse.quote(f"{where.container}/{name}", safe="/")
    return _get(where, f"{where.base_path}/{quoted}", {}, deadline)


def _info(container: str, blob: ET.Element) -> dict[str, Any]:
    """One ``<Blob>`` of a listing as adlfs describes it."""
    name_element = blob.find("Name")
    name = (name_element.text if name_element is not None else None) or ""
    if name_element is not None and name_element.get("Encoded") == "true":
        name = urllib.parse.unquote(name)  # names with characters XML cannot carry
    props = _children(blob, "Properties")
    metadata = _children(blob, "Metadata")
    md5 = _b64(props.get("Content-MD5", ""))
    etag = props.get("Etag")
    info: dict[str, Any] = {
        "name": f"{container}/{name}".rstrip("/"),
        "size": int(props.get("Content-Length") or 0),
        "type": "file",
        "metadata": metadata,
        "etag": f'"{etag.strip(chr(34))}"' if etag is not None else None,
        "last_modified": props.get("Last-Modified"),
        "creation_time": props.get("Creation-Time"),
        "content_settings": {
            "content_type": props.get("Content-Type") or None,
            "content_md5": md5,
        },
    }
    if metadata.get("is_directory") == "true" or (
        metadata.get("is_directory") != "false"
        and any(metadata.get(k) == "true" for k in _FOLDER_KEYS)
    ):
        info["type"], info["size"] = "directory", None
    return info


def _children(element: ET.Element, tag: str) -> dict[str, str]:
    """The text of each child of ``element``'s ``tag`` child, by its tag ({} if absent)."""
    found = element.find(tag)
    return {} if found is None else {child.tag: child.text or "" for child in found}


def _b64(value: str) -> bytearray | None:
    # The SDK gives Content-MD5 as the decoded bytes (a bytearray), or None.
    if not value:
        return None
    try:
        return bytearray(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None


def _with_directories(infos: list[dict[str, Any]], full_path: str) -> dict[str, dict[str, Any]]:
    """The listing's files and directories, real and inferred, as adlfs's ``find`` keys them.

    Every parent below ``full_path`` of a listed blob is a directory, as in adlfs;
    folder markers are directories of their own. Sorted by name.
    """
    files: dict[str, dict[str, Any]] = {}
    dirs: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for info in infos:
        name = info["name"]
        parent = name
        while True:
            parent = parent.rstrip("/").rpartition("/")[0]
            if parent in seen or parent == full_path:
                break
            seen.add(parent)
            dirs[parent] = {"name": parent, "type": "directory", "size": 0}
        if info["type"] == "directory":
            dirs[name] = info
        else:
            files[name] = info
    files.update(dirs)
    prefix = full_path + "/"
    return {name: files[name] for name in sorted(files) if name.startswith(prefix)}
