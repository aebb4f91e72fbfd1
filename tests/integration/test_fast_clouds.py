"""The SDK-free GCS and Azure clients: the same listing as the SDKs, and a hit without them.

A fresh worker's first hit is one listing (``cacheagent warm`` also reads the
model's config). On fake-gcs-server (anonymous, as gcsfs reaches an emulator)
and Azurite (Shared Key from the connection string) those go through
:mod:`cacheagent.remote.gcs` and :mod:`cacheagent.remote.azure`; these tests
pin that they list exactly what gcsfs's and adlfs's ``find`` list (so the
snapshot key is the same whichever client listed), that a hit imports no SDK
and sends only listing requests, and that a failure the fast client cannot
handle hands the location to the SDK as the fast S3 client does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from cacheagent.errors import RemoteAccessDeniedError, StorageUnavailableError
from cacheagent.remote import azure, gcs
from cacheagent.remote.faults import Deadline
from cacheagent.remote.listing import list_manifest, list_tree, read_file
from cacheagent.remote.location import Location, parse_location
from cacheagent.remote.manifest import build_manifest
from harness.emulators import StorageRig
from tests.integration.remote_endpoints import ForwardProxy

FILES = {
    "1/model.py": b"# model\n",
    "1/w.bin": b"w" * 300_000,
    "2/sub dir/x+y.bin": b"odd names",
    "config.pbtxt": b'name: "m"\nbackend: "python"\n',
}
# What a hit must not import: the SDKs and their HTTP stack.
SDK_MODULES = ("gcsfs", "adlfs", "azure", "google.cloud", "google.auth", "aiohttp", "fsspec")
_RIGS = {"gs": "gcs_rig", "as": "azure_rig"}


def rig_for(request: pytest.FixtureRequest, cloud: str) -> StorageRig:
    rig: StorageRig = request.getfixturevalue(_RIGS[cloud])
    return rig


def env_of(rig: StorageRig) -> dict[str, str]:
    return {**os.environ, **rig.env}


def location(rig: StorageRig, relpath: str, env: Mapping[str, str] | None = None) -> Location:
    return parse_location(rig.url(relpath), env_of(rig) if env is None else env)


def put_folder_marker(rig: StorageRig, relpath: str) -> None:
    """An empty directory as each cloud's tools write it."""
    if rig.cloud == "as":
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(rig.emulator.connection_string)
        container = service.get_container_client(rig.bucket)
        container.upload_blob(relpath, b"", metadata={"hdi_isfolder": "true"})
    else:
        rig.fs.pipe(rig.key(relpath + "/"), b"")


def sdk_find(rig: StorageRig, loc: Location) -> dict[str, dict[str, Any]]:
    """The SDK's listing of ``loc`` exactly as list_tree asks for it."""
    fs = rig.proxied_fs()
    found: dict[str, dict[str, Any]] = fs.find(loc.root, detail=True, withdirs=rig.cloud == "as")
    return found


# Per cloud, the fields of an entry the manifest and `cacheagent check` read.
FIELDS = {
    "gs": ("name", "size", "md5Hash", "generation", "type"),
    "as": ("name", "size", "etag", "type", "metadata"),
}


def fields(cloud: str, listing: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, ...]]:
    out = {}
    for name, info in listing.items():
        values = tuple(info.get(f) for f in FIELDS[cloud])
        if cloud == "as":
            settings = info.get("content_settings")
            md5 = getattr(settings, "content_md5", None) or (
                settings.get("content_md5") if isinstance(settings, Mapping) else None
            )
            values += (bytes(md5) if md5 else None,)
        out[name] = values
    return out


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_the_fast_listing_is_the_sdks(request, cloud):
    rig = rig_for(request, cloud)
    rig.put_tree("models/m", FILES)
    rig.put_tree("models/mm", {"not/below.bin": b"a sibling sharing the prefix"})
    put_folder_marker(rig, "models/m/3")  # an empty version directory
    loc = location(rig, "models/m")

    fast = gcs.list_objects(loc, Deadline()) if cloud == "gs" else azure.list_blobs(loc, Deadline())
    assert fast is not None
    sdk = sdk_find(rig, loc)

    assert sorted(fast) == sorted(sdk)
    assert fields(cloud, fast) == fields(cloud, sdk)
    fast_manifest = build_manifest(loc.url, loc.root, fast)
    assert fast_manifest == build_manifest(loc.url, loc.root, sdk)
    assert fast_manifest.key == build_manifest(loc.url, loc.root, sdk).key
    assert fast_manifest.empty_dirs == ("3",)
    assert all(f.content_md5 for f in fast_manifest.files)  # both give content MD5s


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_a_listing_of_many_pages_is_whole(request, cloud, monkeypatch):
    rig = rig_for(request, cloud)
    many = {f"1/f{i:03}.bin": b"x" for i in range(25)}
    rig.put_tree("models/m", many)
    # Small pages, so the listing needs several (the page size is ours to choose).
    if cloud == "gs":
        monkeypatch.setattr(gcs, "_PAGE_SIZE", "10")
    else:
        monkeypatch.setattr(azure, "_PAGE_SIZE", "10")
    rig.proxy.reset()
    found = list_tree(location(rig, "models/m"))
    assert sorted(n.rsplit("/", 1)[-1] for n, i in found.items() if i["type"] == "file") == sorted(
        name.rsplit("/", 1)[-1] for name in many
    )
    assert rig.proxy.count() == 3  # 25 objects in pages of 10


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_a_fresh_hit_imports_no_sdk_and_only_lists(request, tmp_path, cloud):
    rig = rig_for(request, cloud)
    rig.put_tree("models/m", FILES)
    env = {**env_of(rig), "CACHEAGENT_CACHE_DIR": str(tmp_path / "cache")}
    warm = [sys.executable, "-m", "cacheagent.cli.main", "warm", rig.url("models/m"), "--json"]
    subprocess.run(warm, env=env, check=True, capture_output=True, timeout=120)
    rig.proxy.reset()

    # -X importtime names every module the process imports, on stderr.
    hit = subprocess.run(
        [sys.executable, "-X", "importtime", *warm[1:]],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(hit.stdout)["hit"] is True
    imported = {line.rsplit("|", 1)[-1].strip() for line in hit.stderr.splitlines() if "|" in line}
    assert f"cacheagent.remote.{'gcs' if cloud == 'gs' else 'azure'}" in imported
    sdk = [m for m in imported if any(m == s or m.startswith(s + ".") for s in SDK_MODULES)]
    assert sdk == []
    # The listing and the config read (for the version policy): nothing else.
    records = rig.proxy.records()
    assert len(records) == 2, [r.target for r in records]
    assert rig.content_records("models/m/1") == []


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_read_file_reads_a_config_and_misses_are_not_found(request, cloud):
    rig = rig_for(request, cloud)
    rig.put_tree("models/m", FILES)
    loc = location(rig, "models/m")
    assert read_file(loc, "config.pbtxt") == FILES["config.pbtxt"]
    assert read_file(loc, "2/sub dir/x+y.bin") == FILES["2/sub dir/x+y.bin"]
    with pytest.raises(FileNotFoundError):
        read_file(loc, "missing.pbtxt", delays=())
    assert not loc.route.sdk  # a missing object is no reason to change clients


def test_refused_azure_credentials_hand_the_location_to_the_sdk(azure_rig, caplog):
    azure_rig.put_tree("models/m", FILES)
    env = env_of(azure_rig)
    good = env["AZURE_STORAGE_CONNECTION_STRING"]
    wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc="
    env["AZURE_STORAGE_CONNECTION_STRING"] = good.replace(
        good.split("AccountKey=")[1].split(";")[0], wrong_key
    )
    loc = location(azure_rig, "models/m", env)
    with (
        caplog.at_level(logging.INFO, logger="cacheagent.remote"),
        pytest.raises(RemoteAccessDeniedError) as raised,
    ):
        list_manifest(loc)
    assert loc.route.sdk  # the SDK reported the real error, and serves it from now on
    assert "the fast Azure client could not list" in caplog.text
    assert wrong_key not in caplog.text and wrong_key not in str(raised.value)


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_an_outage_is_raised_not_handed_to_the_sdk(request, cloud):
    rig = rig_for(request, cloud)
    rig.put_tree("models/m", FILES)
    loc = location(rig, "models/m")
    rig.proxy.set_down(True)
    try:
        with pytest.raises(StorageUnavailableError):
            list_manifest(loc, timeout=2)
    finally:
        rig.proxy.set_down(False)
    assert not loc.route.sdk


@pytest.mark.parametrize("cloud", ["gs", "as"])
def test_the_fast_listing_goes_through_http_proxy(request, monkeypatch, cloud):
    rig = rig_for(request, cloud)
    rig.put_tree("models/m", FILES)
    direct = f"http://127.0.0.1:{rig.emulator.port}"
    env = env_of(rig)
    if cloud == "gs":
        env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = env["STORAGE_EMULATOR_HOST"] = direct
    else:
        connection = env["AZURE_STORAGE_CONNECTION_STRING"]
        env["AZURE_STORAGE_CONNECTION_STRING"] = connection.replace(rig.proxy.url, direct)
    with ForwardProxy() as proxy, monkeypatch.context() as patch:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            patch.delenv(name, raising=False)
        patch.setenv("HTTP_PROXY", proxy.url)
        loc = parse_location(rig.url("models/m"), env)
        manifest = list_manifest(loc)
        assert {f.path for f in manifest.files} == set(FILES)
        assert not loc.route.sdk
        assert any(t.startswith(direct) for t in proxy.targets), proxy.targets
        # NO_PROXY naming the endpoint bypasses the proxy.
        patch.setenv("NO_PROXY", "127.0.0.1")
        before = len(proxy.targets)
        list_manifest(parse_location(rig.url("models/m"), env))
        assert len(proxy.targets) == before


def test_gcs_with_real_credentials_stays_on_gcsfs(gcs_rig):
    # Only anonymous access is SDK-free: a service account's token needs a signed JWT.
    env = {k: v for k, v in env_of(gcs_rig).items() if "EMULATOR" not in k}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = "/nonexistent/key.json"
    assert not gcs.can_serve(parse_location("gs://bucket/models/m", env))
    assert gcs.can_serve(location(gcs_rig, "models/m"))


def test_azure_sas_and_missing_keys_stay_on_adlfs():
    sas = "BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature=sv=2021&sig=x"
    env = {"AZURE_STORAGE_CONNECTION_STRING": sas}
    assert not azure.can_serve(parse_location("as://acct/container/models/m", env))
    assert not azure.can_serve(parse_location("as://acct/container/models/m", {}))
    keyed = {"AZURE_STORAGE_KEY": "a2V5"}
    assert azure.can_serve(parse_location("as://acct/container/models/m", keyed))
