"""Reliability through a real tritonserver: killed processes, outages, corruption, budget.

Models come from a LOCAL stub repository: each model directory holds only a
config.pbtxt whose cacheagent parameters name the real model in the storage rig
(``source``). Triton sees a FILESYSTEM model and never talks to storage; the
agent fetches from ``source`` through the rig's counting proxy. So every byte
of model content that crosses the proxy was fetched by cacheagent, and taking
storage away hits the agent only.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from cacheagent.local.index import Index
from cacheagent.local.store import Store
from harness.emulators import StorageRig
from harness.triton import (
    TritonHTTPError,
    TritonServer,
    _pbtxt_string,
    model_config,
    put_weighted_model,
    wait_pid_gone,
)
from harness.wait import wait_for

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]
MiB = 1024 * 1024
MB = 1000 * 1000
X = [10.0, 20.0, 30.0, 40.0]


# ---- helpers ------------------------------------------------------------------


def stub(repo: Path, name: str, rig: StorageRig | None, cache: Path, **params: str) -> Path:
    """A local model dir holding only config.pbtxt; the agent fetches it from ``source``."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    values = {"cache_dir": str(cache), "prefetch": "false", **params}
    if rig is not None:
        values.setdefault("source", rig.url(f"models/{name}"))
    (model_dir / "config.pbtxt").write_text(model_config(name, values))
    return model_dir


def assert_serves(server: TritonServer, name: str, weights: Sequence[float]) -> None:
    out = server.infer(name, "INPUT0", X)["OUTPUT0"]
    np.testing.assert_allclose(out, np.asarray(X, np.float32) + np.asarray(weights, np.float32))


def load_lines(server: TritonServer, name: str) -> list[str]:
    return [
        line for line in server.log_text().splitlines() if f"cacheagent: model '{name}' " in line
    ]


def temp_blobs_with_bytes(cache: Path) -> list[Path]:
    found = []
    for path in (cache / "tmp").glob("*.blob"):
        with contextlib.suppress(FileNotFoundError):  # finished and renamed meanwhile
            if path.stat().st_size > 0:
                found.append(path)
    return found


def owners_of(cache: Path, pid: int) -> list[str]:
    """The owner names of process ``pid`` (temp names carry those, not pids); call this
    before a cleanup after its death removes its owner token."""
    return [
        token.stem
        for token in (cache / "owners").glob("owner-*.lock")
        if token.read_text().strip() == f"pid {pid}"
    ]


def temp_entries_of(cache: Path, owners: list[str]) -> list[Path]:
    return [path for owner in owners for path in (cache / "tmp").glob(f"{owner}.*")]


def cache_problems(root: Path) -> list[str]:
    """Blobs whose bytes do not match their name, snapshots that are partial or unrecorded."""
    problems = []
    for blob in (root / "blobs").iterdir():
        if blob.name in (".flat", ".staging"):
            continue
        if not blob.is_file() or xxhash.xxh3_128_hexdigest(blob.read_bytes()) != blob.name:
            problems.append(f"blob {blob.name} holds other bytes")
    index = Index(root / "index")
    try:
        records = {r.key: r for r in index.snapshots()}
    finally:
        index.close()
    for entry in (root / "snapshots").iterdir():
        record = records.get(entry.name)
        if record is None:
            problems.append(f"snapshot {entry.name} has no index record")
            continue
        for relpath, _size, _fp, _md5, digest in record.files:
            path = entry / relpath
            if not path.is_file() or xxhash.xxh3_128_hexdigest(path.read_bytes()) != digest:
                problems.append(f"snapshot {entry.name}: {relpath} is missing or wrong")
    return problems


def live_leases(cache: Path) -> list[Any]:
    index = Index(cache / "index")
    try:
        return [lease for lease in index.leases() if lease.is_live()]
    finally:
        index.close()


def snapshot_of(cache: Path, model: str) -> Any:
    index = Index(cache / "index")
    try:
        (record,) = [r for r in index.snapshots() if r.model == model]
        return record
    finally:
        index.close()


# ---- 1. crash safety ------------------------------------------------------------


def test_triton_killed_mid_fetch_then_restart_serves_right_weights(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    weights = [1.0, 2.0, 3.0, 4.0]
    size = put_weighted_model(rig, "add", weights, 6 * MiB)
    stub(repo, "add", rig, cache, concurrency="2", part_size="1MiB")
    rig.proxy.per_conn_bytes_per_s = MiB  # ~3 s of download: the kill lands inside it

    first = triton_factory(
        repo, repoagent_dir=repoagent_dir, model_control_mode="none", env=rig.env, wait=False
    )
    wait_for(lambda: bool(temp_blobs_with_bytes(cache)), 60, "bytes of the weights on disk")
    (worker,) = first.worker_pids()
    first.kill()  # SIGKILL Triton in the middle of its LOAD
    assert wait_pid_gone(worker, 10), "the worker outlived a SIGKILLed Triton"
    wait_for(lambda: rig.object_bytes("models/add/", ok_only=False) > 0, 10, "the cut GETs")
    assert rig.object_bytes("models/add/", ok_only=False) < size, "the kill came too late"
    owners = owners_of(cache, worker)
    assert temp_entries_of(cache, owners), "no partial download was interrupted"
    assert list((cache / "snapshots").iterdir()) == []
    assert cache_problems(cache) == []

    rig.proxy.per_conn_bytes_per_s = None
    second = triton_factory(
        repo, repoagent_dir=repoagent_dir, model_control_mode="none", env=rig.env
    )
    assert second.model_ready("add")
    assert_serves(second, "add", weights)
    assert any(" MISS: " in line for line in load_lines(second, "add"))
    assert not temp_entries_of(cache, owners), "the dead worker's temp files stayed"
    assert cache_problems(cache) == []
    assert [lease.pid for lease in live_leases(cache)] == [second.pid]


def test_worker_killed_mid_fetch_then_load_again_serves_right_weights(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    weights = [5.0, 6.0, 7.0, 8.0]
    put_weighted_model(rig, "add", weights, 6 * MiB)
    stub(repo, "add", rig, cache, concurrency="2", part_size="1MiB")
    rig.proxy.per_conn_bytes_per_s = MiB
    server = triton_factory(repo, repoagent_dir=repoagent_dir, env=rig.env)

    failure: list[BaseException] = []

    def load() -> None:
        try:
            server.load("add")
        except BaseException as exc:
            failure.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    wait_for(lambda: bool(temp_blobs_with_bytes(cache)), 60, "bytes of the weights on disk")
    (worker,) = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    owners = owners_of(cache, worker)
    assert temp_entries_of(cache, owners), "no partial download was interrupted"
    loader.join(60)
    assert failure and isinstance(failure[0], TritonHTTPError), "the LOAD did not fail"
    server.wait_log(f"worker process (pid {worker}) was killed by signal 9", 10)
    assert not server.model_ready("add")
    assert list((cache / "snapshots").iterdir()) == []
    assert cache_problems(cache) == []

    rig.proxy.per_conn_bytes_per_s = None
    server.load("add")  # a fresh worker; it also clears the dead one's temp files
    assert server.worker_pids() != [worker]
    assert_serves(server, "add", weights)
    assert not temp_entries_of(cache, owners)
    assert cache_problems(cache) == []


# ---- 3. corruption --------------------------------------------------------------


def test_verify_hash_refetches_a_flipped_weight_byte(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    weights = [1.0, 2.0, 3.0, 4.0]
    put_weighted_model(rig, "add", weights, 64 * 1024)
    stub(repo, "add", rig, cache, verify="hash")
    server = triton_factory(repo, repoagent_dir=repoagent_dir, env=rig.env)
    server.load("add")
    assert_serves(server, "add", weights)
    server.unload("add")
    wait_for(lambda: not live_leases(cache), 15, "the lease to be released")

    record = snapshot_of(cache, "add")
    blob = Store(cache).blob_path(record.blobs()["1/weights.bin"])
    blob.chmod(0o644)
    with open(blob, "r+b") as handle:  # 1.0 = 00 00 80 3f: flip the exponent byte
        handle.seek(3)
        handle.write(bytes([0x3F ^ 0x01]))
    blob.chmod(0o444)
    rig.proxy.reset()

    server.load("add")
    assert_serves(server, "add", weights)  # the right weights, not the flipped ones
    last = load_lines(server, "add")[-1]
    assert " MISS: " in last and "(1 of 3 files" in last, last
    assert rig.object_bytes("models/add/") == 64 * 1024  # only the damaged file again
    assert cache_problems(cache) == []


# ---- 4. outage ------------------------------------------------------------------


def test_outage_serves_last_good_snapshot_or_fails_naming_the_url(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    put_weighted_model(rig, "stale", [1.0, 1.0, 1.0, 1.0])
    put_weighted_model(rig, "strict", [2.0, 2.0, 2.0, 2.0])
    put_weighted_model(rig, "never", [3.0, 3.0, 3.0, 3.0])
    stub(repo, "stale", rig, cache)
    stub(repo, "strict", rig, cache, stale_if_error="false")
    stub(repo, "never", rig, cache)

    first = triton_factory(
        repo, repoagent_dir=repoagent_dir, env=rig.env, load_models=["stale", "strict"]
    )
    assert " MISS: " in load_lines(first, "stale")[-1]
    first.stop()

    rig.proxy.set_down(True)  # storage unreachable from here on
    second = triton_factory(repo, repoagent_dir=repoagent_dir, env=rig.env, load_models=["stale"])
    assert second.model_ready("stale")
    assert_serves(second, "stale", [1.0, 1.0, 1.0, 1.0])
    warnings = [
        line
        for line in second.log_text().splitlines()
        if line.startswith("W") and "cacheagent" in line and "stale" in line
    ]
    assert warnings and rig.url("models/stale") in warnings[0], second.log_tail()

    for name in ("strict", "never"):  # no stale fallback allowed / nothing cached to fall back on
        with pytest.raises(TritonHTTPError):
            second.load(name)
        url = rig.url(f"models/{name}")
        failed = [line for line in second.log_text().splitlines() if url in line]
        assert any("unreachable" in line for line in failed), second.log_tail()
    assert not second.model_ready("strict") and not second.model_ready("never")


# ---- 5. concurrency ---------------------------------------------------------------


def test_two_tritons_sharing_a_cache_download_once(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    weights = [4.0, 3.0, 2.0, 1.0]
    size = put_weighted_model(rig, "add", weights, 3 * MiB)
    stub(repo, "add", rig, cache)
    # A crawl until both agents have listed the model (so both LOADs run at once),
    # then full speed.
    rig.proxy.per_conn_bytes_per_s = 32 * 1024
    servers = [
        triton_factory(
            repo, repoagent_dir=repoagent_dir, model_control_mode="none", env=rig.env, wait=False
        )
        for _ in range(2)
    ]
    wait_for(lambda: len(listings(rig)) >= 2, 60, "both agents to list the model")
    assert rig.object_bytes("models/add/1/weights.bin") == 0
    rig.proxy.per_conn_bytes_per_s = None
    for server in servers:
        server.wait_ready(60)
        assert_serves(server, "add", weights)
    assert rig.object_bytes("models/add/") == size
    outcomes = sorted(load_lines(s, "add")[-1].split("'add' ")[1].split(":")[0] for s in servers)
    assert outcomes == ["HIT", "MISS"]
    assert sorted(lease.pid for lease in live_leases(cache)) == sorted(s.pid for s in servers)


def listings(rig: StorageRig) -> list[Any]:
    return [r for r in rig.proxy.records() if "list-type=2" in r.query]


# ---- 6. budget ------------------------------------------------------------------


def test_model_over_budget_fails_with_both_sizes_in_the_log(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    size = put_weighted_model(rig, "big", [1.0] * 4, 2 * MB)
    stub(repo, "big", rig, cache, max_size="1MB")
    server = triton_factory(repo, repoagent_dir=repoagent_dir, env=rig.env)
    with pytest.raises(TritonHTTPError):
        server.load("big")
    lines = [line for line in server.log_text().splitlines() if "max_size" in line]
    assert any(f"({size} bytes)" in line and "(1000000 bytes)" in line for line in lines), lines
    assert rig.object_bytes() == 0


def ensemble_config(name: str, params: Mapping[str, str]) -> str:
    """An ensemble over the 'anchor' model: it loads in milliseconds (no backend process),
    yet goes through the agent like any model, so many load/unload cycles stay cheap."""
    pairs = ", ".join(
        f"{{ key: {_pbtxt_string(k)}, value: {_pbtxt_string(v)} }}" for k, v in params.items()
    )
    return (
        f"name: {_pbtxt_string(name)}\n"
        'platform: "ensemble"\n'
        "max_batch_size: 0\n"
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "anchor" model_version: -1\n'
        '  input_map { key: "INPUT0" value: "INPUT0" }\n'
        '  output_map { key: "OUTPUT0" value: "OUTPUT0" } } ] }\n'
        'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
        f"{pairs} ] }} ] }}\n"
    )


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


CYCLES = 200


def test_load_unload_cycles_over_budget_leak_nothing(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    budget = 5 * MB
    # The anchor: a real python model, leased for the whole test and least recently
    # used of all, so it is the first eviction candidate: it must never go.
    put_weighted_model(rig, "anchor", [1.0, 1.0, 1.0, 1.0], MB // 2)
    stub(repo, "anchor", rig, cache, max_size="5MB")
    names = ["e0", "e1", "e2"]  # 2 MB each: anchor + any two fit, all three do not
    for i, name in enumerate(names):
        params = {
            "cache_dir": str(cache),
            "source": rig.url(f"models/{name}"),
            "max_size": "5MB",
            "prefetch": "false",
        }
        config = ensemble_config(name, params)
        rig.put_tree(
            f"models/{name}", {"config.pbtxt": config.encode(), "1/blob.bin": bytes([i]) * 2 * MB}
        )
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)

    server = triton_factory(
        repo, repoagent_dir=repoagent_dir, env=rig.env, load_models=["anchor"], log_verbose=0
    )
    worker = server.wait_worker()
    anchor = snapshot_of(cache, "anchor")
    store = Store(cache)
    index = Index(cache / "index")  # one handle for polling, not one per poll

    def live() -> list[Any]:
        return [lease for lease in index.leases() if lease.is_live()]

    warm_fds = warm_rss = 0
    peak = 0
    for cycle in range(CYCLES):
        name = names[cycle % 3]
        server.load(name)
        if cycle % 50 == 0:
            assert_serves(server, name, [1.0] * 4)
        server.unload(name)
        wait_for(lambda: len(live()) == 1, 15, f"{name}'s lease to be released")
        peak = max(peak, store.blob_bytes())
        if cycle == 20:  # after warm-up: imports, SQLite handles, connection pools
            warm_fds, warm_rss = fd_count(worker), rss_kib(worker)
    # An UNLOAD_COMPLETE still running when the next LOAD comes may start a second
    # worker of the pool; none may die or be replaced.
    pids = server.worker_pids()
    assert worker in pids and len(pids) <= 4, pids
    assert "starting a fresh one" not in server.log_text(), "a worker was replaced"
    end_fds, end_rss = fd_count(worker), rss_kib(worker)
    print(f"worker fds {warm_fds}->{end_fds}, VmRSS {warm_rss}->{end_rss} KiB, peak {peak} B")

    assert peak <= budget, f"the cache reached {peak} bytes, over its budget of {budget}"
    assert end_fds <= warm_fds + 2, f"open files grew from {warm_fds} to {end_fds}"
    assert end_rss <= warm_rss + 30 * 1024, f"VmRSS grew from {warm_rss} to {end_rss} KiB"
    (lease,) = live()
    assert lease.key == anchor.key and lease.pid == server.pid
    assert (store.snapshot_path(anchor.key) / "1" / "weights.bin").is_file()
    assert_serves(server, "anchor", [1.0] * 4)
    try:
        counters = index.counters()
        assert counters["evictions"] >= CYCLES - 3, "the budget never forced an eviction"
        assert len(index.leases()) == 1  # released, not merely dead
    finally:
        index.close()
    assert cache_problems(cache) == []


# ---- 7. secrets -------------------------------------------------------------------


SECRET = "tRiToNsEcReT-" + os.urandom(8).hex()
AZURE_SECRET = base64.b64encode(b"azure-key-" + os.urandom(24)).decode()


def test_credentials_never_reach_tritons_log(
    triton_factory: Factory,
    s3_rig: StorageRig,
    azure_rig: StorageRig,
    repoagent_dir: Path,
    tmp_path: Path,
) -> None:
    cache, repo = tmp_path / "cache", tmp_path / "repo"
    put_weighted_model(s3_rig, "good", [1.0] * 4)
    azure_rig.put_tree("models/az", {"config.pbtxt": b"c", "1/model.py": b"#"})
    stub(repo, "good", s3_rig, cache)
    stub(
        repo,
        "nobucket",
        None,
        cache,
        source=s3_rig.url("models/good").replace(s3_rig.bucket, "nope"),
    )
    stub(repo, "unreachable", None, cache, source=f"s3://127.0.0.1:9/{s3_rig.bucket}/models/good")
    stub(repo, "az", azure_rig, cache)
    wrong = azure_rig.env["AZURE_STORAGE_CONNECTION_STRING"].replace(
        azure_rig.env["AZURE_STORAGE_KEY"], AZURE_SECRET
    )
    env = {
        **s3_rig.env,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AZURE_STORAGE_CONNECTION_STRING": wrong,
        "AZURE_STORAGE_KEY": AZURE_SECRET,
    }
    server = triton_factory(repo, repoagent_dir=repoagent_dir, env=env)
    server.load("good")
    assert_serves(server, "good", [1.0] * 4)
    for name in ("nobucket", "unreachable", "az"):
        with pytest.raises(TritonHTTPError) as failure:
            server.load(name)
        assert SECRET not in failure.value.message and AZURE_SECRET not in failure.value.message

    creds = tmp_path / "creds.json"  # broken JSON that quotes the secret
    creds.write_text('{"s3": {"": {"key_id": "k", "secret_key": "' + SECRET + '",}}')
    other = triton_factory(
        repo, repoagent_dir=repoagent_dir, env={**env, "TRITON_CLOUD_CREDENTIAL_PATH": str(creds)}
    )
    with pytest.raises(TritonHTTPError):
        other.load("good")
    assert str(creds) in other.log_text()

    server.stop()
    other.stop()
    for log in (server.log_text(), other.log_text()):
        assert "cacheagent" in log
        assert SECRET not in log and AZURE_SECRET not in log


# ---- 8. settings travel with each model ------------------------------------------


def test_models_with_different_settings_on_one_cache_keep_their_own_with_prefetch_on(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    """Per-model parameters never bleed between models sharing one cache and worker.

    Prefetch is on, so sibling fetches run in background threads while the other
    models' LOADs run. Each model must be judged by its own parameters: ``verify:
    hash`` catches a flipped byte although its sibling says ``verify: none``;
    ``stale_if_error: false`` fails during an outage although its sibling allows
    stale; ``max_size: 1MB`` refuses a 2 MB model although its sibling sets none.
    """
    rig, cache, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    hashed, careless = [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]
    put_weighted_model(rig, "hashed", hashed)
    put_weighted_model(rig, "careless", careless)
    put_weighted_model(rig, "strict", [2.0] * 4)
    put_weighted_model(rig, "lenient", [3.0] * 4)
    put_weighted_model(rig, "small_budget", [4.0] * 4, 2 * MB)
    put_weighted_model(rig, "no_budget", [5.0] * 4, 2 * MB)
    on = {"prefetch": "true"}
    stub(repo, "careless", rig, cache, verify="none", **on)
    stub(repo, "hashed", rig, cache, verify="hash", **on)
    stub(repo, "lenient", rig, cache, **on)
    stub(repo, "strict", rig, cache, stale_if_error="false", **on)
    stub(repo, "no_budget", rig, cache, **on)
    stub(repo, "small_budget", rig, cache, max_size="1MB", **on)

    first = triton_factory(
        repo, repoagent_dir=repoagent_dir, env=rig.env, load_models=["careless", "hashed"]
    )
    for name in ("strict", "lenient", "no_budget"):
        first.load(name)
    with pytest.raises(TritonHTTPError):
        first.load("small_budget")  # its own 1MB budget, whatever the siblings say
    budget_lines = [line for line in first.log_text().splitlines() if "small_budget" in line]
    assert any("max_size" in line and "(1000000 bytes)" in line for line in budget_lines)
    first.stop()

    record = snapshot_of(cache, "hashed")
    blob = cache / "snapshots" / record.key / "1" / "weights.bin"
    blob.chmod(0o644)
    with open(blob, "r+b") as handle:  # 1.0 = 00 00 80 3f: flip the exponent byte
        handle.seek(3)
        handle.write(bytes([0x3F ^ 0x01]))
    blob.chmod(0o444)

    # careless loads first and starts prefetching hashed with verify: none meanwhile.
    second = triton_factory(
        repo, repoagent_dir=repoagent_dir, env=rig.env, load_models=["careless", "hashed"]
    )
    assert_serves(second, "careless", careless)
    assert_serves(second, "hashed", hashed)  # re-fetched: the flipped byte was caught
    assert " MISS: " in load_lines(second, "hashed")[-1], load_lines(second, "hashed")
    second.stop()

    rig.proxy.set_down(True)
    third = triton_factory(repo, repoagent_dir=repoagent_dir, env=rig.env, load_models=["lenient"])
    with pytest.raises(TritonHTTPError):
        third.load("strict")
    assert " STALE: " in load_lines(third, "lenient")[-1]
    assert not any(" STALE: " in line for line in load_lines(third, "strict"))
    assert not third.model_ready("strict")


# ---- 9. the worker's own modules only ----------------------------------------------


def test_tritons_working_directory_never_shadows_the_workers_modules(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    """Modules planted in Triton's working directory (an ``xxhash.py`` that leaves a mark,
    a ``cacheagent/`` package that breaks every import) never run in the worker: it is
    started isolated (``python -I``), and the model loads with the right weights."""
    rig, cache, repo, cwd = s3_rig, tmp_path / "cache", tmp_path / "repo", tmp_path / "cwd"
    weights = [1.5, 2.5, 3.5, 4.5]
    put_weighted_model(rig, "add", weights)
    stub(repo, "add", rig, cache)
    mark = tmp_path / "planted-module-ran"
    (cwd / "cacheagent").mkdir(parents=True)
    (cwd / "cacheagent" / "__init__.py").write_text("raise ImportError('planted cacheagent')\n")
    (cwd / "xxhash.py").write_text(f"open({str(mark)!r}, 'w').close()\nraise ImportError('x')\n")
    env = {**rig.env, "PYTHONPATH": str(cwd)}  # -I ignores PYTHONPATH as well
    server = triton_factory(
        repo, repoagent_dir=repoagent_dir, env=env, load_models=["add"], cwd=cwd
    )
    assert_serves(server, "add", weights)
    assert " MISS: " in load_lines(server, "add")[-1]
    assert not mark.exists()
    assert "planted" not in server.log_text()
