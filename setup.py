"""Build the optional C extension ``fastlstm._cext``.

Set ``FASTLSTM_NO_EXTENSION=1`` to skip it. When it cannot be compiled (no C compiler, no Cython),
the install still succeeds with a warning and fastlstm runs on its Numba backend.
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SKIP_VARIABLE = "FASTLSTM_NO_EXTENSION"


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed compilation as a warning instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure falls back to Numba
            self._warn(error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            self._warn(error)

    @staticmethod
    def _warn(error):
        print(
            f"WARNING: the fastlstm C extension could not be built ({type(error).__name__}: {error}); "
            "fastlstm will use its Numba backend.",
            file=sys.stderr,
        )


def extensions():
    if os.environ.get(SKIP_VARIABLE, "") not in ("", "0"):
        print(f"{SKIP_VARIABLE} is set: skipping the C extension", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: Cython is not installed: skipping the C extension", file=sys.stderr)
        return []
    import numpy

    extension = Extension(
        "fastlstm._cext",
        sources=["fastlstm/_cext.pyx", "csrc/fastlstm.c", "csrc/fastlstm_pool.c"],
        # Headers as dependencies, so that editing one rebuilds the extension.
        depends=sorted(glob.glob("csrc/*.h")),
        include_dirs=["csrc", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        # -fno-math-errno lets sqrt inline; -ffp-contract=off keeps every build and every
        # instruction-set clone on the same rounding (no fused multiply-add).
        extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=off", "-pthread"],
        extra_link_args=["-pthread"],
    )
    try:
        return cythonize([extension], language_level=3,
                         compiler_directives={"boundscheck": False, "wraparound": False})
    except Exception as error:  # noqa: BLE001 - a Cython failure falls back to Numba too
        OptionalBuildExt._warn(error)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
