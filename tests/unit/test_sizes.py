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
