"""The core cache against real emulators of S3, GCS and Azure, counted at a proxy.

"A hit costs listings only" and "a miss fetches only what changed" are
proven by counting the GETs of object contents that reached storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cacheagent.cache import Cache
from cacheagent.errors import RemoteNotFoundError, StorageUnavailableError
from cacheagent.triton.stub import write_stub
from harness.agent_requests import agent_request

MiB = 1024 * 1024


def small_files() -> dict[str, bytes]:
    files = {f"1/shard{i}.bin": os.urandom(20_000 + i) for i in range(8)}
    files["config.pbtxt"] = b'name: "m"\nbackend: "python"\n'
    files["labels.txt"] = b"a\nb\n"
    return files


def open_cache(tmp_path, rig, **kwargs) -> Cache:
    return Cache(tmp_path / "cache", env={**os.environ, **rig.env}, **kwargs)


def test_miss_then_hit_with_zero_content_gets(tmp_path, rig):
    files = small_files() | {"1/big.bin": os.urandom(3 * MiB + 17)}
    rig.put_tree("models/m", files)
    with open_cache(tmp_path, rig, concurrency=4, part_size=MiB) as cache:
        first = cache.fetch(rig.url("models/m"))
        assert not first.hit
        assert first.bytes_fetched == sum(map(len, files.values()))
        # Every byte crossed the wire exactly once: 10 small files + 4 ranged parts.
        assert rig.object_bytes("models/m") == first.bytes_fetched
        assert rig.object_gets("models/m") == 10 + 4
        for rel, data in files.items():
            assert (first.path / rel).read_bytes() == data

        rig.proxy.reset()
        second = cache.fetch(rig.url("models/m"))
        assert second.hit and second.bytes_fetched == 0 and second.path == first.path
        assert rig.object_gets() == 0 and rig.object_bytes() == 0
        assert len(rig.proxy.records()) >= 1  # it did list


def test_one_changed_file_of_ten_is_the_only_download(tmp_path, rig):
    files = small_files()
    rig.put_tree("models/m", files)
    with open_cache(tmp_path, rig) as cache:
        cache.fetch(rig.url("models/m"))
        changed = os.urandom(33_333)
        rig.put("models/m/1/shard3.bin", changed)
        rig.proxy.reset()
        snap = cache.fetch(rig.url("models/m"))
        assert not snap.hit and snap.files_fetched == 1 and snap.bytes_fetched == len(changed)
        assert rig.object_gets("models/m") == 1
        assert rig.object_gets("models/m/1/shard3.bin") == 1
        assert rig.object_bytes() == len(changed)
        assert (snap.path / "1/shard3.bin").read_bytes() == changed


def test_same_bytes_in_another_model_are_not_downloaded_again(tmp_path, rig):
    if rig.cloud == "as":
        pytest.skip("Azurite reports no content_md5 for block uploads: identity is per object")
    weights = os.urandom(100_000)
    rig.put_tree("models/a", {"1/w.bin": weights, "config.pbtxt": b"a"})
    rig.put_tree("models/b", {"1/w.bin": weights, "config.pbtxt": b"b"})
    with open_cache(tmp_path, rig) as cache:
        cache.fetch(rig.url("models/a"))
        rig.proxy.reset()
        snap = cache.fetch(rig.url("models/b"))
        assert snap.bytes_fetched == 1 and rig.object_bytes() == 1
        assert cache.size() == len(weights) + 2


def test_object_replaced_after_listing_is_never_mixed_in(tmp_path, rig):
    rig.put_tree("models/m", {"1/w.bin": b"old" * 1000, "config.pbtxt": b"c"})
    replaced = []

    def replace_after_listing(files: int, size: int) -> None:
        if not replaced:
            rig.put("models/m/1/w.bin", b"new" * 2000)
            replaced.append(True)

    with open_cache(tmp_path, rig) as cache:
        snap = cache.fetch(rig.url("models/m"), on_plan=replace_after_listing)
        assert (snap.path / "1/w.bin").read_bytes() == b"new" * 2000
        assert len(cache.snapshots()) == 1


def test_stale_if_error_serves_last_good_snapshot(tmp_path, rig):
    rig.put_tree("models/m", small_files())
    with open_cache(tmp_path, rig) as cache:
        good = cache.fetch(rig.url("models/m"))
        rig.proxy.set_down(True)
        try:
            stale = cache.fetch(rig.url("models/m"))
            assert stale.stale and stale.path == good.path
            assert "unreachable" in stale.warning and rig.url("models/m") in stale.warning
            strict = cache.defaults.replace(stale_if_error=False)
            with pytest.raises(StorageUnavailableError) as info:
                cache.fetch(rig.url("models/m"), settings=strict)
            assert rig.url("models/m") in str(info.value)
            with pytest.raises(StorageUnavailableError, match="unreachable"):
                cache.fetch(rig.url("models/other"), settings=strict)
        finally:
            rig.proxy.set_down(False)


def test_missing_directory_is_a_clear_not_found(tmp_path, rig):
    rig.put("models/m/config.pbtxt", b"x")
    with open_cache(tmp_path, rig) as cache, pytest.raises(RemoteNotFoundError) as info:
        cache.fetch(rig.url("models/nothing-here"))
    assert rig.url("models/nothing-here") in str(info.value)


def test_concurrent_warms_download_once(tmp_path, s3_rig):
    rig = s3_rig
    files = {"1/w.bin": os.urandom(4 * MiB), "config.pbtxt": b"c"}
    rig.put_tree("models/m", files)
    env = {**os.environ, **rig.env, "CACHEAGENT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "cacheagent.cli.main", "warm", rig.url("models/m"), "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({r["path"] for r in results}) == 1
    assert sum(r["bytes_fetched"] for r in results) == sum(map(len, files.values()))
    # The files cross once, plus one read of config.pbtxt per warm (to select versions).
    reads = sum(map(len, files.values())) + len(results) * len(files["config.pbtxt"])
    assert rig.object_bytes("models/m") == reads


def test_cli_warm_reports_stale_and_never_prints_secrets(tmp_path, s3_rig):
    rig = s3_rig
    rig.put_tree("models/m", {"1/w.bin": b"w", "config.pbtxt": b"c"})
    secret = "testing"  # moto accepts any secret; make ours distinctive
    env = {**os.environ, **rig.env, "AWS_SECRET_ACCESS_KEY": "SuperSecretValue123"}
    env["CACHEAGENT_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "cacheagent.cli.main", "warm", rig.url("models/m"), "--json"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    rig.proxy.set_down(True)
    try:
        stale = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        no_stale = subprocess.run(
            [*cmd, "--no-stale"], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        rig.proxy.set_down(False)
    assert stale.returncode == 0 and json.loads(stale.stdout)["stale"] is True
    assert "warning" in stale.stderr
    assert no_stale.returncode == 1 and rig.url("models/m") in no_stale.stderr
    for output in (ok.stdout, ok.stderr, stale.stdout, stale.stderr, no_stale.stderr):
        assert "SuperSecretValue123" not in output
    assert secret


def test_s3_fast_listing_gives_the_same_manifest_as_s3fs(tmp_path, s3_rig):
    from cacheagent.remote.clients import filesystem_for
    from cacheagent.remote.location import parse_location
    from cacheagent.remote.manifest import build_manifest
    from cacheagent.remote.s3 import fast_find

    files = small_files() | {"weird name+1/ü.bin": b"x", "1/": b""}
    s3_rig.put_tree("models/m", files)
    loc = parse_location(s3_rig.url("models/m"), {**os.environ, **s3_rig.env})
    fast = fast_find(loc)
    assert fast is not None
    fs = filesystem_for(loc)
    fs.invalidate_cache()
    slow = fs.find(loc.root, detail=True)
    assert (
        build_manifest(loc.url, loc.root, fast).key == build_manifest(loc.url, loc.root, slow).key
    )
    assert {k: v["ETag"] for k, v in fast.items()} == {k: v["ETag"] for k, v in slow.items()}


def test_s3_fast_model_listing_and_reads_match_s3fs(s3_rig):
    from cacheagent.errors import RemoteNotFoundError
    from cacheagent.remote.clients import filesystem_for
    from cacheagent.remote.listing import list_model_names, read_file
    from cacheagent.remote.location import parse_location
    from cacheagent.remote.s3 import fast_cat, fast_subdirs

    s3_rig.put_tree("repo/b", {"config.pbtxt": b"name: 'b'", "1/w.bin": b"w"})
    s3_rig.put_tree("repo/a", {"config.pbtxt": b"name: 'a'"})
    s3_rig.put_tree("repo/only marker+", {"": b""})  # a "dir/" marker object, no files
    s3_rig.put_tree("repo", {"README.md": b"not a model"})
    repo = parse_location(s3_rig.url("repo"), {**os.environ, **s3_rig.env})
    fs = filesystem_for(repo)
    fs.invalidate_cache()
    assert fast_subdirs(repo) == list_model_names(repo, fs) == ["a", "b", "only marker+"]
    assert fast_cat(repo.child("b"), "config.pbtxt") == b"name: 'b'"
    assert read_file(repo.child("a"), "config.pbtxt") == read_file(
        repo.child("a"), "config.pbtxt", fs
    )
    with pytest.raises(FileNotFoundError):
        fast_cat(repo.child("a"), "missing")
    with pytest.raises(RemoteNotFoundError):
        read_file(repo.child("a"), "missing", delays=())


def run_probe(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (so sys.modules shows what it imported)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_s3_hit_does_not_import_the_sdk(tmp_path, s3_rig):
    s3_rig.put_tree("models/m", small_files())
    env = {**os.environ, **s3_rig.env, "CACHEAGENT_CACHE_DIR": str(tmp_path / "cache")}
    warm = [sys.executable, "-m", "cacheagent.cli.main", "warm", s3_rig.url("models/m")]
    subprocess.run(warm, env=env, check=True, capture_output=True, timeout=120)
    probe = (
        "import sys; from cacheagent.cache import Cache; "
        f"s = Cache().fetch({s3_rig.url('models/m')!r}); "
        "print(s.hit, 's3fs' in sys.modules, 'botocore' in sys.modules)"
    )
    out = run_probe(probe, env)
    assert out.stdout.split() == ["True", "False", "False"]


def test_s3_stub_load_and_its_prefetch_import_no_fsspec(tmp_path, s3_rig):
    # Prefetch lists the stub repository and reads sibling configs while Triton
    # starts its backends; importing fsspec or an SDK then would take CPU from
    # Triton's own start (measured: about 0.1 s of a warm start on 2 cores).
    s3_rig.put_tree("models/a", small_files())
    s3_rig.put_tree("models/b", {"1/w.bin": b"b" * 1000, "config.pbtxt": b"name: 'b'"})
    cache_dir = tmp_path / "cache"
    stub = tmp_path / "stub"
    write_stub(
        s3_rig.url("models"), stub, {"cache_dir": str(cache_dir)}, {**os.environ, **s3_rig.env}
    )
    (stub / "c").mkdir()  # a directory without config.pbtxt is skipped
    params = {"cache_dir": str(cache_dir), "source": s3_rig.url("models/a")}
    request = agent_request("LOAD", stub / "a", params, model="a", artifact="FILESYSTEM")
    probe = (
        "import json, sys\n"
        "from cacheagent.triton import actions\n"
        "path = actions.handle(json.loads(sys.argv[1]), lambda *a: None)\n"
        "for thread in actions.prefetcher().threads:\n"
        "    thread.join(60)\n"
        "print(bool(path), *(m in sys.modules for m in ('fsspec', 's3fs', 'botocore')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(request)],
        env={**os.environ, **s3_rig.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["True", "False", "False", "False"]
    assert sorted(r.model for r in Cache(cache_dir).snapshots()) == ["a", "b"]  # b: prefetched


def test_bad_credentials_are_access_denied_never_an_outage(tmp_path, azure_rig):
    from cacheagent.errors import RemoteAccessDeniedError

    rig = azure_rig
    rig.put_tree("models/m", small_files())
    with open_cache(tmp_path, rig) as cache:
        cache.fetch(rig.url("models/m"))
    good_key = rig.env["AZURE_STORAGE_KEY"]
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    env = {k: v.replace(good_key, wrong_key) for k, v in rig.env.items()}
    # A cached snapshot exists, yet bad credentials must fail loudly, not serve it stale.
    with (
        Cache(tmp_path / "cache", env={**os.environ, **env}) as cache,
        pytest.raises(RemoteAccessDeniedError) as info,
    ):
        cache.fetch(rig.url("models/m"))
    assert "credentials" in str(info.value) and wrong_key not in str(info.value)


def test_s3_miss_with_static_credentials_never_imports_the_sdk(tmp_path, s3_rig):
    files = {"1/w.bin": os.urandom(3 * MiB + 5), "config.pbtxt": b"c"}
    s3_rig.put_tree("models/m", files)
    env = {**os.environ, **s3_rig.env, "CACHEAGENT_CACHE_DIR": str(tmp_path / "cache")}
    probe = (
        "import sys; from cacheagent.cache import Cache; "
        "cache = Cache(concurrency=4, part_size=1024 * 1024); "
        f"s = cache.fetch({s3_rig.url('models/m')!r}); "
        "print(s.hit, s.bytes_fetched, 's3fs' in sys.modules, 'botocore' in sys.modules)"
    )
    out = run_probe(probe, env)
    assert out.stdout.split() == ["False", str(3 * MiB + 6), "False", "False"]
    assert s3_rig.object_bytes("models/m/") == 3 * MiB + 6
    assert s3_rig.object_gets("models/m/1/w.bin") == 4  # ranged parts
