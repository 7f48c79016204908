"""Build hook: compile the native CPU kernels (plain C + OpenMP, krasis_run/kernels/native) at install.

Everything else is in pyproject.toml. The library is a plain shared object loaded with ctypes (no
Python or torch ABI). Without a C compiler the install still succeeds: the runtime then tries to
build on first use and otherwise falls back to torch's kernels with a one-line warning.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = Path(__file__).resolve().parent / "krasis_run" / "kernels" / "native"


def _native_build():
    spec = importlib.util.spec_from_file_location("krasis_native_build", NATIVE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildNative(build_ext):
    def build_extension(self, ext):
        builder = _native_build()
        target = Path(self.get_ext_fullpath(ext.name))
        # An editable install runs from the sources, so the library goes where the loader looks there.
        editable = getattr(self, "editable_mode", False) or self.inplace
        dest = NATIVE / "_build" if editable else target.parent / "_build"
        try:
            self._built = builder.build(dest, verbose=True)
        except builder.BuildError as e:
            self._built = None
            print(f"warning: {e}; krasis will retry on first use or use torch's kernels")
            return
        # setuptools copies/records the file it expects for this extension; give it the same library
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._built, target)

    def get_outputs(self):
        built = getattr(self, "_built", None)
        return [str(built), self.get_ext_fullpath(self.extensions[0].name)] if built else []


setup(
    ext_modules=[Extension("krasis_run.kernels.native.krasis_native", sources=[])],
    cmdclass={"build_ext": BuildNative},
)
