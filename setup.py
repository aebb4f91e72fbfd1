"""Build step for the Triton repository-agent shim; all metadata lives in pyproject.toml.

The shim (``cacheagent/triton/shim/cacheagent_shim.c``) is an ordinary C shared library
that Triton dlopens, not a Python extension module. It is built with a setuptools
``Extension`` so that ``pip install .`` (and ``pip install -e .``) produce it at
``cacheagent/_lib/libtritonrepoagent_cacheagent.so`` inside the installed package,
where ``cacheagent install-triton`` finds it. The custom ``build_ext`` below
drops what is specific to Python modules: the ABI-tagged file name, the
``PyInit_*`` export and any libpython link. Triton's own symbols stay undefined
on purpose: they resolve from the tritonserver process that loads the library.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SHIM = "cacheagent._lib.libtritonrepoagent_cacheagent"
SHIM_BASENAME = SHIM.rsplit(".", 1)[-1]


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


def shim_extension() -> Extension:
    """The Extension that compiles the shim."""
    return Extension(
        SHIM,
        sources=["cacheagent/triton/shim/cacheagent_shim.c"],
        # Only the TRITONREPOAGENT_* entry points (marked in the source) are exported.
        extra_compile_args=["-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra"],
        # dladdr lives in libdl before glibc 2.34; later it is an empty stub.
        libraries=["dl"],
        # Python's include dirs are harmless, but the shim needs none of them.
        include_dirs=[],
    )


# Triton (and so the repository agent) exists for Linux only.
setup(
    ext_modules=[shim_extension()] if sys.platform.startswith("linux") else [],
    cmdclass={"build_ext": BuildShim},
)
