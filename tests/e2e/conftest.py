"""Fixtures for end-to-end tests against a real tritonserver (helpers in triton.py).

- ``triton_bin`` (session): the wheel's Triton, with the python-backend stub in place.
- ``repoagent_dir`` (session): a ``--repoagent-directory`` with cacheagent installed.
- ``triton_factory`` (function): ``start(model_repository, **kwargs) -> TritonServer``;
  every server it started is stopped (or killed) and reaped at teardown, with
  whatever it left behind; when the test fails, each server's log tail is
  attached to the failure report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cacheagent.triton.install import install_triton
from harness.triton import TritonPaths, TritonServer, TritonUnavailable, prepare_triton


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the Triton log tails to the report of a failed test (before teardown)."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for i, server in enumerate(getattr(item, "_triton_servers", [])):
            report.sections.append((f"tritonserver #{i} log tail", server.log_tail(80)))
    return report


@pytest.fixture(scope="session")
def triton_bin() -> TritonPaths:
    """The nvidia-pytriton wheel's tritonserver, prepared to run python-backend models."""
    try:
        return prepare_triton()
    except TritonUnavailable as exc:
        pytest.skip(f"tritonserver unavailable: {exc}")


@pytest.fixture(scope="session")
def repoagent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository-agent directory with cacheagent installed (shared: don't modify it)."""
    directory = tmp_path_factory.mktemp("repoagents")
    install_triton(directory)
    return directory


@pytest.fixture
def triton_factory(
    request: pytest.FixtureRequest, triton_bin: TritonPaths, tmp_path: Path
) -> Iterator[Callable[..., TritonServer]]:
    """Start tritonservers for one test; all are stopped, killed and reaped afterwards.

    ``start(model_repository, *, wait=True, ready_timeout=60, **kwargs)`` passes
    ``kwargs`` to :class:`TritonServer` (``repoagent_dir``, ``model_control_mode``,
    ``exit_on_error``, ``load_models``, ``extra_args``, ``env``, ...) and waits for
    ``/v2/health/ready`` unless ``wait`` is false. Logs go to ``tmp_path``.
    """
    servers: list[TritonServer] = []
    request.node._triton_servers = servers

    def start(
        model_repository: Path | str,
        *,
        wait: bool = True,
        ready_timeout: float = 60.0,
        **kwargs: Any,
    ) -> TritonServer:
        log = tmp_path / f"tritonserver-{len(servers)}.log"
        server = TritonServer(triton_bin, model_repository, log, **kwargs)
        servers.append(server)
        server.start()
        if wait:
            server.wait_ready(ready_timeout)
        return server

    yield start
    for server in servers:
        server.cleanup()
