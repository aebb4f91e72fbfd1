"""Installing the agent for Triton: the shim, the launcher, and the worker's bytecode."""

import importlib.util
import os
import subprocess
import sys

import cacheagent
from cacheagent.triton import layout as versions
from cacheagent.triton.install import (
    LAUNCHER_NAME,
    LAUNCHER_NO_PYTHON,
    LIBRARY_NAME,
    install_triton,
    launcher_script,
)


def test_install_writes_shim_launcher_and_bytecode(tmp_path):
    # A worker starts with every Triton start: it must not compile its modules each
    # time, even where the environment never writes bytecode (PYTHONDONTWRITEBYTECODE).
    pyc = importlib.util.cache_from_source(versions.__file__)
    if os.path.exists(pyc):
        os.unlink(pyc)
    library = install_triton(tmp_path / "agents")
    assert library.name == LIBRARY_NAME and library.stat().st_size > 0
    launcher = library.parent / LAUNCHER_NAME
    assert os.access(launcher, os.X_OK) and sys.executable in launcher.read_text()
    assert os.path.isfile(pyc)


def _launch(launcher, env_python=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if env_python:
        env["CACHEAGENT_PYTHON"] = str(env_python)
    return subprocess.run(
        [str(launcher)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_launcher_of_a_moved_venv_says_to_reinstall(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    agents = tmp_path / "agents"
    library = install_triton(agents, python=str(venv / "bin" / "python"))
    launcher = library.parent / LAUNCHER_NAME
    venv.rename(tmp_path / "moved-venv")  # what `mv venv elsewhere` does to the recorded path
    done = _launch(launcher)
    assert done.returncode == LAUNCHER_NO_PYTHON
    # The shim shows stderr in Triton's console and forwards LOG lines into Triton's log.
    for text in (done.stderr, done.stdout):
        assert str(venv / "bin" / "python") in text and "moved" in text
        assert f"cacheagent install-triton --repoagent-dir {agents}" in text
    assert done.stdout.startswith("LOG ERROR ")


def test_launcher_names_a_bad_cacheagent_python(tmp_path):
    library = install_triton(tmp_path / "agents")
    done = _launch(library.parent / LAUNCHER_NAME, env_python=tmp_path / "nope" / "python")
    assert done.returncode == LAUNCHER_NO_PYTHON
    assert f"CACHEAGENT_PYTHON={tmp_path / 'nope' / 'python'}" in done.stderr


def test_launcher_execs_its_python_with_the_worker_module(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ran $*"\n')
    fake.chmod(0o755)
    library = install_triton(tmp_path / "agents", python=str(fake))
    done = _launch(library.parent / LAUNCHER_NAME)
    assert done.returncode == 0 and done.stdout.strip() == "ran -I -m cacheagent.triton.worker"


def test_launcher_of_this_python_starts_the_worker_without_site(tmp_path):
    """The interpreter that installs knows its paths: the worker starts with -S (no .pth
    processing), and still imports the installed cacheagent and its dependencies."""
    script = launcher_script(sys.executable)
    assert "-I -S -c" in script
    boot = script.split("-I -S -c '", 1)[1].split("'", 1)[0]
    check = boot.replace(
        "from cacheagent.triton.worker import run; run()",
        "import site, cacheagent, xxhash, diskcache; "
        "print(site.ENABLE_USER_SITE, cacheagent.__file__)",
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", check], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == cacheagent.__file__
