"""cacheagent inside a real tritonserver, on an S3 repository (moto behind a counting proxy).

Triton's ``--model-repository`` is the rig's ``s3://127.0.0.1:<proxy>/<bucket>/models``,
so Triton's own S3 traffic crosses the proxy as well as the agent's. Requests are
attributed by User-Agent (Triton: aws-sdk-cpp; the agent: botocore). Before
calling the agent, Triton lists the model folder, HEADs each file and GETs
``config.pbtxt`` itself (DESIGN.md §1): that one GET per load is Triton's,
every other byte of a model must come from the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cacheagent.sizes import format_size
from cacheagent.triton.params import PARAMETERS
from harness.emulators import StorageRig
from harness.triton import (
    TritonServer,
    agent_log_lines,
    check_first_start_then_restart,
    downloads,
    expected_output,
    live_leases,
    padded_weights,
    put_add_model,
    wait_live_leases,
    wait_model_gone,
)

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]

X = [10.0, 20.0, 30.0, 40.0]
WEIGHTS = [1.0, 2.0, 3.0, 4.0]
SIZE = 1 << 20  # weights.bin: big enough that a stray download shows in the byte counts


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def serves(server: TritonServer, model: str, weights: list[float]) -> None:
    out = server.infer(model, "INPUT0", X)["OUTPUT0"]
    np.testing.assert_allclose(out, expected_output(X, weights))


def test_first_start_misses_then_restart_hits(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, cache_dir: Path
) -> None:
    first, restart = check_first_start_then_restart(
        triton_factory, s3_rig, repoagent_dir, cache_dir, SIZE
    )
    # Everything a cold start downloads besides Triton's config.pbtxt is the agent's.
    assert sum(size for _, size in first.agent.values()) >= SIZE
    assert sum(size for _, size in restart.triton.values()) < 4096
    assert restart.response_bytes < 64 * 1024, "a restart should cost listings only"


def test_explicit_unload_releases_lease_and_reload_hits(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, cache_dir: Path
) -> None:
    files = put_add_model(
        s3_rig, "models", "add", padded_weights(WEIGHTS, SIZE), {"cache_dir": str(cache_dir)}
    )
    server = triton_factory(
        s3_rig.url("models"),
        repoagent_dir=repoagent_dir,
        model_control_mode="explicit",
        env=s3_rig.env,
    )
    server.load("add")
    serves(server, "add", WEIGHTS)
    (lease,) = live_leases(cache_dir)
    assert (lease.model, lease.pid) == ("add", server.pid)
    assert downloads(s3_rig, "agent", "models/add/")["models/add/1/weights.bin"] == (1, SIZE)

    server.unload("add")
    wait_model_gone(server, "add")
    wait_live_leases(cache_dir, 0)  # UNLOAD_COMPLETE released it; the snapshot stays

    s3_rig.proxy.reset()
    server.load("add")
    serves(server, "add", WEIGHTS)
    assert downloads(s3_rig, "agent") == {}
    assert downloads(s3_rig, "triton") == {
        "models/add/config.pbtxt": (1, len(files["config.pbtxt"]))
    }
    (again,) = live_leases(cache_dir)
    assert (again.model, again.pid, again.key) == ("add", server.pid, lease.key)
    lines = agent_log_lines(server.log_text(), "add")
    assert [line.split("'add' ")[1].split(":")[0] for line in lines] == ["MISS", "HIT"]


def test_changed_file_is_the_only_download_on_reload(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, cache_dir: Path
) -> None:
    put_add_model(
        s3_rig, "models", "add", padded_weights(WEIGHTS, SIZE), {"cache_dir": str(cache_dir)}
    )
    server = triton_factory(
        s3_rig.url("models"),
        repoagent_dir=repoagent_dir,
        model_control_mode="explicit",
        env=s3_rig.env,
    )
    server.load("add")
    serves(server, "add", WEIGHTS)
    (old,) = live_leases(cache_dir)

    new_weights = [5.0, 6.0, 7.0, 8.0]
    s3_rig.put("models/add/1/weights.bin", padded_weights(new_weights, SIZE))
    s3_rig.proxy.reset()
    server.load("add")  # a load of a loaded model reloads it
    serves(server, "add", new_weights)
    assert downloads(s3_rig, "agent") == {"models/add/1/weights.bin": (1, SIZE)}
    # The old instance's UNLOAD_COMPLETE released its lease; one lease, on the new snapshot.
    (new,) = wait_live_leases(cache_dir, 1)
    assert new.key != old.key and new.model == "add"
    lines = agent_log_lines(server.log_text(), "add")
    assert len(lines) == 2, lines
    assert f"MISS: {format_size(SIZE)} fetched (1 of 3 files" in lines[1], lines[1]


def test_two_models_each_fetched_once(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, cache_dir: Path
) -> None:
    weights = {"add": WEIGHTS, "add2": [0.5, 0.25, 0.125, 2.0]}
    files = {
        name: put_add_model(
            s3_rig, "models", name, padded_weights(w, SIZE), {"cache_dir": str(cache_dir)}
        )
        for name, w in weights.items()
    }
    server = triton_factory(
        s3_rig.url("models"), repoagent_dir=repoagent_dir, model_control_mode="none", env=s3_rig.env
    )
    for name, w in weights.items():
        assert server.model_ready(name)
        serves(server, name, w)
    # After the first LOAD the worker prefetches the other model in the background;
    # its closing note means every download of this start is over.
    loads = [line for line in server.log_text().splitlines() if "cacheagent: LOAD of '" in line]
    first = loads[0].rstrip("'\"").rsplit("/", 1)[1]
    sibling = next(name for name in weights if name != first)
    server.wait_log(f"cacheagent: prefetched model '{sibling}'")

    agent = downloads(s3_rig, "agent")
    # Each file once, except the sibling's config.pbtxt: the prefetcher reads it
    # whole to learn the model's agent parameters, then fetches it as a model file.
    # model.py is the same bytes in both models (same MD5 ETag), so the
    # content-addressed cache fetches it once, for the first model.
    expected: dict[str, tuple[int, int]] = {}
    for name, model_files in files.items():
        for rel, data in model_files.items():
            if rel == "1/model.py" and name != first:
                continue
            gets = 2 if (name, rel) == (sibling, "config.pbtxt") else 1
            expected[f"models/{name}/{rel}"] = (gets, gets * len(data))
    assert agent == expected
    assert downloads(s3_rig, "triton") == {
        f"models/{name}/config.pbtxt": (1, len(model_files["config.pbtxt"]))
        for name, model_files in files.items()
    }
    assert "MISS" in agent_log_lines(server.log_text(), first)[0]
    (sibling_line,) = agent_log_lines(server.log_text(), sibling)
    assert f"-> {cache_dir}/snapshots/" in sibling_line
    assert len(live_leases(cache_dir)) == 2


def test_bad_parameters_fail_only_their_model(
    triton_factory: Factory, s3_rig: StorageRig, repoagent_dir: Path, cache_dir: Path
) -> None:
    put_add_model(
        s3_rig, "models", "bad_size", WEIGHTS, {"cache_dir": str(cache_dir), "max_size": "lots"}
    )
    put_add_model(
        s3_rig, "models", "bad_key", WEIGHTS, {"cache_dir": str(cache_dir), "colour": "blue"}
    )
    put_add_model(s3_rig, "models", "good", WEIGHTS, {"cache_dir": str(cache_dir)})
    server = triton_factory(
        s3_rig.url("models"),
        repoagent_dir=repoagent_dir,
        model_control_mode="none",
        exit_on_error=False,
        # Strict readiness would keep the server "not ready" while any model failed.
        extra_args=["--strict-readiness=false"],
        env=s3_rig.env,
    )
    assert server.model_ready("good")
    serves(server, "good", WEIGHTS)
    assert not server.model_ready("bad_size") and not server.model_ready("bad_key")

    log = server.log_text()
    (size_error,) = [
        line for line in log.splitlines() if "Poll failed for model directory 'bad_size'" in line
    ]
    assert "cacheagent parameter 'max_size' = 'lots' is not valid" in size_error
    assert "model 'bad_size'" in size_error and PARAMETERS["max_size"] in size_error
    (key_error,) = [
        line for line in log.splitlines() if "Poll failed for model directory 'bad_key'" in line
    ]
    assert "model 'bad_key': unknown cacheagent parameter 'colour'" in key_error
    assert all(f"{name} (" in key_error for name in PARAMETERS), key_error
    # A bad parameter fails before any download. Only the background prefetch
    # (after good's LOAD) reads the bad models' config.pbtxt, and skips them.
    server.wait_log("cacheagent: prefetch of model 'bad_key' skipped: model 'bad_key'")
    server.wait_log("cacheagent: prefetch of model 'bad_size' skipped: model 'bad_size'")
    agent = downloads(s3_rig, "agent")
    for bad in ("bad_key", "bad_size"):
        assert [key for key in agent if key.startswith(f"models/{bad}/")] == [
            f"models/{bad}/config.pbtxt"
        ], agent
    assert agent["models/good/1/weights.bin"] == (1, 16)
    assert server.running()
