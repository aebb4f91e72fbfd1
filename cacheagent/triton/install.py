"""Install the cacheagent repository agent where tritonserver looks for it.

``install_triton(DIR)`` (the CLI's ``cacheagent install-triton --repoagent-dir DIR``)
puts two files in ``DIR/cacheagent/``:

- ``libtritonrepoagent_cacheagent.so``: the C shim, copied from this package
  (``pip install`` builds it into ``cacheagent/_lib/``);
- ``cacheagent-worker``: a two-line launcher the shim executes to start the
  Python worker, pinned to the Python that ran the install (override at run
  time with ``CACHEAGENT_PYTHON``).

It also writes the package's bytecode (``__pycache__``) when it can, since a
worker that compiled its modules on every start would pay for it in every
Triton start.

Then start ``tritonserver --repoagent-directory=DIR``. Both files are replaced
atomically, so reinstalling under a running Triton is safe: a worker started
later simply uses the new launcher.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cacheagent.errors import CacheAgentError
from cacheagent.local.atomic import write_atomically
from cacheagent.triton.config import AGENT_NAME
from cacheagent.triton.prestart import worker_boot_code

LIBRARY_NAME = f"libtritonrepoagent_{AGENT_NAME}.so"
LAUNCHER_NAME = "cacheagent-worker"


class InstallError(CacheAgentError, OSError):
    """The agent cannot be installed into Triton's repository-agent directory."""


def shim_library() -> Path:
    """Path of the shim built into this installed package; raises InstallError if absent."""
    path = Path(__file__).resolve().parent.parent / "_lib" / LIBRARY_NAME
    if not path.is_file():
        raise InstallError(
            f"the Triton shim {path} is missing from the installed cacheagent package; "
            "reinstall it from source with a C compiler available (pip install .), "
            "on Linux"
        )
    return path


# Exit status of a launcher whose Python is gone (the shell's "command not found").
LAUNCHER_NO_PYTHON = 127

# The launcher checks its Python before exec'ing it: a virtualenv that was moved,
# rebuilt or deleted would otherwise fail with a bare "not found" from sh. The
# message goes to stderr (Triton's console) and, as a LOG line on stdout, which the
# shim forwards before the worker is ready, into Triton's log beside the failed LOAD.
_LAUNCHER = """\
#!/bin/sh
# Started by libtritonrepoagent_cacheagent.so; written by `cacheagent install-triton`.
recorded="{python}"
python="${{CACHEAGENT_PYTHON:-$recorded}}"
if [ ! -x "$python" ]; then
    here=$(dirname "$0")
    if [ -n "${{CACHEAGENT_PYTHON:-}}" ]; then
        what="CACHEAGENT_PYTHON=$python"
    else
        what="the Python $python recorded by cacheagent install-triton"
    fi
    msg="cacheagent-worker: cannot start the worker: $what does not exist or is not \
executable (was its virtualenv moved or deleted?); run 'cacheagent install-triton \
--repoagent-dir $(dirname "$here")' again with the Python that has cacheagent \
installed, or set CACHEAGENT_PYTHON to it"
    echo "$msg" >&2
    echo "LOG ERROR $msg"
    exit {status}
fi
if [ "$python" = "$recorded" ] && [ {fast} = 1 ]; then
    # No site (-S): the worker's paths were recorded at install, which saves
    # processing every .pth file of the venv on each worker start.
    exec "$python" -I -S -c '{boot}' "$@"
fi
exec "$python" -I -m cacheagent.triton.worker "$@"
"""


def launcher_script(python: str) -> str:
    """The launcher's text: run the worker with ``python`` unless CACHEAGENT_PYTHON is set.

    When that Python is gone, it says so and what to do, and exits 127.
    """
    quoted = python.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    quoted = quoted.replace("`", "\\`")
    boot = worker_boot_code(python)
    return _LAUNCHER.format(
        python=quoted, status=LAUNCHER_NO_PYTHON, boot=boot, fast=1 if boot else 0
    )


def install_triton(repoagent_dir: Path, python: str = sys.executable) -> Path:
    """Install the agent under ``repoagent_dir``; return the installed library's path.

    ``repoagent_dir`` is what tritonserver gets as ``--repoagent-directory``; it is
    created if missing. ``python`` is the interpreter the worker runs with (it must
    have cacheagent installed); the default is the one running this function.
    """
    library = shim_library()
    if not python or not os.path.isabs(python):
        raise InstallError(f"the worker's Python must be an absolute path, got {python!r}")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise InstallError(f"the worker's Python {python} does not exist or is not executable")
    target_dir = Path(repoagent_dir).absolute() / AGENT_NAME
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(
            f"cannot create {target_dir}: {exc.strerror or exc}; choose a writable "
            "--repoagent-dir (and pass the same one to tritonserver --repoagent-directory)"
        ) from exc
    if not os.access(target_dir, os.W_OK | os.X_OK):
        raise InstallError(
            f"{target_dir} is not writable by this user; choose a writable --repoagent-dir "
            "or run the install as its owner"
        )
    target = target_dir / LIBRARY_NAME
    try:
        # Renamed into place, never overwritten: a running Triton may have the old .so mapped.
        write_atomically(target, library.read_bytes(), mode=0o755)
        write_atomically(target_dir / LAUNCHER_NAME, launcher_script(python), mode=0o755)
    except OSError as exc:
        raise InstallError(f"cannot install into {target_dir}: {exc}") from exc
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        precompile_package()
    return target


def precompile_package() -> bool:
    """Write this package's bytecode now, so that no worker start compiles Python.

    A worker starts with every Triton start; compiling cacheagent's modules from
    source costs it about 40 ms (measured), and happens on every start wherever
    bytecode is never written: PYTHONDONTWRITEBYTECODE=1 (common in container
    images) with an editable install or one made with ``pip --no-compile``.
    Best effort: False if the bytecode could not be written (read-only package).
    """
    import compileall

    package = Path(__file__).resolve().parent
    return bool(compileall.compile_dir(str(package), quiet=2))
