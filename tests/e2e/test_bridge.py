"""The Triton <-> worker bridge, against a real tritonserver and local model repositories.

No cloud storage here: the models are local (artifact FILESYSTEM), which the real
worker leaves untouched. Faults the real worker cannot be asked to produce
(crash or hang inside an action, errors, a redirect) come from a scripted
worker: ``cacheagent.triton.worker.main(handler)`` with a test handler, started by a
launcher rewritten in a private repoagent directory. The bridge under test (C
shim, pipes, worker protocol) is the real one either way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cacheagent.triton.install import LAUNCHER_NAME, install_triton, launcher_script
from harness.triton import (
    MODEL_PY,
    WORKER_MARKER,
    TritonHTTPError,
    TritonServer,
    cmdline,
    pid_alive,
    wait_pid_gone,
    write_add_model,
)
from harness.wait import wait_for

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]

WEIGHTS = [1.0, 2.0, 3.0, 4.0]
X = [10.0, 20.0, 30.0, 40.0]


def expected(weights: list[float]) -> np.ndarray:
    return np.asarray(X, np.float32) + np.asarray(weights, np.float32)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def env(cache_dir: Path) -> dict[str, str]:
    # Keep whatever the real worker does on UNLOAD_COMPLETE out of the home directory.
    return {"CACHEAGENT_CACHE_DIR": str(cache_dir)}


@pytest.fixture
def repo(tmp_path: Path, cache_dir: Path) -> Path:
    """A local repository with two models that name cacheagent."""
    repo = tmp_path / "repo"
    params = {"cache_dir": str(cache_dir)}
    write_add_model(repo, "add", WEIGHTS, params)
    write_add_model(repo, "add2", [0.5, 0.5, 0.5, 0.5], params)
    return repo


FAKE_WORKER = """\
# A scripted worker for tests: the real bridge code, with a handler driven by plan.json.
import json, os, sys, time
from pathlib import Path

from cacheagent.triton import worker
from cacheagent.errors import CacheAgentError

HERE = Path(__file__).resolve().parent


def handler(request, log):
    with open(HERE / "requests.jsonl", "a") as out:
        out.write(json.dumps(request) + "\\n")
    plan_file = HERE / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    model = (request.get("config") or {}).get("name", "")
    step = plan.get(request["action"] + ":" + model, plan.get(request["action"], "ok"))
    log("WARN", "fake worker: " + request["action"] + " -> " + step + "\\nsecond line")
    if step == "crash":
        os._exit(3)
    if step == "hang":
        time.sleep(3600)
    if step.startswith("sleep:"):
        time.sleep(float(step[len("sleep:"):]))
    if step.startswith("gate:"):
        gate = HERE / step[len("gate:"):]
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if step == "bug":
        raise KeyError("boom")
    if step.startswith("error:"):
        raise CacheAgentError(step[len("error:"):])
    if step.startswith("redirect:"):
        return step[len("redirect:"):]
    return None


sys.exit(worker.main(handler))
"""


class FakeAgent:
    """A private repoagent dir whose launcher runs the scripted worker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        install_triton(root)
        self.dir = root / "cacheagent"
        self.launcher = self.dir / LAUNCHER_NAME
        script = self.dir / "fake_worker.py"
        script.write_text(FAKE_WORKER)
        self.launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}"\n')

    def plan(self, **steps: str) -> None:
        """Per action: ok, crash, hang, sleep:SECONDS, gate:FILE, bug, error:MSG or redirect:DIR.

        A key ``ACTION:model`` applies to that model only and wins over ``ACTION``;
        ``gate:FILE`` blocks until :meth:`open_gate` creates FILE (60 s at most).
        """
        (self.dir / "plan.json").write_text(json.dumps(steps))

    def open_gate(self, name: str) -> None:
        """Release every action waiting on ``gate:name``."""
        (self.dir / name).touch()

    def wait_request(self, action: str, model: str, timeout: float = 60.0) -> None:
        """Wait until the worker has received ``action`` for ``model``."""
        wait_for(
            lambda: any(
                r["action"] == action and (r.get("config") or {}).get("name") == model
                for r in self.requests()
            ),
            timeout,
            f"{action} of {model} to reach the worker",
        )

    def requests(self) -> list[dict[str, Any]]:
        path = self.dir / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def fake_agent(tmp_path: Path) -> FakeAgent:
    return FakeAgent(tmp_path / "fake-agent")


def wait_not_ready(server: TritonServer, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while server.model_ready(name):
        assert time.monotonic() < deadline, f"{name} still ready after unload"
        time.sleep(0.05)


def assert_serving(server: TritonServer, name: str, weights: list[float]) -> None:
    assert server.running(), "tritonserver died"
    out = server.infer(name, "INPUT0", X)["OUTPUT0"]
    np.testing.assert_allclose(out, expected(weights))


# ---- the worker alone ----

PROTOCOL_HANDLER = """\
import os, sys, time
from cacheagent.triton import worker
from cacheagent.errors import CacheAgentError

def handler(request, log):
    step = request["step"]
    print("stray print must not reach the protocol")
    os.write(1, b"stray fd-1 write\\n")
    log("warning", "multi\\nline")
    if step == "path":
        return "/some/dir"
    if step == "slow":
        time.sleep(1.3)
        return None
    if step == "refuse":
        raise CacheAgentError("no such bucket\\nat all")
    raise ValueError("oops")

sys.exit(worker.main(handler))
"""


def test_worker_protocol_lines() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROTOCOL_HANDLER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().decode().startswith("READY ")

        def ask(step: str) -> list[str]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps({"id": 1, "step": step}).encode() + b"\n")
            proc.stdin.flush()
            lines = []
            while not lines or not lines[-1].startswith(("OK", "ERR")):
                lines.append(proc.stdout.readline().decode().rstrip("\n"))
            return lines

        assert ask("path") == ["LOG WARN multi line", "OK /some/dir"]
        slow = ask("slow")
        assert slow[0] == "LOG WARN multi line" and slow[-1] == "OK "
        assert "HB" in slow[1:-1]
        assert ask("refuse")[-1] == "ERR no such bucket at all"
        bug = ask("bug")[-1]
        assert bug.startswith("ERR internal error in the cacheagent worker")
        assert "ValueError: oops" in bug and "report" in bug
        proc.stdin.close()  # EOF: the worker exits by itself
        assert proc.wait(5) == 0
        assert proc.stdout.read() == b""
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "stray print" in err and "stray fd-1 write" in err and "Traceback" in err
    finally:
        proc.kill()
        proc.wait()


def test_worker_exits_when_its_parent_dies() -> None:
    # The worker's stdin stays open (we hold it), so only the parent watchdog can end it.
    shell = subprocess.Popen(
        [
            "/bin/sh",
            "-c",
            f'"{sys.executable}" -m cacheagent.triton.worker <&0 & echo $!; sleep 0.5',
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert shell.stdout is not None
    worker = int(shell.stdout.readline())
    try:
        assert shell.stdout.readline().startswith(b"READY")
        assert shell.wait(5) == 0
        assert wait_pid_gone(worker, 5.0), "worker outlived its parent"
    finally:
        if pid_alive(worker):
            os.kill(worker, signal.SIGKILL)
        if shell.stdin:
            shell.stdin.close()


# ---- the real worker in Triton ----


def test_model_loads_through_agent_and_worker_is_triton_child(
    triton_factory: Factory, repo: Path, repoagent_dir: Path, env: dict[str, str]
) -> None:
    server = triton_factory(
        repo,
        repoagent_dir=repoagent_dir,
        model_control_mode="none",
        exit_on_error=True,
        env=env,
    )
    assert server.model_ready("add")
    assert_serving(server, "add", WEIGHTS)
    worker = server.wait_worker()
    assert WORKER_MARKER in cmdline(worker)
    log = server.log_text()
    assert f"worker pid {worker} started (READY" in log
    assert "cacheagent: LOAD of" in log and "LOAD_COMPLETE of" in log


def test_worker_exits_when_triton_is_killed(
    triton_factory: Factory, repo: Path, repoagent_dir: Path, env: dict[str, str]
) -> None:
    server = triton_factory(repo, repoagent_dir=repoagent_dir, model_control_mode="none", env=env)
    worker = server.wait_worker()
    server.kill()  # SIGKILL: no Finalize, the worker must notice on its own
    started = time.monotonic()
    assert wait_pid_gone(worker, 5.0), "worker outlived a SIGKILLed Triton"
    assert time.monotonic() - started < 5.0


def test_finalize_stops_worker_after_last_model_unloads(
    triton_factory: Factory, repo: Path, repoagent_dir: Path, env: dict[str, str]
) -> None:
    server = triton_factory(repo, repoagent_dir=repoagent_dir, env=env)
    server.load("add")
    server.load("add2")
    worker = server.wait_worker()
    server.unload("add")
    wait_not_ready(server, "add")
    assert pid_alive(worker), "worker stopped while add2 still uses the agent"
    server.unload("add2")
    wait_not_ready(server, "add2")
    assert wait_pid_gone(worker, 10.0), "worker survived the agent's Finalize"
    server.wait_log(f"worker pid {worker} stopped: exited with code 0")
    # The library is loaded afresh for the next model, with a fresh worker.
    server.load("add")
    assert server.wait_worker() != worker
    assert_serving(server, "add", WEIGHTS)


def test_worker_killed_between_loads_is_replaced(
    triton_factory: Factory, repo: Path, repoagent_dir: Path, env: dict[str, str]
) -> None:
    server = triton_factory(repo, repoagent_dir=repoagent_dir, env=env)
    server.load("add")  # keeps the agent library loaded
    first = server.wait_worker()
    os.kill(first, signal.SIGKILL)
    assert wait_pid_gone(first, 5.0)
    server.load("add2")  # the shim notices the dead worker and starts another
    second = server.wait_worker()
    assert second != first
    assert_serving(server, "add2", [0.5] * 4)
    assert_serving(server, "add", WEIGHTS)
    assert "while idle; starting a fresh one" in server.log_text()


def test_stopped_worker_hits_idle_timeout_then_recovers(
    triton_factory: Factory, repo: Path, repoagent_dir: Path, env: dict[str, str]
) -> None:
    server = triton_factory(
        repo,
        repoagent_dir=repoagent_dir,
        env={**env, "CACHEAGENT_WORKER_IDLE_TIMEOUT": "3"},
    )
    server.load("add")
    first = server.wait_worker()
    os.kill(first, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(TritonHTTPError) as failure:
        server.load("add2")
    elapsed = time.monotonic() - started
    assert 2.5 < elapsed < 15.0, elapsed
    assert "add2" in failure.value.message
    log = server.wait_log("(CACHEAGENT_WORKER_IDLE_TIMEOUT)")
    assert f"worker process (pid {first}) sent nothing for 3 s" in log
    assert "The next action starts a fresh worker" in log
    assert wait_pid_gone(first, 5.0), "the stopped worker was not killed"
    server.load("add2")
    assert server.wait_worker() != first
    assert_serving(server, "add2", [0.5] * 4)
    assert_serving(server, "add", WEIGHTS)


def test_unstartable_worker_names_launcher_then_recovers(
    triton_factory: Factory, repo: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    agents = tmp_path / "agents"
    install_triton(agents)
    launcher = agents / "cacheagent" / LAUNCHER_NAME
    server = triton_factory(repo, repoagent_dir=agents, env=env)
    fix = f"cacheagent install-triton --repoagent-dir {agents}"

    launcher.unlink()
    with pytest.raises(TritonHTTPError):
        server.load("add")
    log = server.wait_log(f"the launcher '{launcher}' does not exist")
    assert fix in log

    launcher.write_text(launcher_script("/nonexistent/python"))
    launcher.chmod(0o755)
    with pytest.raises(TritonHTTPError):
        server.load("add")
    log = server.wait_log("exited with code 127 before it was ready")
    assert f"the launcher '{launcher}' exited with code 127" in log

    install_triton(agents)  # the documented fix, while Triton keeps running
    server.load("add")
    assert_serving(server, "add", WEIGHTS)


def test_bad_cacheagent_python_fails_load_naming_launcher(
    triton_factory: Factory, repo: Path, repoagent_dir: Path, env: dict[str, str]
) -> None:
    server = triton_factory(
        repo,
        repoagent_dir=repoagent_dir,
        env={**env, "CACHEAGENT_PYTHON": "/nonexistent/python"},
    )
    with pytest.raises(TritonHTTPError):
        server.load("add")
    launcher = repoagent_dir.absolute() / "cacheagent" / LAUNCHER_NAME
    log = server.wait_log(f"cannot start the worker: the launcher '{launcher}'")
    assert "CACHEAGENT_PYTHON" in log
    assert server.running()


# ---- the scripted worker ----


def test_request_fields_logs_and_redirect(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent, tmp_path: Path
) -> None:
    # A parameter value that exercises the C side's JSON escaping.
    tricky = 'quote " backslash \\ newline \n tab \t unicode é'
    write_add_model(repo, "add", WEIGHTS, {"cache_dir": "/x", "tricky": tricky})
    redirected = tmp_path / "redirected" / "add"
    shutil.copytree(repo / "add", redirected)
    write_add_model(redirected.parent, "add", [100.0, 200.0, 300.0, 400.0], None)
    fake_agent.plan(LOAD=f"redirect:{redirected}")
    server = triton_factory(repo, repoagent_dir=fake_agent.root)
    server.load("add")
    assert_serving(server, "add", [100.0, 200.0, 300.0, 400.0])

    load, complete = fake_agent.requests()[:2]
    assert load["action"] == "LOAD" and complete["action"] == "LOAD_COMPLETE"
    assert load["artifact_type"] == "FILESYSTEM"
    assert load["location"].endswith("/repo/add")
    assert load["params"] == {"cache_dir": "/x", "tricky": tricky}
    assert load["server_pid"] == server.pid
    assert load["handle"].startswith("0x") and load["handle"] == complete["handle"]
    assert load["config"]["name"] == "add"
    agents = load["config"]["model_repository_agents"]["agents"]
    assert agents[0]["name"] == "cacheagent"
    assert complete["config"] is None
    assert "id" not in load  # requests carry no sequence number: any worker serves any
    # LOG lines land in Triton's log at their level, newlines flattened.
    line = next(
        ln for ln in server.log_text().splitlines() if "fake worker: LOAD -> redirect:" in ln
    )
    assert line.startswith("W") and line.endswith('second line"')


def test_worker_errors_fail_load_only(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent
) -> None:
    server = triton_factory(repo, repoagent_dir=fake_agent.root)
    fake_agent.plan(LOAD="error:the bucket is gone; check the location")
    with pytest.raises(TritonHTTPError) as failure:
        server.load("add")
    # Triton answers the client generically; the reason is in its log only.
    assert "failed to load 'add'" in failure.value.message
    server.wait_log(
        "Poll failed for model directory 'add': cacheagent: the bucket is gone; check the location"
    )

    fake_agent.plan(LOAD="bug")
    with pytest.raises(TritonHTTPError):
        server.load("add")
    log = server.wait_log("internal error in the cacheagent worker during LOAD")
    assert "KeyError: 'boom'" in log  # message and the traceback on Triton's console
    assert "Traceback (most recent call last)" in log

    # Failures of other actions are logged and ignored.
    fake_agent.plan(UNLOAD="error:cannot release", UNLOAD_COMPLETE="crash")
    server.load("add")
    server.unload("add")
    wait_not_ready(server, "add")
    log = server.wait_log("UNLOAD_COMPLETE for")
    assert "UNLOAD for" in log and "failed (ignored): cacheagent: cannot release" in log
    assert server.running()


def test_worker_dying_mid_action_fails_that_load_only(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent
) -> None:
    server = triton_factory(repo, repoagent_dir=fake_agent.root)
    fake_agent.plan(LOAD="crash")
    with pytest.raises(TritonHTTPError):
        server.load("add")
    log = server.wait_log("exited with code 3 while handling LOAD for model location")
    assert "The next action starts a fresh worker" in log
    fake_agent.plan()
    server.load("add")
    assert_serving(server, "add", WEIGHTS)


def test_action_timeout_kills_busy_worker(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent
) -> None:
    server = triton_factory(
        repo,
        repoagent_dir=fake_agent.root,
        env={"CACHEAGENT_WORKER_ACTION_TIMEOUT": "2", "CACHEAGENT_WORKER_IDLE_TIMEOUT": "60"},
    )
    fake_agent.plan(LOAD="hang")  # heartbeats keep coming: only the action limit applies
    started = time.monotonic()
    with pytest.raises(TritonHTTPError):
        server.load("add")
    assert 1.5 < time.monotonic() - started < 12.0
    server.wait_log("did not finish LOAD for model location")
    fake_agent.plan()
    server.load("add")
    assert_serving(server, "add", WEIGHTS)


def _load_with_held_load(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent, env: dict[str, str]
) -> tuple[TritonServer, threading.Thread, threading.Thread]:
    """add's LOAD is done and its backend start waits for "add-go"; add2's LOAD is
    then held by its gate (as a long download holds it). Returns once both wait."""
    add_go = fake_agent.dir / "add-go"
    (repo / "add" / "1" / "model.py").write_text(gated_model_py(add_go))
    fake_agent.plan(**{"LOAD:add2": "gate:add2-go"})
    server = triton_factory(repo, repoagent_dir=fake_agent.root, env=env)
    threads = tuple(threading.Thread(target=server.load, args=(n,)) for n in ("add", "add2"))
    threads[0].start()
    fake_agent.wait_request("LOAD", "add")
    threads[1].start()
    fake_agent.wait_request("LOAD", "add2")
    add_go.touch()  # add's backend is up: its LOAD_COMPLETE comes while add2's LOAD runs
    return server, threads[0], threads[1]


def test_concurrent_explicit_actions_never_wait_behind_another_models_action(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent
) -> None:
    """While add2's LOAD is held, add's LOAD_COMPLETE runs on a second worker at once:
    add serves before add2's LOAD is let go."""
    server, add, add2 = _load_with_held_load(triton_factory, repo, fake_agent, {})
    try:
        # Triton's own answer to add's load request may wait for add2's (its lock), so
        # watch the model, not the request.
        server.wait_log("successfully loaded 'add'", timeout=60)
        assert_serving(server, "add", WEIGHTS)
        assert add2.is_alive()  # its LOAD is still held
    finally:
        fake_agent.open_gate("add2-go")
        add.join(60)
        add2.join(60)
    assert_serving(server, "add2", [0.5] * 4)
    log = server.log_text()
    started = [ln for ln in log.splitlines() if "cacheagent: worker pid" in ln and "started" in ln]
    assert len(started) == 2, started
    assert "workers are busy" not in log


def test_one_worker_makes_actions_wait_and_says_so(
    triton_factory: Factory, repo: Path, fake_agent: FakeAgent
) -> None:
    """With CACHEAGENT_WORKERS=1, add's LOAD_COMPLETE waits for add2's LOAD, and says why."""
    env = {"CACHEAGENT_WORKERS": "1"}
    server, add, add2 = _load_with_held_load(triton_factory, repo, fake_agent, env)
    try:
        log = server.wait_log("all 1 workers are busy", timeout=60)
        assert any("LOAD_COMPLETE of" in ln and "workers are busy" in ln for ln in log.splitlines())
        assert add.is_alive()  # add's load waits for the one worker
    finally:
        fake_agent.open_gate("add2-go")
        add.join(60)
        add2.join(60)
    assert_serving(server, "add", WEIGHTS)
    assert_serving(server, "add2", [0.5] * 4)


def gated_model_py(gate: Path) -> str:
    """The add model, whose backend start waits (60 s at most) until ``gate`` exists."""
    wait = (
        "        import time\n"
        f"        gate, deadline = {str(gate)!r}, time.monotonic() + 60\n"
        "        while not os.path.exists(gate) and time.monotonic() < deadline:\n"
        "            time.sleep(0.02)\n"
    )
    marker = "    def initialize(self, args):\n"
    assert marker in MODEL_PY
    return MODEL_PY.replace(marker, marker + wait)
