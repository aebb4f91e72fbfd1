"""``cacheagent check`` on real local repositories.

Every rule has a repository that breaks it and a test that the finding names
the model, the path and what to do; the good repository yields no error and
no warning. What Triton's schema refuses, the check refuses with line and
column (the reader itself is tested in test_config.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cacheagent.errors import InvalidLocationError, RemoteNotFoundError
from cacheagent.triton import check as check_module
from cacheagent.triton.check import (
    CheckReport,
    Finding,
    check_repository,
    format_report,
    report_json,
)

# --------------------------------------------------------------------------- repositories

ENV = {"CACHEAGENT_CACHE_DIR": "/var/cache/cacheagent-test"}
AGENT = (
    'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
    '{ key: "max_size", value: "10GiB" }, { key: "concurrency", value: "8" } ] } ] }\n'
)


def config(name: str, backend: str = 'backend: "python"', extra: str = "", agent: str = AGENT):
    return f'name: "{name}"\n{backend}\n{extra}\n{agent}'


def write(root: Path, files: dict[str, str | bytes | None]) -> Path:
    """Create files (None = an empty directory) below root."""
    for rel, content in files.items():
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def good_repo(root: Path) -> Path:
    return write(
        root,
        {
            "add/config.pbtxt": config("add"),
            "add/1/model.py": "print('v1')\n",
            "add/1/weights.bin": os.urandom(64),
            "add/configs/fast.pbtxt": config("add", extra="max_batch_size: 4"),
            "add/warmup/sample.bin": b"0",
            "add/labels.txt": "a\nb\n",
            "resnet/config.pbtxt": config(
                "resnet",
                'platform: "tensorrt_plan"',
                "version_policy: { latest: { num_versions: 2 } }",
            ),
            "resnet/2/model.plan": b"plan",
            "resnet/3/model.plan": b"plan",
            "detector/config.pbtxt": config("detector", 'backend: "onnxruntime"'),
            "detector/1/model.onnx/model.onnx": b"onnx as a directory",
            "pipeline/config.pbtxt": config("pipeline", 'platform: "ensemble"'),
            "pipeline/1": None,
        },
    )


def run(root: Path) -> CheckReport:
    return check_repository(str(root), env=ENV)


def only(report: CheckReport, severity: str, model: str | None = None) -> list[Finding]:
    return [
        f for f in report.findings if f.severity == severity and (model is None or f.model == model)
    ]


def test_good_repository_passes_and_reads_only_configs(tmp_path):
    report = run(good_repo(tmp_path / "repo"))
    assert report.layout == "repository"
    assert report.models == ["add", "detector", "pipeline", "resnet"]
    assert only(report, "error") == [] and only(report, "warning") == [], report.findings
    assert report.ok
    assert report.files_read == [
        "add/config.pbtxt",
        "add/configs/fast.pbtxt",
        "detector/config.pbtxt",
        "pipeline/config.pbtxt",
        "resnet/config.pbtxt",
    ]
    # Served locally, cacheagent has nothing to do: said once per config, as a note.
    notes = only(report, "info")
    assert notes and all("local path untouched" in f.message for f in notes)


def test_model_without_version_directory_is_an_error(tmp_path):
    repo = write(tmp_path / "repo", {"m/config.pbtxt": config("m"), "m/model.py": "x"})
    (finding,) = only(run(repo), "error")
    assert finding.model == "m" and finding.path == "m"
    assert "no version directory" in finding.message and "m/1/" in finding.message


def test_ignored_directories_are_warnings(tmp_path):
    repo = good_repo(tmp_path / "repo")
    write(repo, {"add/01/model.py": "x", "add/extra/x": "x", "add/2a/model.py": "x"})
    report = run(repo)
    warnings = {f.path: f.message for f in only(report, "warning", "add")}
    assert set(warnings) == {"add/01", "add/extra", "add/2a"}
    assert "start with a zero" in warnings["add/01"] and "rename it to '1'" in warnings["add/01"]
    assert "no version number" in warnings["add/extra"]
    assert "as version 2" in warnings["add/2a"]
    assert report.ok  # warnings do not fail the check


def test_missing_config_is_a_note_with_a_guessed_backend(tmp_path):
    repo = write(tmp_path / "repo", {"auto/1/model.onnx": b"x", "plain/1/weights.bin": b"x"})
    report = run(repo)
    notes = {f.model: f.message for f in only(report, "info")}
    assert "no config.pbtxt" in notes["auto"] and "onnxruntime" in notes["auto"]
    assert "no file name gives the backend away" in notes["plain"]
    assert report.ok and report.files_read == []


def test_unparsable_configs_are_errors_naming_the_file_and_line(tmp_path):
    repo = good_repo(tmp_path / "repo")
    write(
        repo, {"add/configs/broken.pbtxt": 'name: "add"\ninput {\n', "add/configs/notes.txt": "x"}
    )
    (finding,) = only(run(repo), "error")
    assert finding.path == "add/configs/broken.pbtxt"
    assert "line 3" in finding.message and "fix the syntax" in finding.message


def test_an_alternative_config_with_another_backend_checks_its_own_model_files(tmp_path):
    repo = good_repo(tmp_path / "repo")
    write(repo, {"add/configs/gpu.pbtxt": config("add", 'platform: "tensorrt_plan"')})
    (finding,) = only(run(repo), "error")
    assert finding.path == "add/1/" and "has no model.plan" in finding.message
    assert "configs/gpu.pbtxt" in finding.message


def test_config_name_must_match_the_directory(tmp_path):
    repo = good_repo(tmp_path / "repo")
    write(repo, {"add/config.pbtxt": config("plus")})
    (finding,) = only(run(repo), "error")
    assert finding.path == "add/config.pbtxt"
    assert "'plus'" in finding.message and 'set name: "add"' in finding.message


@pytest.mark.parametrize(
    ("backend", "files", "missing"),
    [
        ('platform: "tensorrt_plan"', {}, "model.plan"),
        ('backend: "tensorrt"', {}, "model.plan"),
        ('platform: "onnxruntime_onnx"', {}, "model.onnx"),
        ('backend: "pytorch"', {}, "model.pt"),
        ('platform: "pytorch_libtorch"', {}, "model.pt"),
        ('platform: "tensorflow_graphdef"', {}, "model.graphdef"),
        ('platform: "tensorflow_savedmodel"', {}, "model.savedmodel"),
        ('backend: "openvino"', {"1/model.xml": "x"}, "model.bin"),
        ('backend: "openvino"', {"1/model.bin": "x"}, "model.xml"),
        ('backend: "python"', {"1/helper.py": "x"}, "model.py"),
        ('backend: "dali"', {}, "model.dali"),
    ],
)
def test_each_backend_needs_its_default_model_file(tmp_path, backend, files, missing):
    repo = write(
        tmp_path / "repo",
        {"m/config.pbtxt": config("m", backend), "m/1/other.bin": "x"}
        | {f"m/{k}": v for k, v in files.items()},
    )
    (finding,) = only(run(repo), "error")
    assert finding.path == "m/1/" and f"has no {missing}" in finding.message
    assert "default_model_filename" in finding.message


@pytest.mark.parametrize(
    ("backend", "files"),
    [
        ('platform: "tensorrt_plan"', {"1/model.plan": "x"}),
        ('platform: "onnxruntime_onnx"', {"1/model.onnx": "x"}),
        ('backend: "onnxruntime"', {"1/model.onnx/model.onnx": "x"}),
        ('backend: "pytorch"', {"1/model.pt": "x"}),
        ('platform: "tensorflow_graphdef"', {"1/model.graphdef": "x"}),
        ('platform: "tensorflow_savedmodel"', {"1/model.savedmodel/saved_model.pb": "x"}),
        ('backend: "tensorflow"', {"1/model.savedmodel/saved_model.pb": "x"}),
        ('backend: "openvino"', {"1/model.xml": "x", "1/model.bin": "x"}),
        ('backend: "dali"', {"1/model.dali": "x"}),
        ('platform: "ensemble"', {"1": None}),
    ],
)
def test_each_backend_passes_with_its_default_model_file(tmp_path, backend, files):
    repo = write(
        tmp_path / "repo",
        {"m/config.pbtxt": config("m", backend)} | {f"m/{k}": v for k, v in files.items()},
    )
    report = run(repo)
    assert report.ok and not only(report, "warning"), report.findings


def test_a_savedmodel_file_is_not_a_savedmodel_directory(tmp_path):
    repo = write(
        tmp_path / "repo",
        {
            "m/config.pbtxt": config("m", 'platform: "tensorflow_savedmodel"'),
            "m/1/model.savedmodel": "not a directory",
        },
    )
    (finding,) = only(run(repo), "error")
    assert finding.path == "m/1/model.savedmodel"
    assert "is a file" in finding.message and "needs a directory" in finding.message


def test_default_model_filename_overrides_the_expected_name(tmp_path):
    files = {
        "m/config.pbtxt": config("m", 'backend: "python"', 'default_model_filename: "serve.py"'),
        "m/1/model.py": "x",
    }
    (finding,) = only(run(write(tmp_path / "a", files)), "error")
    assert "has no serve.py" in finding.message
    files["m/1/serve.py"] = "x"
    assert run(write(tmp_path / "b", files)).ok


def test_only_the_versions_the_policy_loads_are_checked(tmp_path):
    files = {"m/config.pbtxt": config("m"), "m/1/old.txt": "x", "m/2/model.py": "x"}
    # The default policy (latest 1) loads version 2 only: version 1's gap does not matter.
    assert run(write(tmp_path / "a", files)).ok
    files["m/config.pbtxt"] = config("m", extra="version_policy: { all: {} }")
    (finding,) = only(run(write(tmp_path / "b", files)), "error")
    assert finding.path == "m/1/" and "version 1" in finding.message


def test_specific_versions_that_do_not_exist(tmp_path):
    files = {
        "m/config.pbtxt": config("m", extra="version_policy { specific { versions: [1, 4] } }"),
        "m/1/model.py": "x",
    }
    report = run(write(tmp_path / "a", files))
    (warning,) = only(report, "warning")
    assert "version 4" in warning.message and report.ok
    files["m/config.pbtxt"] = config("m", extra="version_policy { specific { versions: 7 } }")
    (error,) = only(run(write(tmp_path / "b", files)), "error")
    assert "selects none of the existing versions (1)" in error.message


def test_version_policy_with_two_choices_is_an_error(tmp_path):
    files = {
        "m/config.pbtxt": config("m", extra="version_policy { all {} latest { num_versions: 1 } }"),
        "m/1/model.py": "x",
    }
    (error,) = only(run(write(tmp_path / "a", files)), "error")
    assert "all and latest" in error.message


def test_unknown_backend_is_only_a_note(tmp_path):
    repo = write(tmp_path / "r", {"m/config.pbtxt": config("m", 'backend: "vllm"'), "m/1/x": "x"})
    report = run(repo)
    assert report.ok and not only(report, "warning")
    assert any("backend 'vllm' is not one this check knows" in f.message for f in report.findings)


def test_bad_agent_parameter_is_an_error_with_the_parameter_text(tmp_path):
    agent = (
        'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
        '{ key: "max_size", value: "lots" } ] } ] }'
    )
    repo = good_repo(tmp_path / "repo")
    write(repo, {"add/config.pbtxt": config("add", agent=agent)})
    (finding,) = only(run(repo), "error")
    assert finding.path == "add/config.pbtxt"
    assert "model 'add': cacheagent parameter 'max_size' = 'lots' is not valid" in finding.message
    assert "accepted" in finding.message


def test_unknown_agent_parameter_and_unquoted_value_are_errors(tmp_path):
    unknown = 'model_repository_agents { agents { name: "cacheagent" parameters { key: "size" value: "1" } } }'  # noqa: E501
    unquoted = 'model_repository_agents { agents { name: "cacheagent" parameters { key: "concurrency" value: 4 } } }'  # noqa: E501
    repo = write(
        tmp_path / "repo",
        {
            "a/config.pbtxt": config("a", agent=unknown),
            "a/1/model.py": "x",
            "b/config.pbtxt": config("b", agent=unquoted),
            "b/1/model.py": "x",
        },
    )
    write(repo, {"c/config.pbtxt": config("c", agent=AGENT.replace('"cacheagent"', "cacheagent"))})
    write(repo, {"c/1/model.py": "x"})
    report = run(repo)
    errors = {f.model: f.message for f in only(report, "error")}
    assert set(errors) == {"a", "b", "c"}
    assert "must be quoted" in errors["c"]
    assert "unknown cacheagent parameter 'size'" in errors["a"]
    assert "both in quotes" in errors["b"] and "concurrency" in errors["b"]


def test_model_without_the_agent_gets_a_note(tmp_path):
    repo = write(tmp_path / "repo", {"m/config.pbtxt": config("m", agent=""), "m/1/model.py": "x"})
    report = run(repo)
    (note,) = only(report, "info")
    assert (
        "does not enable cacheagent" in note.message and "model_repository_agents" in note.message
    )
    assert report.ok


def test_unknown_and_duplicated_fields(tmp_path):
    # Triton's parser refuses a field it does not know (an older check only warned),
    # and a single-valued field set twice; repeated fields may repeat.
    unknown = config("a", extra="max_batch_sise: 4\ninstance_group {}\ninstance_group {}")
    twice = config("b", extra='backend: "python"\ninstance_group {}\ninstance_group {}')
    repo = write(
        tmp_path / "repo",
        {
            "a/config.pbtxt": unknown,
            "a/1/model.py": "x",
            "b/config.pbtxt": twice,
            "b/1/model.py": "x",
        },
    )
    report = run(repo)
    assert not only(report, "warning")
    errors = {f.model: f for f in only(report, "error")}
    assert set(errors) == {"a", "b"}
    assert errors["a"].path == "a/config.pbtxt"
    assert "'max_batch_sise' is no field" in errors["a"].message
    assert "line 3, column 1" in errors["a"].message
    assert "did you mean 'max_batch_size'" in errors["a"].message
    assert "'backend' is set more than once" in errors["b"].message
    assert "line 3," in errors["b"].message


@pytest.mark.parametrize(
    ("extra", "line", "column", "needles"),
    [
        (
            "instance_group [ { kind: KIND_GPUU } ]",
            3,
            26,
            ["KIND_GPUU is no value", "did you mean 'KIND_GPU'", "KIND_CPU"],
        ),
        ("max_batch_sise: 8", 3, 1, ["'max_batch_sise' is no field", "'max_batch_size'"]),
        (
            "dynamic_batching { max_queue_delay_microsecondz: 100 }",
            3,
            20,
            ["'max_queue_delay_microsecondz' is no field of ModelDynamicBatching"],
        ),
        ("max_batch_size: 3000000000", 3, 17, ["out of range"]),
        ("max_batch_size: 8.5", 3, 17, ["integer"]),
        ('input [ { name: "x" dims: [ 1, 2, ] } ]', 3, 35, ["integer", "fix the syntax"]),
        ("dynamic_batching { } sequence_batching { }", 3, 22, ["sets dynamic_batching and"]),
        ("default_model_filename: model.onnx", 3, 25, ["must be quoted"]),
        ("platform: 7", 3, 11, ["must be quoted"]),
    ],
)
def test_what_triton_refuses_is_an_error_with_line_and_column(
    tmp_path, extra, line, column, needles
):
    repo = write(
        tmp_path / "repo", {"m/config.pbtxt": config("m", extra=extra), "m/1/model.py": "x"}
    )
    (error,) = only(run(repo), "error")
    assert error.path == "m/config.pbtxt"
    assert f"line {line}, column {column}:" in error.message, error.message
    assert all(needle in error.message for needle in needles), error.message


def test_unsafe_object_names_are_errors(tmp_path):
    repo = good_repo(tmp_path / "repo")
    write(repo, {"add/1/evil\\name.bin": "x"})
    (finding,) = only(run(repo), "error")
    assert finding.model == "add" and finding.path == "add/1/evil\\name.bin"
    assert "refusing object name" in finding.message and "rename" in finding.message


def test_a_single_model_directory_is_recognised(tmp_path):
    repo = good_repo(tmp_path / "repo")
    report = run(repo / "resnet")
    assert report.layout == "model" and report.models == ["resnet"]
    assert report.ok and report.files_read == ["config.pbtxt"]
    assert "one model directory ('resnet')" in format_report(report)
    # Without config.pbtxt, numeric directories give a model directory away.
    auto = write(tmp_path / "auto", {"1/model.onnx": b"x"})
    assert run(auto).layout == "model"


def test_a_repository_whose_models_have_no_config_is_still_a_repository(tmp_path):
    repo = write(tmp_path / "repo", {"a/1/model.onnx": b"x", "b/config.pbtxt": config("b")})
    assert run(repo).layout == "repository"


def test_oversized_config_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(check_module, "MAX_CONFIG_BYTES", 64)
    repo = write(tmp_path / "repo", {"m/config.pbtxt": config("m"), "m/1/model.py": "x"})
    report = run(repo)
    (error,) = only(report, "error")
    assert "too large" in error.message and report.files_read == []


def test_missing_location_and_a_file_location(tmp_path):
    with pytest.raises(RemoteNotFoundError, match="nothing found"):
        run(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidLocationError, match="is a file"):
        run(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RemoteNotFoundError, match="empty"):
        run(tmp_path / "empty")
    report = run(write(tmp_path / "readme", {"README.md": "models go here"}))
    assert not report.ok and "no model directory" in only(report, "error")[0].message


def test_report_json_and_text(tmp_path):
    repo = good_repo(tmp_path / "repo")
    write(repo, {"add/config.pbtxt": config("plus"), "add/01/x": "x"})
    report = run(repo)
    data = json.loads(json.dumps(report_json(report)))
    assert set(data) >= {"location", "models", "findings", "errors", "warnings", "ok"}
    assert data["location"] == str(repo) and data["ok"] is False
    assert data["errors"] == 1 and data["warnings"] == 1
    assert {"severity", "model", "path", "message"} == set(data["findings"][0])
    # Errors sort first within a model.
    add = [f for f in data["findings"] if f["model"] == "add"]
    assert add[0]["severity"] == "error"
    text = format_report(report)
    assert "a model repository of 4 models" in text
    assert "ERROR   add/config.pbtxt:" in text and "WARNING add/01:" in text
    assert text.splitlines()[-1].endswith("FAILED")
    assert "resnet: ok" in text
