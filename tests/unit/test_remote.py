"""Storage access on local directories: model listings, small reads, background listing."""

import pytest

from cacheagent.errors import RemoteNotFoundError
from cacheagent.remote.listing import list_manifest, list_model_names, read_file, start_listing
from cacheagent.remote.location import parse_location


def test_model_names_and_config_reads_of_a_local_repository(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_bytes(f"name: '{name}'".encode())
    (tmp_path / "README.md").write_text("not a model")
    repo = parse_location(str(tmp_path))
    assert list_model_names(repo) == ["a", "b"]
    assert read_file(repo.child("a"), "config.pbtxt") == b"name: 'a'"
    with pytest.raises(RemoteNotFoundError, match="was not found"):
        read_file(repo.child("a"), "missing.pbtxt", delays=())
    with pytest.raises(RemoteNotFoundError):
        list_model_names(parse_location(str(tmp_path / "nope")), delays=())


def test_background_listing_gives_the_manifest_or_raises_its_error(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "w.bin").write_bytes(b"abc")
    location = parse_location(str(tmp_path / "m"))
    assert start_listing(location)().key == list_manifest(location).key
    waiting = start_listing(parse_location(str(tmp_path / "missing")))
    with pytest.raises(RemoteNotFoundError, match="no model files"):
        waiting()
