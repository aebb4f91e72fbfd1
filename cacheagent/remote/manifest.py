"""The manifest: what a remote model directory holds, from one recursive listing.

Each file contributes its relative path, its size and a cheap version
fingerprint. Where the store reports a content hash (a single-part S3 ETag,
GCS md5Hash, Azure content_md5) the fingerprint *is* that hash, so an
identical re-upload keeps the same manifest and a hash seen before maps
straight to a blob already held. The xxh3-128 of the canonical manifest is
the snapshot key. Every relative path is validated here, before anything is
written, so no object name can steer a write outside the cache directory.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from cacheagent.errors import UnsafePathError

MANIFEST_FORMAT = 1
NAME_MAX = 255  # bytes per path component on every filesystem we target
_S3_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


@dataclass(frozen=True)
class FileEntry:
    """One remote file of a model directory."""

    path: str  # relative, POSIX, validated
    size: int
    fingerprint: str  # changes whenever the object's content may have changed
    content_md5: str | None  # hex MD5 of the content when the store reports it

    @property
    def content_key(self) -> str | None:
        """A location-independent identity of the bytes, when the store gave a content hash."""
        return f"md5:{self.content_md5}:{self.size}" if self.content_md5 else None


@dataclass(frozen=True)
class Manifest:
    """The files of one model directory at one moment, keyed by their canonical hash."""

    source: str
    files: tuple[FileEntry, ...]
    # Directories that exist only as marker objects, with nothing below them:
    # an ensemble's empty version directory "1/" is one, and Triton needs it.
    empty_dirs: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The snapshot key: xxh3-128 of the canonical manifest (source plus sorted files)."""
        content: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "source": self.source,
            "files": [[f.path, f.size, f.fingerprint] for f in self.files],
        }
        if self.empty_dirs:
            content["empty_dirs"] = list(self.empty_dirs)
        canonical = json.dumps(content, separators=(",", ":"))
        return xxhash.xxh3_128_hexdigest(canonical.encode())

    @property
    def total_size(self) -> int:
        """Sum of the file sizes, in bytes."""
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, FileEntry]:
        """Map each relative path to its entry."""
        return {f.path: f for f in self.files}


def validate_relpath(relpath: str, source: str = "") -> str:
    """Return ``relpath`` if it is a safe relative path; raise UnsafePathError otherwise."""
    where = f" in {source}" if source else ""
    if not relpath or "\x00" in relpath or "\\" in relpath or relpath.startswith("/"):
        raise UnsafePathError(
            f"refusing object name {relpath!r}{where}: it is empty, absolute, or holds a "
            "backslash or NUL; rename the object so it is a plain relative path"
        )
    for part in relpath.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(
                f"refusing object name {relpath!r}{where}: '..', '.' and empty path parts "
                "could escape the cache directory; rename the object"
            )
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UnsafePathError(
                f"refusing object name {relpath!r}{where}: the part {part[:40]!r}... is longer "
                f"than {NAME_MAX} bytes, too long for a local filesystem; shorten it"
            )
    return relpath


def build_manifest(
    source: str,
    root: str,
    listing: Mapping[str, Mapping[str, Any]],
    select: Callable[[Iterable[str]], set[str]] | None = None,
) -> Manifest:
    """Turn an fsspec ``find(root, detail=True)`` listing into a validated, sorted manifest.

    ``select`` receives every relative path and returns those to keep (used
    for version-aware fetch).
    """
    prefix = root.rstrip("/") + "/"
    infos: dict[str, Mapping[str, Any]] = {}
    markers: set[str] = set()
    for name, info in listing.items():
        if not name.startswith(prefix):
            continue
        if _is_directory_marker(name, info):
            relpath = name[len(prefix) :].rstrip("/")
            if relpath:
                markers.add(validate_relpath(relpath, source))
            continue
        infos[validate_relpath(name[len(prefix) :], source)] = info
    candidates = list(infos) + [d + "/" for d in markers]
    kept = set(candidates) if select is None else select(candidates)
    entries = [_entry(relpath, info) for relpath, info in infos.items() if relpath in kept]
    entries.sort(key=lambda e: e.path)
    _refuse_file_dir_clashes(entries, source)
    dirs = {d for d in markers if d + "/" in kept and d not in infos}
    empty = tuple(sorted(d for d in dirs if not _has_children(d, infos, dirs)))
    return Manifest(source, tuple(entries), empty)


def _has_children(directory: str, files: Mapping[str, Any], dirs: set[str]) -> bool:
    prefix = directory + "/"
    return any(p.startswith(prefix) for p in files) or any(d.startswith(prefix) for d in dirs)


def _is_directory_marker(name: str, info: Mapping[str, Any]) -> bool:
    metadata = info.get("metadata") or {}
    folder = isinstance(metadata, Mapping) and (
        str(metadata.get("is_directory", "")).lower() == "true"
        or str(metadata.get("hdi_isfolder", "")).lower() == "true"
    )
    return name.endswith("/") or info.get("type") == "directory" or folder


def _refuse_file_dir_clashes(entries: list[FileEntry], source: str) -> None:
    # An object "a" beside "a/b" cannot both exist on a local filesystem.
    paths = {e.path for e in entries}
    for entry in entries:
        parent = os.path.dirname(entry.path)
        while parent:
            if parent in paths:
                raise UnsafePathError(
                    f"{source} holds both a file {parent!r} and files below {parent + '/'!r}; "
                    "a local directory cannot hold both, remove one of them"
                )
            parent = os.path.dirname(parent)


def _entry(relpath: str, info: Mapping[str, Any]) -> FileEntry:
    size = int(info.get("size") or info.get("Size") or 0)
    md5 = _content_md5(info)
    fingerprint = f"md5:{md5}" if md5 else _version_fingerprint(info)
    return FileEntry(relpath, size, fingerprint, md5)


def _content_md5(info: Mapping[str, Any]) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    if etag and "md5Hash" not in info and "generation" not in info:
        match = _S3_MD5_ETAG.match(str(etag))
        # A multipart ETag ("<hex>-N") is no MD5 of the content; only single-part ones are.
        if match and "content_settings" not in info:
            return match.group(1).lower()
    md5_b64 = info.get("md5Hash")
    if md5_b64:
        return _b64_to_hex(str(md5_b64))
    settings = info.get("content_settings")
    raw = getattr(settings, "content_md5", None) or (
        settings.get("content_md5") if isinstance(settings, Mapping) else None
    )
    if raw:
        return bytes(raw).hex() if isinstance(raw, (bytes, bytearray)) else _b64_to_hex(str(raw))
    return None


def contradicts_listing(entry: FileEntry, etag: str | None) -> bool:
    """True if an answer carrying ``etag`` is provably of another version than ``entry`` listed.

    Only an S3 listing's fingerprint is its ETag (as the MD5 of a single-part
    upload, or verbatim), and S3 sends an object's ETag with every GET, ranged
    or not. An answer without an ETag, or a fingerprint that is no ETag, proves
    nothing either way: the listing after the download is what decides then.
    It catches what a second listing cannot: an object replaced and put back
    (A, B, A again) while its parts were being read, or a stale copy in between.
    """
    if not etag:
        return False
    answered = _bare_etag(etag).lower()
    kind, _, listed = entry.fingerprint.partition(":")
    if kind == "md5":
        return answered != listed.lower()
    return kind == "etag" and answered != _bare_etag(listed).lower()


def _bare_etag(etag: str) -> str:
    # The quotes are part of the header's syntax, not of the tag (RFC 9110 8.8.3).
    etag = etag.strip()
    return etag[1:-1] if len(etag) >= 2 and etag[0] == etag[-1] == '"' else etag


def _b64_to_hex(value: str) -> str | None:
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 16 else None


def _version_fingerprint(info: Mapping[str, Any]) -> str:
    for field in ("generation", "VersionId", "version_id", "etag", "ETag"):
        value = info.get(field)
        if value:
            return f"{field.lower()}:{value}"
    # Local files (and stores that give nothing better): size plus modification time.
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return f"mtime:{mtime}:{info.get('ino', '')}"
