"""The shared tier without emulators: hashing, records, claims, the directory backend,
and whole fetches between in-process caches over a directory tier and a local origin."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import xxhash

from cacheagent.cache import Cache, Snapshot
from cacheagent.errors import CacheAgentError
from cacheagent.local.store import Store
from cacheagent.remote.manifest import FileEntry, Manifest
from cacheagent.tier import Tier, open_backend, open_tier
from cacheagent.tier import claims as claims_module
from cacheagent.tier.claims import ClaimView, try_claim
from cacheagent.tier.directory import DirectoryBackend
from cacheagent.tier.errors import TierConfigError, TierUnavailableError
from cacheagent.tier.hashing import HashingWriter
from cacheagent.tier.layout import BlobRecord, ClaimRecord, TierManifest, claim_key
from cacheagent.triton.actions import load_line

MiB = 1024 * 1024


# ---- hashing ------------------------------------------------------------------------


def test_sha256_and_md5_are_taken_in_order_whatever_order_parts_arrive(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    data = os.urandom(5 * 1000 + 17)
    parts = [(i, data[i : i + 1000]) for i in range(0, len(data), 1000)]
    writer = HashingWriter(store.new_blob(len(data)), md5=True)
    for offset, piece in reversed(parts):
        writer.write(offset, piece)
    assert writer.complete
    assert writer.sha256() == hashlib.sha256(data).hexdigest()
    assert writer.md5() == hashlib.md5(data).hexdigest()
    assert writer.mismatch(hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()) == ""
    assert "SHA-256" in writer.mismatch("0" * 64, None)
    assert "MD5" in writer.mismatch(None, "0" * 32)
    digest = writer.commit()
    assert digest == xxhash.xxh3_128_hexdigest(data)  # the local store's name, unchanged
    assert store.blob_path(digest).read_bytes() == data


def test_no_sha256_before_the_last_byte(tmp_path: Path) -> None:
    writer = HashingWriter(Store(tmp_path / "cache").new_blob(10))
    writer.write(0, b"12345")
    with pytest.raises(RuntimeError):
        writer.sha256()
    writer.abort()


# ---- records ----------------------------------------------------------------------------


def test_records_round_trip_and_malformed_ones_are_absent() -> None:
    record = BlobRecord("a" * 64, 10, MiB, "b" * 64)
    assert BlobRecord.parse(record.to_json()) == record
    for bad in (
        b"not json",
        b"[]",
        json.dumps({"format": 2, "sha256": "a" * 64}).encode(),
        json.dumps(
            {"format": 1, "sha256": "A" * 64, "size": 1, "chunk": 1, "parts": "b" * 64}
        ).encode(),
        json.dumps(
            {"format": 1, "sha256": "a" * 64, "size": -1, "chunk": 1, "parts": "b" * 64}
        ).encode(),
        json.dumps(
            {"format": 1, "sha256": "a" * 64, "size": True, "chunk": 1, "parts": "b" * 64}
        ).encode(),
        json.dumps(
            {"format": 1, "sha256": "a" * 64, "size": 1, "chunk": 0, "parts": "b" * 64}
        ).encode(),
    ):
        assert BlobRecord.parse(bad) is None
    claim = ClaimRecord("node", 3, MiB, 10, 1.5)
    assert ClaimRecord.parse(claim.to_json()) == claim
    manifest = TierManifest("ab" * 16, "s3://b/m", {"1/w": ("c" * 64, 5), "x": ("bad", 1)})
    parsed = TierManifest.parse(manifest.to_json(), "ab" * 16)
    assert parsed is not None and parsed.files == {"1/w": ("c" * 64, 5)}
    assert TierManifest.parse(manifest.to_json(), "cd" * 16) is None  # another snapshot's


# ---- the directory backend ------------------------------------------------------------


def test_directory_backend_refuses_relative_roots_and_escaping_keys(tmp_path: Path) -> None:
    with pytest.raises(TierConfigError):
        DirectoryBackend("relative/tier")
    backend = DirectoryBackend(tmp_path / "tier")
    for key in ("../x", "a//b", "/abs", "a/./b", ""):
        with pytest.raises(TierConfigError):
            backend.create(key, b"x")
    assert not (tmp_path / "x").exists()


def test_directory_backend_never_shows_a_partial_object(tmp_path: Path) -> None:
    backend = DirectoryBackend(tmp_path / "tier")
    assert backend.create("parts/a/0", b"x" * MiB)
    assert backend.get("parts/a/0") == b"x" * MiB
    assert list((tmp_path / "tier" / "tmp").iterdir()) == []  # no temp file left


def test_open_backend_names_the_accepted_forms(tmp_path: Path) -> None:
    assert isinstance(open_backend(str(tmp_path / "t")), DirectoryBackend)
    with pytest.raises(TierConfigError, match="absolute path"):
        open_backend("relative/dir")
    with pytest.raises(TierConfigError):
        open_backend("ftp://host/x")


# ---- claims ----------------------------------------------------------------------------


def test_a_claim_is_stale_only_after_its_beat_stood_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(claims_module.time, "monotonic", lambda: clock[0])
    backend = DirectoryBackend(tmp_path / "tier")
    ident = "a" * 64
    view = ClaimView(backend, lambda g: claim_key(ident, g))
    assert view.refresh() is None
    record = ClaimRecord("leader", 0, MiB, 10, 0.0)
    assert try_claim(backend, view, record) == (0, True)
    assert try_claim(backend, view, record) == (0, False)  # a second creator loses
    view.refresh()
    clock[0] += claims_module.CLAIM_TTL_S - 1
    backend.put(claim_key(ident, 0), ClaimRecord("leader", 1, MiB, 10, 0.0).to_json())
    view.refresh()
    clock[0] += claims_module.CLAIM_TTL_S - 1
    assert not view.stale()  # it beat in between
    clock[0] += 2
    view.refresh()
    assert view.stale()
    # The takeover is the next generation, created once.
    assert try_claim(backend, view, ClaimRecord("b", 0, MiB, 10, 0.0)) == (1, True)
    assert try_claim(backend, view, ClaimRecord("c", 0, MiB, 10, 0.0)) == (1, False)
    current = view.refresh()
    assert current is not None and current.owner == "b" and view.generation == 1


def test_a_released_claim_is_taken_over_at_once(tmp_path: Path) -> None:
    backend = DirectoryBackend(tmp_path / "tier")
    view = ClaimView(backend, lambda g: claim_key("b" * 64, g))
    backend.create(claim_key("b" * 64, 0), ClaimRecord("x", 0, MiB, 1, 0.0, True).to_json())
    view.refresh()
    assert view.stale()


class _HeldWrites(DirectoryBackend):
    """A directory tier whose claim rewrites (heartbeats) wait at a gate while ``hold`` is
    set: the one interleaving a test cannot produce by timing alone."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hold = threading.Event()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if self.hold.is_set() and threading.current_thread().name == "cacheagent-tier-heartbeat":
            self.entered.set()
            self.gate.wait(10)
        super().put(key, data)


@pytest.mark.parametrize("done", [True, False], ids=["finished", "failed"])
def test_a_heartbeat_in_flight_never_undoes_the_release(tmp_path: Path, done: bool) -> None:
    backend = _HeldWrites(tmp_path / "tier")
    key = claim_key("c" * 64, 0)
    record = ClaimRecord("leader", 0, MiB, 1, 0.0)
    assert backend.create(key, record.to_json())
    beats = claims_module.Heartbeats(backend, interval=0.01)
    backend.hold.set()
    held = beats.hold(key, record)
    assert backend.entered.wait(10)  # a heartbeat is writing the claim now
    releasing = threading.Thread(target=beats.release, args=(held,), kwargs={"done": done})
    releasing.start()
    releasing.join(0.3)  # the release has begun while that write is in flight
    backend.gate.set()
    releasing.join(10)
    assert not releasing.is_alive()
    time.sleep(0.1)  # further rounds of the heartbeat thread, if it still beat this claim
    left = ClaimRecord.parse(backend.get(key))
    if done:
        assert left is None  # deleted, and not written back by the late heartbeat
    else:
        assert left is not None and left.released  # the mark stays for followers to see


# ---- whole fetches: in-process nodes, a directory tier, a local origin ---------------------


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    model = tmp_path / "origin" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "w.bin").write_bytes(os.urandom(9 * MiB + 3))
    (model / "1" / "empty").write_bytes(b"")
    (model / "config.pbtxt").write_text('name: "m"')
    return model


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def warm(cache_dir: Path, origin: Path, shared: str | None) -> Snapshot:
    with Cache(cache_dir) as cache:
        settings = cache.defaults.replace(shared_cache=shared)
        return cache.fetch(str(origin), settings=settings)


def counters(cache_dir: Path) -> dict[str, int]:
    with Cache(cache_dir) as cache:
        return cache.stats().counters


def test_a_second_node_reads_everything_from_the_tier(tmp_path: Path, origin: Path) -> None:
    shared = str(tmp_path / "tier")
    first = warm(tmp_path / "a", origin, shared)
    assert first.bytes_from_origin == first.size and first.bytes_from_tier == 0
    second = warm(tmp_path / "b", origin, shared)
    assert files_of(second.path) == files_of(origin)
    assert second.bytes_from_tier == second.size and second.bytes_from_origin == 0
    seen = counters(tmp_path / "b")
    assert seen["bytes_from_tier"] == second.size and seen["tier_blobs_read"] == 2
    assert counters(tmp_path / "a")["tier_blobs_led"] == 2
    # The LOAD line says where the bytes came from.
    line = load_line("m", second, tiered=True)
    assert f"(tier {9.0:.1f} MiB, origin 0 B; " in line, line
    assert "tier" not in load_line("m", second)


def test_nodes_at_once_download_each_blob_once(
    tmp_path: Path, origin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cacheagent.tier import fetch as fetch_module

    reads: list[tuple[str, int]] = []
    real = fetch_module.origin_range

    def counted(loc: Any, relpath: str, start: int, end: int, timeout: float) -> bytes:
        reads.append((relpath, end - start))
        return real(loc, relpath, start, end, timeout)

    monkeypatch.setattr(fetch_module, "origin_range", counted)
    shared = str(tmp_path / "tier")
    results: list[Snapshot] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(warm(tmp_path / f"n{i}", origin, shared))
        )
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 3
    assert all(files_of(r.path) == files_of(origin) for r in results)
    by_file: dict[str, int] = {}
    for relpath, n in reads:
        by_file[relpath] = by_file.get(relpath, 0) + n
    assert by_file["1/w.bin"] == 9 * MiB + 3  # one node led it, the others followed or read
    assert sum(r.bytes_from_tier for r in results) >= 2 * (9 * MiB + 3)


def test_a_damaged_chunk_is_a_miss_for_that_blob_and_is_repaired(
    tmp_path: Path, origin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "tier"
    warm(tmp_path / "a", origin, str(shared))
    part = next(p for p in (shared / "parts").rglob("1") if p.is_file())
    part.write_bytes(b"\0" * part.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="cacheagent.tier"):
        second = warm(tmp_path / "b", origin, str(shared))
    assert files_of(second.path) == files_of(origin)
    assert "damaged" in caplog.text
    assert counters(tmp_path / "b")["tier_corrupt"] == 1
    third = warm(tmp_path / "c", origin, str(shared))
    assert third.bytes_from_origin == 0 and files_of(third.path) == files_of(origin)


class DownBackend:
    """A tier that never answers."""

    url = "s3://down/tier"
    calls = 0

    def _fail(self) -> None:
        DownBackend.calls += 1
        raise TierUnavailableError("the tier is down")

    def get(self, key: str) -> bytes | None:
        self._fail()
        return None

    def create(self, key: str, data: bytes) -> bool:
        self._fail()
        return False

    def put(self, key: str, data: bytes) -> None:
        self._fail()

    def delete(self, key: str) -> None:
        self._fail()


def test_a_tier_that_is_down_costs_one_try_then_the_origin_serves(
    tmp_path: Path, origin: Path
) -> None:
    tier = Tier(DownBackend())
    with Cache(tmp_path / "a") as cache:
        loc = cache.parse(str(origin))
        from cacheagent.remote.listing import list_manifest
        from cacheagent.remote.transfer import download

        manifest = list_manifest(loc)
        entries = list(manifest.files)
        got = tier.fetch(
            loc,
            manifest,
            entries,
            cache.store,
            lambda es: download(loc, es, cache.store),
            None,
            cache.defaults,
            lambda name, n: None,
        )
        assert set(got.digests) == {e.path for e in entries}
        assert got.origin_bytes == manifest.total_size and got.tier_bytes == 0
        assert DownBackend.calls == 1 and tier.down()
        tier.publish_manifest(loc, manifest, got.digests, cache.store)
        assert DownBackend.calls == 1  # not tried again while it is down


def test_an_origin_blob_that_fails_its_md5_is_never_published(tmp_path: Path) -> None:
    from cacheagent.errors import RemoteChangedError

    model = tmp_path / "origin" / "m"
    model.mkdir(parents=True)
    (model / "w.bin").write_bytes(b"the bytes")
    with Cache(tmp_path / "a") as cache:
        loc = cache.parse(str(model))
        entry = FileEntry("w.bin", 9, "md5:x", "0" * 32)  # the origin said another MD5
        manifest = Manifest(loc.url, (entry,))
        tier = Tier(DirectoryBackend(tmp_path / "tier"))
        with pytest.raises(RemoteChangedError, match="MD5"):
            tier.fetch(
                loc, manifest, [entry], cache.store, lambda es: {}, None, cache.defaults,
                lambda name, n: None,
            )  # fmt: skip
    assert (
        not list((tmp_path / "tier" / "blobs").rglob("*"))
        if (tmp_path / "tier" / "blobs").exists()
        else True
    )
    assert list(Store(tmp_path / "a").iter_blobs()) == []


def test_without_shared_cache_the_tier_is_never_opened(
    tmp_path: Path, origin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cacheagent.tier

    def refuse(*args: object, **kwargs: object) -> Tier:
        raise AssertionError("the tier was opened")

    monkeypatch.setattr(cacheagent.tier, "open_tier", refuse)
    snap = warm(tmp_path / "a", origin, None)
    assert snap.bytes_from_tier == 0 and snap.bytes_from_origin == snap.size
    assert "tier" not in load_line("m", snap)


def test_a_tier_that_cannot_be_opened_is_a_warning_not_a_failure(
    tmp_path: Path, origin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="cacheagent"):
        snap = warm(tmp_path / "a", origin, str(blocker / "tier"))
    assert files_of(snap.path) == files_of(origin)
    assert "without the shared tier" in caplog.text


def test_open_tier_is_one_object_per_spec(tmp_path: Path) -> None:
    spec = str(tmp_path / "tier")
    assert open_tier(spec, {}) is open_tier(spec, {})


# ---- the S3 signature --------------------------------------------------------------------


def test_tier_requests_are_signed_as_botocore_signs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from cacheagent.remote.s3 import Endpoint
    from cacheagent.tier.s3 import sign

    now = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    ep = Endpoint(
        urllib.parse.urlsplit("https://s3.eu-west-1.amazonaws.com"),
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "eu-west-1",
        "session-token",
        None,
        None,
    )
    path = "/bucket/fleet/parts/ab/0"
    ours = sign("PUT", ep, path, {"if-none-match": "*"}, now=now)
    request = AWSRequest(
        method="PUT",
        url=f"https://s3.eu-west-1.amazonaws.com{path}",
        data=b"chunk",
        headers={"host": ep.origin.netloc, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"},
    )
    request.context["payload_signing_enabled"] = False  # what the tier sends over HTTPS
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    credentials = Credentials(ep.key, ep.secret, ep.token)
    botocore_auth.SigV4Auth(credentials, "s3", ep.region).add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ep.secret not in json.dumps(ours)


def test_settings_accept_a_tier_and_refuse_a_relative_path() -> None:
    from cacheagent.errors import InvalidParameterError
    from cacheagent.settings import settings_from

    env = {"CACHEAGENT_SHARED_CACHE": "/shared/tier"}
    assert settings_from({}, env=env).shared_cache == "/shared/tier"
    assert settings_from({"shared_cache": "s3://bucket/tier"}, env={}).shared_cache
    with pytest.raises(InvalidParameterError):
        settings_from({"shared_cache": "relative/tier"}, env={})
    assert isinstance(InvalidParameterError("x"), CacheAgentError)


# ---- a live leader that never publishes; a read-only tier ------------------------------------


def test_a_follower_whose_leader_publishes_nothing_uses_the_origin_through_a_slot(
    tmp_path: Path, origin: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cacheagent.local.index import content_identity
    from cacheagent.tier import fetch as fetch_module
    from cacheagent.tier import layout
    from cacheagent.tier.claims import Heartbeats

    monkeypatch.setattr(fetch_module, "FOLLOW_STALL_S", 1.0)
    backend = DirectoryBackend(tmp_path / "tier")
    with Cache(tmp_path / "a") as cache:
        loc = cache.parse(str(origin))
        from cacheagent.remote.listing import list_manifest

        manifest = list_manifest(loc)
        big = next(e for e in manifest.files if e.path == "1/w.bin")
        ident = layout.identity_key(content_identity(loc.url, big))
        # A leader that beats but never publishes a chunk.
        ghost = ClaimRecord("ghost", 0, layout.CHUNK, big.size, 0.0)
        key = layout.claim_key(ident, 0)
        assert backend.create(key, ghost.to_json())
        beats = Heartbeats(backend, interval=0.2)
        held = beats.hold(key, ghost)
        try:
            with caplog.at_level(logging.WARNING, logger="cacheagent.tier"):
                snap = cache.fetch(
                    str(origin),
                    settings=cache.defaults.replace(shared_cache=str(tmp_path / "tier")),
                )
        finally:
            beats.release(held, done=True)
        assert files_of(snap.path) == files_of(origin)
        assert "published nothing" in caplog.text
        assert cache.stats().counters["tier_fallbacks"] >= 1
    assert not [p for p in (tmp_path / "tier" / "fallback").rglob("*") if p.is_file()]


class ReadOnly:
    """A directory tier this node may only read (a 403 on every write)."""

    def __init__(self, inner: DirectoryBackend) -> None:
        self.inner, self.url, self.writes = inner, inner.url, 0

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def _deny(self) -> None:
        from cacheagent.tier.errors import TierAccessDeniedError

        self.writes += 1
        raise TierAccessDeniedError("PUT on the shared tier was denied (HTTP 403)")

    def create(self, key: str, data: bytes) -> bool:
        self._deny()
        return False

    def put(self, key: str, data: bytes) -> None:
        self._deny()

    def delete(self, key: str) -> None:
        self._deny()


def test_a_read_only_node_reads_the_tier_and_fetches_the_rest_from_the_origin(
    tmp_path: Path, origin: Path
) -> None:
    from cacheagent.remote.listing import list_manifest
    from cacheagent.remote.transfer import download

    def fetch_with(tier: Tier, cache_dir: Path) -> Any:
        with Cache(cache_dir) as cache:
            loc = cache.parse(str(origin))
            manifest = list_manifest(loc)
            return tier.fetch(
                loc,
                manifest,
                list(manifest.files),
                cache.store,
                lambda es: download(loc, es, cache.store),
                None,
                cache.defaults,
                lambda name, n: None,
            )

    empty = ReadOnly(DirectoryBackend(tmp_path / "empty-tier"))
    got = fetch_with(Tier(empty), tmp_path / "a")
    # At most one denied claim per blob in flight at once, then this node only reads.
    assert got.tier_bytes == 0 and 1 <= empty.writes <= 2
    warm(tmp_path / "writer", origin, str(tmp_path / "tier"))  # the pre-warming writer
    reader = ReadOnly(DirectoryBackend(tmp_path / "tier"))
    got = fetch_with(Tier(reader), tmp_path / "b")
    assert got.origin_bytes == 0 and reader.writes == 0
