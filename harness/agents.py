"""Other repository agents for tests, built from source at test time.

``md5check`` (``tests/fixtures/md5_agent/md5_agent.c``) verifies ``MD5:<relpath>``
parameters against the local copy of a model on LOAD, like Triton's own checksum
agent: chained after cacheagent, it proves a second agent sees cacheagent's
snapshot and that its verdict decides the load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MD5_AGENT_NAME = "md5check"
MD5_AGENT_SOURCE = Path(__file__).resolve().parent.parent / "tests/fixtures/md5_agent/md5_agent.c"
_CFLAGS = ("-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror")


class AgentBuildError(RuntimeError):
    """A test agent could not be compiled (no C compiler, or the source does not build)."""


def build_md5_agent(repoagent_dir: Path | str) -> Path:
    """Compile md5check into ``<repoagent_dir>/md5check/libtritonrepoagent_md5check.so``.

    Triton loads it as agent ``md5check`` when started with
    ``--repoagent-directory=<repoagent_dir>``. Returns the library's path.
    """
    target = Path(repoagent_dir) / MD5_AGENT_NAME / f"libtritonrepoagent_{MD5_AGENT_NAME}.so"
    _compile(["-shared", "-fPIC"], target)
    return target


def build_md5_tool(directory: Path | str) -> Path:
    """Compile the same source as a command (``md5check FILE...`` prints MD5s); its path."""
    target = Path(directory) / "md5check"
    _compile(["-DMD5CHECK_MAIN"], target)
    return target


def _compile(flags: list[str], target: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise AgentBuildError("no C compiler (gcc, or $CC) on PATH to build the md5check agent")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: a Triton already running never sees half a file.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    command = [compiler, *_CFLAGS, *flags, "-o", partial, str(MD5_AGENT_SOURCE), "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AgentBuildError(
                f"building {MD5_AGENT_SOURCE.name} failed ({' '.join(command)}):\n{result.stderr}"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
