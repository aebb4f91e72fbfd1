"""Build step for the Triton repository-agent shim; all metadata lives in pyproject.toml.

The shim (``cacheagent/triton/shim/cacheagent_shim.c``) is an ordinary C shared library
that Triton dlopens, not a Python extension module. It is built with a setuptools
``Extension`` so that ``pip install .`` (and ``pip install -e .``) produce it at
``cacheagent/_lib/libtritonrepoagent_cacheagent.so`` inside the installed package,
where ``cacheagent install-triton`` finds it. The custom ``build_ext`` below
drops what is specific to Python modules: the ABI-tagged file name, the
``PyInit_*`` export and any libpython link. Triton's own symbols stay undefined
on purpose: they resolve from the tritonserver process that loads the library.

Because the library is no Python extension, the wheel is tagged
``py3-none-<platform>``: any Python 3 on that platform can use it. On x86_64
glibc the shim is linked against the oldest versions of the few glibc symbols
that moved into libc in 2.32-2.34 (see ``glibc_compat.h``), so it needs only
GLIBC_2.17; the wheel is then tagged ``manylinux_2_17`` (manylinux2014) when the
built library proves it, and installs on Ubuntu 20.04, RHEL 8 and newer.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

SHIM = "cacheagent._lib.libtritonrepoagent_cacheagent"
SHIM_BASENAME = SHIM.rsplit(".", 1)[-1]
SHIM_DIR = "cacheagent/triton/shim"
# The manylinux floor the x86_64 build reaches (manylinux2014 is its legacy alias).
MANYLINUX_GLIBC = (2, 17)


class BuildShim(build_ext):
    """``build_ext`` that emits the shim as a plain ``lib*.so``."""

    def get_ext_filename(self, fullname: str) -> str:
        """Name the shim ``libtritonrepoagent_cacheagent.so``, without the ABI suffix."""
        # distutils asks with the last dotted component only, setuptools sometimes
        # with the full name; both must get the plain name.
        if fullname.rsplit(".", 1)[-1] == SHIM_BASENAME:
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        """Export nothing extra: the shim has no ``PyInit_*`` entry point."""
        if ext.name == SHIM:
            return []
        return super().get_export_symbols(ext)

    def build_extension(self, ext: Extension) -> None:
        """Link the shim without the interpreter's rpath (it needs no Python library)."""
        if ext.name == SHIM and self.compiler is not None:
            linker = list(self.compiler.linker_so)
            self.compiler.linker_so = [a for a in linker if not a.startswith("-Wl,-rpath")]
            try:
                super().build_extension(ext)
            finally:
                self.compiler.linker_so = linker
            return
        super().build_extension(ext)

    def copy_extensions_to_source(self) -> None:
        """For editable installs: create ``cacheagent/_lib/`` in the source tree first."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = ext.name.rsplit(".", 1)[0]
            os.makedirs(build_py.get_package_dir(package) or ".", exist_ok=True)
        super().copy_extensions_to_source()

    def get_libraries(self, ext: Extension) -> list[str]:
        """Never link libpython into the shim: Triton's process has no Python in it."""
        if ext.name == SHIM:
            return list(ext.libraries)
        return super().get_libraries(ext)


def _is_glibc_x86_64() -> bool:
    return platform.libc_ver()[0] == "glibc" and platform.machine() in ("x86_64", "AMD64")


def shim_extension() -> Extension:
    """The Extension that compiles the shim."""
    # Only the TRITONREPOAGENT_* entry points (marked in the source) are exported.
    compile_args = ["-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra"]
    link_args: list[str] = []
    if _is_glibc_x86_64():
        compile_args += ["-include", f"{SHIM_DIR}/glibc_compat.h"]
        # Before glibc 2.34 the pinned dladdr and pthread_mutex_trylock live in
        # libdl.so.2 and libpthread.so.0: name them, so an older system loads them
        # (glibc 2.34+ keeps both files as stubs). "-ldl" would pick the empty libdl.a.
        link_args = ["-Wl,--no-as-needed", "-l:libdl.so.2", "-l:libpthread.so.0"]
    return Extension(
        SHIM,
        sources=[f"{SHIM_DIR}/cacheagent_shim.c"],
        depends=[f"{SHIM_DIR}/glibc_compat.h"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # Python's include dirs are harmless, but the shim needs none of them.
        include_dirs=[],
    )


def glibc_floor(library: str) -> tuple[int, int] | None:
    """The newest GLIBC_x.y symbol version ``library`` needs, read with objdump; None if unknown."""
    objdump = shutil.which("objdump")
    if objdump is None or not os.path.isfile(library):
        return None
    try:
        listing = subprocess.run(
            [objdump, "-T", library], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.findall(r"GLIBC_([0-9]+)\.([0-9]+)", listing)
    return max(((int(major), int(minor)) for major, minor in found), default=(2, 0))


class ShimWheel(bdist_wheel):
    """A wheel for any Python 3 on this platform: the shim is no Python extension."""

    def finalize_options(self) -> None:
        """The wheel holds a native library, so it is never pure."""
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        """``py3-none-<platform>``; manylinux_2_17 when the built shim needs no newer glibc."""
        _python, _abi, plat = super().get_tag()
        return "py3", "none", self._manylinux(plat) or plat

    def _manylinux(self, plat: str) -> str | None:
        # Only a tag the built library proves: objdump must show its glibc floor.
        if plat != "linux_x86_64" or not _is_glibc_x86_64():
            return None
        build = self.get_finalized_command("build_ext")
        floor = glibc_floor(build.get_ext_fullpath(SHIM))
        if floor is None or floor > MANYLINUX_GLIBC:
            return None
        major, minor = MANYLINUX_GLIBC
        return f"manylinux_{major}_{minor}_x86_64.manylinux2014_x86_64"


# Triton (and so the repository agent) exists for Linux only.
setup(
    ext_modules=[shim_extension()] if sys.platform.startswith("linux") else [],
    cmdclass={"build_ext": BuildShim, "bdist_wheel": ShimWheel},
)
