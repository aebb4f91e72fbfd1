"""A fast GCS client for anonymous access: JSON API listings and reads, no SDK.

Listing through gcsfs means importing it (with google-auth and aiohttp) and
building a session first: about 0.5 s of every fresh worker's first hit. For a
location reached anonymously (an emulator, where cacheagent gives gcsfs
``token="anon"`` too, or an explicit ``"anon"`` token) this module sends the
JSON API's GETs itself (:mod:`cacheagent.remote.plainhttp`).

Service-account credentials stay with gcsfs: an access token needs an
RS256-signed JWT exchanged at Google's token endpoint, which costs an import of
``cryptography`` and a round trip to another host on every fresh process, so
it would not make the hit cheaper than the SDK does by much.

Listings return what ``gcsfs.find(detail=True)`` returns for the fields the
manifest and ``cacheagent check`` use (name, size, md5Hash, generation, type),
so both clients give the same snapshot key. Failures are raised as they are
(:class:`~cacheagent.remote.plainhttp.HTTPStatusError` and network errors);
:mod:`cacheagent.remote.listing` decides what they mean.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

from cacheagent.remote import plainhttp
from cacheagent.remote.faults import Deadline
from cacheagent.remote.location import Location

PUBLIC_ENDPOINT = "https://storage.googleapis.com"
# GCS's documented largest page; gcsfs asks for 1000, the answers are the same objects.
_PAGE_SIZE = "1000"


@dataclass(frozen=True)
class Bucket:
    """How to reach one location's bucket: the origin, the endpoint's path, the bucket."""

    origin: plainhttp.Origin
    base_path: str  # the endpoint URL's own path, without a trailing slash
    bucket: str
    prefix: str  # the location's directory, with a trailing slash ("" for the bucket)


def bucket_of(location: Location) -> Bucket | None:
    """The fast client's view of ``location``; None where only gcsfs can serve it.

    None unless the location is reached anonymously, once its route says the SDK
    serves it, or behind an https:// proxy.
    """
    options = location.storage_options
    if location.scheme != "gs" or location.route.sdk or options.get("token") != "anon":
        return None
    endpoint = str(options.get("endpoint_url") or PUBLIC_ENDPOINT).rstrip("/")
    origin = plainhttp.origin_of(endpoint)
    if origin is None:
        return None
    bucket, _, path = location.root.partition("/")
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    base_path = urllib.parse.urlsplit(endpoint).path.rstrip("/")
    return Bucket(origin, base_path, bucket, prefix)


def can_serve(location: Location) -> bool:
    """True if the fast client serves this location (anonymous access)."""
    return bucket_of(location) is not None


def list_objects(location: Location, deadline: Deadline) -> dict[str, dict[str, Any]] | None:
    """Every object below ``location``, as ``gcsfs.find(detail=True)`` gives them.

    One paginated ``objects.list`` of the directory's prefix. None when the fast
    client cannot serve the location; failures are raised, not hidden.
    """
    where = bucket_of(location)
    if where is None:
        return None
    query = (
        {"prefix": where.prefix, "maxResults": _PAGE_SIZE}
        if where.prefix
        else {"maxResults": _PAGE_SIZE}
    )
    path = f"{where.base_path}/storage/v1/b/{_quote(where.bucket)}/o"
    found: dict[str, dict[str, Any]] = {}
    while True:
        page = _json(_get(where, path, query, deadline))
        for item in page.get("items") or []:
            entry = _entry(where.bucket, item)
            found[entry["name"]] = entry
        token = page.get("nextPageToken")
        if not token:
            return found
        query = {**query, "pageToken": str(token)}


def read_object(location: Location, relpath: str, deadline: Deadline) -> bytes | None:
    """The whole object ``<location>/<relpath>`` (small files: configs); None if not served."""
    where = bucket_of(location)
    if where is None:
        return None
    name = f"{where.prefix}{relpath.strip('/')}"
    path = f"{where.base_path}/storage/v1/b/{_quote(where.bucket)}/o/{_quote(name)}"
    return _get(where, path, {"alt": "media"}, deadline).body


def _entry(bucket: str, item: dict[str, Any]) -> dict[str, Any]:
    """An object resource as gcsfs reports it: the resource, its size an int, a full name."""
    entry = dict(item)
    entry["size"] = int(item.get("size") or 0)
    entry["name"] = f"{bucket}/{item['name']}"
    entry["type"] = "file"
    if "generation" in item or "metageneration" in item:
        entry["generation"] = item.get("generation")
        entry["metageneration"] = item.get("metageneration")
    return entry


def _quote(text: str) -> str:
    # Object names go into the path as one segment: "/" is encoded too.
    return urllib.parse.quote(text, safe="")


def _get(where: Bucket, path: str, query: dict[str, str], deadline: Deadline) -> plainhttp.Response:
    target = path + (
        "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else ""
    )
    response = plainhttp.get(where.origin, target, {}, deadline)
    if response.status != 200:
        code, message = _error_of(response.body)
        raise plainhttp.status_error(response.status, response.reason, code, message)
    return response


def _json(response: plainhttp.Response) -> dict[str, Any]:
    page = json.loads(response.body)
    if not isinstance(page, dict):
        raise ValueError("an objects.list answer that is not a JSON object")
    return page


def _error_of(body: bytes) -> tuple[str | None, str]:
    """(reason, message) of the JSON API's ``{"error": {...}}``, if that is the body."""
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return None, body[:200].decode("utf-8", "replace").strip()
    if not isinstance(error, dict):
        return None, str(error)[:200]
    errors = error.get("errors") or [{}]
    reason = errors[0].get("reason") if isinstance(errors[0], dict) else None
    return (str(reason) if reason else None), str(error.get("message") or "")
