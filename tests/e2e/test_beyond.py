"""Beyond Triton's own behaviour, in a real tritonserver: version-aware fetch, poll-mode
reloads, and stub repositories where Triton never talks to storage."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cacheagent.cache import Cache
from cacheagent.triton.stub import write_stub
from harness.emulators import StorageRig
from harness.triton import (
    TritonServer,
    client_of,
    downloads,
    expected_output,
    live_leases,
    put_add_model,
    wait_live_leases,
)

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]
X = [10.0, 20.0, 30.0, 40.0]


def weights_file(weights: list[float], size: int = 256 * 1024) -> bytes:
    return struct.pack("<4f", *weights) + bytes(size - 16)


def answers(server: TritonServer, model: str, weights: list[float]) -> bool:
    out = server.infer(model, "INPUT0", X)["OUTPUT0"]
    return bool(np.allclose(out, expected_output(X, weights)))


def test_default_policy_fetches_only_the_latest_version(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    params = {"cache_dir": str(cache_dir), "prefetch": "false"}
    put_add_model(s3_rig, "models", "add", [0.0] * 4, params, (1, 2, 3), version_policy=None)
    put_add_model(
        s3_rig, "models", "addall", [0.0] * 4, {**params, "versions": "all"}, (1, 2, 3), None
    )
    for offset, model in ((0, "add"), (10, "addall")):  # distinct bytes: no dedup between them
        for version in (1, 2, 3):
            weights = weights_file([float(version + offset)] * 4)
            s3_rig.put(f"models/{model}/{version}/weights.bin", weights)
    server = triton_factory(
        s3_rig.url("models"),
        repoagent_dir=repoagent_dir,
        model_control_mode="none",
        env=s3_rig.env,
    )
    assert answers(server, "add", [3.0] * 4)  # Triton's default policy: latest 1
    agent = downloads(s3_rig, "agent", "models/add/")
    assert set(agent) == {
        "models/add/config.pbtxt",
        "models/add/3/model.py",
        "models/add/3/weights.bin",
    }
    assert not downloads(s3_rig, "triton", "models/add/1/")
    assert not downloads(s3_rig, "triton", "models/add/2/")
    # versions=all turns it off: every version directory is fetched.
    fetched_all = downloads(s3_rig, "agent", "models/addall/")
    assert {f"models/addall/{v}/weights.bin" for v in (1, 2, 3)} <= set(fetched_all)
    assert answers(server, "addall", [13.0] * 4)


def test_poll_mode_reload_serves_new_content_and_old_snapshot_becomes_evictable(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([1.0] * 4), {"cache_dir": str(cache_dir)})
    server = triton_factory(
        s3_rig.url("models"),
        repoagent_dir=repoagent_dir,
        model_control_mode="poll",
        extra_args=["--repository-poll-secs=1"],
        env=s3_rig.env,
    )
    assert answers(server, "add", [1.0] * 4)
    [old_lease] = wait_live_leases(cache_dir, 1)
    s3_rig.put("models/add/1/weights.bin", weights_file([5.0] * 4))
    deadline = time.monotonic() + 60
    while not answers(server, "add", [5.0] * 4):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while {lease.key for lease in live_leases(cache_dir)} != {
        k for k in (r.key for r in Cache(cache_dir).snapshots()) if k != old_lease.key
    }:
        assert time.monotonic() < deadline, "the old snapshot's lease was not released"
        time.sleep(0.25)
    with Cache(cache_dir) as cache:
        plan = cache.evict(0, dry_run=True)
        assert [r.key for r in plan.evicted] == [old_lease.key]  # the new one is leased
    reloaded = downloads(s3_rig, "agent", "models/add/")
    assert reloaded["models/add/1/weights.bin"][0] == 2  # the first load and the reload


def test_stub_repository_keeps_triton_off_storage_and_survives_an_outage(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([2.0] * 4))
    stub = tmp_path / "stub"
    report = write_stub(
        s3_rig.url("models"), stub, {"cache_dir": str(cache_dir)}, env={**s3_rig.env}
    )
    assert report.written == ["add"]
    s3_rig.proxy.reset()
    server = triton_factory(
        stub, repoagent_dir=repoagent_dir, model_control_mode="none", env=s3_rig.env
    )
    assert answers(server, "add", [2.0] * 4)
    assert "MISS" in server.log_text()
    clients = {client_of(r) for r in s3_rig.proxy.records()}
    assert clients == {"agent"}, "Triton itself must not talk to storage"
    server.stop()

    s3_rig.proxy.set_down(True)
    try:
        again = triton_factory(
            stub, repoagent_dir=repoagent_dir, model_control_mode="none", env=s3_rig.env
        )
        assert answers(again, "add", [2.0] * 4)
        log = again.log_text()
        assert "STALE" in log and "unreachable" in log
        assert any(line.startswith("W") and "stale" in line for line in log.splitlines())
    finally:
        s3_rig.proxy.set_down(False)
