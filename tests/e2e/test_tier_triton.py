"""Two real tritonservers, each with its own cache, share a tier: the model leaves S3 once.

Each server loads the same S3 model through a local stub repository of its own
(``source`` names the model, ``cache_dir`` its own cache, ``shared_cache`` the
tier: SeaweedFS behind a counting proxy). The origin is moto behind the rig's
counting proxy, held to a crawl until both agents have listed the model, so
that both LOADs miss at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.emulators import StorageRig
from harness.seaweed import SeaweedS3
from harness.triton import TritonServer, model_config, put_weighted_model
from harness.wait import wait_for

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]
MiB = 1024 * 1024
X = [10.0, 20.0, 30.0, 40.0]


@pytest.fixture
def tier() -> Iterator[StorageRig]:
    with SeaweedS3() as seaweed, StorageRig(seaweed) as rig:  # type: ignore[arg-type]
        yield rig


def stub(repo: Path, name: str, params: dict[str, str]) -> None:
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(model_config(name, {"prefetch": "false", **params}))


def load_lines(server: TritonServer, name: str) -> list[str]:
    return [
        line for line in server.log_text().splitlines() if f"cacheagent: model '{name}' " in line
    ]


def test_two_tritons_with_their_own_caches_load_a_model_once_from_the_origin(
    triton_factory: Factory,
    s3_rig: StorageRig,
    tier: StorageRig,
    repoagent_dir: Path,
    tmp_path: Path,
) -> None:
    rig = s3_rig
    weights = [4.0, 3.0, 2.0, 1.0]
    size = put_weighted_model(rig, "add", weights, 12 * MiB)
    for i in range(2):
        stub(
            tmp_path / f"repo{i}",
            "add",
            {
                "source": rig.url("models/add"),
                "cache_dir": str(tmp_path / f"cache{i}"),
                "shared_cache": tier.url("fleet"),
            },
        )
    # A crawl until both agents have listed the model (so both LOADs miss at once).
    rig.proxy.per_conn_bytes_per_s = 32 * 1024
    servers = [
        triton_factory(
            tmp_path / f"repo{i}",
            repoagent_dir=repoagent_dir,
            model_control_mode="none",
            env=rig.env,
            wait=False,
        )
        for i in range(2)
    ]
    wait_for(
        lambda: sum("list-type=2" in r.query for r in rig.proxy.records()) >= 2,
        60,
        "both agents to list the model",
    )
    rig.proxy.per_conn_bytes_per_s = 8 * MiB
    for server in servers:
        server.wait_ready(90)
        out = server.infer("add", "INPUT0", X)["OUTPUT0"]
        np.testing.assert_allclose(out, np.asarray(X, np.float32) + np.asarray(weights))
    # Each byte of the model left the origin once; the other server read it from the tier.
    assert rig.object_bytes("models/add/") == size
    lines = [load_lines(s, "add")[-1] for s in servers]
    assert all("MISS" in line and "(tier " in line for line in lines), lines
    assert tier.proxy.count() > 0
