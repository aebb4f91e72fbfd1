"""``cacheagent check`` and the fetch see a model through one listing, on every cloud.

An ensemble's version directory holds no file. Object stores keep it as a
folder marker: a ``1/`` object on S3 and GCS, and on Azure an empty blob ``1``
flagged ``hdi_isfolder`` (as Azure's own tools write it). The fetch has always
kept that directory; the check must see it too, or it reports an ensemble Triton
loads as having no version at all.
"""

from __future__ import annotations

import os

from cacheagent.cache import Cache
from cacheagent.triton.check import check_repository
from harness.emulators import StorageRig

ENSEMBLE = b'name: "ens"\nplatform: "ensemble"\n'


def put_empty_version_dir(rig: StorageRig, relpath: str) -> None:
    if rig.cloud == "as":
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(rig.emulator.connection_string)
        container = service.get_container_client(rig.bucket)
        container.upload_blob(relpath, b"", metadata={"hdi_isfolder": "true"})
    else:
        rig.fs.pipe(rig.key(relpath + "/"), b"")


def test_an_empty_version_directory_is_seen_by_check_and_fetch(tmp_path, rig):
    rig.put("repo/ens/config.pbtxt", ENSEMBLE)
    put_empty_version_dir(rig, "repo/ens/1")
    env = {**os.environ, **rig.env}

    report = check_repository(rig.url("repo"), env=env)
    assert report.models == ["ens"]
    assert not [f for f in report.findings if f.severity != "info"], report.findings

    with Cache(tmp_path / "cache", env=env) as cache:
        snapshot = cache.fetch(rig.url("repo/ens"))
    assert sorted(os.listdir(snapshot.path)) == ["1", "config.pbtxt"]


def test_a_model_with_no_version_directory_is_still_reported(tmp_path, rig):
    rig.put("repo/ens/config.pbtxt", ENSEMBLE)
    report = check_repository(rig.url("repo"), env={**os.environ, **rig.env})
    (error,) = [f for f in report.findings if f.severity == "error"]
    assert error.model == "ens" and "no version directory" in error.message
