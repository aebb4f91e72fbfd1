import base64

import pytest

from cacheagent.errors import UnsafePathError
from cacheagent.remote.manifest import build_manifest, contradicts_listing, validate_relpath

MD5 = "9e107d9d372bb6826bd81d3542a419d6"


def s3_info(size, etag):
    return {"name": "x", "size": size, "ETag": etag, "type": "file"}


def test_s3_single_part_etag_is_a_content_hash_multipart_is_not():
    listing = {
        "b/m/config.pbtxt": s3_info(10, f'"{MD5}"'),
        "b/m/1/model.bin": s3_info(99, '"abcdef0123456789abcdef0123456789-3"'),
        "b/m/1/": {"size": 0, "type": "directory"},
        "b/m2/other": s3_info(1, '"x"'),
    }
    manifest = build_manifest("s3://b/m", "b/m", listing)
    by_path = manifest.by_path()
    assert sorted(by_path) == ["1/model.bin", "config.pbtxt"]
    assert by_path["config.pbtxt"].content_md5 == MD5
    assert by_path["config.pbtxt"].fingerprint == f"md5:{MD5}"
    assert by_path["1/model.bin"].content_md5 is None
    assert by_path["1/model.bin"].fingerprint.startswith("etag:")
    assert manifest.total_size == 109


def test_gcs_prefers_md5_over_generation_so_identical_reuploads_keep_the_key():
    md5_b64 = base64.b64encode(bytes.fromhex(MD5)).decode()
    first = {"b/m/f": {"size": 3, "generation": "111", "md5Hash": md5_b64, "type": "file"}}
    again = {"b/m/f": {"size": 3, "generation": "222", "md5Hash": md5_b64, "type": "file"}}
    assert (
        build_manifest("gs://b/m", "b/m", first).key == build_manifest("gs://b/m", "b/m", again).key
    )
    no_md5 = {"b/m/f": {"size": 3, "generation": "111", "type": "file"}}
    assert build_manifest("gs://b/m", "b/m", no_md5).files[0].fingerprint == "generation:111"


def test_azure_uses_content_md5_when_set_else_etag():
    with_md5 = {
        "c/m/f": {
            "size": 3,
            "etag": "0x8D1",
            "content_settings": {"content_md5": bytearray.fromhex(MD5)},
        }
    }
    without = {"c/m/f": {"size": 3, "etag": "0x8D1", "content_settings": {"content_md5": None}}}
    assert build_manifest("as://a/c/m", "c/m", with_md5).files[0].content_md5 == MD5
    assert build_manifest("as://a/c/m", "c/m", without).files[0].fingerprint == "etag:0x8D1"


def test_key_changes_with_any_fingerprint_size_path_or_source():
    base = {"b/m/a": s3_info(1, '"e1"'), "b/m/b": s3_info(2, '"e2"')}
    key = build_manifest("s3://b/m", "b/m", base).key
    assert build_manifest("s3://b/m", "b/m", dict(reversed(list(base.items())))).key == key
    assert build_manifest("s3://b/m", "b/m", {**base, "b/m/a": s3_info(1, '"e9"')}).key != key
    assert build_manifest("s3://b/m", "b/m", {**base, "b/m/a": s3_info(5, '"e1"')}).key != key
    assert build_manifest("s3://other/m", "b/m", base).key != key


@pytest.mark.parametrize(
    "relpath",
    ["../escape", "a/../../b", "/abs", "a\\b", "nul\x00", "", "a//b", "./a", "a/" + "x" * 256],
)
def test_unsafe_relpaths_are_refused(relpath):
    with pytest.raises(UnsafePathError):
        validate_relpath(relpath, "s3://b/m")


def test_listing_with_hostile_name_is_refused_before_anything_is_written():
    with pytest.raises(UnsafePathError, match="refusing"):
        build_manifest("s3://b/m", "b/m", {"b/m/../../etc/passwd": s3_info(1, '"e"')})


def test_file_and_directory_with_same_name_is_refused():
    listing = {"b/m/a": s3_info(1, '"e"'), "b/m/a/b": s3_info(1, '"f"')}
    with pytest.raises(UnsafePathError, match="both a file"):
        build_manifest("s3://b/m", "b/m", listing)


def test_select_filters_paths():
    listing = {
        "b/m/1/x": s3_info(1, '"a"'),
        "b/m/2/x": s3_info(1, '"b"'),
        "b/m/config.pbtxt": s3_info(1, '"c"'),
    }
    manifest = build_manifest(
        "s3://b/m", "b/m", listing, select=lambda ps: {p for p in ps if not p.startswith("1/")}
    )
    assert [f.path for f in manifest.files] == ["2/x", "config.pbtxt"]


def test_directory_markers_become_empty_dirs_only_when_nothing_is_below():
    listing = {
        "b/ens/config.pbtxt": s3_info(5, '"c"'),
        "b/ens/1/": s3_info(0, '"d41d8cd98f00b204e9800998ecf8427e"'),
        "b/ens/2/": s3_info(0, '"d41d8cd98f00b204e9800998ecf8427e"'),
        "b/ens/2/model.py": s3_info(3, '"m"'),
        "b/ens/3": {"size": 0, "type": "file", "metadata": {"hdi_isfolder": "true"}},
    }
    manifest = build_manifest("s3://b/ens", "b/ens", listing)
    assert manifest.empty_dirs == ("1", "3")
    assert [f.path for f in manifest.files] == ["2/model.py", "config.pbtxt"]
    without = build_manifest(
        "s3://b/ens", "b/ens", {k: v for k, v in listing.items() if k != "b/ens/1/"}
    )
    assert without.key != manifest.key
    latest = build_manifest(
        "s3://b/ens", "b/ens", listing, select=lambda ps: {p for p in ps if not p.startswith("1")}
    )
    assert latest.empty_dirs == ("3",)


def test_an_answers_etag_contradicts_the_listed_s3_version_only_when_it_is_another_tag():
    multipart = '"abcdef0123456789abcdef0123456789-3"'
    listing = {"b/m/a": s3_info(1, f'"{MD5}"'), "b/m/b": s3_info(2, multipart)}
    by_path = build_manifest("s3://b/m", "b/m", listing).by_path()
    single, multi = by_path["a"], by_path["b"]
    # The header's quotes and a hex digest's case are syntax, not the tag.
    assert not contradicts_listing(single, f'"{MD5}"')
    assert not contradicts_listing(single, MD5.upper())
    assert not contradicts_listing(multi, multipart)
    assert not contradicts_listing(multi, multipart.strip('"').upper())
    # No tag proves nothing: the listing after the download decides.
    assert not contradicts_listing(single, None)
    assert not contradicts_listing(single, "")
    # Another tag is another version.
    assert contradicts_listing(single, '"0123456789abcdef0123456789abcdef"')
    assert contradicts_listing(single, multipart)
    assert contradicts_listing(multi, f'"{MD5}"')


def test_fingerprints_that_are_no_etag_are_never_contradicted_by_one():
    gcs = {"b/m/a": {"name": "b/m/a", "size": 1, "generation": "17", "etag": "CLE="}}
    entry = build_manifest("gs://b/m", "b/m", gcs).by_path()["a"]
    assert entry.fingerprint == "generation:17"
    assert not contradicts_listing(entry, "CLE=")
    assert not contradicts_listing(entry, "other")
