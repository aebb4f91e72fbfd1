"""``cacheagent run`` around a real tritonserver: stubs kept current from one listing per
repository per start, on S3, GCS and Azure, in every model-control mode, through outages
and signals. Everything is counted at the rig's proxy, nothing is timed."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from cacheagent.triton.config import parse_config
from harness.agents import AgentBuildError, build_md5_agent
from harness.emulators import StorageRig
from harness.proxy import ProxyRecord
from harness.triton import (
    TritonHTTPError,
    TritonServer,
    agent_log_lines,
    child_pids,
    client_of,
    cmdline,
    expected_output,
    model_config,
    put_add_model,
    wait_pid_gone,
)

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]
X = [10.0, 20.0, 30.0, 40.0]


def weights_file(weights: Sequence[float], size: int = 64 * 1024) -> bytes:
    return struct.pack("<4f", *weights) + bytes(size - 16)


def answers(server: TritonServer, model: str, weights: Sequence[float]) -> bool:
    out = server.infer(model, "INPUT0", X)["OUTPUT0"]
    return bool(np.allclose(out, expected_output(X, weights)))


def launch(
    triton_factory: Factory,
    rig: StorageRig,
    cache_dir: Path,
    *,
    mode: str = "none",
    options: Sequence[str] = (),
    **kwargs: object,
) -> TritonServer:
    """tritonserver on the rig's ``models/`` repository, started through ``cacheagent run``."""
    # As users run it: 'cacheagent run' (its first worker starts before the launcher's
    # imports; cacheagent.triton.prestart).
    wrapper = [sys.executable, "-m", "cacheagent.cli.main", "run", "--cache-dir", str(cache_dir)]
    return triton_factory(
        rig.url("models"),
        wrapper=[*wrapper, *options, "--"],
        model_control_mode=mode,
        env=rig.env,
        **kwargs,
    )


def listings(rig: StorageRig) -> list[ProxyRecord]:
    return rig.listing_records()


def stub_configs(cache_dir: Path) -> dict[str, str]:
    """Every stub config under the cache, by model name."""
    return {p.parent.name: p.read_text() for p in (cache_dir / "stubs").glob("*/*/config.pbtxt")}


def triton_child(server: TritonServer) -> int:
    """The tritonserver process the launcher started."""
    [pid] = [p for p in child_pids(server.pid) if "tritonserver" in cmdline(p)]
    return pid


RIGS = {"s3": "s3_rig", "gs": "gcs_rig", "as": "azure_rig"}


def first_start_then_restart(
    rig: StorageRig, triton_factory: Factory, cache_dir: Path, models: dict[str, float]
) -> TritonServer:
    """Start on ``models`` (name -> weight), check the stub, restart; return the restart."""
    for name, weight in models.items():
        put_add_model(rig, "models", name, weights_file([weight] * 4))  # names no agent
    first = launch(triton_factory, rig, cache_dir)
    assert all(answers(first, name, [w] * 4) for name, w in models.items())
    stubs = stub_configs(cache_dir)
    assert sorted(stubs) == sorted(models)
    for name in models:
        assert 'name: "cacheagent"' in stubs[name] and rig.url(f"models/{name}") in stubs[name]
    # Triton itself never talked to storage: every request came from cacheagent.
    assert {client_of(r) for r in rig.proxy.records()} == {"agent"}
    assert first.stop() == 0

    rig.proxy.reset()
    again = launch(triton_factory, rig, cache_dir)
    assert all(answers(again, name, [w] * 4) for name, w in models.items())
    return again


@pytest.mark.parametrize("cloud", sorted(RIGS))
def test_stub_serves_and_a_restart_costs_one_listing_and_no_content_get(
    cloud: str, request: pytest.FixtureRequest, triton_factory: Factory, tmp_path: Path
) -> None:
    rig: StorageRig = request.getfixturevalue(RIGS[cloud])
    cache_dir = tmp_path / "cache"
    again = first_start_then_restart(rig, triton_factory, cache_dir, {"add": 1.5})
    records = rig.proxy.records()
    assert len(listings(rig)) == 1, [r.target for r in records]
    assert rig.object_gets() == 0, rig.downloaded_keys()
    listed = {id(r) for r in listings(rig)}
    others = [(r.method, r.path) for r in records if id(r) not in listed]
    # Nothing else either (the SDK-free GCS and Azure listings make no extra HEAD).
    assert others == [], [r.target for r in records]
    assert "HIT: 0 B fetched" in again.log_text()
    assert again.stop() == 0
    assert list((cache_dir / "starts").iterdir()) == []  # this start's listing went with it


def test_a_restart_of_many_models_costs_one_listing(
    s3_rig: StorageRig, triton_factory: Factory, tmp_path: Path
) -> None:
    models = {"add": 1.0, "mul": 2.0, "sub": 3.0}
    again = first_start_then_restart(s3_rig, triton_factory, tmp_path / "cache", models)
    assert s3_rig.object_gets() == 0
    assert again.log_text().count("HIT: 0 B fetched") == 3
    assert len(listings(s3_rig)) == 1, [r.target for r in s3_rig.proxy.records()]


def test_a_cold_start_fetches_every_model_at_once_before_their_loads(
    s3_rig: StorageRig, triton_factory: Factory, tmp_path: Path
) -> None:
    """The launcher fetches all missing models as soon as it has listed: each LOAD finds
    its model cached (HIT), and the models' bytes crossed the proxy once each."""
    models = {"add": 1.0, "mul": 2.0, "sub": 3.0}
    sizes = 0
    for name, weight in models.items():
        files = put_add_model(
            s3_rig, "models", name, weights_file([weight] * 4, size=2 * 1024 * 1024)
        )
        sizes += sum(len(data) for path, data in files.items() if path.startswith("1/"))
    server = launch(triton_factory, s3_rig, tmp_path / "cache")
    assert all(answers(server, name, [w] * 4) for name, w in models.items())
    log = server.log_text()
    assert "cacheagent run: fetching 3 model(s) missing from the cache" in log
    for name in models:
        [load] = agent_log_lines(log, name)
        [fetched] = [line for line in log.splitlines() if f"cacheagent run: model '{name}'" in line]
        # The launcher fetched it and the LOAD found it cached, or (should Triton's LOAD
        # ever win the snapshot's lock) the LOAD fetched it and the launcher found it done.
        assert ("HIT: 0 B fetched" in load) != ("cached meanwhile" in fetched), (load, fetched)
    # Either way each model's bytes crossed once.
    model_bytes = sum(s3_rig.object_bytes(f"models/{n}/1/") for n in models)
    assert model_bytes == sizes


def test_the_first_worker_is_started_by_the_launcher_and_adopted_by_the_shim(
    s3_rig: StorageRig, triton_factory: Factory, tmp_path: Path
) -> None:
    """The worker answering Triton's LOADs was started ahead of Triton (it is the
    launcher's child, started first thing), and once Triton exits it exits too and
    is reaped."""
    put_add_model(s3_rig, "models", "add", weights_file([1.0] * 4))
    server = launch(triton_factory, s3_rig, tmp_path / "cache")
    assert answers(server, "add", [1.0] * 4)
    [worker] = re.findall(r"cacheagent: worker pid (\d+) started", server.log_text())
    status = Path(f"/proc/{worker}/status").read_text()
    [ppid] = [line.split()[1] for line in status.splitlines() if line.startswith("PPid:")]
    assert int(ppid) == server.pid  # the launcher, not tritonserver
    # ... started by 'cacheagent run' before its own work, given Triton's env later.
    assert b"--env-first" in Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
    assert server.stop() == 0
    assert not Path(f"/proc/{worker}").exists()


def test_two_agents_stay_in_order_and_the_second_checks_the_snapshot(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    try:
        build_md5_agent(cache_dir / "repoagents")  # beside the agent the launcher installs
    except AgentBuildError as exc:
        pytest.skip(str(exc))
    weights = weights_file([2.0] * 4)
    for name, digest in (("chained", hashlib.md5(weights).hexdigest()), ("tampered", "0" * 32)):
        config = model_config(name, None) + (
            "model_repository_agents { agents [\n"
            '  { name: "cacheagent", parameters [ { key: "verify", value: "hash" } ] },\n'
            '  { name: "md5check", parameters [\n'
            f'    {{ key: "MD5:1/weights.bin", value: "{digest}" }} ] }}\n'
            "] }\n"
        )
        put_add_model(s3_rig, "models", name, weights)
        s3_rig.put(f"models/{name}/config.pbtxt", config.encode())

    server = launch(
        triton_factory,
        s3_rig,
        cache_dir,
        mode="explicit",
        options=["--param", "verify=size", "--param", "prefetch=false"],
        load_models=["chained"],
    )
    assert answers(server, "chained", [2.0] * 4)
    agents = parse_config(stub_configs(cache_dir)["chained"]).model_repository_agents.agents
    assert [(a.name, dict(a.parameters)) for a in agents] == [
        # The model's own cacheagent parameter wins over the launcher's.
        (
            "cacheagent",
            {"verify": "hash", "prefetch": "false", "source": s3_rig.url("models/chained")},
        ),
        ("md5check", {"MD5:1/weights.bin": hashlib.md5(weights).hexdigest()}),
    ]
    # md5check runs after cacheagent, on the snapshot: a wrong digest fails the load.
    with pytest.raises(TritonHTTPError):
        server.load("tampered")
    assert "md5check" in server.wait_log("weights.bin")


def test_models_added_and_removed_between_starts(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([1.0] * 4))
    first = launch(triton_factory, s3_rig, cache_dir)
    assert answers(first, "add", [1.0] * 4)
    assert first.stop() == 0

    s3_rig.delete("models/add")
    put_add_model(s3_rig, "models", "mul", weights_file([3.0] * 4))
    again = launch(triton_factory, s3_rig, cache_dir)
    assert answers(again, "mul", [3.0] * 4)
    assert not again.model_ready("add")
    assert sorted(stub_configs(cache_dir)) == ["mul"]
    # The stub existed, so Triton started on it while the launcher listed; the listing
    # found other models, so Triton was started again on the current stub.
    log = again.log_text()
    assert "add: removed" in log and "mul: new config" in log
    assert log.count("restarting Triton") == 1


def test_a_restart_with_unchanged_models_starts_triton_once_and_waits_for_no_restart(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    """Only new weights since the last start: Triton starts before the listing, its LOAD
    waits for the start's listing and serves the new weights; no restart."""
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([1.0] * 4))
    first = launch(triton_factory, s3_rig, cache_dir)
    assert answers(first, "add", [1.0] * 4)
    assert first.stop() == 0
    put_add_model(s3_rig, "models", "add", weights_file([5.0] * 4))
    again = launch(triton_factory, s3_rig, cache_dir)
    assert answers(again, "add", [5.0] * 4)
    log = again.log_text()
    assert "restarting Triton" not in log


def listings_of(rig: StorageRig, relpath: str) -> int:
    """Listings of exactly ``relpath/`` (the launcher lists models/, the agent models/<m>/)."""
    prefix = f"prefix={quote(relpath.strip('/') + '/', safe='')}"
    return sum(1 for r in listings(rig) if prefix in r.query.split("&"))


def test_explicit_mode_loads_the_named_model_and_the_api_loads_the_others(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    for name, w in (("add", 1.0), ("mul", 2.0)):
        put_add_model(s3_rig, "models", name, weights_file([w] * 4), {"prefetch": "false"})
    server = launch(triton_factory, s3_rig, cache_dir, mode="explicit", load_models=["add"])
    assert answers(server, "add", [1.0] * 4)
    assert not server.model_ready("mul")
    assert listings_of(s3_rig, "models") == 1  # the launcher's one listing
    # --load-model's LOAD was validated by it; the one listing of add is the check
    # every miss makes after downloading, that nothing changed meanwhile.
    assert listings_of(s3_rig, "models/add") == 1
    server.load("mul")  # the load API, after start-up: the agent lists it itself
    assert answers(server, "mul", [2.0] * 4)
    assert listings_of(s3_rig, "models/mul") == 2  # its listing, and the miss's check
    server.unload("add")
    deadline = time.monotonic() + 15
    while server.model_ready("add"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.load("add")  # a start's listing served its start-up LOAD only
    assert answers(server, "add", [1.0] * 4)
    assert listings_of(s3_rig, "models/add") == 2
    assert listings_of(s3_rig, "models") == 1


def test_poll_mode_reloads_a_model_whose_weights_changed(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([1.0] * 4))
    server = launch(
        triton_factory,
        s3_rig,
        cache_dir,
        mode="poll",
        options=["-v"],  # a line per refresh: polls are counted below
        extra_args=["--repository-poll-secs=1"],
    )
    assert answers(server, "add", [1.0] * 4)
    [mark] = (cache_dir / "stubs").glob("*/add/cacheagent.mark")
    before = stub_configs(cache_dir)["add"], mark.read_text()
    s3_rig.proxy.reset()
    s3_rig.put("models/add/1/weights.bin", weights_file([5.0] * 4))  # weights only
    deadline = time.monotonic() + 60
    while not answers(server, "add", [5.0] * 4):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.25)
    # The content mark changed (that is what made Triton reload), the config did not.
    assert stub_configs(cache_dir)["add"] == before[0] and mark.read_text() != before[1]
    # Only the changed file crossed the wire: the config was not read again.
    assert s3_rig.downloaded_keys() == ["models/add/1/weights.bin"]
    # Refreshes that find nothing new rewrite nothing, so Triton reloads nothing.
    unchanged = "models: unchanged (1 model(s))"
    seen = server.log_text().count(unchanged)
    deadline = time.monotonic() + 30
    while server.log_text().count(unchanged) < seen + 3:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    assert len(agent_log_lines(server.log_text(), "add")) == 2  # the start, the one reload


def test_storage_down_with_a_cached_stub_starts_and_serves_stale(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([4.0] * 4))
    first = launch(triton_factory, s3_rig, cache_dir)
    assert answers(first, "add", [4.0] * 4)
    assert first.stop() == 0

    s3_rig.proxy.set_down(True)
    try:
        again = launch(triton_factory, s3_rig, cache_dir)
        assert answers(again, "add", [4.0] * 4)
        log = again.log_text()
        assert "cacheagent run: warning: could not refresh the stub of" in log, log
        assert "STALE" in log
        assert any(line.startswith("W") and "stale" in line for line in log.splitlines()), log
    finally:
        s3_rig.proxy.set_down(False)


def test_sigterm_stops_triton_and_the_launcher_exits_with_its_status(
    triton_factory: Factory, s3_rig: StorageRig, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    put_add_model(s3_rig, "models", "add", weights_file([1.0] * 4))
    server = launch(triton_factory, s3_rig, cache_dir)
    triton = triton_child(server)
    assert server.stop() == 0  # SIGTERM to the launcher; Triton's clean exit is 0
    assert wait_pid_gone(triton, 10)

    killed = launch(triton_factory, s3_rig, cache_dir)
    os.kill(triton_child(killed), signal.SIGKILL)  # killed by a signal: 128 + its number
    assert killed.proc is not None
    assert killed.proc.wait(30) == 128 + signal.SIGKILL
