"""cacheagent inside a real tritonserver, on a GCS repository (fake-gcs-server behind a proxy).

Triton's GCS client (google-cloud-cpp) reaches the emulator through
``CLOUD_STORAGE_EMULATOR_ENDPOINT``, the rig's counting proxy, as does the
agent's gcsfs. Requests are attributed by User-Agent (Triton: gcloud-cpp; the
agent: python-gcsfs).

google-cloud-cpp downloads with the XML API (``GET /<bucket>/<object>``), which
fake-gcs-server routes only when the request's Host header matches its
``-public-host``. The shared rig's emulator is started with
``-public-host 127.0.0.1:<emulator port>``, while requests through the proxy
carry the proxy's port, so Triton's read of config.pbtxt gets a 404 there. With a
port-less ``-public-host 127.0.0.1`` the emulator's router ignores the port, so
this module runs its own emulator that way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.emulators import FakeGcs, StorageRig
from harness.triton import TritonServer, check_first_start_then_restart

pytestmark = pytest.mark.e2e

Factory = Callable[..., TritonServer]


class ProxiedFakeGcs(FakeGcs):
    """fake-gcs-server whose XML API answers whatever port a proxy in front of it uses."""

    def _command(self) -> list[str]:
        argv = super()._command()
        argv[argv.index("-public-host") + 1] = self.host
        return argv


@pytest.fixture(scope="module")
def triton_gcs_server() -> Iterator[FakeGcs]:
    """A fake-gcs-server (in memory) for this module."""
    with ProxiedFakeGcs() as emulator:
        yield emulator


@pytest.fixture
def triton_gcs_rig(triton_gcs_server: FakeGcs) -> Iterator[StorageRig]:
    """A fresh bucket on :func:`triton_gcs_server`, behind a fresh counting proxy."""
    with StorageRig(triton_gcs_server) as storage_rig:
        yield storage_rig


def test_first_start_misses_then_restart_hits(
    triton_factory: Factory, triton_gcs_rig: StorageRig, repoagent_dir: Path, tmp_path: Path
) -> None:
    assert "CLOUD_STORAGE_EMULATOR_ENDPOINT" in triton_gcs_rig.env
    first, restart = check_first_start_then_restart(
        triton_factory, triton_gcs_rig, repoagent_dir, tmp_path / "cache", 1 << 20
    )
    assert sum(size for _, size in first.agent.values()) >= 1 << 20
    assert restart.response_bytes < 64 * 1024, "a restart should cost listings only"
