import pytest

from cacheagent.errors import CacheAgentError, InvalidParameterError
from cacheagent.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("500MB", 500_000_000),
        ("200GiB", 200 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("64 KiB", 65536),
        ("10b", 10),
        ("3tib", 3 * 1024**4),
        (42, 42),
    ],
)
def test_parse_size_accepts_documented_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-5", "5XB", "1.2.3GB", "GB", True, -1])
def test_parse_size_rejects_garbage_with_accepted_forms(text):
    with pytest.raises(InvalidParameterError) as info:
        parse_size(text, name="max_size")
    assert "max_size" in str(info.value)
    assert "200GiB" in str(info.value)
    assert isinstance(info.value, CacheAgentError) and isinstance(info.value, ValueError)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200Gi", 200 * 1024**3),
        ("500Mi", 500 * 1024**2),
        ("1Ki", 1024),
        ("1.5Ti", 3 * 1024**4 // 2),
        ("2Pi", 2 * 1024**5),
        ("1k", 1000),
        ("1M", 1000**2),
        ("1G", 1000**3),
        ("1T", 1000**4),
        ("4611686018427387904", 2**62),  # exact: no float rounding at the top of the range
        ("0.5Ki", 512),
    ],
)
def test_parse_size_accepts_kubernetes_quantities(text, expected):
    assert parse_size(text) == expected


def test_huge_sizes_are_refused_not_crashed():
    for text in ("9" * 5000, "9" * 25, "5Ei"):
        with pytest.raises(InvalidParameterError, match=r"larger than any disk|not a size"):
            parse_size(text)
    assert parse_size("1." + "9" * 5000) == 1  # a long fraction is read, not refused


def test_a_models_max_size_in_kubernetes_form_loads():
    from cacheagent.settings import parse_value
    from cacheagent.triton.params import parse_params

    assert parse_params({"max_size": "200Gi"}, "m").max_size == 200 * 1024**3
    assert parse_value("max_size", "none") is None
    assert parse_value("part_size", "8Mi") == 8 * 1024**2


def test_cli_max_size_takes_kubernetes_form_and_none(tmp_path, capsys):
    from cacheagent.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(["warm", "x", "--max-size", "200Gi"])
    assert args.max_size == 200 * 1024**3
    assert parser.parse_args(["warm", "x", "--max-size", "none"]).max_size is None
    assert parser.parse_args(["evict", "--max-size", "1.5Ti"]).max_size == 3 * 1024**4 // 2
