"""Stub repositories on real directories: configs only, the agent fetches from source."""

import os

import pytest

from cacheagent.cli.main import main
from cacheagent.errors import InvalidParameterError
from cacheagent.triton import actions
from cacheagent.triton.config import ConfigError, agent_parameters, parse_config
from cacheagent.triton.stub import stub_config, write_stub
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


def test_stub_config_keeps_the_config_and_sets_source():
    text = stub_config(CONFIG, "s3://bucket/repo/add", {"cache_dir": "/var/cache/ca"})
    config = parse_config(text)
    assert agent_parameters(config) == {
        "max_size": "1GB",
        "cache_dir": "/var/cache/ca",
        "source": "s3://bucket/repo/add",
    }
    assert config.backend == "python" and config.input[0].name == "INPUT0"
    # Only the agent section changes: a string that looks like one stays as it was.
    note = config.parameters["note"].string_value
    assert note == "has a } brace and model_repository_agents"
    assert [a.name for a in config.model_repository_agents.agents] == ["cacheagent"]
    assert recorded_digest(text)[0] == "s3://bucket/repo/add"


CHAINED = b"""name: "add"
backend: "python"
model_repository_agents {
  agents [
    { name: "checksum", parameters [ { key: "MD5:1/model.py", value: "0123" } ] },
    { name: "cacheagent", parameters [ { key: "max_size", value: "1GB" } ] },
    { name: "decrypt", parameters [ { key: "key_file", value: "/k" } ] }
  ]
}
"""


def test_stub_keeps_every_other_agent_in_order_after_cacheagent():
    # Issue 10.13: a stub once kept cacheagent alone and dropped the checksum agent.
    text = stub_config(CHAINED, "s3://bucket/repo/add", {"max_size": "5GB", "cache_dir": "/c"})
    agents = parse_config(text).model_repository_agents.agents
    assert [a.name for a in agents] == ["cacheagent", "checksum", "decrypt"]
    # The model's own cacheagent parameters win over the stub's.
    assert dict(agents[0].parameters) == {
        "max_size": "1GB",
        "cache_dir": "/c",
        "source": "s3://bucket/repo/add",
    }
    assert dict(agents[1].parameters) == {"MD5:1/model.py": "0123"}
    assert dict(agents[2].parameters) == {"key_file": "/k"}


def test_stub_adds_cacheagent_first_where_the_model_has_only_other_agents():
    remote = b'name: "add"\nmodel_repository_agents { agents { name: "checksum" } }\n'
    agents = parse_config(stub_config(remote, "gs://b/add", {})).model_repository_agents.agents
    assert [a.name for a in agents] == ["cacheagent", "checksum"]
    assert dict(agents[0].parameters) == {"source": "gs://b/add"}


def test_stub_refuses_a_config_triton_refuses():
    with pytest.raises(ConfigError, match=r"line 2, column 1: 'max_batch_sise' is no field"):
        stub_config(b'name: "add"\nmax_batch_sise: 8\n', "s3://b/add", {})


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
    config = agent_parameters(parse_config((stub / "add" / "config.pbtxt").read_text()))
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
    stubbed = (tmp_path / "stub" / "mul" / "config.pbtxt").read_text()
    params = agent_parameters(parse_config(stubbed))
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
    labels = f'{{cache_dir="{tmp_path / "c"}"}}'
    assert f"cacheagent_misses_total{labels} 1" in text
    assert "# TYPE cacheagent_hits_total counter" in text
    assert f"cacheagent_cache_max_size_bytes{labels} 1000000000" in text
    assert list(target.parent.iterdir()) == [target]
