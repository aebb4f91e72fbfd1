"""Shared pytest fixtures: real storage emulators and per-test storage rigs.

Imports: the test helpers live in the package ``tests.support`` (``tests/`` has
an ``__init__.py``), imported as e.g. ``from harness.proxy import
CountingProxy`` and ``from harness.emulators import StorageRig``. The repo
root is put on ``sys.path`` below so that works from any test directory,
whether or not it has an ``__init__.py`` and whatever pytest's import mode.

Fixtures (all start real processes, lazily - only when a test asks):

* session scope, one process per test session each:
  ``moto_server`` (:class:`MotoS3`), ``gcs_server`` (:class:`FakeGcs`, in-memory
  backend), ``azurite_server`` (:class:`Azurite`).
* function scope, a fresh bucket + fresh :class:`CountingProxy` per test, proxy
  stopped and bucket deleted afterwards: ``s3_rig``, ``gcs_rig``, ``azure_rig``,
  and ``rig``, parametrized over the three clouds with ids "s3", "gs", "as".

Tests that use any of these fixtures are marked ``integration`` automatically,
so ``-m "not integration"`` runs without emulators.

Only these names are defined here; conftest files in tests/unit,
tests/integration and tests/e2e belong to other parts of the suite.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from harness.emulators import Azurite, FakeGcs, MotoS3, StorageRig  # noqa: E402
from harness.seaweed import SeaweedS3  # noqa: E402

_EMULATOR_FIXTURES = frozenset(
    {
        "moto_server",
        "gcs_server",
        "azurite_server",
        "seaweed_server",
        "s3_rig",
        "gcs_rig",
        "azure_rig",
        "seaweed_rig",
        "rig",
    }
)
_RIG_FOR_CLOUD = {"s3": "s3_rig", "gs": "gcs_rig", "as": "azure_rig"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that need emulators as ``integration``."""
    for item in items:
        if _EMULATOR_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3]:
    """A moto S3 server for the whole session (data in memory)."""
    with MotoS3() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGcs]:
    """A fake-gcs-server for the whole session (in-memory backend)."""
    with FakeGcs() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[Azurite]:
    """An Azurite blob server for the whole session (data on disk in a temp dir)."""
    with Azurite() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 gateway for the whole session: ranges cost what they hold."""
    with SeaweedS3() as emulator:
        yield emulator


def _rig(emulator: MotoS3 | FakeGcs | Azurite | SeaweedS3) -> Iterator[StorageRig]:
    # A test may have stopped the shared emulator and failed before
    # restarting it; make sure the next test gets a running one.
    if not emulator.running:
        emulator.start()
    with StorageRig(emulator) as storage_rig:  # type: ignore[arg-type]
        yield storage_rig


@pytest.fixture
def s3_rig(moto_server: MotoS3) -> Iterator[StorageRig]:
    """A fresh S3 bucket behind a fresh counting proxy."""
    yield from _rig(moto_server)


@pytest.fixture
def seaweed_rig(seaweed_server: SeaweedS3) -> Iterator[StorageRig]:
    """A fresh bucket on SeaweedFS, a range-efficient S3 origin, behind a fresh proxy."""
    yield from _rig(seaweed_server)


@pytest.fixture
def gcs_rig(gcs_server: FakeGcs) -> Iterator[StorageRig]:
    """A fresh GCS bucket behind a fresh counting proxy."""
    yield from _rig(gcs_server)


@pytest.fixture
def azure_rig(azurite_server: Azurite) -> Iterator[StorageRig]:
    """A fresh Azure container behind a fresh counting proxy."""
    yield from _rig(azurite_server)


@pytest.fixture(params=["s3", "gs", "as"])
def rig(request: pytest.FixtureRequest) -> StorageRig:
    """The rig of each cloud in turn (ids "s3", "gs", "as").

    Resolved through ``getfixturevalue`` so a run selecting one cloud (``-k s3``)
    starts only that cloud's emulator.
    """
    storage_rig: StorageRig = request.getfixturevalue(_RIG_FOR_CLOUD[request.param])
    return storage_rig
