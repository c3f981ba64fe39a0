"""Build script.

The pure-Python package always installs. `kernels/` is installed as `wsd_engine.kernels`.
The optional C++ extension in `csrc/` (pybind11) is built only when pybind11 and a compiler
are available; any failure to build it is reported and ignored, never fatal, because the
engine has a pure-Python fallback with identical behaviour.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - optional extension
            print(f"wsd_engine: optional C++ extension not built ({e}); using the Python driver",
                  file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - optional extension
            print(f"wsd_engine: optional C++ extension {ext.name} not built ({e})", file=sys.stderr)


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("WSD_ENGINE_NO_EXT") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        return []
    return [Pybind11Extension("wsd_engine._C", sources, cxx_std=17)]


setup(
    packages=["wsd_engine", "wsd_engine.kernels"],
    package_dir={"wsd_engine": "wsd_engine", "wsd_engine.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
