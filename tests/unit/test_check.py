"""``cacheagent check`` on real local repositories, and the config.pbtxt reader it uses.

Every rule has a repository that breaks it and a test that the finding names
the model, the path and what to do; the good repository yields no error and
no warning. The reader is checked on realistic configs (against protobuf's own
parser where tritonclient's generated ModelConfig is installed), on malformed
input (a PbtxtError with a line number), and by property tests.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheagent.errors import CacheAgentError, InvalidLocationError, RemoteNotFoundError
from cacheagent.triton import check as check_module
from cacheagent.triton.check import (
    CheckReport,
    Finding,
    check_repository,
    format_report,
    report_json,
)
from cacheagent.triton.pbtxt import Identifier, Message, PbtxtError, parse

# --------------------------------------------------------------------------- the reader

REALISTIC = """
# A config as people write them: comments, both quote styles, lists, nesting.
name: "resnet"   # trailing comment
platform: 'onnxruntime_onnx'
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  }
]
output {
  name: 'OUTPUT__0'
  data_type: TYPE_FP32
  dims: [ 1000 ]
  label_filename: "labels.txt"
}
instance_group [
  { count: 2, kind: KIND_GPU, gpus: [ 0, 1 ] },
  { count: 1; kind: KIND_CPU }
]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
optimization { execution_accelerators {
  gpu_execution_accelerator : [ { name : "tensorrt"
    parameters { key: "precision_mode" value: "FP16" } } ] } }
parameters: { key: "escaped" value: { string_value: "tab\\there \\"q\\" \\x41\\101 \\u00e9" } }
model_repository_agents {
  agents [
    {
      name: "cacheagent",
      parameters [
        { key: "cache_dir", value: "/var/cache/cacheagent" },
        { key: "max_size", value: "200" 'GiB' }
      ]
    }
  ]
}
"""


def test_realistic_config_reads_every_field():
    config = parse(REALISTIC)
    assert config.first("name") == "resnet"
    assert config.first("platform") == "onnxruntime_onnx"
    assert config.first("max_batch_size") == 8
    policy = config.message("version_policy")
    assert policy is not None and policy.message("specific").all("versions") == [1, 3]
    (inp,) = config.all("input")
    assert inp.first("data_type") == "TYPE_FP32" and isinstance(inp.first("data_type"), Identifier)
    assert inp.all("dims") == [3, 224, 224]
    assert inp.message("reshape").all("shape") == [1, 3, 224, 224]
    assert config.message("output").first("name") == "OUTPUT__0"
    groups = config.all("instance_group")
    assert [g.first("count") for g in groups] == [2, 1]
    assert groups[0].all("gpus") == [0, 1] and groups[1].first("kind") == "KIND_CPU"
    accel = config.message("optimization").message("execution_accelerators")
    gpu = accel.message("gpu_execution_accelerator")
    assert gpu.first("name") == "tensorrt"
    assert gpu.message("parameters").first("value") == "FP16"
    escaped = config.message("parameters").message("value").first("string_value")
    assert escaped == 'tab\there "q" AA é'
    agent = config.message("model_repository_agents").message("agents")
    assert agent.first("name") == "cacheagent"
    params = {p.first("key"): p.first("value") for p in agent.all("parameters")}
    assert params == {"cache_dir": "/var/cache/cacheagent", "max_size": "200GiB"}
    assert config.line_of("instance_group") == 22  # the text starts with a newline


def test_realistic_config_agrees_with_protobuf():
    """protobuf's own text parser with Triton's schema reads the same values."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    proto = text_format.Parse(REALISTIC, model_config_pb2.ModelConfig())
    ours = parse(REALISTIC)
    assert proto.name == ours.first("name") and proto.platform == ours.first("platform")
    assert list(proto.version_policy.specific.versions) == [1, 3]
    assert [g.count for g in proto.instance_group] == [
        g.first("count") for g in ours.all("instance_group")
    ]
    assert list(proto.input[0].dims) == ours.message("input").all("dims")
    assert proto.parameters["escaped"].string_value == (
        ours.message("parameters").message("value").first("string_value")
    )
    agent = proto.model_repository_agents.agents[0]
    assert dict(agent.parameters) == {
        p.first("key"): p.first("value")
        for p in ours.message("model_repository_agents").message("agents").all("parameters")
    }


SYNTAX_CASES = [
    ("input { dims: [1, 2,] }", False),
    ("input { dims [1, 2] }", False),
    ("input { dims: [1 2] }", False),
    ("input { name: 'x' >", False),
    ("max_batch_size: 09", False),
    ("max_batch_size: 1abc", False),
    ('name: "\\u12"', False),
    ('name: "\\777"', False),
    ('name: "open', False),
    ("max_batch_size: 010", True),
    ("name: \"a\" 'b'", True),
    ("input [ ]", True),
    ('input: [ { name: "x" }, { name: "y" } ]', True),
    ('input < name: "x" >', True),
    ('input { name: "x" }; name: "m",', True),
    ("input { dims: [ -1 ] }  # comment", True),
    ('name: "\\x4\\101\\n"', True),
    ('parameters { key: "a" value { string_value: "b" } }', True),
]


@pytest.mark.parametrize(("text", "valid"), SYNTAX_CASES)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # protobuf's own, on \\777
def test_syntax_verdict_matches_protobuf(text, valid):
    """Where protobuf (with Triton's schema) refuses the syntax, so does the reader."""
    try:
        parse(text)
        ours = True
    except PbtxtError:
        ours = False
    assert ours == valid
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
        theirs = True
    except text_format.ParseError:
        theirs = False
    assert theirs == valid


def test_numbers_identifiers_and_angle_brackets():
    config = parse("a: -1.5e3 b: 0x1F c: 010 d: -inf e: true f: .5 g: 2f h < x: 1 > i: 0")
    assert config.to_python() == {
        "a": -1500.0,
        "b": 31,
        "c": 8,
        "d": "-inf",
        "e": "true",
        "f": 0.5,
        "g": 2.0,
        "h": {"x": 1},
        "i": 0,
    }
    assert isinstance(config.first("e"), Identifier)
    assert parse("").fields == [] and parse("# only a comment\n").fields == []
    assert parse(b'name: "caf\xc3\xa9"').first("name") == "café"


def test_repeated_fields_keep_every_occurrence_in_order():
    config = parse("versions: 1 versions: [2, 3] versions: 4 x { } x [ { y: 1 } ]")
    assert config.all("versions") == [1, 2, 3, 4]
    assert config.to_python()["versions"] == [1, 2, 3, 4]
    assert [isinstance(v, Message) for v in config.all("x")] == [True, True]
    assert config.lines_of("versions") == [1, 1, 1, 1]
    assert config.names() == ["versions", "x"]


MALFORMED = [
    ('name: "open', 1, "not closed"),
    ("name: 'a\"", 1, "not closed"),
    ('input {\n  name: "x"\n', 3, "closing '}'"),
    ("input { name: 1 >", 1, "expected a field name"),
    ("}", 1, "expected a field name"),
    ('name "x"', 1, "expected ':'"),
    ("dims [1, 2]", 1, "expected ':'"),
    ("dims: [1, 2,]", 1, "expected a value"),
    ("dims: [1 2]", 1, "expected ','"),
    ("dims: [[1]]", 1, "expected a value"),
    ("a: 1abc", 1, "malformed number"),
    ("a: 09", 1, "octal"),
    ('a: "\\q"', 1, "unknown escape"),
    ('a: "\\u12"', 1, "hex digits"),
    ('a: "\\777"', 1, "larger than one byte"),
    ("a: -x", 1, "number after '-'"),
    ("a: @", 1, "unexpected character"),
    ("[ext.field]: 1", 1, "extension"),
    ("\n\n  a: ", 3, "expected a value"),
    ("a { " * 150, 1, "nested deeper"),
]


@pytest.mark.parametrize(("text", "line", "needle"), MALFORMED)
def test_malformed_config_is_a_clear_error_with_its_line(text, line, needle):
    with pytest.raises(PbtxtError) as info:
        parse(text)
    assert needle in str(info.value)
    assert info.value.line == line and f"line {line}," in str(info.value)
    assert isinstance(info.value, CacheAgentError)


def test_invalid_utf8_is_a_clear_error():
    with pytest.raises(PbtxtError, match="not valid UTF-8"):
        parse(b'name: "\xff"')


PBTXT_TOKENS = st.sampled_from(
    [
        "name", "input", ":", "{", "}", "<", ">", "[", "]", ",", ";", "-", " ", "\n", "#c\n",
        '"s"', "'s'", '"\\', "1", "0x", "1.5e", "09", "KIND_GPU", "\\u", '"\\x4"', ".",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=120), st.lists(PBTXT_TOKENS, max_size=40).map("".join)))
def test_reader_never_raises_anything_but_its_own_error(text):
    try:
        message = parse(text)
    except PbtxtError as exc:
        assert str(exc)
        return
    message.to_python()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=80))
def test_reader_on_bytes_never_raises_anything_but_its_own_error(data):
    with contextlib.suppress(PbtxtError):
        parse(data)


NAMES = st.sampled_from(["name", "dims", "kind", "input", "parameters", "x_1"])
SCALARS = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=12),
    st.sampled_from(["KIND_GPU", "TYPE_FP32", "true"]).map(Identifier),
)
TREES = st.recursive(
    st.lists(st.tuples(NAMES, SCALARS), max_size=4),
    lambda children: st.lists(st.tuples(NAMES, st.one_of(SCALARS, children)), max_size=4),
    max_leaves=12,
)


def _render(fields, style: int) -> str:
    out = []
    for name, value in fields:
        if isinstance(value, list):
            open_, close = ("{", "}") if style % 2 else ("<", ">")
            colon = ": " if style % 3 else " "
            out.append(f"{name}{colon}{open_} {_render(value, style + 1)} {close}")
        elif isinstance(value, Identifier):
            out.append(f"{name}: {value}")
        elif isinstance(value, str):
            quote = '"' if style % 2 else "'"
            escaped = "".join(
                "".join(f"\\{b:03o}" for b in c.encode())
                if c in "\\\"'\n" or not c.isprintable()
                else c
                for c in value
            )
            out.append(f"{name}: {quote}{escaped}{quote}")
        else:
            out.append(f"{name}: {value}")
    sep = ",\n" if style % 2 else " # note\n"
    return sep.join(out)


def _as_fields(message: Message):
    return [(f.name, _as_fields(f.value) if isinstance(f.value, Message) else f.value)
            for f in message.fields]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(TREES, st.integers(min_value=0, max_value=5))
def test_reader_reads_back_what_was_written(fields, style):
    assert _tagged(_as_fields(parse(_render(fields, style)))) == _tagged(fields)


def _tagged(fields):
    # Compare types too: an enum identifier must not come back as a quoted string.
    return [
        (name, _tagged(v) if isinstance(v, list) else (type(v).__name__, v)) for name, v in fields
    ]


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
    text = config(
        "m", extra='max_batch_sise: 4\nbackend: "python"\ninstance_group {}\ninstance_group {}'
    )
    repo = write(tmp_path / "repo", {"m/config.pbtxt": text, "m/1/model.py": "x"})
    report = run(repo)
    (warning,) = only(report, "warning")
    assert "'max_batch_sise' is no field" in warning.message and "line 3" in warning.message
    (error,) = only(report, "error")
    assert "'backend' is set 2 times (lines 2, 4)" in error.message


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
