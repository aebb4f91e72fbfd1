import pytest

from cacheagent.errors import InvalidParameterError
from cacheagent.triton.params import PARAMETERS, parse_params


def test_defaults(tmp_path):
    params = parse_params({}, "m", {"CACHEAGENT_CACHE_DIR": str(tmp_path)})
    assert params.cache_dir == tmp_path
    assert params.max_size is None and params.verify == "size" and params.stale_if_error
    assert params.on_unload == "keep" and params.versions == "policy"


def test_all_good_values(tmp_path):
    params = parse_params(
        {
            "cache_dir": str(tmp_path),
            "max_size": "200GiB",
            "verify": "hash",
            "stale_if_error": "false",
            "concurrency": "16",
            "part_size": "16MiB",
            "versions": "all",
            "on_unload": "evict",
            "source": "s3://bucket/models/add",
        },
        "m",
        {},
    )
    assert params.max_size == 200 * 1024**3 and params.part_size == 16 * 1024**2
    assert params.concurrency == 16 and not params.stale_if_error
    assert params.source == "s3://bucket/models/add"


BAD = [
    ("cache_dir", "relative/path"),
    ("cache_dir", ""),
    ("max_size", "lots"),
    ("max_size", "-1GB"),
    ("verify", "sha256"),
    ("stale_if_error", "maybe"),
    ("prefetch", "sometimes"),
    ("concurrency", "0"),
    ("concurrency", "257"),
    ("concurrency", "four"),
    ("part_size", "1KB"),
    ("part_size", "2GiB"),
    ("timeout", "0.5"),
    ("timeout", "soon"),
    ("shared_cache", "ftp://x/y"),
    ("shared_cache", "relative/dir"),
    ("versions", "latest"),
    ("on_unload", "delete"),
    ("source", "ftp://x/y"),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_every_parameter_rejects_bad_values_naming_model_parameter_and_accepted(key, value):
    with pytest.raises(InvalidParameterError) as info:
        parse_params({key: value}, "resnet", {})
    message = str(info.value)
    assert "model 'resnet'" in message
    assert f"'{key}'" in message
    assert "accepted" in message


def test_every_parameter_has_a_bad_value_test():
    assert {key for key, _ in BAD} == set(PARAMETERS)


def test_unknown_parameter_lists_accepted_keys():
    with pytest.raises(InvalidParameterError) as info:
        parse_params({"cache_size": "1GB"}, "m", {})
    message = str(info.value)
    assert "unknown cacheagent parameter 'cache_size'" in message
    for key in PARAMETERS:
        assert key in message


def test_cache_dir_naming_an_unknown_user_is_a_parameter_error():
    # Found by Hypothesis: Path("~0").expanduser() raises RuntimeError.
    with pytest.raises(InvalidParameterError, match="names no known user"):
        parse_params({"cache_dir": "~0"}, "m", {})
