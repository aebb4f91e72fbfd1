"""The snapshot holds everything Triton reads from a model directory, byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

from cacheagent.cache import Cache
from cacheagent.triton.layout import policy_selector


def model_tree() -> dict[str, bytes]:
    return {
        "config.pbtxt": b'name: "m"\nplatform: "onnxruntime_onnx"\n',
        "labels.txt": b"cat\ndog\n",
        "configs/alt.pbtxt": b'name: "m"\nmax_batch_size: 8\n',
        "configs/h100.pbtxt": b'name: "m"\n',
        "1/model.onnx/model.onnx": os.urandom(3000),
        "1/model.onnx/weights/layer0.bin": os.urandom(5000),
        "2/model.savedmodel/saved_model.pb": os.urandom(2000),
        "2/model.savedmodel/variables/variables.index": os.urandom(100),
        "2/model.savedmodel/variables/variables.data-00000-of-00001": os.urandom(7000),
        "2/model.savedmodel/assets/vocab.txt": b"a b c",
        "3/model.py": b"# python model",
        "3/empty.marker": b"",
    }


def tree_of(root) -> dict[str, bytes]:
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


def test_all_versions_configs_labels_and_model_directories(tmp_path, s3_rig):
    files = model_tree()
    s3_rig.put_tree("repo/m", files)
    with Cache(tmp_path / "cache", env={**os.environ, **s3_rig.env}) as cache:
        snap = cache.fetch(s3_rig.url("repo/m"))
        assert tree_of(snap.path) == files


def test_default_policy_keeps_everything_but_older_versions(tmp_path, s3_rig):
    files = model_tree()
    s3_rig.put_tree("repo/m", files)
    with Cache(tmp_path / "cache", env={**os.environ, **s3_rig.env}) as cache:
        snap = cache.fetch(s3_rig.url("repo/m"), select=policy_selector({}))
        expected = {k: v for k, v in files.items() if not k.startswith(("1/", "2/"))}
        assert tree_of(snap.path) == expected
        assert s3_rig.object_gets("repo/m/1/") == 0 and s3_rig.object_gets("repo/m/2/") == 0


def test_ensemble_empty_version_directory_survives(tmp_path, rig):
    rig.put("repo/ens/config.pbtxt", b'name: "ens"\nplatform: "ensemble"\n')
    if rig.cloud == "as":
        # A folder marker as Azure tools (and ADLS) write it: an empty blob flagged hdi_isfolder.
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(rig.emulator.connection_string)
        container = service.get_container_client(rig.bucket)
        container.upload_blob("repo/ens/1", b"", metadata={"hdi_isfolder": "true"})
    else:
        rig.fs.pipe(rig.key("repo/ens/1/"), b"")
    with Cache(tmp_path / "cache", env={**os.environ, **rig.env}) as cache:
        snap = cache.fetch(rig.url("repo/ens"))
        assert sorted(os.listdir(snap.path)) == ["1", "config.pbtxt"]
        assert (snap.path / "1").is_dir() and os.listdir(snap.path / "1") == []
        assert cache.fetch(rig.url("repo/ens")).hit
