"""What a tier holds, where, and in which format.

::

    manifests/<snapshot key>.json   relpath -> sha256 and size of each file of one snapshot
    blobs/sha256/<hex>              a finished blob's record (its chunks, size, sha256)
    parts/<identity>/<n>            chunk n of a blob (CHUNK bytes; the last may be shorter)
    parts/<identity>/done           the same record as the blob's, once every chunk is in
    claims/<identity>/<g>           generation g of the claim of the node downloading it
    fallback/<slot>/<g>             the claims that bound how many nodes use the origin at once

Blobs are named by SHA-256 (the local store's xxh3 is not collision-resistant,
and many machines write a tier). But a leader learns a blob's SHA-256 only once
it has downloaded it, while followers must find its chunks from the start: so
chunks and claims are keyed by the *identity* of the origin's content, the
SHA-256 of :func:`cacheagent.local.index.content_identity` (a content MD5 and
size where the origin gives one, else the object's URL, version and size).
When the last chunk is in, the record naming the chunks is written under the
identity (``done``) and under the SHA-256 (``blobs/sha256/<hex>``): the blob
*is* its chunks, written once, never copied into a second object.

Snapshot keys are the local cache's: the xxh3 of the origin's listing, so a
node that has just listed the origin knows which manifest to ask for.

Every record read from a tier is checked here (types, hex digests, sizes
that add up) before it is used: a malformed one is treated as absent.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

FORMAT = 1
# Chunk size of blobs a node leads: one ranged GET from the origin, one tier object.
# 8 MiB amortises a request's latency on any link, and a follower is at most one
# chunk behind its leader.
CHUNK = 8 * 1024 * 1024
MAX_CHUNK = 1024**3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def identity_key(identity: str) -> str:
    """The tier name of an origin content identity (any string): its SHA-256, hex."""
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()


def manifest_key(snapshot_key: str) -> str:
    """Where the manifest of a snapshot lives."""
    return f"manifests/{_hexish(snapshot_key)}.json"


def blob_key(sha256: str) -> str:
    """Where the record of the finished blob with this SHA-256 lives."""
    return f"blobs/sha256/{_hex64(sha256)}"


def part_key(ident: str, index: int) -> str:
    """Where chunk ``index`` of the blob with tier identity ``ident`` lives."""
    return f"parts/{_hex64(ident)}/{int(index)}"


def done_key(ident: str) -> str:
    """Where the finished record of the blob with tier identity ``ident`` lives."""
    return f"parts/{_hex64(ident)}/done"


def claim_key(ident: str, generation: int) -> str:
    """Generation ``generation`` of the claim on identity ``ident``."""
    return f"claims/{_hex64(ident)}/{int(generation)}"


def slot_key(slot: int, generation: int) -> str:
    """Generation ``generation`` of fallback slot ``slot``."""
    return f"fallback/{int(slot)}/{int(generation)}"


def chunk_count(size: int, chunk: int) -> int:
    """How many chunks of ``chunk`` bytes hold ``size`` bytes."""
    return (size + chunk - 1) // chunk


def chunk_range(index: int, size: int, chunk: int) -> tuple[int, int]:
    """Bytes [start, end) of chunk ``index`` of a ``size``-byte blob."""
    start = index * chunk
    return start, min(start + chunk, size)


@dataclass(frozen=True)
class BlobRecord:
    """A finished blob in the tier: where its chunks are and what they must hash to."""

    sha256: str
    size: int
    chunk: int
    ident: str  # the identity whose parts/ hold the chunks

    def to_json(self) -> bytes:
        """The stored form."""
        return _dump(
            {
                "format": FORMAT,
                "sha256": self.sha256,
                "size": self.size,
                "chunk": self.chunk,
                "parts": self.ident,
            }
        )

    @classmethod
    def parse(cls, raw: bytes | None) -> BlobRecord | None:
        """The record in ``raw``, or None when absent or malformed."""
        data = _load(raw)
        if data is None:
            return None
        sha, size, chunk, ident = (data.get(k) for k in ("sha256", "size", "chunk", "parts"))
        if not (_is_hex64(sha) and _is_hex64(ident) and _is_size(size) and _is_chunk(chunk)):
            return None
        return cls(str(sha), int(str(size)), int(str(chunk)), str(ident))


@dataclass(frozen=True)
class TierManifest:
    """The files of one snapshot by SHA-256: ``{relpath: (sha256, size)}``."""

    key: str
    source: str
    files: dict[str, tuple[str, int]]

    def to_json(self) -> bytes:
        """The stored form."""
        return _dump(
            {
                "format": FORMAT,
                "key": self.key,
                "source": self.source,
                "files": {
                    path: {"sha256": sha, "size": size}
                    for path, (sha, size) in sorted(self.files.items())
                },
            }
        )

    @classmethod
    def parse(cls, raw: bytes | None, key: str) -> TierManifest | None:
        """The manifest of snapshot ``key`` in ``raw``; entries that are malformed are left out."""
        data = _load(raw)
        if data is None or data.get("key") != key or not isinstance(data.get("files"), dict):
            return None
        files: dict[str, tuple[str, int]] = {}
        for path, entry in data["files"].items():
            if not isinstance(entry, dict):
                continue
            sha, size = entry.get("sha256"), entry.get("size")
            if isinstance(path, str) and _is_hex64(sha) and _is_size(size):
                files[path] = (str(sha), int(str(size)))
        return cls(key, str(data.get("source", "")), files)


@dataclass(frozen=True)
class ClaimRecord:
    """What a claim says: who downloads the blob, in which chunks, and that it lives.

    ``beat`` grows with every heartbeat. Followers judge a claim dead when they
    see ``beat`` unchanged for a while *by their own clock*, so clocks that
    disagree across the fleet never make a live leader look dead.
    """

    owner: str
    beat: int
    chunk: int
    size: int
    time: float  # the owner's wall clock at the last beat, for people reading the tier
    released: bool = False  # the owner gave up (it failed): take over at once

    def to_json(self) -> bytes:
        """The stored form."""
        return _dump(
            {
                "format": FORMAT,
                "owner": self.owner,
                "beat": self.beat,
                "chunk": self.chunk,
                "size": self.size,
                "time": round(self.time, 3),
                "released": self.released,
            }
        )

    @classmethod
    def parse(cls, raw: bytes | None) -> ClaimRecord | None:
        """The claim in ``raw``, or None when absent or malformed."""
        data = _load(raw)
        if data is None:
            return None
        owner, beat, chunk, size = (data.get(k) for k in ("owner", "beat", "chunk", "size"))
        if not isinstance(owner, str) or not _is_size(beat) or not _is_chunk(chunk):
            return None
        if not _is_size(size):
            return None
        when = data.get("time")
        return cls(
            owner,
            int(str(beat)),
            int(str(chunk)),
            int(str(size)),
            float(when) if isinstance(when, (int, float)) else 0.0,
            data.get("released") is True,
        )


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _load(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_chunk(value: object) -> bool:
    return _is_size(value) and 0 < int(str(value)) <= MAX_CHUNK


def _hex64(value: str) -> str:
    if not _is_hex64(value):
        raise ValueError(f"not a SHA-256 hex digest: {value!r}")
    return value


def _hexish(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16,128}", value):
        raise ValueError(f"not a snapshot key: {value!r}")
    return value
