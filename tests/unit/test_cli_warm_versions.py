"""`cacheagent warm` selects versions as the agent's LOAD does, so a warmed node hits (issue 10)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cacheagent.cache import Cache
from cacheagent.cli.main import main
from cacheagent.triton import actions
from cacheagent.triton.layout import version_dirs, version_selection
from harness.agent_requests import agent_request

LATEST_2 = "version_policy: { latest: { num_versions: 2 } }\n"


def model_with_versions(tmp_path: Path, config_extra: str = LATEST_2) -> Path:
    model = tmp_path / "repo" / "m"
    for version in (1, 2, 3):
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "w.bin").write_bytes(os.urandom(1000 + version))
    (model / "config.pbtxt").write_text(f'name: "m"\nbackend: "python"\n{config_extra}')
    return model


def warm(capsys: pytest.CaptureFixture[str], model: Path, cache: Path, *flags: str) -> dict:
    capsys.readouterr()
    assert main(["warm", str(model), "--cache-dir", str(cache), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def versions_of(cache: Path, key: str) -> list[str]:
    with Cache(cache) as c:
        record = c.index.get_snapshot(key)
        return version_dirs([row[0] for row in record.files], record.empty_dirs)


def test_warm_then_the_agents_first_load_is_a_hit_with_the_same_key(tmp_path, capsys):
    model, cache = model_with_versions(tmp_path), tmp_path / "c"
    warmed = warm(capsys, model, cache)
    assert warmed["hit"] is False and versions_of(cache, warmed["key"]) == ["2", "3"]
    # Triton's LOAD: the config arrives as JSON, the policy in Triton's shape.
    params = {"cache_dir": str(cache), "prefetch": "false"}
    request = agent_request("LOAD", model, params, model="m")
    request["config"] = {"name": "m", "version_policy": {"latest": {"num_versions": 2}}}
    lines: list[str] = []
    path = actions.handle(request, lambda level, text: lines.append(text))
    assert path == warmed["path"] and any(" HIT: " in line for line in lines), lines
    actions.handle({**request, "action": "UNLOAD_COMPLETE", "config": None}, lambda *a: None)
    # And through the API with LOAD's own selector: the same key, a hit.
    select, selection = version_selection(request["config"], "policy")
    with Cache(cache) as c:
        again = c.fetch(str(model), select=select, selection=selection)
    assert again.hit and again.key == warmed["key"]


def test_versions_all_overrides_the_policy(tmp_path, capsys):
    model, cache = model_with_versions(tmp_path), tmp_path / "c"
    everything = warm(capsys, model, cache, "--versions", "all")
    assert versions_of(cache, everything["key"]) == ["1", "2", "3"]
    assert warm(capsys, model, cache)["key"] != everything["key"]


def test_no_policy_means_triton_default_latest_one(tmp_path, capsys):
    model, cache = model_with_versions(tmp_path, config_extra=""), tmp_path / "c"
    assert versions_of(cache, warm(capsys, model, cache)["key"]) == ["3"]
    os.unlink(model / "config.pbtxt")  # no config at all: Triton's default again
    assert versions_of(cache, warm(capsys, model, cache)["key"]) == ["3"]


def test_the_configs_own_versions_parameter_is_honoured(tmp_path, capsys):
    agent = (
        'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
        '{ key: "versions", value: "all" } ] } ] }\n'
    )
    model, cache = model_with_versions(tmp_path, LATEST_2 + agent), tmp_path / "c"
    assert versions_of(cache, warm(capsys, model, cache)["key"]) == ["1", "2", "3"]


def test_a_bad_agent_parameter_fails_warm_as_it_would_fail_the_load(tmp_path, capsys):
    agent = (
        'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
        '{ key: "max_size", value: "lots" } ] } ] }\n'
    )
    model = model_with_versions(tmp_path, agent)
    assert main(["warm", str(model), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "max_size" in capsys.readouterr().err


def test_an_unparsable_config_warns_and_keeps_tritons_default(tmp_path, capsys):
    model = model_with_versions(tmp_path, config_extra="this is { not pbtxt\n")
    capsys.readouterr()
    assert main(["warm", str(model), "--cache-dir", str(tmp_path / "c"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "does not parse" in err and "latest 1" in err
    assert versions_of(tmp_path / "c", json.loads(out)["key"]) == ["3"]


@pytest.mark.parametrize(
    "policy",
    [
        None,
        {"all": {}},
        {"latest": {"num_versions": 2}},
        {"specific": {"versions": [1, 3]}},
    ],
)
def test_an_outage_keeps_the_last_snapshots_selection(tmp_path, policy):
    # What warm falls back to when config.pbtxt cannot be read: the selection (and its
    # name, which stale-if-error matches) of the source's newest snapshot.
    from cacheagent.cli.warm import _previous_selection

    model = model_with_versions(tmp_path, config_extra="")
    config = {"version_policy": policy} if policy else None
    select, name = version_selection(config, "policy")
    with Cache(tmp_path / "c") as cache:
        fetched = cache.fetch(str(model), select=select, selection=name)
        rebuilt = _previous_selection(cache, fetched.source)
        assert rebuilt is not None and rebuilt[1] == name
        again = cache.fetch(str(model), select=rebuilt[0], selection=rebuilt[1])
    assert again.hit and again.key == fetched.key
