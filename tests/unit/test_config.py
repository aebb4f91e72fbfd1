"""The config.pbtxt reader and writer (Triton's own schema), the agent section, the policy.

The reader is protobuf's text_format with the ModelConfig that tritonclient
compiles from Triton's model_config.proto: it is checked on a realistic config,
on what Triton refuses (a ConfigError with line and column, worded for a user),
by property tests (nothing but ConfigError escapes; what is written reads back
equal), and for what it must never cost: protobuf stays out of the worker's LOAD
path, and grpc out of everything.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheagent.errors import CacheAgentError
from cacheagent.triton import config as config_module
from cacheagent.triton.config import (
    AGENT_NAME,
    ConfigError,
    agent_parameters,
    cacheagent_entries,
    config_json,
    format_config,
    parse_config,
    policy_json,
    schema,
    with_cacheagent_first,
)
from cacheagent.triton.layout import selected_versions

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
    },
    { name: "checksum", parameters { key: "MD5:1/model.onnx", value: "0123" } }
  ]
}
"""


def test_realistic_config_reads_every_field():
    config = parse_config(REALISTIC)
    assert config.name == "resnet" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert list(config.version_policy.specific.versions) == [1, 3]
    (inp,) = config.input
    assert inp.data_type == schema().TYPE_FP32 and list(inp.dims) == [3, 224, 224]
    assert list(inp.reshape.shape) == [1, 3, 224, 224]
    assert config.output[0].name == "OUTPUT__0"
    assert [g.count for g in config.instance_group] == [2, 1]
    assert list(config.instance_group[0].gpus) == [0, 1]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and dict(accel.parameters) == {"precision_mode": "FP16"}
    assert config.parameters["escaped"].string_value == 'tab\there "q" AA é'
    assert agent_parameters(config) == {"cache_dir": "/var/cache/cacheagent", "max_size": "200GiB"}
    assert [a.name for a in config.model_repository_agents.agents] == ["cacheagent", "checksum"]


def test_a_lone_repeated_field_is_a_list():
    config = parse_config(
        'instance_group { kind: KIND_CPU }\nmodel_repository_agents { agents { name: "x" } }\n'
        "version_policy { specific { versions: 4 } }"
    )
    assert [g.kind for g in config.instance_group] == [schema().ModelInstanceGroup.KIND_CPU]
    assert [a.name for a in config.model_repository_agents.agents] == ["x"]
    assert policy_json(config) == {"specific": {"versions": [4]}}


def test_repeated_fields_keep_every_occurrence_in_order():
    config = parse_config(
        "instance_group { count: 1 } instance_group [ { count: 2 }, { count: 3 } ]\n"
        "version_policy { specific { versions: 1 versions: [2, 3] versions: 4 } }"
    )
    assert [g.count for g in config.instance_group] == [1, 2, 3]
    assert list(config.version_policy.specific.versions) == [1, 2, 3, 4]


SYNTAX_CASES = [
    ("input { dims: [1, 2,] }", False),
    ("input { dims [1, 2] }", False),
    ("input { dims: [1 2] }", False),
    ("input { name: 'x' >", False),
    ("max_batch_size: 09", False),
    ("max_batch_size: 1abc", False),
    ('name: "\\u12"', False),
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
def test_syntax_verdicts(text, valid):
    try:
        parse_config(text)
        ours = True
    except ConfigError:
        ours = False
    assert ours == valid


def test_numbers_enums_and_angle_brackets():
    config = parse_config(
        "max_batch_size: 0x1F\n"
        "version_policy < latest < num_versions: 010 > >\n"
        "sequence_batching { direct { minimum_slot_utilization: .5 } "
        "control_input { control { fp32_false_true: [ -inf, 2f ] } } }\n"
        "model_transaction_policy { decoupled: true }\n"
        "instance_group { kind: 2 }\n"
    )
    assert config.max_batch_size == 31 and config.version_policy.latest.num_versions == 8
    assert config.sequence_batching.direct.minimum_slot_utilization == 0.5
    values = list(config.sequence_batching.control_input[0].control[0].fp32_false_true)
    assert values == [float("-inf"), 2.0]
    assert config.model_transaction_policy.decoupled is True
    assert config.instance_group[0].kind == schema().ModelInstanceGroup.KIND_CPU
    assert parse_config("").ByteSize() == 0 and parse_config("# only a comment\n").ByteSize() == 0
    assert parse_config(b'name: "caf\xc3\xa9"').name == "café"


MALFORMED = [
    ('name: "open', 1, "String missing ending quote"),
    ('input {\n  name: "x"\n', 3, "the file ends before a message is closed"),
    ("name: ", 1, "the file ends before a value"),
    ("input { name: 1 >", 1, "Expected"),
    ("}", 1, "fix the syntax"),
    ('name "x"', 1, "fix the syntax"),
    ("input { dims [1, 2] }", 1, "fix the syntax"),
    ("input { dims: [1, 2,] }", 1, "Couldn't parse integer"),
    ("max_batch_size: 1abc", 1, "fix the syntax"),
    ("max_batch_size: 09", 1, "Couldn't parse integer"),
    ('name: "\\u12"', 1, "fix the syntax"),
    ("max_batch_size: -x", 1, "fix the syntax"),
    ("max_batch_size: @", 1, "fix the syntax"),
    ("[ext.field]: 1", 1, "extensions"),
    ("\n\n  name: ", 3, "the file ends before a value"),
    ("instance_group { kind: KIND_GPUU }", 1, "did you mean 'KIND_GPU'"),
    ("max_batch_sise: 8", 1, "did you mean 'max_batch_size'"),
    ('name: "a"\nname: "b"', 2, "'name' is set more than once"),
    ("version_policy { all {} latest {} }", 1, "sets all and latest"),
    ("name: m", 1, "must be quoted"),
]


@pytest.mark.parametrize(("text", "line", "needle"), MALFORMED)
def test_malformed_config_is_a_clear_error_with_its_line(text, line, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert needle in str(info.value)
    assert info.value.line == line and f"line {line}, column " in str(info.value)
    assert info.value.column >= 1
    assert isinstance(info.value, CacheAgentError)


def test_invalid_utf8_is_a_clear_error():
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        parse_config(b'name: "\xff"')


PBTXT_TOKENS = st.sampled_from(
    [
        "name", "input", "instance_group", "kind", "dims", "version_policy", "latest",
        "model_repository_agents", "agents", "parameters", "key", "value", ":", "{", "}",
        "<", ">", "[", "]", ",", ";", "-", " ", "\n", "#c\n", '"s"', "'s'", '"\\', "1",
        "0x", "1.5e", "09", "KIND_GPU", "\\u", '"\\x4"', ".",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=120), st.lists(PBTXT_TOKENS, max_size=40).map("".join)))
def test_reader_never_raises_anything_but_its_own_error(text):
    try:
        parse_config(text)
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=80))
def test_reader_on_bytes_never_raises_anything_but_its_own_error(data):
    with contextlib.suppress(ConfigError):
        parse_config(data)


TEXT = st.text(max_size=16)
KINDS = st.sampled_from(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])


@st.composite
def model_configs(draw):
    config = schema().ModelConfig()
    config.name = draw(TEXT)
    config.backend = draw(TEXT)
    config.max_batch_size = draw(st.integers(-(2**31), 2**31 - 1))
    for kind in draw(st.lists(KINDS, max_size=3)):
        config.instance_group.add(kind=kind, count=draw(st.integers(0, 8)))
    for name in draw(st.lists(TEXT, max_size=3)):
        agent = config.model_repository_agents.agents.add(name=name)
        agent.parameters.update(draw(st.dictionaries(TEXT, TEXT, max_size=3)))
    for key, value in draw(st.dictionaries(TEXT, TEXT, max_size=3)).items():
        config.parameters[key].string_value = value
    choice = draw(st.sampled_from(["none", "latest", "all", "specific"]))
    if choice == "latest":
        config.version_policy.latest.num_versions = draw(st.integers(0, 2**32 - 1))
    elif choice == "all":
        config.version_policy.all.SetInParent()
    elif choice == "specific":
        config.version_policy.specific.versions.extend(
            draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
        )
    return config


@settings(max_examples=200, deadline=None)
@given(model_configs())
def test_what_is_written_reads_back_equal(config):
    # What a stub writes is what Triton reads: any text in names, keys and values.
    assert parse_config(format_config(config)) == config


# --------------------------------------------------------------------------- agents


def test_agent_parameters_and_entries():
    config = parse_config(
        "model_repository_agents { agents [ "
        '{ name: "checksum" parameters { key: "MD5:1/a" value: "00" } }, '
        '{ name: "cacheagent" parameters { key: "max_size" value: "1GB" } }, '
        '{ name: "cacheagent" } ] }'
    )
    assert agent_parameters(config) == {"max_size": "1GB"}
    assert len(cacheagent_entries(config)) == 2
    assert agent_parameters(parse_config('name: "x"')) is None
    assert AGENT_NAME == "cacheagent"


def test_cacheagent_first_keeps_every_other_agent_in_order(caplog):
    config = parse_config(
        'name: "m"\nmodel_repository_agents { agents [ '
        '{ name: "checksum" parameters [ { key: "MD5:1/a" value: "00" }, '
        '{ key: "MD5:1/b" value: "11" } ] }, '
        '{ name: "cacheagent" parameters [ { key: "max_size" value: "1GB" }, '
        '{ key: "source" value: "gs://elsewhere/m" } ] }, '
        '{ name: "decrypt" }, '
        '{ name: "cacheagent" parameters { key: "max_size" value: "2GB" } } ] }'
    )
    with caplog.at_level(logging.WARNING, logger="cacheagent.triton.config"):
        result = with_cacheagent_first(
            config, {"max_size": "9GB", "cache_dir": "/c", "source": "s3://b/m"}
        )
    agents = result.model_repository_agents.agents
    assert [a.name for a in agents] == ["cacheagent", "checksum", "decrypt"]
    # The model's own parameters win over the defaults (its source too).
    assert dict(agents[0].parameters) == {
        "max_size": "1GB",
        "cache_dir": "/c",
        "source": "gs://elsewhere/m",
    }
    assert dict(agents[1].parameters) == {"MD5:1/a": "00", "MD5:1/b": "11"}
    assert "lists cacheagent 2 times" in caplog.text
    assert len(config.model_repository_agents.agents) == 4  # the input is left alone


def test_cacheagent_is_added_first_where_absent():
    config = parse_config('model_repository_agents { agents { name: "checksum" } }')
    result = with_cacheagent_first(config, {"source": "s3://b/m"})
    assert [a.name for a in result.model_repository_agents.agents] == ["cacheagent", "checksum"]
    assert agent_parameters(result) == {"source": "s3://b/m"}
    bare = with_cacheagent_first(parse_config('name: "m"'), {"source": "s3://b/m"})
    assert agent_parameters(parse_config(format_config(bare))) == {"source": "s3://b/m"}


# --------------------------------------------------------------------------- version policy


@pytest.mark.parametrize(
    ("policy", "expected", "loads"),
    [
        ("", None, {3}),  # no version_policy: Triton's default, latest 1
        ("version_policy { }", {}, {1, 2, 3}),  # no choice: Triton loads all (measured)
        ("version_policy { latest { } }", {"latest": {"num_versions": 0}}, set()),
        ("version_policy { latest { num_versions: 2 } }", {"latest": {"num_versions": 2}}, {2, 3}),
        ("version_policy { all { } }", {"all": {}}, {1, 2, 3}),
        ("version_policy { specific { versions: 2 } }", {"specific": {"versions": [2]}}, {2}),
        (
            "version_policy { specific { versions: [1, 7] } }",
            {"specific": {"versions": [1, 7]}},
            {1},
        ),
    ],
)
def test_policy_in_tritons_json_shape(policy, expected, loads):
    config = parse_config(f'name: "m"\n{policy}')
    assert policy_json(config) == expected
    shaped = config_json(config)
    assert shaped["name"] == "m" and shaped.get("version_policy") == expected
    assert selected_versions(shaped.get("version_policy"), [1, 2, 3]) == loads


# --------------------------------------------------------------------------- what it costs


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_the_load_path_imports_no_protobuf():
    # Triton hands LOAD its config as JSON: the schema is for check, stub and prefetch.
    probe = (
        "import sys, cacheagent.triton.worker, cacheagent.triton.actions\n"
        "import cacheagent.triton.config, cacheagent.triton.layout\n"
        "heavy = [m for m in sys.modules if m.startswith(('google.protobuf', 'tritonclient',\n"
        "         'grpc', 'cacheagent.triton._model_config_pb2'))]\n"
        "print(' '.join(heavy) or 'none')\n"
    )
    assert run_python(probe) == "none"


def test_the_schema_loads_without_grpc_or_tritonclients_package():
    probe = (
        "import sys\n"
        "from cacheagent.triton.config import parse_config\n"
        "parse_config('name: \"m\" instance_group { kind: KIND_CPU }')\n"
        "print('grpc' in sys.modules, 'tritonclient' in sys.modules,\n"
        "      'tritonclient.grpc' in sys.modules)\n"
    )
    assert run_python(probe) == "False False False"


def test_the_schema_is_the_same_one_tritonclient_imports():
    # Loaded first under our own name, then again by tritonclient: one descriptor pool.
    ours = schema().ModelConfig
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    assert ours.DESCRIPTOR is model_config_pb2.ModelConfig.DESCRIPTOR
    assert parse_config('name: "m"') == model_config_pb2.ModelConfig(name="m")


def test_a_schema_file_that_cannot_load_falls_back_with_a_warning():
    probe = (
        "import logging, pathlib, sys, tempfile\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='%(message)s')\n"
        "from cacheagent.triton import config\n"
        "bad = pathlib.Path(tempfile.mkdtemp()) / 'model_config_pb2.py'\n"
        "bad.write_text('raise RuntimeError(\"moved\")')\n"
        "config._schema_file = lambda: bad\n"
        "print(config.parse_config('name: \"m\"').name)\n"
    )
    out = run_python(probe)
    assert "cannot load Triton's config schema" in out and "RuntimeError: moved" in out
    assert out.endswith("\nm")


def test_a_missing_schema_says_what_to_install():
    probe = (
        "import sys\n"
        "sys.modules['tritonclient'] = None  # as if it were not installed\n"
        "from cacheagent.triton import config\n"
        "config._schema_file = lambda: None\n"
        "try:\n"
        "    config.parse_config('name: \"m\"')\n"
        "except config.SchemaUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    assert "pip install 'tritonclient>=2.40' protobuf" in run_python(probe)


def test_threads_share_one_schema(monkeypatch):
    import threading

    monkeypatch.setattr(config_module, "_SCHEMA", None)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(schema())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(m) for m in seen}) == 1
