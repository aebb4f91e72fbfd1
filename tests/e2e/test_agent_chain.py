"""cacheagent chained with a second repository agent, in a real tritonserver.

Triton runs a model's agents in the order its config lists them. ``md5check``
(tests/fixtures/md5_agent/md5_agent.c, built by harness/agents.py) stands in for
Triton's own checksum agent: listed after cacheagent, it must get the local
snapshot cacheagent made (artifact FILESYSTEM, a path in the cache) and verify
its ``MD5:<relpath>`` parameters there. Its verdict decides the load: a right
checksum loads, a wrong one fails with md5check's message in Triton's log, and
either way no lease is left behind. Both layouts: Triton on the S3 repository,
and on a stub repository written by ``cacheagent stub``, which must keep the
second agent (issue 10.13: it used to keep cacheagent alone).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cacheagent.cache import Cache
from cacheagent.triton.config import format_config, parse_config
from cacheagent.triton.install import install_triton
from cacheagent.triton.stub import write_stub
from harness.agents import AgentBuildError, build_md5_agent
from harness.emulators import StorageRig
from harness.triton import (
    TritonServer,
    add_model_files,
    expected_output,
    live_leases,
    wait_live_leases,
)

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]
X = [10.0, 20.0, 30.0, 40.0]
CHECKED = ("1/model.py", "1/weights.bin")


@pytest.fixture(scope="module")
def chain_agents_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --repoagent-directory with cacheagent and md5check (the shared one stays untouched)."""
    directory = tmp_path_factory.mktemp("chain-repoagents")
    install_triton(directory)
    try:
        build_md5_agent(directory)
    except AgentBuildError as exc:
        pytest.skip(f"cannot build the md5check test agent: {exc}")
    return directory


def weights(value: float) -> bytes:
    return struct.pack("<4f", *([value] * 4)) + bytes(64 * 1024)


def chained_model(name: str, value: float, cache_dir: Path, *, corrupt: bool) -> dict[str, bytes]:
    """The add model with cacheagent, then md5check over its version files."""
    params = {"cache_dir": str(cache_dir), "prefetch": "false"}
    files = add_model_files(name, weights(value), params)
    config = parse_config(files["config.pbtxt"])
    md5check = config.model_repository_agents.agents.add(name="md5check")
    for relpath in CHECKED:
        digest = hashlib.md5(files[relpath]).hexdigest()
        if corrupt and relpath.endswith("weights.bin"):
            digest = hashlib.md5(b"not the weights").hexdigest()
        md5check.parameters[f"MD5:{relpath}"] = digest
    files["config.pbtxt"] = format_config(config).encode()
    return files


def put_models(rig: StorageRig, cache_dir: Path) -> None:
    rig.put_tree("models/good", chained_model("good", 1.0, cache_dir, corrupt=False))
    rig.put_tree("models/bad", chained_model("bad", 2.0, cache_dir, corrupt=True))


def start(factory: Factory, repository: Path | str, agents: Path, rig: StorageRig) -> TritonServer:
    return factory(
        repository,
        repoagent_dir=agents,
        model_control_mode="none",
        exit_on_error=False,
        # Strict readiness would keep the server "not ready" while a model failed.
        extra_args=["--strict-readiness=false"],
        env=rig.env,
    )


def check_verdicts(server: TritonServer, cache_dir: Path) -> None:
    """good serves, checked by md5check in the cache; bad failed with md5check's message."""
    out = server.infer("good", "INPUT0", X)["OUTPUT0"]
    np.testing.assert_allclose(out, expected_output(X, [1.0] * 4))
    assert not server.model_ready("bad")
    lines = server.log_text().splitlines()
    verified = [line for line in lines if "md5check: 2 file(s) verified in" in line]
    assert len(verified) == 1 and f"verified in {cache_dir}/snapshots/" in verified[0], verified
    (failure,) = [line for line in lines if "Poll failed for model directory 'bad'" in line]
    assert "md5check: MD5 mismatch for '1/weights.bin'" in failure
    assert f"in {cache_dir}/snapshots/" in failure  # md5check looked at cacheagent's copy
    # The failed load released its lease (LOAD_FAIL); the loaded model holds one.
    (lease,) = wait_live_leases(cache_dir, 1)
    assert lease.model == "good"


def check_no_lease_left(server: TritonServer, cache_dir: Path) -> None:
    server.stop()
    assert live_leases(cache_dir) == []
    with Cache(cache_dir) as cache:
        assert cache.leases() == []  # released at UNLOAD_COMPLETE, not merely dead


def test_second_agent_verifies_the_snapshot_in_the_s3_layout(
    triton_factory: Factory, s3_rig: StorageRig, chain_agents_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_models(s3_rig, cache_dir)
    server = start(triton_factory, s3_rig.url("models"), chain_agents_dir, s3_rig)
    check_verdicts(server, cache_dir)
    check_no_lease_left(server, cache_dir)


def test_second_agent_survives_the_stub_and_verifies_the_snapshot(
    triton_factory: Factory, s3_rig: StorageRig, chain_agents_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_models(s3_rig, cache_dir)
    stub = tmp_path / "stub"
    report = write_stub(s3_rig.url("models"), stub, {"cache_dir": str(cache_dir)}, env=s3_rig.env)
    assert report.written == ["bad", "good"], report.skipped
    agents = parse_config((stub / "bad" / "config.pbtxt").read_text()).model_repository_agents
    assert [a.name for a in agents.agents] == ["cacheagent", "md5check"]
    assert sorted(agents.agents[1].parameters) == [f"MD5:{r}" for r in CHECKED]

    server = start(triton_factory, stub, chain_agents_dir, s3_rig)
    check_verdicts(server, cache_dir)
    check_no_lease_left(server, cache_dir)
