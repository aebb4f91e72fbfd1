"""``cacheagent check``: lint a Triton model repository, local or in the cloud.

One recursive listing gives the layout (the listing the fetch uses:
:func:`cacheagent.remote.listing.list_tree`); only the small configuration files
(``config.pbtxt`` and ``configs/*.pbtxt``) are read, never model weights. The
rules are Triton's own: its schema for the configs (read with
:mod:`cacheagent.triton.config`), its repository layout and version directories
(:mod:`cacheagent.triton.layout`), its backends' default model file names, plus
the cacheagent parameters.

Each finding says what is wrong and what to do. Errors are what makes Triton
refuse or misload a model; warnings are what Triton silently ignores; notes
(info) are facts worth knowing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cacheagent.errors import (
    CacheAgentError,
    InvalidLocationError,
    InvalidParameterError,
    RemoteNotFoundError,
    UnsafePathError,
)
from cacheagent.remote.listing import is_directory_entry, list_tree, read_file
from cacheagent.remote.location import Location, parse_location
from cacheagent.remote.manifest import validate_relpath
from cacheagent.sizes import format_size
from cacheagent.triton.config import (
    AGENT_NAME,
    CONFIG_FILE,
    ConfigError,
    cacheagent_entries,
    parse_config,
    policy_json,
)
from cacheagent.triton.layout import classify, policy_choice, selected_versions
from cacheagent.triton.params import parse_params

SEVERITIES = ("error", "warning", "info")
CONFIG = CONFIG_FILE
CONFIGS_DIR = "configs"
# A config bigger than this is no config; reading it would be reading weights.
MAX_CONFIG_BYTES = 8 * 1024 * 1024
READ_CONCURRENCY = 8

PLATFORM_BACKENDS = {
    "tensorrt_plan": "tensorrt",
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "ensemble": "ensemble",
}
# What a file or directory name in a version directory says about the backend,
# for models whose backend Triton has to guess.
FILE_BACKENDS = {
    "model.plan": "tensorrt",
    "model.onnx": "onnxruntime",
    "model.pt": "pytorch",
    "model.graphdef": "tensorflow (graphdef)",
    "model.savedmodel": "tensorflow (savedmodel)",
    "model.xml": "openvino",
    "model.py": "python",
    "model.dali": "dali",
}


@dataclass(frozen=True)
class _Expect:
    """One thing a version directory must hold: any of ``names``, of the given kind."""

    names: tuple[str, ...]
    kind: str  # "file", "dir" or "any"
    what: str  # how to describe it in a message


_DEFAULT_FILES: dict[str, tuple[_Expect, ...]] = {
    "tensorrt": (_Expect(("model.plan",), "file", "the TensorRT engine"),),
    "onnxruntime": (_Expect(("model.onnx",), "any", "the ONNX model (file or directory)"),),
    "pytorch": (_Expect(("model.pt",), "file", "the TorchScript model"),),
    "tensorflow_graphdef": (_Expect(("model.graphdef",), "file", "the TensorFlow GraphDef"),),
    "tensorflow_savedmodel": (
        _Expect(("model.savedmodel",), "dir", "the TensorFlow SavedModel directory"),
    ),
    "tensorflow": (
        _Expect(
            ("model.savedmodel", "model.graphdef"),
            "any",
            "the TensorFlow SavedModel directory or GraphDef",
        ),
    ),
    "openvino": (
        _Expect(("model.xml",), "file", "the OpenVINO model description"),
        _Expect(("model.bin",), "file", "the OpenVINO weights"),
    ),
    "python": (_Expect(("model.py",), "file", "the Python model"),),
    "dali": (_Expect(("model.dali",), "file", "the serialized DALI pipeline"),),
    "ensemble": (),
}


@dataclass(frozen=True)
class Finding:
    """One problem or note: how bad, which model, which path (relative to LOCATION), what to do."""

    severity: str  # "error", "warning" or "info"
    model: str  # "" for the repository itself
    path: str
    message: str


@dataclass
class CheckReport:
    """The outcome of :func:`check_repository`."""

    location: str
    layout: str  # "repository" (a directory of models) or "model" (one model directory)
    models: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)  # relative to LOCATION

    @property
    def errors(self) -> int:
        """Number of error findings."""
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        """Number of warning findings."""
        return sum(f.severity == "warning" for f in self.findings)

    @property
    def notes(self) -> int:
        """Number of info findings."""
        return sum(f.severity == "info" for f in self.findings)

    @property
    def ok(self) -> bool:
        """True when no finding is an error (warnings and notes do not fail a check)."""
        return self.errors == 0


@dataclass
class _Model:
    """One model directory: its name, where it sits below LOCATION, and what it holds."""

    name: str
    prefix: str  # "" in model layout, else "<name>/"
    files: dict[str, int] = field(default_factory=dict)  # path below the model dir -> size
    dirs: set[str] = field(default_factory=set)  # every directory below the model dir

    def is_file(self, rel: str) -> bool:
        return rel in self.files

    def is_dir(self, rel: str) -> bool:
        return rel in self.dirs

    def top_dirs(self) -> set[str]:
        return {d.split("/", 1)[0] for d in self.dirs}


class _Findings:
    """Findings in discovery order, each once."""

    def __init__(self) -> None:
        self.items: dict[Finding, None] = {}

    def add(self, severity: str, model: str, path: str, message: str) -> None:
        self.items.setdefault(Finding(severity, model, path, message), None)


def check_repository(location: str, env: Mapping[str, str] | None = None) -> CheckReport:
    """Check a Triton model repository (or one model directory) at ``location``.

    ``location`` is any form Triton accepts (``s3://``, ``gs://``, ``as://``,
    a local path). Storage failures raise the package's errors
    (:class:`~cacheagent.errors.StorageUnavailableError`, ...); a location with
    nothing under it raises :class:`~cacheagent.errors.RemoteNotFoundError`.
    Everything else is a finding in the returned report.
    """
    loc = parse_location(location, env)
    found = list_tree(loc)
    findings = _Findings()
    files, dirs = _tree(loc, found, findings)
    if not files and not dirs:
        raise RemoteNotFoundError(
            f"nothing found at {loc.url}: the directory is empty or does not exist, or the bucket "
            "or container is missing; check the location"
        )

    layout, models = _models(loc, files, dirs, findings)
    report = CheckReport(loc.url, layout, [m.name for m in models])
    to_read = []
    for model in models:
        for rel in _config_paths(model):
            size = model.files[rel]
            if size > MAX_CONFIG_BYTES:
                findings.add(
                    "error",
                    model.name,
                    model.prefix + rel,
                    f"{rel} is {format_size(size)}, too large to be a model configuration; "
                    "check that the file is the text config and not a model file",
                )
            else:
                to_read.append(model.prefix + rel)
    texts = _read_all(loc, to_read)
    report.files_read = sorted(to_read)

    if layout == "repository" and not models:
        findings.add(
            "error",
            "",
            "",
            "the repository holds no model directory; put each model in its own directory, "
            "e.g. <repository>/<model>/config.pbtxt and <repository>/<model>/1/",
        )
    for model in models:
        _check_model(model, texts, loc, env, findings)
    report.findings = list(findings.items)
    return report


def _tree(
    loc: Location, found: Mapping[str, Mapping[str, Any]], findings: _Findings
) -> tuple[dict[str, int], set[str]]:
    """Relative files (with sizes) and directories below LOCATION; unsafe names become errors."""
    root = loc.root.rstrip("/")
    prefix = root + "/"
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for name, info in found.items():
        is_dir = is_directory_entry(name, info)
        if name.rstrip("/") == root:
            if not is_dir:
                raise InvalidLocationError(
                    f"{loc.url} is a file; give the model repository directory (or one model's "
                    "directory) instead"
                )
            continue
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        if is_dir:
            rel = rel.rstrip("/")
            if rel and _safe(rel):
                dirs.add(rel)
            continue
        try:
            validate_relpath(rel, loc.url)
        except UnsafePathError as exc:
            findings.add("error", _first_part(rel), rel, str(exc))
            continue
        files[rel] = int(info.get("size") or info.get("Size") or 0)
    for rel in files:
        # Directories are implied by the files below them (object stores have no others).
        parts = rel.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for rel in sorted(files):
        if rel in dirs:
            findings.add(
                "error",
                _first_part(rel),
                rel,
                f"{loc.url} holds both a file {rel!r} and objects below {rel + '/'!r}; a local "
                "directory (Triton's copy, or the cache) cannot hold both: remove one of them",
            )
            # The objects below win: that is the directory the rest of the check sees.
            del files[rel]
    return files, dirs


def _safe(rel: str) -> bool:
    try:
        validate_relpath(rel)
    except UnsafePathError:
        return False
    return True


def _first_part(rel: str) -> str:
    return rel.split("/", 1)[0]


def _models(
    loc: Location, files: dict[str, int], dirs: set[str], findings: _Findings
) -> tuple[str, list[_Model]]:
    """Decide between a repository and a single model directory, and split the tree per model."""
    top_dirs = {d.split("/", 1)[0] for d in dirs}
    holds_models = any(f"{d}/{CONFIG}" in files for d in top_dirs)
    if CONFIG in files or (any(d.isdigit() for d in top_dirs) and not holds_models):
        name = loc.root.rstrip("/").rsplit("/", 1)[-1]
        return "model", [_Model(name, "", dict(files), set(dirs))]
    models = {d: _Model(d, d + "/") for d in sorted(top_dirs)}
    for rel, size in files.items():
        top, _, below = rel.partition("/")
        if not below:
            findings.add(
                "info",
                "",
                rel,
                f"'{rel}' is a file at the repository root, not a model directory; Triton "
                "ignores it",
            )
            continue
        models[top].files[below] = size
    for rel in dirs:
        top, _, below = rel.partition("/")
        if below:
            models[top].dirs.add(below)
    return "repository", list(models.values())


def _config_paths(model: _Model) -> list[str]:
    paths = [CONFIG] if model.is_file(CONFIG) else []
    paths += sorted(
        rel
        for rel in model.files
        if rel.startswith(CONFIGS_DIR + "/") and rel.endswith(".pbtxt") and rel.count("/") == 1
    )
    return paths


def _read_all(loc: Location, relpaths: list[str]) -> dict[str, bytes | CacheAgentError]:
    """Read the small config files, a few at a time; a vanished file is a result, not a failure."""

    def read(rel: str) -> bytes | CacheAgentError:
        try:
            return bytes(read_file(loc, rel))
        except RemoteNotFoundError as exc:
            return exc

    if not relpaths:
        return {}
    workers = min(READ_CONCURRENCY, len(relpaths))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cacheagent-check") as pool:
        return dict(zip(relpaths, pool.map(read, relpaths), strict=True))


# --------------------------------------------------------------------------- per model


def _check_model(
    model: _Model,
    texts: Mapping[str, bytes | CacheAgentError],
    loc: Location,
    env: Mapping[str, str] | None,
    findings: _Findings,
) -> None:
    versions = _versions_and_skips(model, findings)
    if not versions:
        findings.add(
            "error",
            model.name,
            model.prefix.rstrip("/") or ".",
            f"model '{model.name}' has no version directory, so Triton loads no version of it; "
            f"put its files in a numeric directory such as {model.prefix}1/",
        )
    primary = _load_config(model, CONFIG, texts, findings) if model.is_file(CONFIG) else None
    if not model.is_file(CONFIG):
        _note_missing_config(model, versions, findings)
    elif primary is not None:
        _check_config(model, CONFIG, primary, versions, loc, env, findings, check_files=True)
    primary_signature = _file_signature(primary) if primary is not None else None
    for rel in _config_paths(model):
        if rel == CONFIG:
            continue
        config = _load_config(model, rel, texts, findings)
        if config is not None:
            # Model files need checking again only if this config expects other ones.
            check_files = _file_signature(config) != primary_signature
            _check_config(model, rel, config, versions, loc, env, findings, check_files=check_files)


def _versions_and_skips(model: _Model, findings: _Findings) -> dict[int, str]:
    """The version directories Triton loads (layout.classify), a finding for each it skips."""
    versions: dict[int, str] = {}
    for top in sorted(model.top_dirs()):
        found = classify(top)
        if found.kind == "version":
            assert found.number is not None
            versions[found.number] = top
        elif found.kind != "special":
            severity, message = _SKIPPED_DIR[found.kind](top, found.number)
            findings.add(severity, model.name, model.prefix + top, message)
    return versions


def _leading_zero(top: str, _: int | None) -> tuple[str, str]:
    if top.isdigit():
        return "warning", (
            f"Triton ignores directory '{top}': a version directory name may not start with "
            f"a zero; rename it to '{top.lstrip('0') or '0'}' if it is a version"
        )
    return "warning", (
        f"Triton ignores directory '{top}': it starts with a zero and is no version "
        "number; move it out of the model directory"
    )


def _too_large(top: str, _: int | None) -> tuple[str, str]:
    return "error", (
        f"version directory '{top}' is larger than a 64-bit integer, which Triton "
        "cannot parse; use a smaller version number"
    )


def _misread(top: str, number: int | None) -> tuple[str, str]:
    return "warning", (
        f"Triton reads directory '{top}' as version {number} (it parses the leading digits) "
        f"but loads that version from a directory named '{number}'; rename or remove '{top}'"
    )


def _other(top: str, _: int | None) -> tuple[str, str]:
    return "warning", (
        f"Triton ignores directory '{top}': it is no version number, and only "
        "configs/, warmup/ and initial_state/ may sit beside the version directories; "
        "move it into a version directory or remove it"
    )


_SKIPPED_DIR = {
    "leading_zero": _leading_zero,
    "too_large": _too_large,
    "misread": _misread,
    "other": _other,
}


def _load_config(
    model: _Model, rel: str, texts: Mapping[str, bytes | CacheAgentError], findings: _Findings
) -> Any | None:
    """The parsed config at ``rel`` (a ModelConfig), or None with an error finding."""
    path = model.prefix + rel
    data = texts.get(path)
    if data is None:  # too large: reported when it was skipped
        return None
    if isinstance(data, CacheAgentError):
        findings.add(
            "error",
            model.name,
            path,
            f"{rel} was listed but could not be read ({data}); run the check again",
        )
        return None
    try:
        return parse_config(data)
    except ConfigError as exc:
        findings.add(
            "error",
            model.name,
            path,
            f"{rel} is not a configuration Triton can load: {exc}",
        )
        return None


def _note_missing_config(model: _Model, versions: Mapping[int, str], findings: _Findings) -> None:
    guesses = sorted(
        {
            backend
            for top in versions.values()
            for name, backend in FILE_BACKENDS.items()
            if model.is_file(f"{top}/{name}") or model.is_dir(f"{top}/{name}")
        }
    )
    if guesses:
        guess = f"from the file names it looks like {' or '.join(guesses)}"
    else:
        guess = "no file name gives the backend away, so auto-complete will likely fail"
    findings.add(
        "info",
        model.name,
        model.prefix + CONFIG,
        f"model '{model.name}' has no {CONFIG}: the backend must auto-complete its "
        "configuration (Triton's default; it fails with --disable-auto-complete-config) and "
        f"{guess}; add a {CONFIG} naming the backend, and a model_repository_agents section "
        "to load it through cacheagent",
    )


def _check_config(
    model: _Model,
    rel: str,
    config: Any,
    versions: Mapping[int, str],
    loc: Location,
    env: Mapping[str, str] | None,
    findings: _Findings,
    *,
    check_files: bool,
) -> None:
    path = model.prefix + rel

    def add(severity: str, message: str, where: str = path) -> None:
        findings.add(severity, model.name, where, message)

    if config.name not in ("", model.name):
        add(
            "error",
            f"the config names the model '{config.name}' but its directory is '{model.name}'; "
            f'Triton refuses the model, set name: "{model.name}" or rename the directory',
        )

    backend = _backend(config, add)
    policy = _policy(config, add)
    selected = _selected(policy, versions, rel, model, add)
    if check_files and backend is not None:
        expects = _expectations(config, backend, add)
        if expects is not None:
            for version in sorted(selected):
                _check_version_files(model, rel, versions[version], expects, backend, findings)
    _check_agent(model, config, loc, env, add)


def _backend(config: Any, add: Any) -> str | None:
    """The backend key of _DEFAULT_FILES this config selects, or None (with a note)."""
    backend, platform = config.backend, config.platform
    if not backend and not platform:
        add(
            "info",
            "the config names neither backend nor platform: Triton has to guess them from "
            "the model file names (auto-complete); name the backend explicitly",
        )
        return None
    if platform and platform not in PLATFORM_BACKENDS:
        add(
            "info",
            f"platform '{platform}' is not one this check knows; its model files were not checked",
        )
        return None
    implied = PLATFORM_BACKENDS.get(platform) if platform else None
    if backend and implied is not None and backend != implied:
        add(
            "warning",
            f"backend '{backend}' and platform '{platform}' disagree; set only one of them",
        )
    if platform in ("tensorflow_graphdef", "tensorflow_savedmodel"):
        return str(platform)
    name = str(backend or implied)
    if name not in _DEFAULT_FILES:
        add(
            "info",
            f"backend '{name}' is not one this check knows; its model files were not checked",
        )
        return None
    return name


def _policy(config: Any, add: Any) -> dict[str, Any] | None:
    """The version_policy in Triton's JSON shape (what layout.selected_versions reads)."""
    policy = policy_json(config)
    choice, count = policy_choice(policy)
    if choice == "latest" and count == 0:
        add(
            "error",
            "version_policy latest sets no num_versions (or 0), so Triton loads no version "
            "and refuses the model; set num_versions: 1 or more",
        )
    return policy


def _selected(
    policy: dict[str, Any] | None,
    versions: Mapping[int, str],
    rel: str,
    model: _Model,
    add: Any,
) -> set[int]:
    selected = selected_versions(policy, versions)
    if policy and "specific" in policy:
        for missing in sorted(set(policy["specific"]["versions"]) - set(versions)):
            add(
                "warning",
                f"version_policy asks for version {missing} but there is no directory "
                f"{model.prefix}{missing}/; Triton logs an error and skips it",
            )
        if versions and not selected:
            add(
                "error",
                f"version_policy selects none of the existing versions "
                f"({', '.join(map(str, sorted(versions)))}); Triton will load no version, fix "
                "the policy or add the version directories",
            )
    return selected


def _file_signature(config: Any | None) -> tuple[object, ...] | None:
    """What decides which model files a config expects; equal signatures expect the same."""
    if config is None:
        return None
    return (
        config.backend,
        config.platform,
        config.default_model_filename,
        tuple(sorted(config.cc_model_filenames.items())),
        repr(policy_json(config)),
    )


def _expectations(config: Any, backend: str, add: Any) -> list[_Expect] | None:
    expects = list(_DEFAULT_FILES[backend])
    name = config.default_model_filename
    if name:
        if "/" in name or name in (".", ".."):
            add(
                "error",
                f"default_model_filename '{name}' must be a plain file name inside the "
                "version directory",
            )
            return None
        expects = [_Expect((name,), "any", "the model file set by default_model_filename")]
        if backend == "openvino" and name.endswith(".xml"):
            expects.append(_Expect((name[:-4] + ".bin",), "file", "the OpenVINO weights"))
    alternatives = [value for _, value in sorted(config.cc_model_filenames.items()) if value]
    if alternatives and expects:
        # Per-GPU file names replace the first (main) model file on matching GPUs.
        first = expects[0]
        expects[0] = _Expect(
            first.names + tuple(a for a in alternatives if a not in first.names),
            "any",
            first.what,
        )
    return expects


def _check_version_files(
    model: _Model,
    rel: str,
    top: str,
    expects: Iterable[_Expect],
    backend: str,
    findings: _Findings,
) -> None:
    # Name the config only when it is an alternative one: config.pbtxt is the default.
    by = "" if rel == CONFIG else f" as {rel} configures it"
    for expect in expects:
        kinds = {name: _kind(model, f"{top}/{name}") for name in expect.names}
        present = [name for name, kind in kinds.items() if kind is not None]
        where = f"{model.prefix}{top}/"
        wanted = " or ".join(expect.names)
        if not present:
            findings.add(
                "error",
                model.name,
                where,
                f"version {top} of model '{model.name}' has no {wanted} ({expect.what}, which "
                f"the {backend} backend{by} loads); add it, or set default_model_filename in "
                f"{rel} if the file has another name",
            )
            continue
        if expect.kind != "any" and all(kinds[name] != expect.kind for name in present):
            actual = kinds[present[0]]
            findings.add(
                "error",
                model.name,
                where + present[0],
                f"{present[0]} in version {top} of model '{model.name}' is a {_noun(actual)}, "
                f"but the {backend} backend{by} needs a {_noun(expect.kind)} ({expect.what})",
            )


def _noun(kind: str | None) -> str:
    return "directory" if kind == "dir" else "file"


def _kind(model: _Model, rel: str) -> str | None:
    if model.is_file(rel):
        return "file"
    if model.is_dir(rel):
        return "dir"
    return None


def _check_agent(
    model: _Model,
    config: Any,
    loc: Location,
    env: Mapping[str, str] | None,
    add: Any,
) -> None:
    ours = cacheagent_entries(config)
    if not ours:
        if loc.is_remote:
            consequence = "Triton downloads the whole model directory again on every load"
        else:
            consequence = "that is fine for a local model, but once uploaded Triton downloads it"
            consequence += " again on every load"
        add(
            "info",
            f"the config does not enable cacheagent: {consequence}; to cache it, add "
            f'model_repository_agents {{ agents [ {{ name: "{AGENT_NAME}" }} ] }}',
        )
        return
    if len(ours) > 1:
        add(
            "warning",
            f"the config lists cacheagent {len(ours)} times; Triton would run it for each "
            "entry, keep one",
        )
    for agent in ours:
        try:
            params = parse_params(dict(agent.parameters), model.name, env)
        except InvalidParameterError as exc:
            add("error", str(exc))
            continue
        if not loc.is_remote and params.source is None:
            add(
                "info",
                "cacheagent leaves a model served from a local path untouched (it "
                "caches cloud locations, or the 'source' parameter's)",
            )


# --------------------------------------------------------------------------- output


def report_json(report: CheckReport) -> dict[str, Any]:
    """The report as a JSON-ready dict (what ``cacheagent check --json`` prints)."""
    return {
        "location": report.location,
        "layout": report.layout,
        "models": list(report.models),
        "findings": [
            {"severity": f.severity, "model": f.model, "path": f.path, "message": f.message}
            for f in _sorted(report.findings)
        ],
        "errors": report.errors,
        "warnings": report.warnings,
        "ok": report.ok,
    }


def _sorted(findings: Iterable[Finding]) -> list[Finding]:
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (f.model, rank.get(f.severity, 9), f.path))


def format_report(report: CheckReport) -> str:
    """The report as text for a terminal: one block per model, then a verdict line."""
    if report.layout == "model":
        what = f"one model directory ('{report.models[0]}')"
    else:
        count = len(report.models)
        what = f"a model repository of {count} model{'s' if count != 1 else ''}"
    lines = [f"{report.location}: checked as {what}"]
    by_model: dict[str, list[Finding]] = {}
    for finding in _sorted(report.findings):
        by_model.setdefault(finding.model, []).append(finding)
    for model in ["", *report.models]:
        items = by_model.get(model, [])
        if model:
            clean = not any(f.severity in ("error", "warning") for f in items)
            lines.append(f"{model}: {'ok' if clean else 'problems'}")
        elif not items:
            continue
        for finding in items:
            label = finding.severity.upper() if finding.severity != "info" else "note"
            where = f"{finding.path}: " if finding.path else ""
            lines.append(f"  {label:<7} {where}{finding.message}")
    verdict = "ok" if report.ok else "FAILED"
    lines.append(
        f"{report.errors} error(s), {report.warnings} warning(s), {report.notes} note(s): {verdict}"
    )
    return "\n".join(lines)
