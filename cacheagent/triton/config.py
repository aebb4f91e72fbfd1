"""Triton model configurations (config.pbtxt): the one home of their rules.

- :data:`AGENT_NAME`, the name a config gives this agent in ``model_repository_agents``.
- Reading and writing config.pbtxt with Triton's own schema: ``model_config.proto``
  as NVIDIA compiles it into the ``tritonclient`` package, parsed with protobuf's
  ``text_format`` the strict way Triton parses it. What Triton refuses (an unknown
  field, an unknown enum value, a field set twice, two choices of one ``oneof``, a
  value of the wrong type), :func:`parse_config` refuses, naming line and column.
- The agent section: this agent's parameters, and the agent list a stub writes
  (cacheagent first, every other agent kept in order).
- ``version_policy`` in the JSON shape Triton hands an agent, the only shape
  :mod:`cacheagent.triton.layout` reads.

Importing this module imports no protobuf. The schema (protobuf's text_format plus
the compiled module: about 25 ms) loads on first use, and never through
``tritonclient.grpc`` (whose package imports grpc: about 0.2 s more). The worker's
first LOAD never needs it: Triton hands the agent its config as JSON already.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from cacheagent.errors import CacheAgentError

log = logging.getLogger(__name__)

AGENT_NAME = "cacheagent"
CONFIG_FILE = "config.pbtxt"

# Where tritonclient keeps the compiled schema, and the name it is loaded under here.
_SCHEMA_MODULE = "tritonclient.grpc.model_config_pb2"
_PRIVATE_NAME = "cacheagent.triton._model_config_pb2"
_SCHEMA_LOCK = threading.Lock()
_SCHEMA: ModuleType | None = None


class ConfigError(CacheAgentError, ValueError):
    """A config.pbtxt Triton would refuse; the message names line and column."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(where + message)
        self.line = line
        self.column = column


class SchemaUnavailableError(CacheAgentError, ImportError):
    """Triton's model configuration schema (the tritonclient package) cannot be loaded."""


# --------------------------------------------------------------------------- the schema


def schema() -> ModuleType:
    """Triton's compiled ``model_config.proto`` (``ModelConfig`` and friends), loaded once."""
    global _SCHEMA
    if _SCHEMA is None:
        # Prefetch threads may ask at the same time; the module must run only once.
        with _SCHEMA_LOCK:
            if _SCHEMA is None:
                _SCHEMA = _load_schema()
    return _SCHEMA


def _load_schema() -> ModuleType:
    already = sys.modules.get(_SCHEMA_MODULE) or sys.modules.get(_PRIVATE_NAME)
    if already is not None:
        return already
    path = _schema_file()
    if path is not None:
        try:
            return _load_file(path)
        except Exception as exc:  # a tritonclient laid out otherwise: the slow way still works
            log.warning(
                "cannot load Triton's config schema from %s alone (%s: %s); importing it "
                "through tritonclient.grpc instead, which also imports grpc",
                path,
                type(exc).__name__,
                exc,
            )
    try:
        return importlib.import_module(_SCHEMA_MODULE)
    except ImportError as exc:
        raise SchemaUnavailableError(
            f"Triton's model configuration schema ({_SCHEMA_MODULE}) cannot be imported "
            f"({exc}); install it with: pip install 'tritonclient>=2.40' protobuf"
        ) from None


def _schema_file() -> Path | None:
    # find_spec of a top-level package locates it without running its __init__.
    try:
        spec = importlib.util.find_spec("tritonclient")
    except (ImportError, ValueError):
        return None
    for directory in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(directory) / "grpc" / "model_config_pb2.py"
        if candidate.is_file():
            return candidate
    return None


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no loader for {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PRIVATE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_PRIVATE_NAME]
        raise
    return module


def _text_format() -> Any:
    from google.protobuf import text_format

    return text_format


# --------------------------------------------------------------------------- read and write


def parse_config(text: str | bytes) -> Any:
    """Parse config.pbtxt text into Triton's ``ModelConfig``, as strictly as Triton does.

    Raises :class:`ConfigError` (with line and column, and what to do) for
    anything Triton would refuse to parse.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"the file is not valid UTF-8 (byte {exc.start}); save it as UTF-8 text"
            ) from None
    text_format = _text_format()
    config = schema().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise _config_error(exc, text) from None
    return config


def format_config(config: Any) -> str:
    """``config`` (a ``ModelConfig``) as config.pbtxt text Triton reads back unchanged."""
    return str(_text_format().MessageToString(config))


_LOCATED = re.compile(r"^\d+:\d+ : (?:'.*?': )?(.*)$", re.S)
_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_UNKNOWN_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named (\w+)')
_REPEATED = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields')
_ONEOF = re.compile(
    r'Field "(\w+)" is specified along with field "(\w+)", another member of oneof "(\w+)"'
    r' for message type "([\w.]+)"'
)


def _config_error(exc: Any, text: str) -> ConfigError:
    """protobuf's ParseError, reworded: what is wrong, where, and what to do."""
    line, column = exc.GetLine() or 0, exc.GetColumn() or 0
    match = _LOCATED.match(str(exc))
    detail = (match.group(1) if match else str(exc)).strip().rstrip(".")
    lines = text.splitlines()
    current = lines[line - 1] if 0 < line <= len(lines) else ""
    if _at_end(detail, lines, line, current[max(0, column - 1) :]):
        # Point at the end of the file, where the missing token belongs.
        end_line, end_column = text.count("\n") + 1, len(text) - (text.rfind("\n") + 1) + 1
        what = "a value" if detail.endswith("found: ''") else "a message is closed"
        return ConfigError(
            f"the file ends before {what} ({detail}); fix the syntax: finish or remove the "
            "last field, and close every '{'",
            end_line,
            end_column,
        )
    if detail.startswith("Expected string") and current[: max(0, column - 1)].rstrip().endswith(
        ("key:", "value:")
    ):
        # A map entry of strings: agent parameters, cc_model_filenames, metric_tags.
        message = (
            f'{detail}: write each entry {{ key: "name", value: "text" }} with both in quotes; '
            "Triton refuses a bare value"
        )
    else:
        message = _explain(detail)
    # The text around the column, so the user sees what protobuf tripped on.
    near = current[max(0, column - 40) : column + 20].strip()
    return ConfigError(f"{message} (near: {near})" if near else message, line, column)


def _at_end(detail: str, lines: list[str], line: int, from_column: str) -> bool:
    """True if protobuf failed because the text ended (it points at the last token read)."""
    missing = detail in ('Expected "}"', 'Expected ">"') or detail.endswith("found: ''")
    return (
        missing
        and line > 0
        and not "".join(lines[line:]).strip()
        and not from_column.split(None, 1)[1:]
    )


def _explain(detail: str) -> str:
    if found := _UNKNOWN_FIELD.search(detail):
        message, name = found.groups()
        hint = _closest(name, _field_names(message))
        return (
            f"'{name}' is no field of {_short(message)} in Triton's model configuration"
            f"{hint}; Triton refuses fields it does not know, fix the spelling or remove it"
        )
    if found := _UNKNOWN_ENUM.search(detail):
        enum, value = found.groups()
        names = _enum_names(enum)
        hint = _closest(value, names)
        accepted = f" (accepted: {', '.join(names)})" if names else ""
        return f"{value} is no value of {_short(enum)}{hint}{accepted}; Triton refuses it"
    if found := _REPEATED.search(detail):
        message, name = found.groups()
        return (
            f"'{name}' is set more than once in {_short(message)}; Triton refuses a config "
            "that sets a single-valued field twice, keep one"
        )
    if found := _ONEOF.search(detail):
        second, first, _oneof, message = found.groups()
        return (
            f"{_short(message)} sets {first} and {second}, but only one of them may be chosen; "
            "Triton refuses the config, keep one"
        )
    if detail.startswith("Expected string"):
        return f'{detail}: this value must be quoted, e.g. "text"; Triton refuses it bare'
    return f"{detail}; Triton cannot parse this configuration, fix the syntax"


def _short(full_name: str) -> str:
    return full_name.rsplit(".", 1)[-1]


def _closest(name: str, candidates: list[str]) -> str:
    import difflib  # only on this error path

    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_names(message: str) -> list[str]:
    try:
        return [f.name for f in _pool().FindMessageTypeByName(message).fields]
    except KeyError:
        return []


def _enum_names(enum: str) -> list[str]:
    try:
        return [v.name for v in _pool().FindEnumTypeByName(enum).values]
    except KeyError:
        return []


def _pool() -> Any:
    return schema().DESCRIPTOR.pool


# --------------------------------------------------------------------------- the agent section


def agent_parameters(config: Any) -> dict[str, str] | None:
    """The parameters of the config's (first) cacheagent entry, or None if it names none."""
    for agent in config.model_repository_agents.agents:
        if agent.name == AGENT_NAME:
            return dict(agent.parameters)
    return None


def cacheagent_entries(config: Any) -> list[Any]:
    """Every ``agents`` entry of the config that names cacheagent, in order."""
    return [a for a in config.model_repository_agents.agents if a.name == AGENT_NAME]


def with_cacheagent_first(config: Any, defaults: Mapping[str, str]) -> Any:
    """A copy of ``config`` whose agent list starts with cacheagent.

    Every other agent stays, with its parameters, in its order. cacheagent's
    parameters are ``defaults`` overridden by the model's own cacheagent
    parameters (added where the model has none). Triton runs agents in order, so an agent
    listed after cacheagent (Triton's checksum agent, say) sees the local copy.
    """
    ours = cacheagent_entries(config)
    if len(ours) > 1:
        log.warning(
            "model '%s' lists cacheagent %d times; keeping the first entry's parameters",
            config.name,
            len(ours),
        )
    params = {**defaults, **(dict(ours[0].parameters) if ours else {})}
    result = type(config)()
    result.CopyFrom(config)
    agents = result.model_repository_agents.agents
    del agents[:]
    first = agents.add(name=AGENT_NAME)
    first.parameters.update(params)
    for agent in config.model_repository_agents.agents:
        if agent.name != AGENT_NAME:
            agents.add().CopyFrom(agent)
    return result


# --------------------------------------------------------------------------- version policy


def policy_json(config: Any) -> dict[str, Any] | None:
    """The config's ``version_policy`` as Triton's JSON has it; None where it has none.

    That is ``{"latest": {"num_versions": n}}``, ``{"all": {}}``,
    ``{"specific": {"versions": [1, 3]}}``, or ``{}`` for a policy that names no
    choice (Triton then loads every version).
    """
    if not config.HasField("version_policy"):
        return None
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        return {"latest": {"num_versions": int(policy.latest.num_versions)}}
    if choice == "all":
        return {"all": {}}
    if choice == "specific":
        # Triton turns protobuf's int64 strings back into numbers for this field.
        return {"specific": {"versions": [int(v) for v in policy.specific.versions]}}
    return {}


def config_json(config: Any) -> dict[str, Any]:
    """The parts of a parsed config the agent reads, in the JSON shape Triton sends a LOAD."""
    out: dict[str, Any] = {"name": config.name}
    policy = policy_json(config)
    if policy is not None:
        out["version_policy"] = policy
    return out
