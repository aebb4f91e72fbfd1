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
from cacheagent.remote.location import parse_location
from cacheagent.triton.config import CONFIG_FILE, format_config, parse_config, with_cacheagent_first
from cacheagent.triton.params import parse_params
from cacheagent.triton.stubmark import mark_line


@dataclass
class StubReport:
    """What ``write_stub`` wrote and skipped."""

    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def stub_config(remote_text: bytes, source: str, params: Mapping[str, str]) -> str:
    """The stub's config.pbtxt: the remote config, with cacheagent fetching from ``source``.

    The remote config is read and written with Triton's schema, so a config Triton
    would refuse raises :class:`~cacheagent.triton.config.ConfigError` instead of
    becoming a stub. Every other agent the model lists stays, with its parameters,
    after cacheagent (Triton runs agents in order: they see cacheagent's local copy).
    cacheagent's parameters are ``params`` and ``source``, overridden by the model's own.
    """
    config = parse_config(remote_text)
    stub = with_cacheagent_first(config, {**params, "source": source})
    return (
        f"{mark_line(source, remote_text)}\n"
        "# Made by 'cacheagent stub'; run it again when the remote config changes.\n"
        f"{format_config(stub)}"
    )


def write_stub(
    repository: str,
    out: Path,
    params: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> StubReport:
    """Write a stub repository for every model of ``repository`` (any location form) into ``out``.

    ``params`` are extra agent parameters (cache_dir, max_size, ...) for every model;
    where a model's config sets a cacheagent parameter itself, its own value wins.
    """
    params = dict(params or {})
    parse_params(params, "<stub>", env)  # validate once, before writing anything
    if "source" in params:
        raise InvalidParameterError("stub sets 'source' itself; do not pass it as a parameter")
    repo = parse_location(repository, env)
    # Imported here: the launcher imports this module for stub_config alone.
    from cacheagent.remote.listing import list_model_names, read_file

    names = list_model_names(repo)
    report = StubReport()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        model = repo.child(name)
        try:
            text = read_file(model, CONFIG_FILE)
        except CacheAgentError as exc:
            report.skipped[name] = f"no readable config.pbtxt ({exc})"
            continue
        try:
            config_text = stub_config(text, model.url, params)
        except CacheAgentError as exc:
            report.skipped[name] = f"config.pbtxt is not valid: {exc}"
            continue
        write_text_atomically(out / name / CONFIG_FILE, config_text)
        report.written.append(name)
    return report
