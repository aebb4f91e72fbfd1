from cacheagent.triton.layout import policy_selector, selected_versions, version_of

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
