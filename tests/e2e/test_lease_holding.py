"""The shim holds each loaded model's lease: it outlives a crashed worker, and a pid namespace.

A real tritonserver loads a model through cacheagent (from a local stub whose
``source`` is in the S3 rig), once as an ordinary child and once as pid 1 of
its own pid namespace (``unshare --pid --fork --mount-proc``), the way Triton
runs in a container. Its worker is then killed with SIGKILL. The test process
(the host, outside any namespace) purges and evicts the cache: the snapshot
Triton serves must stay, and the model must keep serving. After the unload
the lease must be gone, and the snapshot purgeable.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from cacheagent.cache import Cache
from harness.emulators import StorageRig
from harness.triton import (
    MODEL_PY,
    TritonServer,
    child_pids,
    find_worker_pids,
    model_config,
    wait_pid_gone,
)
from harness.wait import wait_for

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]
X = [10.0, 20.0, 30.0, 40.0]
WEIGHTS = [1.0, 2.0, 3.0, 4.0]
PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]


def put_model(rig: StorageRig, name: str) -> None:
    rig.put_tree(
        f"models/{name}",
        {
            "config.pbtxt": model_config(name, None).encode(),
            "1/model.py": MODEL_PY.encode(),
            "1/weights.bin": struct.pack("<4f", *WEIGHTS) + os.urandom(64 * 1024),
        },
    )


def stub(repo: Path, name: str, rig: StorageRig, cache: Path) -> None:
    params = {"cache_dir": str(cache), "prefetch": "false", "source": rig.url(f"models/{name}")}
    (repo / name).mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(model_config(name, params))


def assert_serves(server: TritonServer, name: str, weights: Sequence[float]) -> None:
    out = server.infer(name, "INPUT0", X)["OUTPUT0"]
    np.testing.assert_allclose(out, np.asarray(X, np.float32) + np.asarray(weights, np.float32))


def triton_pid(server: TritonServer, in_namespace: bool) -> int:
    """Triton's pid as the host sees it (behind unshare, it is unshare's child)."""
    if not in_namespace:
        return server.pid
    (pid,) = child_pids(server.pid)
    return pid


def live_keys(cache_dir: Path) -> set[str]:
    with Cache(cache_dir) as cache:
        return cache.index.live_leased_keys()


@pytest.mark.parametrize("in_namespace", [False, True], ids=["host", "pid-namespace"])
def test_lease_held_by_the_shim_survives_a_killed_worker_until_unload(
    triton_factory: Factory,
    s3_rig: StorageRig,
    repoagent_dir: Path,
    tmp_path: Path,
    in_namespace: bool,
) -> None:
    if in_namespace and (
        not shutil.which("unshare")
        or subprocess.run([*PID_NAMESPACE, "true"], capture_output=True).returncode != 0
    ):
        pytest.skip("cannot create pid namespaces here (needs root)")
    rig, cache_dir, repo = s3_rig, tmp_path / "cache", tmp_path / "repo"
    put_model(rig, "add")
    stub(repo, "add", rig, cache_dir)
    server = triton_factory(
        repo,
        repoagent_dir=repoagent_dir,
        env=rig.env,
        wrapper=PID_NAMESPACE if in_namespace else (),
    )
    server.load("add")
    assert_serves(server, "add", WEIGHTS)
    with Cache(cache_dir) as cache:
        (lease,) = [lease for lease in cache.leases() if lease.is_live()]
        (record,) = cache.snapshots()
    assert lease.key == record.key and lease.model == "add"
    if in_namespace:
        assert lease.pid == 1, "Triton should be pid 1 of its namespace"
    snapshot = cache_dir / "snapshots" / record.key

    triton = triton_pid(server, in_namespace)
    (worker,) = find_worker_pids(triton)
    os.kill(worker, signal.SIGKILL)
    assert wait_pid_gone(worker, 10), "the worker survived SIGKILL"

    # The worker's own lease descriptor died with it; the shim's holds the lease.
    assert live_keys(cache_dir) == {record.key}
    with Cache(cache_dir) as host:
        host.purge()
        report = host.evict(0)
        assert report.evicted == [] and report.kept_leased == 1
    assert (snapshot / "1" / "weights.bin").is_file() and (snapshot / "1" / "model.py").is_file()
    assert_serves(server, "add", WEIGHTS)

    server.unload("add")  # a fresh worker releases the lease by its id; the shim lets go
    wait_for(lambda: live_keys(cache_dir) == set(), 30, "the lease to end at unload")
    with Cache(cache_dir) as host:
        assert host.leases() == []
        host.purge()
    assert not snapshot.exists()
    assert server.running()
