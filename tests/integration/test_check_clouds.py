"""``cacheagent check`` against real S3 and GCS emulators, counted at the proxy.

A bucket holds one good and one broken model. The check must report exactly
the broken model's defects, and must read only the small config files: the
proxy counts every GET of object contents, so a single byte of weights read
would show.
"""

from __future__ import annotations

import os

import pytest

from cacheagent.errors import RemoteNotFoundError, StorageUnavailableError
from cacheagent.remote import listing as remote
from cacheagent.triton.check import check_repository, format_report, report_json

AGENT = (
    'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
    '{ key: "max_size", value: "%s" } ] } ] }\n'
)
GOOD_CONFIG = b'name: "good"\nbackend: "python"\n' + (AGENT % "10GiB").encode()
ALT_CONFIG = b'name: "good"\nbackend: "python"\nmax_batch_size: 8\n'
BROKEN_CONFIG = b'name: "renamed"\nbackend: "python"\n' + (AGENT % "lots").encode()


def repository() -> dict[str, bytes]:
    weights = os.urandom(256 * 1024)
    return {
        "good/config.pbtxt": GOOD_CONFIG,
        "good/configs/batch.pbtxt": ALT_CONFIG,
        "good/1/model.py": b"class TritonPythonModel: pass\n",
        "good/1/weights.bin": weights,
        "good/2/model.py": b"class TritonPythonModel: pass\n",
        "good/2/weights.bin": weights,
        "broken/config.pbtxt": BROKEN_CONFIG,
        "broken/1/weights.bin": weights,  # no model.py
        "broken/01/model.py": b"ignored by Triton\n",
        "broken/1/sub//odd.bin": b"an empty path part",
    }


@pytest.fixture(params=["s3", "gs"])
def cloud_rig(request):
    return request.getfixturevalue({"s3": "s3_rig", "gs": "gcs_rig"}[request.param])


def run(rig, relpath: str):
    return check_repository(rig.url(relpath), env={**os.environ, **rig.env})


def test_check_reports_the_broken_model_and_reads_only_configs(cloud_rig):
    rig = cloud_rig
    files = repository()
    rig.put_tree("repo", files)
    rig.proxy.reset()

    report = run(rig, "repo")

    assert report.layout == "repository" and report.models == ["broken", "good"]
    found = sorted((f.severity, f.path) for f in report.findings if f.severity != "info")
    assert found == [
        ("error", "broken/1/"),  # no model.py in the version Triton loads
        ("error", "broken/1/sub//odd.bin"),  # an object name no local directory can hold
        ("error", "broken/config.pbtxt"),  # the name differs from the directory
        ("error", "broken/config.pbtxt"),  # a bad cacheagent parameter
        ("warning", "broken/01"),  # leading zero: Triton ignores the directory
    ]
    messages = " | ".join(f.message for f in report.findings if f.model == "broken")
    assert "names the model 'renamed'" in messages
    assert "cacheagent parameter 'max_size' = 'lots' is not valid" in messages
    assert "has no model.py" in messages and "refusing object name" in messages
    assert not [f for f in report.findings if f.model == "good" and f.severity != "info"]
    assert not report.ok and report_json(report)["errors"] == 4
    assert "FAILED" in format_report(report)

    # Only the three config files crossed the wire, each once, and nothing else.
    configs = [
        "repo/broken/config.pbtxt",
        "repo/good/config.pbtxt",
        "repo/good/configs/batch.pbtxt",
    ]
    assert rig.downloaded_keys() == configs
    assert rig.object_gets() == 3
    assert rig.object_bytes() == sum(len(files[k.removeprefix("repo/")]) for k in configs)
    assert rig.object_gets("repo/good/1/") == 0 and rig.object_gets("repo/broken/1/") == 0


def test_check_of_one_cloud_model_directory(cloud_rig):
    rig = cloud_rig
    rig.put_tree("repo", repository())
    rig.proxy.reset()
    report = run(rig, "repo/good")
    assert report.layout == "model" and report.models == ["good"]
    assert report.ok and report.errors == 0 and report.warnings == 0
    assert rig.downloaded_keys() == ["repo/good/config.pbtxt", "repo/good/configs/batch.pbtxt"]


def test_check_sees_a_file_beside_a_directory_of_the_same_name(cloud_rig):
    rig = cloud_rig
    rig.put_tree(
        "repo",
        {"m/config.pbtxt": b'name: "m"\nbackend: "python"\n', "m/1/model.py": b"x", "m/1": b"f"},
    )
    report = run(rig, "repo")
    (error,) = [f for f in report.findings if f.severity == "error"]
    assert error.path == "m/1" and "both a file" in error.message


def test_missing_prefix_is_not_found(cloud_rig):
    with pytest.raises(RemoteNotFoundError, match="nothing found"):
        run(cloud_rig, "no/such/repo")


def test_unreachable_storage_is_a_clear_error(s3_rig, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS", ())  # one attempt: the same translation, sooner
    s3_rig.put_tree("repo", repository())
    s3_rig.proxy.set_down(True)
    with pytest.raises(StorageUnavailableError, match="unreachable") as info:
        run(s3_rig, "repo")
    assert "testing" not in str(info.value)  # no secret in the message
