"""Stub repositories: Triton reads local configs, the agent alone talks to storage.

Even with a perfect cache, Triton on an ``s3://`` repository lists the bucket
and HEADs every file itself before it calls the agent, one request at a time,
and fails outright when storage is down. A stub repository is a local
directory holding only each model's config.pbtxt, with the cacheagent section
naming the cloud model directory as ``source``. Triton starts from local
files; the agent fetches from ``source`` (or serves the cache, stale if it
must).

Triton uses the stub's copy of the config, so each stub config records the
hash of the remote config it was made from; the agent compares it with the
config in every snapshot it serves and warns when they differ. Re-running
``cacheagent stub`` brings the stub up to date.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.errors import CacheAgentError, InvalidParameterError
from cacheagent.local.atomic import write_text_atomically
from cacheagent.remote.listing import list_model_names, read_file
from cacheagent.remote.location import parse_location
from cacheagent.triton import pbtxt
from cacheagent.triton.params import parse_params
from cacheagent.triton.prefetch import AGENT_NAME, agent_parameters
from cacheagent.triton.stubmark import mark_line


@dataclass
class StubReport:
    """What ``write_stub`` wrote and skipped."""

    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def strip_field(text: str, name: str) -> str:
    """Remove every top-level ``name { ... }`` / ``name: { ... }`` block from config text."""
    out: list[str] = []
    i, depth, n = 0, 0, len(text)
    while i < n:
        char = text[i]
        if char == "#":
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end])
            i = end
            continue
        if char in "\"'":
            end = _string_end(text, i)
            out.append(text[i:end])
            i = end
            continue
        if depth == 0 and text.startswith(name, i) and _is_word_boundary(text, i, len(name)):
            block_end = _block_end(text, i + len(name))
            if block_end is not None:
                i = block_end
                continue
        if char in "{<[":
            depth += 1
        elif char in "}>]":
            depth -= 1
        out.append(char)
        i += 1
    return "".join(out)


def _is_word_boundary(text: str, start: int, length: int) -> bool:
    before = text[start - 1] if start else " "
    after = text[start + length] if start + length < len(text) else " "
    return not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_")


def _string_end(text: str, start: int) -> int:
    quote, i = text[start], start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote or text[i] == "\n":
            return i + 1
        i += 1
    return len(text)


def _block_end(text: str, i: int) -> int | None:
    while i < len(text) and text[i] in " \t\r\n:":
        i += 1
    if i >= len(text) or text[i] not in "{<":
        return None
    depth = 0
    while i < len(text):
        char = text[i]
        if char in "\"'":
            i = _string_end(text, i)
            continue
        if char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if char in "{<":
            depth += 1
        elif char in "}>":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stub_config(remote_text: bytes, source: str, params: Mapping[str, str]) -> str:
    """The stub's config.pbtxt: the remote config, its agent section set to fetch from source."""
    text = remote_text.decode("utf-8")
    config = pbtxt.parse(text)  # refuse to build a stub from a config Triton would reject
    merged = {**(agent_parameters(config) or {}), **params, "source": source}
    items = ",\n      ".join(
        f"{{ key: {_quote(k)}, value: {_quote(v)} }}" for k, v in merged.items()
    )
    body = strip_field(text, "model_repository_agents").rstrip()
    return (
        f"{mark_line(source, remote_text)}\n"
        "# Made by 'cacheagent stub'; run it again when the remote config changes.\n"
        f"{body}\n"
        "model_repository_agents {\n"
        f"  agents [ {{ name: {_quote(AGENT_NAME)}, parameters [\n      {items} ] }} ]\n"
        "}\n"
    )


def write_stub(
    repository: str,
    out: Path,
    params: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> StubReport:
    """Write a stub repository for every model of ``repository`` (any location form) into ``out``.

    ``params`` are extra agent parameters (cache_dir, max_size, ...) for every model.
    """
    params = dict(params or {})
    parse_params(params, "<stub>", env)  # validate once, before writing anything
    if "source" in params:
        raise InvalidParameterError("stub sets 'source' itself; do not pass it as a parameter")
    repo = parse_location(repository, env)
    names = list_model_names(repo)
    report = StubReport()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        model = repo.child(name)
        try:
            text = read_file(model, "config.pbtxt")
        except CacheAgentError as exc:
            report.skipped[name] = f"no readable config.pbtxt ({exc})"
            continue
        try:
            config_text = stub_config(text, model.url, params)
        except CacheAgentError as exc:
            report.skipped[name] = f"config.pbtxt is not valid: {exc}"
            continue
        write_text_atomically(out / name / "config.pbtxt", config_text)
        report.written.append(name)
    return report
