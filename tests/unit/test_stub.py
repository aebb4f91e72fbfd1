"""Stub repositories on real directories: configs only, the agent fetches from source."""

import os

import pytest

from cacheagent.cli.main import main
from cacheagent.errors import InvalidParameterError
from cacheagent.triton import actions, pbtxt
from cacheagent.triton.prefetch import agent_parameters
from cacheagent.triton.stub import strip_field, stub_config, write_stub
from cacheagent.triton.stubmark import recorded_digest
from harness.agent_requests import agent_request

CONFIG = b"""name: "add"  # the model
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
model_repository_agents {
  agents [ { name: "cacheagent", parameters [ { key: "max_size", value: "1GB" } ] } ]
}
parameters { key: "note" value: { string_value: "has a } brace and model_repository_agents" } }
"""


def test_strip_field_removes_only_the_top_level_block():
    text = CONFIG.decode()
    stripped = strip_field(text, "model_repository_agents")
    assert "agents [" not in stripped
    assert 'string_value: "has a } brace and model_repository_agents"' in stripped
    assert pbtxt.parse(stripped).first("name") == "add"


def test_stub_config_keeps_the_config_and_sets_source():
    text = stub_config(CONFIG, "s3://bucket/repo/add", {"cache_dir": "/var/cache/ca"})
    config = pbtxt.parse(text)
    assert agent_parameters(config) == {
        "max_size": "1GB",
        "cache_dir": "/var/cache/ca",
        "source": "s3://bucket/repo/add",
    }
    assert config.first("backend") == "python" and config.has("input")
    assert recorded_digest(text)[0] == "s3://bucket/repo/add"


def make_repo(root):
    for name in ("add", "mul"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text("# model")
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n')
    (root / "broken").mkdir()
    (root / "broken" / "config.pbtxt").write_text("name: {{{")
    (root / "noconfig").mkdir()
    return root


def test_write_stub_writes_configs_and_reports_skips(tmp_path):
    repo = make_repo(tmp_path / "repo")
    report = write_stub(str(repo), tmp_path / "stub", {"cache_dir": str(tmp_path / "c")})
    assert report.written == ["add", "mul"]
    assert set(report.skipped) == {"broken", "noconfig"}
    assert sorted(os.listdir(tmp_path / "stub" / "add")) == ["config.pbtxt"]
    with pytest.raises(InvalidParameterError):
        write_stub(str(repo), tmp_path / "stub2", {"max_size": "huge"})


def test_stub_load_fetches_from_source_and_warns_when_remote_config_changes(tmp_path):
    repo = make_repo(tmp_path / "repo")
    stub = tmp_path / "stub"
    write_stub(str(repo), stub, {"cache_dir": str(tmp_path / "c"), "prefetch": "false"})
    config = agent_parameters(pbtxt.parse((stub / "add" / "config.pbtxt").read_text()))
    logs = []
    request = agent_request("LOAD", stub / "add", config, artifact="FILESYSTEM")
    path = actions.handle(request, lambda level, msg: logs.append((level, msg)))
    assert (tmp_path / "c") in __import__("pathlib").Path(path).parents
    assert not [m for lvl, m in logs if lvl == "WARN"]
    (repo / "add" / "config.pbtxt").write_text(
        'name: "add"\nbackend: "python"\nmax_batch_size: 8\n'
    )
    logs.clear()
    actions.handle(request, lambda level, msg: logs.append((level, msg)))
    warnings = [m for lvl, m in logs if lvl == "WARN"]
    assert len(warnings) == 1 and "run 'cacheagent stub' again" in warnings[0]
    actions._CACHES.clear()


def test_cli_stub_and_prometheus_stats(tmp_path, capsys):
    repo = make_repo(tmp_path / "repo")
    code = main(
        [
            "stub",
            str(repo),
            "--out",
            str(tmp_path / "stub"),
            "--param",
            "max_size=5GB",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "2 model(s) stubbed" in out and "skipped broken" in out
    params = agent_parameters(pbtxt.parse((tmp_path / "stub" / "mul" / "config.pbtxt").read_text()))
    assert params["max_size"] == "5GB" and params["cache_dir"] == str(tmp_path / "c")
    assert main(["stub", str(repo), "--out", str(tmp_path / "s2"), "--param", "oops"]) == 2
    main(["warm", str(repo / "add"), "--cache-dir", str(tmp_path / "c")])
    target = tmp_path / "metrics" / "cacheagent.prom"
    assert (
        main(
            [
                "stats",
                "--cache-dir",
                str(tmp_path / "c"),
                "--format",
                "prometheus",
                "--output",
                str(target),
                "--max-size",
                "1GB",
            ]
        )
        == 0
    )
    text = target.read_text()
    assert "cacheagent_misses_total 1" in text and "# TYPE cacheagent_hits_total counter" in text
    assert "cacheagent_cache_max_size_bytes 1000000000" in text
    assert list(target.parent.iterdir()) == [target]
