"""Version directories and policies (cacheagent.triton.layout): Triton's rules."""

import pytest

from cacheagent.triton.layout import (
    TopDir,
    classify,
    policy_selector,
    selected_versions,
    version_dirs,
    version_of,
    version_selection,
)

PATHS = [
    "config.pbtxt",
    "labels.txt",
    "configs/a.pbtxt",
    "1/model.py",
    "2/model.py",
    "3/model.py",
    "3/sub/w.bin",
    "01/model.py",
    "abc/x",
]


def test_version_names_follow_triton_rules():
    assert version_of("3") == 3
    assert version_of("0") == 0
    assert version_of("01") is None
    assert version_of("v1") is None


def test_default_policy_is_latest_one():
    kept = policy_selector({})(PATHS)
    assert kept == {
        "config.pbtxt",
        "labels.txt",
        "configs/a.pbtxt",
        "3/model.py",
        "3/sub/w.bin",
        "abc/x",
    }


def test_latest_n_specific_and_all():
    latest2 = policy_selector({"version_policy": {"latest": {"num_versions": 2}}})(PATHS)
    assert {"2/model.py", "3/model.py"} <= latest2 and "1/model.py" not in latest2
    specific = policy_selector({"version_policy": {"specific": {"versions": ["1", 3]}}})(PATHS)
    assert "1/model.py" in specific and "3/model.py" in specific and "2/model.py" not in specific
    everything = policy_selector({"version_policy": {"all": {}}})(PATHS)
    assert {"1/model.py", "2/model.py", "3/model.py"} <= everything
    assert "01/model.py" not in everything


def test_selected_versions_handles_missing():
    assert selected_versions({"specific": {"versions": [7]}}, [1, 2]) == set()
    assert selected_versions(None, []) == set()


def test_policy_comes_only_in_tritons_json_shape():
    # Triton sends specific versions as a list of numbers, even for one version.
    assert selected_versions({"specific": {"versions": [2]}}, [1, 2, 3]) == {2}
    with pytest.raises(ValueError, match="must be a list"):
        selected_versions({"specific": {"versions": 2}}, [1, 2, 3])


def test_an_empty_policy_loads_all_and_latest_zero_loads_none():
    # Measured on Triton 2.51: version_policy {} loads every version, and
    # latest { } (num_versions 0) loads none and fails the model.
    assert selected_versions({}, [1, 2, 3]) == {1, 2, 3}
    assert selected_versions({"latest": {"num_versions": 0}}, [1, 2, 3]) == set()
    assert selected_versions(None, [1, 2, 3]) == {3}
    assert version_selection({"version_policy": {}}, "policy")[1] == "policy:all"
    assert version_selection({}, "policy")[1] == "policy:latest:1"
    assert (
        version_selection({"version_policy": {"specific": {"versions": [3, 1]}}}, "policy")[1]
        == "policy:specific:1,3"
    )


@pytest.mark.parametrize(
    ("name", "kind", "number"),
    [
        ("1", "version", 1),
        ("0", "version", 0),
        ("9223372036854775807", "version", 2**63 - 1),
        ("9223372036854775808", "too_large", None),
        ("01", "leading_zero", None),
        ("0abc", "leading_zero", None),
        ("2a", "misread", 2),
        ("+3", "misread", 3),
        ("configs", "special", None),
        ("warmup", "special", None),
        ("initial_state", "special", None),
        ("v1", "other", None),
        ("\u0661", "other", None),  # an Arabic-Indic digit is no ASCII number
    ],
)
def test_top_level_directories_as_triton_reads_them(name, kind, number):
    assert classify(name) == TopDir(name, kind, number)


def test_version_dirs_of_files_and_empty_directories():
    assert version_dirs(PATHS) == ["1", "2", "3"]
    assert version_dirs(["config.pbtxt"], ["10", "9", "01", "x/y"]) == ["9", "10"]
    assert version_dirs([]) == []
