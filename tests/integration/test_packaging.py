"""The sdist and wheel as a Triton image would get them: tags, glibc floor, no compiler at install.

One module-scoped build (``python -m build``: the sdist, then the wheel from the
sdist, as CI and a release would make them), then checks of what it produced,
and an install of the wheel into a fresh virtualenv with no C compiler reachable.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from cacheagent import __version__

ROOT = Path(__file__).resolve().parents[2]
SHIM_IN_WHEEL = "cacheagent/_lib/libtritonrepoagent_cacheagent.so"
BUILD_TIMEOUT_S = 540
STEP_TIMEOUT_S = 180
X86_64_GLIBC = platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"


def _isolation_flags() -> list[str]:
    # Offline where it can be: the test extra installs setuptools>=77 and wheel into the
    # venv, so the build needs no index. An older venv builds in isolation instead.
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-isolation"] if major >= 77 else []


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", *_isolation_flags(), "--outdir", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "dir": out}


def _shim_from(wheel: Path, where: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        target = where / "shim.so"
        target.write_bytes(archive.read(SHIM_IN_WHEEL))
    return target


def test_wheel_is_tagged_for_any_python3_on_its_platform(dist):
    name = dist["wheel"].name
    assert name.startswith(f"cacheagent-{__version__}-py3-none-"), name
    assert "cp3" not in name and "abi3" not in name  # the .so is no Python extension
    if X86_64_GLIBC:
        assert name.endswith("-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"), name
    with zipfile.ZipFile(dist["wheel"]) as archive:
        wheel_file = archive.read(f"cacheagent-{__version__}.dist-info/WHEEL").decode()
    assert "Root-Is-Purelib: false" in wheel_file


@pytest.mark.skipif(not X86_64_GLIBC, reason="the glibc floor is pinned for x86_64 glibc")
def test_shim_needs_no_glibc_newer_than_2_17(dist, tmp_path):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    shim = _shim_from(dist["wheel"], tmp_path)
    symbols = subprocess.run(
        [objdump, "-T", str(shim)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    versions = {tuple(map(int, v)) for v in re.findall(r"GLIBC_(\d+)\.(\d+)", symbols)}
    assert versions and max(versions) <= (2, 17), sorted(versions)
    for name in ("dladdr", "pthread_mutex_trylock"):
        assert re.search(rf"\(GLIBC_2\.2\.5\)\s+{name}$", symbols, re.M), name
    # Where glibc < 2.34 keeps the pinned dladdr and pthread_mutex_trylock.
    dynamic = subprocess.run(
        [objdump, "-p", str(shim)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "libdl.so.2" in dynamic and "libpthread.so.0" in dynamic
    assert "libpython" not in dynamic


@pytest.mark.skipif(not X86_64_GLIBC, reason="manylinux tags are checked on x86_64 glibc")
def test_auditwheel_agrees_with_the_manylinux_tag(dist):
    auditwheel = Path(sys.executable).with_name("auditwheel")
    if not auditwheel.exists():
        pytest.skip("auditwheel is not installed (pip install auditwheel)")
    done = subprocess.run(
        [str(auditwheel), "show", str(dist["wheel"])],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert 'consistent with the following platform tag:\n"manylinux_2_17_x86_64"' in done.stdout


def test_sdist_holds_what_a_build_needs(dist):
    with tarfile.open(dist["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "setup.py",
        "pyproject.toml",
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "cacheagent/__init__.py",
        "cacheagent/triton/shim/cacheagent_shim.c",
        "cacheagent/triton/shim/glibc_compat.h",
    ):
        assert needed in names, needed


def test_metadata_names_license_version_and_bounded_dependencies(dist):
    with zipfile.ZipFile(dist["wheel"]) as archive:
        info = f"cacheagent-{__version__}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        assert b"BSD 3-Clause" in archive.read(f"{info}/licenses/LICENSE")
    assert metadata["Version"] == __version__  # one source: cacheagent.__version__
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["License-File"] == "LICENSE"
    assert "Programming Language :: Python :: 3" in metadata.get_all("Classifier")
    requires = " ".join(metadata.get_all("Requires-Dist"))
    assert "tqdm>=4.66" in requires
    for patched in ("gcsfs", "adlfs", "s3fs", "azure-core"):
        assert re.search(rf"{patched}[^,;]*,?<\d", requires) or re.search(
            rf"{patched}<\d[^;]*", requires
        ), patched


def _without_compiler_env(venv: Path) -> dict[str, str]:
    # Only the venv's own scripts and sh's basics: no cc, gcc or ld reachable.
    tools = venv / "tools"
    tools.mkdir(exist_ok=True)
    for tool in ("sh", "dirname", "cat", "uname"):
        found = shutil.which(tool)
        if found and not (tools / tool).exists():
            (tools / tool).symlink_to(found)
    env = {
        "PATH": f"{venv / 'bin'}:{tools}",
        "CC": "/nonexistent/cc",
        "CXX": "/nonexistent/c++",
        "HOME": str(venv),
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "CACHEAGENT_CACHE_DIR": str(venv / "cache"),
    }
    for compiler in ("gcc", "cc", "ld"):
        assert shutil.which(compiler, path=env["PATH"]) is None
    return env


def test_wheel_installs_and_runs_without_a_compiler(dist, tmp_path):
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=STEP_TIMEOUT_S)
    env = _without_compiler_env(venv)
    python = str(venv / "bin" / "python")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        # cwd away from the checkout: "python -c" would import it from there.
        return subprocess.run(
            list(argv),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
        )

    # --no-deps --no-index: offline, and proof that nothing is built at install time.
    done = run(python, "-m", "pip", "install", "--no-deps", "--no-index", str(dist["wheel"]))
    assert done.returncode == 0, done.stdout + done.stderr
    # The command line, --help and install-triton need none of the storage SDKs.
    done = run(str(venv / "bin" / "cacheagent"), "--help")
    assert done.returncode == 0 and "install-triton" in done.stdout, done.stderr
    agents = tmp_path / "repoagents"
    done = run(str(venv / "bin" / "cacheagent"), "install-triton", "--repoagent-dir", str(agents))
    assert done.returncode == 0, done.stderr
    installed = agents / "cacheagent" / "libtritonrepoagent_cacheagent.so"
    assert installed.read_bytes() == _shim_from(dist["wheel"], tmp_path).read_bytes()
    assert python in (agents / "cacheagent" / "cacheagent-worker").read_text()

    # With the dependencies (borrowed from this venv, since the fresh one is offline),
    # the installed package, not this checkout, fetches a model.
    site = Path(sysconfig.get_path("purelib"))
    fresh_site = next((venv / "lib").glob("python3*/site-packages"))
    (fresh_site / "borrowed-deps.pth").write_text(f"{site}\n")
    model = tmp_path / "model"
    (model / "1").mkdir(parents=True)
    (model / "1" / "w.bin").write_bytes(os.urandom(4096))
    where = run(python, "-c", "import cacheagent.cli.main as m; print(m.__file__)")
    assert where.stdout.startswith(str(fresh_site)), where.stdout + where.stderr
    done = run(str(venv / "bin" / "cacheagent"), "warm", str(model), "--versions", "all")
    assert done.returncode == 0, done.stderr
    assert (
        Path(done.stdout.strip(), "1", "w.bin").read_bytes() == (model / "1" / "w.bin").read_bytes()
    )
