"""Keep a stub repository current from one listing of its cloud repository.

``cacheagent run`` calls :func:`list_repository` once per repository per start
(and at each poll in poll mode): one recursive, paginated listing of the
repository prefix gives every model directory and every file in it, with its
fingerprint. :func:`sync_stub` then brings the stub up to date from that
listing alone, reading a model's ``config.pbtxt`` only when its fingerprint
differs from the one the stub recorded:

- every model directory holding a ``config.pbtxt`` gets a stub config
  (:func:`cacheagent.triton.stub.stub_config`: cacheagent first, every other
  agent kept in order);
- a model added to the bucket gets its stub directory by one rename, a model
  removed loses it by one rename, a changed config is replaced atomically;
- each stub config carries a *run mark* line: the fingerprint of the remote
  config and a digest of the launcher's parameters, which decide whether the
  config must be read again;
- beside it, ``cacheagent.mark`` holds the key of the model's manifest (every
  file, every version). When any file of the model changes, this file does, and
  Triton's poll mode reloads the model's versions. It must be a file of its own:
  Triton 2.51 reloads a version only when a timestamp other than the config's
  changes in the model directory (measured: a changed config.pbtxt alone calls
  the agents' LOAD, then keeps the serving version and sends LOAD_FAIL).

A file is rewritten only when its text changes: in poll mode a rewrite, even to
the same text, would make Triton reload the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from cacheagent.errors import CacheAgentError
from cacheagent.local.atomic import fsync_dir, write_text_atomically
from cacheagent.remote.location import Location
from cacheagent.remote.manifest import build_manifest
from cacheagent.triton.config import CONFIG_FILE
from cacheagent.triton.startlisting import portable_info
from cacheagent.triton.stub import stub_config

#: Bumped when the stub text made from the same inputs changes: every stub is then rebuilt.
STUB_FORMAT = 1
_RUN_MARK = re.compile(r"^# cacheagent run: config ([0-9a-f]{32}) params ([0-9a-f]{32})$", re.M)
#: Beside each stub config: the model's content key (a name Triton takes for no version).
CONTENT_MARK = "cacheagent.mark"
_RUN_NOTE = "# Kept current by 'cacheagent run' at each start; edits here are overwritten."
# Work names in the stub's parent directory: never seen by Triton as models.
_NEW_PREFIX = ".new-"
_GONE_PREFIX = ".gone-"
WORK_DIR_MAX_AGE_S = 3600.0
CONFIG_READERS = 8

ConfigReader = Callable[[Location, str], bytes]


@dataclass(frozen=True)
class ModelListing:
    """One model directory in a repository listing."""

    name: str
    location: Location
    entries: dict[str, dict[str, Any]]  # listing name -> portable info (startlisting)
    config_fingerprint: str  # xxh3-128 of the remote config.pbtxt's fingerprint
    content_key: str  # the manifest key of every file of the model


@dataclass(frozen=True)
class RepositoryListing:
    """What one listing of a repository found."""

    repository: Location
    listed_at: float  # time.time() when the listing was sent
    models: dict[str, ModelListing]  # model directories holding a config.pbtxt
    without_config: list[str]  # top-level directories without one (not models for a stub)


@dataclass
class SyncReport:
    """What :func:`sync_stub` did to each model of the stub."""

    written: list[str] = field(default_factory=list)  # new stub configs, or rebuilt ones
    updated: list[str] = field(default_factory=list)  # only the content changed, not the config
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # old stub kept: why
    skipped: dict[str, str] = field(default_factory=dict)  # no stub: why

    @property
    def changed(self) -> list[str]:
        """The models whose stub changed."""
        return sorted(self.written + self.updated + self.removed)


def list_repository(repository: Location) -> RepositoryListing:
    """List ``repository`` once (recursive, paginated) and split the listing by model.

    Raises the package's storage errors (:func:`cacheagent.remote.listing.with_retries`).
    """
    listed_at = time.time()
    # The one tree listing the agent makes of one model (list_manifest), here of the
    # whole repository: the entries below a model directory are then exactly those
    # the agent's own listing of that model would give.
    # Imported here: a launcher whose stubs exist starts Triton before it lists, and
    # the storage clients (http.client, ssl, the signers) would only delay that.
    from cacheagent.remote.listing import LIST_RETRY_DELAYS, list_tree

    found = list_tree(repository, delays=LIST_RETRY_DELAYS)
    return split_by_model(repository, found, listed_at)


def split_by_model(
    repository: Location, found: Mapping[str, Mapping[str, Any]], listed_at: float
) -> RepositoryListing:
    """The models of a repository from its recursive listing ``found`` (name -> info)."""
    prefix = repository.root.rstrip("/") + "/"
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for name, info in found.items():
        if not name.startswith(prefix):
            continue
        top, slash, rest = name[len(prefix) :].partition("/")
        if not top or (not slash and info.get("type") != "directory"):
            continue  # a file beside the models is no model
        entries = by_model.setdefault(top, {})
        if rest:
            entries[name] = portable_info(info)
    models: dict[str, ModelListing] = {}
    without_config: list[str] = []
    for top in sorted(by_model):
        model = _model_listing(repository.child(top), top, by_model[top])
        if model is None:
            without_config.append(top)
        else:
            models[top] = model
    return RepositoryListing(repository, listed_at, models, without_config)


def _model_listing(
    location: Location, name: str, entries: dict[str, dict[str, Any]]
) -> ModelListing | None:
    config_name = f"{location.root}/{CONFIG_FILE}"
    config = entries.get(config_name)
    if config is None or config.get("type") == "directory":
        return None
    [config_entry] = build_manifest(location.url, location.root, {config_name: config}).files
    return ModelListing(
        name=name,
        location=location,
        entries=entries,
        config_fingerprint=xxhash.xxh3_128_hexdigest(config_entry.fingerprint.encode()),
        content_key=_content_key(location, entries),
    )


def _content_key(location: Location, entries: Mapping[str, Mapping[str, Any]]) -> str:
    try:
        return build_manifest(location.url, location.root, entries).key
    except CacheAgentError:
        # An object name the agent refuses: the stub is still written, and the
        # model's LOAD fails with the agent's message, in Triton's log.
        canonical = json.dumps(sorted(entries.items()), sort_keys=True, default=str)
        return xxhash.xxh3_128_hexdigest(canonical.encode())


def params_digest(params: Mapping[str, str]) -> str:
    """The digest a stub records of the launcher's parameters (and of the stub's format)."""
    canonical = json.dumps({"format": STUB_FORMAT, "params": sorted(params.items())})
    return xxhash.xxh3_128_hexdigest(canonical.encode())


def run_mark(config_fingerprint: str, params: str) -> str:
    """The run mark line of a stub config."""
    return f"# cacheagent run: config {config_fingerprint} params {params}"


def recorded_run_mark(stub_text: str) -> tuple[str, str] | None:
    """(config fingerprint, params digest) from a stub config, or None."""
    match = _RUN_MARK.search(stub_text)
    return (match.group(1), match.group(2)) if match else None


def content_mark(content_key: str) -> str:
    """The text of a model's ``cacheagent.mark``."""
    return f"{content_key}\n"


def sync_stub(
    listing: RepositoryListing,
    out: Path,
    params: Mapping[str, str],
    read_config: ConfigReader | None = None,
) -> SyncReport:
    """Bring the stub repository ``out`` up to date with ``listing``; return what changed.

    ``params`` are the launcher's agent parameters for every model (the model's
    own cacheagent parameters win). ``read_config(model_location, "config.pbtxt")``
    is called only for models whose config is new or changed, several at a time.
    """
    if read_config is None:
        from cacheagent.remote.listing import read_file

        read_config = read_file
    out.mkdir(parents=True, exist_ok=True)
    digest = params_digest(params)
    report = SyncReport()
    to_read: list[ModelListing] = []
    existing: dict[str, str | None] = {}
    for name, model in listing.models.items():
        text = existing[name] = _read_text(out / name / CONFIG_FILE)
        if recorded_run_mark(text or "") == (model.config_fingerprint, digest):
            _update_content_mark(model, out / name, report)
        else:
            to_read.append(model)
    for model, remote in _read_configs(to_read, read_config):
        _write_model(model, out / model.name, existing[model.name], remote, params, digest, report)
    for name in _stubbed_models(out):
        if name not in listing.models:
            _remove_model_dir(out / name)
            report.removed.append(name)
    return report


def _update_content_mark(model: ModelListing, model_dir: Path, report: SyncReport) -> None:
    mark = content_mark(model.content_key)
    if _read_text(model_dir / CONTENT_MARK) == mark:
        report.unchanged.append(model.name)
        return
    write_text_atomically(model_dir / CONTENT_MARK, mark)
    report.updated.append(model.name)


def _read_configs(
    models: list[ModelListing], read_config: ConfigReader
) -> list[tuple[ModelListing, bytes | CacheAgentError]]:
    def read(model: ModelListing) -> tuple[ModelListing, bytes | CacheAgentError]:
        try:
            return model, read_config(model.location, CONFIG_FILE)
        except CacheAgentError as exc:
            return model, exc

    if len(models) <= 1:
        return [read(m) for m in models]
    # Small files, one round trip each: in parallel, a first start of many models
    # costs about one round trip, not one per model.
    with ThreadPoolExecutor(min(len(models), CONFIG_READERS), "cacheagent-config") as pool:
        return list(pool.map(read, models))


def _write_model(
    model: ModelListing,
    model_dir: Path,
    existing: str | None,
    remote: bytes | CacheAgentError,
    params: Mapping[str, str],
    digest: str,
    report: SyncReport,
) -> None:
    try:
        if isinstance(remote, CacheAgentError):
            raise remote
        stub = stub_config(remote, model.location.url, params)
    except CacheAgentError as exc:
        reason = f"its config.pbtxt cannot be used ({exc})"
        if existing is not None:
            report.kept[model.name] = reason
        else:
            report.skipped[model.name] = reason
        return
    files = {
        CONFIG_FILE: with_run_mark(stub, run_mark(model.config_fingerprint, digest)),
        CONTENT_MARK: content_mark(model.content_key),
    }
    if existing is None:
        _create_model_dir(model_dir, files)
    else:
        # The content mark last: it is what makes Triton reload the versions, and by
        # then the config it reloads them with is the new one.
        for name, text in files.items():
            if _read_text(model_dir / name) != text:
                write_text_atomically(model_dir / name, text)
    report.written.append(model.name)


def with_run_mark(stub_text: str, mark: str) -> str:
    """``stub_text`` (from ``stub_config``) with the run mark after its first line."""
    first, _, rest = stub_text.partition("\n")
    return f"{first}\n{mark}\n{_RUN_NOTE}\n{rest}"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _stubbed_models(out: Path) -> list[str]:
    with os.scandir(out) as entries:
        return sorted(
            e.name
            for e in entries
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        )


def _work_dir(model_dir: Path, prefix: str) -> Path:
    # Beside the stub, not in it: Triton must never see a half-made model directory.
    stub = model_dir.parent
    return stub.parent / f"{prefix}{stub.name}-{model_dir.name}-{os.getpid()}-{os.urandom(4).hex()}"


def _create_model_dir(model_dir: Path, files: Mapping[str, str]) -> None:
    temp = _work_dir(model_dir, _NEW_PREFIX)
    temp.mkdir(parents=True)
    try:
        for name, text in files.items():
            write_text_atomically(temp / name, text)
        try:
            os.rename(temp, model_dir)
        except OSError:
            # Another launcher made it first (same repository, same cache): update it instead.
            for name, text in files.items():
                write_text_atomically(model_dir / name, text)
            return
        fsync_dir(model_dir.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _remove_model_dir(model_dir: Path) -> None:
    gone = _work_dir(model_dir, _GONE_PREFIX)
    try:
        os.rename(model_dir, gone)
    except FileNotFoundError:
        return
    fsync_dir(model_dir.parent)
    shutil.rmtree(gone, ignore_errors=True)


def clean_work_dirs(stubs_root: Path, older_than: float = WORK_DIR_MAX_AGE_S) -> None:
    """Remove work directories a killed launcher left in ``stubs_root``.

    By age, not by pid: a launcher in another container sharing the cache has a
    pid that means nothing here, and a work directory lives for milliseconds.
    """
    now = time.time()
    with contextlib.suppress(FileNotFoundError), os.scandir(stubs_root) as entries:
        for entry in entries:
            if not entry.name.startswith((_NEW_PREFIX, _GONE_PREFIX)):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                    shutil.rmtree(entry.path, ignore_errors=True)
