"""The launcher's start fetch (cacheagent/triton/startfetch.py) against real storage.

A real stub (``sync_stub`` of a real listing) and a real cache; counted at the rig's
proxy and in the cache, never timed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cacheagent.cache import Cache
from cacheagent.remote.location import parse_location
from cacheagent.triton import prefetch
from cacheagent.triton.startfetch import StartFetcher, known_path
from cacheagent.triton.stubsync import list_repository, sync_stub
from harness.emulators import StorageRig
from harness.triton import put_add_model

MiB = 1024 * 1024


def stage(rig: StorageRig, names: list[str], size: int = 2 * MiB) -> None:
    for seed, name in enumerate(names, start=1):
        put_add_model(rig, "models", name, os.urandom(seed) + bytes(size - seed))


def stub_of(rig: StorageRig, tmp_path: Path):  # type: ignore[no-untyped-def]
    listing = list_repository(parse_location(rig.url("models"), rig.env))
    stub = tmp_path / "stubs" / "s"
    sync_stub(listing, stub, {})
    return listing, stub


def fetcher(rig: StorageRig, cache_dir: Path, **env: str) -> StartFetcher:
    return StartFetcher({**os.environ, **rig.env, "CACHEAGENT_CACHE_DIR": str(cache_dir), **env})


def test_every_missing_model_is_fetched_at_once_and_each_load_then_hits(
    s3_rig: StorageRig, tmp_path: Path
):
    names = ["a", "b", "c", "d"]
    stage(s3_rig, names)
    listing, stub = stub_of(s3_rig, tmp_path)
    cache_dir = tmp_path / "cache"
    s3_rig.proxy.reset()
    s3_rig.proxy.per_conn_bytes_per_s = 2e6  # each part takes a while: downloads overlap
    try:
        run = fetcher(s3_rig, cache_dir)
        assert run.fetch_missing(listing.models.values(), stub, None) == names
        run.join(120)
    finally:
        s3_rig.proxy.per_conn_bytes_per_s = None
    # All four were on the wire at once, not one after another.
    assert max_models_in_flight(s3_rig, names) == len(names)
    # Each model's bytes crossed once, and each is now a hit for the stub's own plan.
    assert s3_rig.object_bytes("models/") == sum(s3_rig.object_bytes(f"models/{n}/") for n in names)
    with Cache(cache_dir, env={**os.environ, **s3_rig.env}) as cache:
        counters = cache.stats().counters
        assert counters["misses"] == len(names) and counters["hits"] == 0
        for name in names:
            plan = prefetch.plan_fetch(
                (stub / name / "config.pbtxt").read_text(),
                name,
                listing.models[name].location,
                {**os.environ, **s3_rig.env},
            )
            assert plan is not None
            snapshot = cache.fetch(plan.location, select=plan.select, selection=plan.selection)
            assert snapshot.hit and snapshot.bytes_fetched == 0


def test_a_warm_start_plans_nothing_and_asks_storage_nothing(
    s3_rig: StorageRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    stage(s3_rig, ["a", "b"])
    listing, stub = stub_of(s3_rig, tmp_path)
    cache_dir = tmp_path / "cache"
    first = fetcher(s3_rig, cache_dir)
    assert first.fetch_missing(listing.models.values(), stub, None) == ["a", "b"]
    first.join(120)
    assert known_path(stub).is_file()

    def no_planning(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm start planned a model")

    monkeypatch.setattr(prefetch, "plan_fetch", no_planning)
    s3_rig.proxy.reset()
    assert fetcher(s3_rig, cache_dir).fetch_missing(listing.models.values(), stub, None) == []
    assert s3_rig.proxy.records() == []


def test_a_changed_model_is_planned_again_and_only_it_is_fetched(
    s3_rig: StorageRig, tmp_path: Path
):
    stage(s3_rig, ["a", "b"])
    listing, stub = stub_of(s3_rig, tmp_path)
    cache_dir = tmp_path / "cache"
    run = fetcher(s3_rig, cache_dir)
    run.fetch_missing(listing.models.values(), stub, None)
    run.join(120)
    put_add_model(s3_rig, "models", "b", bytes(3 * MiB))  # new weights for b only
    listing, stub = stub_of(s3_rig, tmp_path)
    again = fetcher(s3_rig, cache_dir)
    assert again.fetch_missing(listing.models.values(), stub, None) == ["b"]
    again.join(120)


def test_models_beyond_the_cache_budget_are_left_to_their_loads(s3_rig: StorageRig, tmp_path: Path):
    stage(s3_rig, ["a", "b", "c"], size=4 * MiB)
    listing, stub = stub_of(s3_rig, tmp_path)
    run = fetcher(s3_rig, tmp_path / "cache", CACHEAGENT_MAX_SIZE=str(9 * MiB))
    assert run.fetch_missing(listing.models.values(), stub, None) == ["a", "b"]
    run.join(120)


def test_explicit_mode_fetches_only_the_named_models(s3_rig: StorageRig, tmp_path: Path):
    stage(s3_rig, ["a", "b", "c"])
    listing, stub = stub_of(s3_rig, tmp_path)
    s3_rig.proxy.reset()
    run = fetcher(s3_rig, tmp_path / "cache")
    assert run.fetch_missing(listing.models.values(), stub, frozenset({"b"})) == ["b"]
    run.join(120)
    assert s3_rig.object_bytes("models/a/") == s3_rig.object_bytes("models/c/") == 0


def test_a_model_with_prefetch_off_is_left_to_its_load(s3_rig: StorageRig, tmp_path: Path):
    put_add_model(s3_rig, "models", "a", bytes(MiB), agent_params={"prefetch": "false"})
    put_add_model(s3_rig, "models", "b", bytes(MiB))
    listing, stub = stub_of(s3_rig, tmp_path)
    run = fetcher(s3_rig, tmp_path / "cache")
    assert run.fetch_missing(listing.models.values(), stub, None) == ["b"]
    run.join(120)


def max_models_in_flight(rig: StorageRig, names: list[str]) -> int:
    """The most distinct models with a content GET open at one moment, at the proxy."""
    spans = []
    for record in rig.proxy.records():
        for name in names:
            if record.method == "GET" and f"/models/{name}/1/" in record.path:
                spans.append((record.started, record.started + record.duration_s, name))
    best = 0
    for start, _end, _name in spans:
        open_now = {n for s, e, n in spans if s <= start < e}
        best = max(best, len(open_now))
    return best
