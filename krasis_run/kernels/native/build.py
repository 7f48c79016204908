"""Build the native kernel library from its C sources with the system C compiler (gcc/cc + OpenMP).

Standalone (no torch, no krasis imports): setup.py loads this file to prebuild the library at
install time, and the runtime loader calls it on first use when the repository runs from a
checkout (PYTHONPATH) without an install. The library name carries a hash of the sources and flags,
so an edited source never runs a stale build.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("krasis_native.c", "generic.inc", "avx2.inc")
MAIN_SOURCE = "krasis_native.c"
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
LIBS = ["-lm"]
CACHE_ENV = "KRASIS_NATIVE_DIR"  # where to put/find the built library (default: beside the sources, else ~/.cache)


class BuildError(RuntimeError):
    """No usable C compiler, or the compile failed; the message says what to do."""


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(" ".join(FLAGS + LIBS).encode())
    h.update(platform.machine().encode())
    return h.hexdigest()[:16]


def library_name() -> str:
    return f"libkrasis_native-{source_hash()}.so"


def candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(CACHE_ENV):
        dirs.append(Path(os.environ[CACHE_ENV]))
    dirs.append(HERE / "_build")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(cache) / "krasis")
    return dirs


def find_library() -> Path | None:
    name = library_name()
    for d in candidate_dirs():
        if (d / name).is_file():
            return d / name
    return None


def build(dest_dir: Path | None = None, verbose: bool = False) -> Path:
    """Compile into dest_dir (default: the first writable candidate directory); returns the library path."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC or install gcc) to build the native kernels")
    dirs = [Path(dest_dir)] if dest_dir else candidate_dirs()
    errors = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        cmd = [*cc.split(), *FLAGS, f'-DKRS_SOURCE_HASH="{source_hash()}"', "-o", tmp,
               str(HERE / MAIN_SOURCE), *LIBS]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
            if result.returncode:
                raise BuildError(f"compiling the native kernels failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
            out = d / library_name()
            os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
            return out
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BuildError("no writable directory for the native kernel library: " + "; ".join(errors))


def find_or_build() -> Path:
    return find_library() or build()


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None, verbose=True))
