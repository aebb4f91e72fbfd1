"""The md5check test agent's own MD5 (RFC 1321), against hashlib, at every block boundary."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from harness.agents import AgentBuildError, build_md5_agent, build_md5_tool


@pytest.fixture(scope="module")
def md5_tool(tmp_path_factory: pytest.TempPathFactory):
    try:
        return build_md5_tool(tmp_path_factory.mktemp("md5tool"))
    except AgentBuildError as exc:
        pytest.skip(str(exc))


def test_md5_matches_hashlib_at_every_padding_boundary(md5_tool, tmp_path):
    sizes = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 65535, 65536, 65537, 200_003]
    files = []
    for size in sizes:
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        files.append(path)
    out = subprocess.run(
        [str(md5_tool), *map(str, files)], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out == [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p}" for p in files]


def test_the_agent_library_builds_where_triton_looks_for_it(tmp_path):
    try:
        library = build_md5_agent(tmp_path)
    except AgentBuildError as exc:
        pytest.skip(str(exc))
    assert library == tmp_path / "md5check" / "libtritonrepoagent_md5check.so"
    assert library.stat().st_size > 0 and not list(library.parent.glob(".*"))
