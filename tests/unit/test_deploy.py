"""Offline checks of deploy/: the container image's Dockerfile and the Kubernetes manifests.

No Docker engine and no cluster are needed. Every manifest is validated against the
Kubernetes JSON schemas bundled by ``kubernetes-validate`` (strict: unknown fields are
errors), and the properties a schema cannot express are checked here: who owns and
opens the cache, what the containers run, which volumes and ports they refer to. Each
structural check is a function returning its problems, and each has a test showing
that it reports a broken copy of the real manifest, so a check cannot pass vacuously.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cacheagent.sizes import parse_size

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"

# A Kubernetes version whose schemas kubernetes-validate bundles (it bundles 1.25 on).
K8S_VERSION = "1.30"

UID = 1000
NODE_CACHE = "/var/cache/cacheagent"  # the hostPath on each node
CACHE_CLAIM = "cacheagent-cache"
CREDENTIALS_SECRET = "cacheagent-storage-credentials"
PREWARM_CONFIGMAP = "cacheagent-prewarm"
# The NGC image's entrypoint, which execs its arguments; allowed in front of the launcher.
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
OWNERSHIP_CAPABILITIES = {"CHOWN", "FOWNER"}

Doc = dict[str, Any]


# -- loading ---------------------------------------------------------------


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/kubernetes."""
    return sorted(p for p in MANIFESTS.iterdir() if p.suffix in (".yaml", ".yml"))


def load_documents(path: Path) -> list[Doc]:
    """The non-empty YAML documents of ``path``."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def all_documents() -> list[tuple[str, Doc]]:
    """(file name, document) for every document of every manifest."""
    return [(p.name, doc) for p in manifest_files() for doc in load_documents(p)]


def find(kind: str, name: str) -> Doc:
    """The one document of ``kind`` named ``name``, fresh from disk (safe to mutate)."""
    found = [
        doc
        for _, doc in all_documents()
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name
    ]
    assert len(found) == 1, f"expected one {kind}/{name} under {MANIFESTS}, found {len(found)}"
    return found[0]


def deployment() -> Doc:
    """The Triton Deployment."""
    return find("Deployment", "tritonserver")


def daemonset() -> Doc:
    """The pre-warming DaemonSet."""
    return find("DaemonSet", "cacheagent-prewarm")


def pod_spec(workload: Doc) -> Doc:
    """The pod template's spec of a Deployment or DaemonSet."""
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(pod: Doc) -> Iterator[tuple[bool, Doc]]:
    """(is an init container, container) for every container of ``pod``."""
    for container in pod.get("initContainers", []):
        yield True, container
    for container in pod.get("containers", []):
        yield False, container


def named(items: list[Doc], name: str) -> Doc:
    """The item of ``items`` called ``name``."""
    matches = [item for item in items if item.get("name") == name]
    assert len(matches) == 1, f"expected one item named {name!r}, found {len(matches)}"
    return matches[0]


def env_value(container: Doc, name: str) -> str:
    """The literal value of environment variable ``name`` in ``container``."""
    value: str = named(container.get("env", []), name)["value"]
    return value


def argv(container: Doc) -> list[str]:
    """What the container executes: command then args."""
    return [*container.get("command", []), *container.get("args", [])]


def security(container: Doc, pod: Doc, field: str) -> Any:
    """A securityContext field as it takes effect: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[field] if field in own else pod.get("securityContext", {}).get(field)


def is_cache_volume(volume: Doc) -> bool:
    """True for the cache PVC and for the node's hostPath cache."""
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    host = volume.get("hostPath", {}).get("path")
    return claim == CACHE_CLAIM or host == NODE_CACHE


def cache_mounts(pod: Doc, container: Doc) -> list[str]:
    """The paths where ``container`` mounts a cache volume."""
    names = {v["name"] for v in pod.get("volumes", []) if is_cache_volume(v)}
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in names]


def k8s_quantity_bytes(text: str) -> int:
    """Bytes of a Kubernetes storage quantity such as ``200Gi`` or ``500G``."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?", text)
    assert match, f"not a storage quantity: {text!r}"
    number, unit = match.groups()
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5}
    decimal = {"k": 1, "M": 2, "G": 3, "T": 4, "P": 5}
    if unit is None:
        return int(number)
    if unit in binary:
        return int(number) * 1024 ** binary[unit]
    return int(number) * 1000 ** decimal[unit]


# -- structural checks: each returns a list of problems ----------------------


def ownership_problems(pod: Doc) -> list[str]:
    """Who opens the cache: uid/gid 1000, non-root, or a minimal root chown of the hostPath.

    The cache refuses a directory owned by another uid, so every process that opens it
    must be the uid that runs Triton. The only exception is an init container that
    makes a hostPath uid 1000's and 0700 and can do nothing else.
    """
    problems = []
    for init, container in containers(pod):
        name = container["name"]
        for path in cache_mounts(pod, container):
            user = security(container, pod, "runAsUser")
            if user == UID:
                if security(container, pod, "runAsGroup") != UID:
                    problems.append(f"{name}: runs as uid {UID} but not gid {UID}")
                if security(container, pod, "runAsNonRoot") is not True:
                    problems.append(f"{name}: runAsNonRoot is not true")
                continue
            if not init:
                problems.append(f"{name}: mounts the cache at {path} as uid {user}, not {UID}")
                continue
            problems += owner_fixer_problems(container, path)
    return problems


def owner_fixer_problems(container: Doc, path: str) -> list[str]:
    """Problems of a root init container that must only chown/chmod the cache's root."""
    name = container["name"]
    context = container.get("securityContext", {})
    capabilities = context.get("capabilities", {})
    script = " ".join(argv(container))
    problems = []
    if context.get("runAsUser") != 0 or context.get("runAsNonRoot") is not False:
        problems.append(f"{name}: not uid {UID}, and not an explicit root ownership fixer")
    if capabilities.get("drop") != ["ALL"]:
        problems.append(f"{name}: root without dropping ALL capabilities")
    if not set(capabilities.get("add", [])) <= OWNERSHIP_CAPABILITIES:
        problems.append(f"{name}: adds capabilities beyond {sorted(OWNERSHIP_CAPABILITIES)}")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if f"chown {UID}:{UID} {path}" not in script:
        problems.append(f"{name}: does not chown {path} to {UID}:{UID}")
    if f"chmod 0700 {path}" not in script:
        problems.append(f"{name}: does not chmod {path} to 0700")
    return problems


def mount_problems(pod: Doc) -> list[str]:
    """Volume mounts naming no volume of the pod."""
    volumes = {v["name"] for v in pod.get("volumes", [])}
    return [
        f"{c['name']}: mounts undefined volume {m['name']!r}"
        for _, c in containers(pod)
        for m in c.get("volumeMounts", [])
        if m["name"] not in volumes
    ]


def launcher_problems(pod: Doc, container: Doc) -> list[str]:
    """Triton must run as ``cacheagent run [OPTIONS] -- tritonserver ARGS``, cache on the volume."""
    words = argv(container)
    if words[:1] == [NGC_ENTRYPOINT]:
        words = words[1:]
    if words[:2] != ["cacheagent", "run"]:
        return [f"{container['name']}: runs {words[:2]}, not 'cacheagent run'"]
    if "--" not in words:
        return [f"{container['name']}: no '--' before Triton's command"]
    split = words.index("--")
    options, triton = words[2:split], words[split + 1 :]
    problems = []
    if triton[:1] != ["tritonserver"]:
        problems.append(f"{container['name']}: '--' is followed by {triton[:1]}, not tritonserver")
    if not any(a.startswith("--model-repository=") for a in triton):
        problems.append(f"{container['name']}: tritonserver has no --model-repository")
    if "--cache-dir" not in options:
        return [*problems, f"{container['name']}: cacheagent run has no --cache-dir"]
    cache_dir = options[options.index("--cache-dir") + 1]
    # Strictly below the mount: a volume's root may be owned by root (PVC) or need a
    # chown (hostPath); the launcher creates its own directory inside it.
    if not any(cache_dir.startswith(m.rstrip("/") + "/") for m in cache_mounts(pod, container)):
        problems.append(f"{container['name']}: --cache-dir {cache_dir} is not inside the volume")
    return problems


def probe_problems(container: Doc) -> list[str]:
    """Readiness and liveness on Triton's health endpoints on its HTTP port."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    expected = {
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
        "startupProbe": None,  # optional; any /v2/health/ endpoint
    }
    problems = []
    for probe_name, path in expected.items():
        probe = container.get(probe_name)
        if probe is None:
            if path is not None:
                problems.append(f"no {probe_name}")
            continue
        http = probe.get("httpGet", {})
        port = ports.get(http.get("port"), http.get("port"))
        wanted = path or "/v2/health/"
        if not str(http.get("path", "")).startswith(wanted) or port != TRITON_PORTS["http"]:
            problems.append(f"{probe_name} checks {http.get('path')} on {port}, not {wanted}")
    return problems


def host_pid_problems(pod: Doc) -> list[str]:
    """No pod needs the host's PID namespace, so none may take it.

    Liveness in the cache is by flock-held token files, which work across PID
    namespaces; hostPID would only cost isolation.
    """
    if pod.get("hostPID"):
        return ["the pod takes hostPID, which the cache does not need"]
    return []


# -- schema validation -------------------------------------------------------


def test_manifests_exist() -> None:
    """deploy/kubernetes holds the four manifests, each with at least one document."""
    names = {p.name for p in manifest_files()}
    expected = {"deployment.yaml", "pvc.yaml", "prewarm-daemonset.yaml", "prewarm-configmap.yaml"}
    assert expected <= names
    for path in manifest_files():
        assert load_documents(path), f"{path.name} has no document"


@pytest.mark.parametrize(
    "doc",
    [pytest.param(d, id=f"{f}:{d['kind']}/{d['metadata']['name']}") for f, d in all_documents()],
)
def test_every_document_is_valid_for_kubernetes(doc: Doc) -> None:
    """Each document validates against the Kubernetes 1.30 strict schema of its kind."""
    validated = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The library falls back to an older bundled schema silently; this pins 1.30.
    assert validated == K8S_VERSION


@pytest.mark.parametrize(
    "breakage",
    [
        "a port that is not a number",
        "a misspelled field",
        "a container without a name",
    ],
)
def test_validation_rejects_a_broken_deployment(breakage: str) -> None:
    """The schema check can fail: broken copies of the real Deployment are rejected."""
    doc = deployment()
    container = pod_spec(doc)["containers"][0]
    if breakage == "a port that is not a number":
        container["ports"][0]["containerPort"] = "eight thousand"
    elif breakage == "a misspelled field":
        container["readinesProbe"] = container.pop("readinessProbe")
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# -- structural checks on the real manifests -----------------------------------


@pytest.mark.parametrize("workload", [deployment, daemonset], ids=["deployment", "daemonset"])
def test_cache_is_opened_only_as_uid_1000(workload: Any) -> None:
    """Every container mounting the cache runs as 1000:1000 non-root (or only fixes owner)."""
    assert ownership_problems(pod_spec(workload())) == []


@pytest.mark.parametrize("workload", [deployment, daemonset], ids=["deployment", "daemonset"])
def test_every_volume_mount_names_a_volume(workload: Any) -> None:
    """No container mounts a volume its pod does not define."""
    assert mount_problems(pod_spec(workload())) == []


@pytest.mark.parametrize("workload", [deployment, daemonset], ids=["deployment", "daemonset"])
def test_pods_sharing_the_node_cache_share_host_pids(workload: Any) -> None:
    """A pod opening the node's hostPath cache sees host pids (the DaemonSet does)."""
    assert host_pid_problems(pod_spec(workload())) == []


def test_deployment_runs_triton_through_the_launcher() -> None:
    """The Deployment runs ``cacheagent run ... -- tritonserver`` with the cache on the PVC."""
    pod = pod_spec(deployment())
    container = named(pod["containers"], "tritonserver")
    assert launcher_problems(pod, container) == []
    cache = next(v for v in pod["volumes"] if is_cache_volume(v))
    assert cache["persistentVolumeClaim"]["claimName"] == CACHE_CLAIM
    assert pod["securityContext"]["fsGroup"] == UID
    # --model-repository is given through $(MODEL_REPOSITORY), which kubelet expands.
    assert "--model-repository=$(MODEL_REPOSITORY)" in argv(container)
    assert env_value(container, "MODEL_REPOSITORY").startswith(("s3://", "gs://", "as://"))


def test_deployment_probes_hit_triton_health() -> None:
    """Readiness, liveness (and startup) probes ask Triton's /v2/health/* on port 8000."""
    container = named(pod_spec(deployment())["containers"], "tritonserver")
    assert probe_problems(container) == []


def test_deployment_credentials_budget_and_volume() -> None:
    """Credentials come from the Secret; the budget parses and fits the ReadWriteOnce PVC."""
    doc = deployment()
    container = named(pod_spec(doc)["containers"], "tritonserver")
    secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    assert secrets == [CREDENTIALS_SECRET]
    claim = find("PersistentVolumeClaim", CACHE_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    capacity = k8s_quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    budget = parse_size(env_value(container, "CACHEAGENT_MAX_SIZE"))
    assert 0 < budget < capacity, "the cache's budget must leave room on its volume"
    # A rolling update would wait forever for a ReadWriteOnce volume on another node.
    assert doc["spec"]["strategy"]["type"] == "Recreate"


def test_service_exposes_triton_ports_of_the_deployment() -> None:
    """The Service selects the Deployment's pods and maps 8000/8001/8002 to named ports."""
    doc = deployment()
    labels = doc["spec"]["template"]["metadata"]["labels"]
    selector = doc["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = find("Service", "tritonserver")
    assert service["spec"]["selector"].items() <= labels.items()
    container = named(pod_spec(doc)["containers"], "tritonserver")
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == TRITON_PORTS
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == TRITON_PORTS


def test_daemonset_warms_the_node_cache_from_the_configmap() -> None:
    """The DaemonSet loops ``cacheagent warm`` over the ConfigMap's list, on the hostPath."""
    pod = pod_spec(daemonset())
    container = named(pod["containers"], "prewarm")
    script = argv(container)[-1]
    assert "cacheagent warm" in script
    assert "while" in script and "sleep" in script
    assert "$(" not in script, "kubelet would try to expand $(...) in a command"
    cache = next(v for v in pod["volumes"] if is_cache_volume(v))
    assert cache["hostPath"] == {"path": NODE_CACHE, "type": "DirectoryOrCreate"}
    cache_dir = env_value(container, "CACHEAGENT_CACHE_DIR")
    assert any(cache_dir.startswith(m + "/") for m in cache_mounts(pod, container))
    # The list file is a key of the ConfigMap, mounted as a directory (so edits arrive).
    listing = next(v for v in pod["volumes"] if "configMap" in v)
    assert listing["configMap"]["name"] == PREWARM_CONFIGMAP
    mount = named(container["volumeMounts"], listing["name"])
    assert "subPath" not in mount
    locations_file = env_value(container, "PREWARM_LOCATIONS")
    key = os.path.relpath(locations_file, mount["mountPath"])
    configmap = find("ConfigMap", PREWARM_CONFIGMAP)
    assert key in configmap["data"]
    entries = [
        line.strip()
        for line in configmap["data"][key].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert entries and all(re.match(r"(s3|gs|as)://\S+$", e) for e in entries), entries
    # Triton's pods that share the node cache use the same budget and credentials.
    triton = named(pod_spec(deployment())["containers"], "tritonserver")
    assert env_value(container, "CACHEAGENT_MAX_SIZE") == env_value(triton, "CACHEAGENT_MAX_SIZE")
    assert container["envFrom"] == triton["envFrom"]


def test_daemonset_loop_runs_each_location_and_stops_on_term(tmp_path: Path) -> None:
    """The DaemonSet's real shell loop warms every listed location and stops on SIGTERM.

    It runs under ``sh`` with a fake ``cacheagent`` that reads its stdin (so a loop
    that let it eat the list would warm only the first location) and fails one
    location, and a fake ``sleep`` that sends SIGTERM to the loop after one round.
    """
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on PATH")
    container = named(pod_spec(daemonset())["containers"], "prewarm")
    assert argv(container)[:2] == ["sh", "-c"]
    script = argv(container)[2]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    fakes = {
        "cacheagent": (
            "#!/bin/sh\ncat >/dev/null\n"
            f"{shlex.quote(str(shutil.which('python3') or 'python3'))} -c "
            "'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> "
            f"{shlex.quote(str(calls))}\n"
            'case "$*" in *broken*) exit 3;; esac\n'
        ),
        "sleep": "#!/bin/sh\nkill -TERM $PPID\n",
    }
    for name, text in fakes.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    locations = tmp_path / "locations"
    locations.write_text(
        "# a comment\n\ns3://bucket/models/a\n   \n  # indented comment\n"
        "gs://bucket/models/broken\nas://account/container/models/c\n"
    )
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PREWARM_LOCATIONS": str(locations),
        "PREWARM_INTERVAL_SECONDS": "1",
        "CACHEAGENT_CACHE_DIR": str(tmp_path / "cache"),
        "CACHEAGENT_MAX_SIZE": "180GiB",
    }
    done = subprocess.run(
        [sh, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "stopping" in done.stdout
    common = ["warm", "--no-progress", "--cache-dir", env["CACHEAGENT_CACHE_DIR"]]
    warmed = [json.loads(line) for line in calls.read_text().splitlines()]
    assert warmed == [
        [*common, "--max-size", "180GiB", location]
        for location in (
            "s3://bucket/models/a",
            "gs://bucket/models/broken",
            "as://account/container/models/c",
        )
    ]
    assert "gs://bucket/models/broken failed (exit 3)" in done.stderr


# -- the structural checks can fail ----------------------------------------------


def test_ownership_check_reports_a_root_or_other_uid_container() -> None:
    """A Triton container as root, or a chown init container with more powers, is reported."""
    pod = pod_spec(deployment())
    pod["containers"][0]["securityContext"]["runAsUser"] = 0
    assert any("not 1000" in p for p in ownership_problems(pod))
    pod = pod_spec(daemonset())
    pod["initContainers"][0]["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    assert any("beyond" in p for p in ownership_problems(pod))
    pod = pod_spec(daemonset())
    pod["initContainers"][0]["command"][-1] = "chown 1000:1000 /var/cache/cacheagent"
    assert any("chmod" in p for p in ownership_problems(pod))


def test_launcher_check_reports_triton_run_directly() -> None:
    """Triton started without the launcher, or after a wrong '--', is reported."""
    pod = pod_spec(deployment())
    container = pod["containers"][0]
    bare = copy.deepcopy(container)
    bare["command"] = ["tritonserver"]
    assert launcher_problems(pod, bare)
    wrong = copy.deepcopy(container)
    wrong["args"][0] = "bash"
    assert any("not tritonserver" in p for p in launcher_problems(pod, wrong))
    outside = copy.deepcopy(container)
    outside["command"][outside["command"].index("--cache-dir") + 1] = "/tmp/cache"
    assert any("not inside the volume" in p for p in launcher_problems(pod, outside))


def test_mount_probe_and_host_pid_checks_report_breakage() -> None:
    """An undefined volume, a probe on the wrong path, a needless hostPID are each reported."""
    pod = pod_spec(deployment())
    pod["containers"][0]["volumeMounts"][0]["name"] = "no-such-volume"
    assert mount_problems(pod) == ["tritonserver: mounts undefined volume 'no-such-volume'"]
    container = pod["containers"][0]
    container["livenessProbe"]["httpGet"]["path"] = "/healthz"
    assert probe_problems(container) == [
        "livenessProbe checks /healthz on 8000, not /v2/health/live"
    ]
    pod = pod_spec(daemonset())
    pod["hostPID"] = True
    assert host_pid_problems(pod)


# -- the Dockerfile ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and its arguments."""

    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD)."""
        assert self.value.startswith("["), f"{self.keyword} is not in exec form: {self.value}"
        words: list[str] = json.loads(self.value)
        return words

    def words(self) -> list[str]:
        """A shell-form value split like sh would, with ; && | as separate words."""
        lexer = shlex.shlex(self.value, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        return list(lexer)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    instructions = []
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside a continuation) and parser directives
        line = raw.rstrip()
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = "".join(pending).strip()
        pending = []
        keyword, _, value = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
    if pending:
        joined = "".join(pending).strip()
        keyword, _, value = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
    return instructions


def dockerfile() -> list[Instruction]:
    """The instructions of deploy/Dockerfile."""
    return parse_dockerfile(DOCKERFILE.read_text())


def contains(words: list[str], run: list[str]) -> bool:
    """True if ``run`` occurs in ``words`` as consecutive words."""
    return any(words[i : i + len(run)] == run for i in range(len(words) - len(run) + 1))


def first(instructions: list[Instruction], keyword: str, needle: str) -> int:
    """Index of the first ``keyword`` instruction whose words contain the words of ``needle``."""
    for index, instruction in enumerate(instructions):
        if instruction.keyword == keyword and contains(instruction.words(), shlex.split(needle)):
            return index
    raise AssertionError(f"no {keyword} with {needle!r} in {DOCKERFILE}")


def test_dockerfile_parser_joins_continuations_and_drops_comments() -> None:
    """The parser the Dockerfile checks rely on handles continuations and comments."""
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG TAG=1\n\n"
        "FROM base:${TAG}\n"
        "RUN set -e; \\\n"
        "    # a comment inside the continuation\n"
        "    echo one; \\\n"
        "    echo two\n"
        'entrypoint ["a", "b"]\n'
    )
    assert parse_dockerfile(text) == [
        Instruction("ARG", "TAG=1"),
        Instruction("FROM", "base:${TAG}"),
        Instruction("RUN", "set -e;     echo one;     echo two"),
        Instruction("ENTRYPOINT", '["a", "b"]'),
    ]
    words = parse_dockerfile(text)[2].words()
    assert words == ["set", "-e", ";", "echo", "one", ";", "echo", "two"]


def test_dockerfile_builds_on_ngc_tritonserver() -> None:
    """FROM is nvcr.io/nvidia/tritonserver, its tag an ARG defaulting to 24.10-py3."""
    instructions = dockerfile()
    base = next(i for i, x in enumerate(instructions) if x.keyword == "FROM")
    defaults = dict(
        x.value.split("=", 1) for x in instructions[:base] if x.keyword == "ARG" and "=" in x.value
    )
    image = re.sub(
        r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], instructions[base].value.split()[0]
    )
    assert image == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert instructions[base].value.split()[0] != image, "the tag should be a build ARG"
    assert [x for x in instructions if x.keyword == "FROM"] == [instructions[base]]


def test_dockerfile_installs_the_package_and_the_agent() -> None:
    """The repo is copied to /src, pip-installed, then installed into Triton's repoagents."""
    instructions = dockerfile()
    copies = [x for x in instructions if x.keyword in ("COPY", "ADD")]
    assert copies and all(x.words()[-1].startswith("/src") for x in copies)
    for instruction in copies:
        for source in instruction.words()[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
    copied = max(instructions.index(x) for x in copies)
    pip = first(instructions, "RUN", "pip install --no-cache-dir /src")
    agent = first(
        instructions,
        "RUN",
        "cacheagent install-triton --repoagent-dir /opt/tritonserver/repoagents",
    )
    assert copied < pip < agent


def test_dockerfile_copies_enough_to_build_the_package(tmp_path: Path) -> None:
    """What the Dockerfile COPYs to /src builds a wheel holding the compiled shim.

    The files are laid out as Docker would (a directory source copies its contents),
    then built offline with this environment's setuptools, so a file the build needs
    (say, one that pyproject.toml names) missing from the COPY lines fails here rather
    than in ``docker build``.
    """
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler to build the shim")
    for instruction in dockerfile():
        if instruction.keyword != "COPY":
            continue
        *sources, dest = instruction.words()
        target = tmp_path / dest.lstrip("/")
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True)
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    out = tmp_path / "wheels"
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps"),
            *("--no-build-isolation", "--no-cache-dir", "-w", str(out), str(tmp_path / "src")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-4000:]
    assert "did not match any files" not in log, log[-4000:]
    (wheel,) = out.glob("cacheagent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "cacheagent/_lib/libtritonrepoagent_cacheagent.so" in names


def test_dockerfile_cache_dir_and_user_are_non_root() -> None:
    """/var/cache/cacheagent is made 0700 for uid 1000, and the image runs as uid 1000."""
    instructions = dockerfile()
    made = first(instructions, "RUN", "install -d -o 1000 -g 1000 -m 0700 /var/cache/cacheagent")
    users = [i for i, x in enumerate(instructions) if x.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    last = instructions[users[-1]].value
    assert last.split(":")[0] == str(UID), f"USER {last}"
    agent = first(instructions, "RUN", "cacheagent install-triton")
    assert max(made, agent) < users[-1], "root steps must come before USER"


def test_dockerfile_entrypoint_is_the_launcher() -> None:
    """ENTRYPOINT is (the NGC entrypoint, then) ``cacheagent run ... --``; CMD is Triton's."""
    instructions = dockerfile()
    entrypoint = [x for x in instructions if x.keyword == "ENTRYPOINT"][-1].exec_form()
    if entrypoint[:1] == [NGC_ENTRYPOINT]:
        entrypoint = entrypoint[1:]
    assert entrypoint[:2] == ["cacheagent", "run"]
    assert entrypoint[-1] == "--", "CMD (Triton's command line) must follow '--'"
    assert entrypoint[entrypoint.index("--cache-dir") + 1] == NODE_CACHE
    command = [x for x in instructions if x.keyword == "CMD"][-1].exec_form()
    assert command[0] == "tritonserver"
    assert any(a.startswith("--model-repository=") for a in command)
