"""The one settings type: validation, immutability, and the budget rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cacheagent.cache import Cache
from cacheagent.errors import InvalidParameterError
from cacheagent.settings import (
    FIELDS,
    Settings,
    effective_budget,
    node_budget,
    parse_value,
    settings_from,
)


def test_settings_are_immutable_values() -> None:
    """A Settings can never be changed in place: a variant is a new value."""
    base = Settings(cache_dir=Path("/c"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.verify = "hash"  # type: ignore[misc]
    variant = base.replace(verify="hash")
    assert base.verify == "size" and variant.verify == "hash"


def test_a_cache_carries_no_mutable_per_model_settings(tmp_path: Path) -> None:
    """Settings travel with each call: the shared Cache has no settings to overwrite."""
    with Cache(tmp_path / "c", verify="hash") as cache:
        for name in ("max_size", "verify_mode", "stale_if_error", "fetch_settings"):
            assert not hasattr(cache, name), name
        with pytest.raises(dataclasses.FrozenInstanceError):
            cache.defaults.verify = "none"  # type: ignore[misc]
        assert cache.defaults.verify == "hash"


def test_api_values_are_validated_like_config_text() -> None:
    """Settings built in Python are checked with the same words as a config value."""
    with pytest.raises(InvalidParameterError, match=r"'concurrency'.*accepted"):
        Settings(cache_dir=Path("/c"), concurrency=0)
    with pytest.raises(InvalidParameterError, match="absolute path"):
        Settings(cache_dir=Path("relative"))
    with pytest.raises(InvalidParameterError, match="'verify'"):
        Settings(cache_dir=Path("/c"), verify="sha256")


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("max_size", "none", None),
        ("max_size", "200GiB", 200 * 2**30),
        ("timeout", "5", 5.0),
        ("timeout", "90s", 90.0),
        ("concurrency", "128", 128),
        ("stale_if_error", "off", False),
    ],
)
def test_parse_value_reads_text(name: str, text: str, value: object) -> None:
    """Each field's parser turns the documented forms into typed values."""
    assert parse_value(name, text) == value


@pytest.mark.parametrize(
    ("name", "text"),
    [("timeout", "0"), ("timeout", "nan"), ("timeout", "4000"), ("concurrency", "257")],
)
def test_parse_value_refuses_out_of_range_naming_where(name: str, text: str) -> None:
    """A refusal names where the value came from and what is accepted."""
    with pytest.raises(InvalidParameterError) as info:
        parse_value(name, text, where=f"--{name}")
    message = str(info.value)
    assert f"--{name}" in message and FIELDS[name].doc in message


def test_settings_from_takes_cache_dir_from_env(tmp_path: Path) -> None:
    """Without cache_dir, the environment's CACHEAGENT_CACHE_DIR is the default."""
    settings = settings_from({"verify": "hash"}, env={"CACHEAGENT_CACHE_DIR": str(tmp_path)})
    assert settings.cache_dir == tmp_path and settings.verify == "hash"


def test_budget_is_the_stricter_of_model_and_node() -> None:
    """A model's max_size can only narrow the node's budget, never widen it."""
    assert effective_budget(None, None) is None
    assert effective_budget(5, None) == 5
    assert effective_budget(None, 7) == 7
    assert effective_budget(9, 7) == 7 and effective_budget(3, 7) == 3
    assert node_budget({"CACHEAGENT_MAX_SIZE": "1GiB"}) == 2**30
    assert node_budget({}) is None
    with pytest.raises(InvalidParameterError, match="CACHEAGENT_MAX_SIZE"):
        node_budget({"CACHEAGENT_MAX_SIZE": "lots"})


def test_cache_budget_uses_the_node_budget_from_its_environment(tmp_path: Path) -> None:
    """Cache.budget combines the call's max_size with $CACHEAGENT_MAX_SIZE."""
    env = {"CACHEAGENT_MAX_SIZE": "10MB"}
    with Cache(tmp_path / "c", env=env) as cache:
        assert cache.budget() == 10_000_000
        assert cache.budget(cache.defaults.replace(max_size=1_000_000)) == 1_000_000
        assert cache.budget(cache.defaults.replace(max_size=50_000_000)) == 10_000_000


def test_public_api_is_exported_lazily() -> None:
    """``from cacheagent import Cache`` works; ``import cacheagent`` opens no index."""
    import subprocess
    import sys

    probe = (
        "import sys, cacheagent; lazy = 'cacheagent.cache' not in sys.modules; "
        "from cacheagent import Cache, Snapshot, Settings, CacheAgentError; "
        "import cacheagent.cache as c; "
        "names = set(cacheagent._LAZY) | {'__version__'}; "
        "print(lazy, Cache is c.Cache, set(cacheagent.__all__) == names)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]
