"""Installing the agent for Triton: the shim, the launcher, and the worker's bytecode."""

import importlib.util
import os
import sys

from cacheagent.triton import layout as versions
from cacheagent.triton.install import LAUNCHER_NAME, LIBRARY_NAME, install_triton


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
