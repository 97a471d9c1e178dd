"""Build hook: the edge's hot modules compiled with Cython, and dnsd's UDP loop in C, when a C
compiler is there.

Everything else about the package is in pyproject.toml. The modules below are
compiled from their own .py sources (Cython's pure-Python mode, no .pyx), so
the source stays the reference, mypy and the tests read it, and it is the
fallback: with no C compiler (or no Python headers), or with
CAROUSEL_PURE_PYTHON=1 set at install time, `pip install` still succeeds and
the edge runs pure Python. edge/__init__.py loads a source instead of its
compiled module when CAROUSEL_PURE_PYTHON=1 is set at run time, or when the
source is newer than the compiled module (an edit not rebuilt yet).

Three of them have a .pxd beside them (Cython's "augmenting .pxd", read from the
source tree when they are compiled): C types for the locals of the head parsers'
loops and the field serialisers (``cpdef`` functions, ``Py_ssize_t`` indexes,
``Py_UCS4`` characters, ``str``/``list``/``dict`` objects), so those loops run as C
over the characters instead of generic method calls. The .py is unchanged by
them and stays the fallback; a .pxd edited alone needs a rebuild too.

dnsd's receive loop (dnsd/_udploop.c) is plain C against the Python C API, not
Cython: the Python loop in dnsd/mmsg.py stays the fallback, chosen by the same
rules (dnsd/mmsg.py, ``_compiled_loop``).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The synchronous parsers and field rules of the proxied request's path (the profile in
# edge/README.md, "Performance"). Modules with coroutines on that path (connection, proxy,
# pipeline, headers) stay interpreted: compiled, their coroutines are Cython's, which asyncio
# drives through its slow path, and the edge spent 10-19 % more CPU per request with them
# (bench/proxy_bench.py --pure, same run).
HOT_MODULES = [
    "edge/http/http1.py",
    "edge/http/request.py",
    "edge/core/fields.py",
    "edge/upstream/client.py",
]

# recvmmsg -> the prepared answer -> sendmmsg without the interpreter per datagram (dnsd/README.md,
# "Speed"); Linux only, like the calls it makes.
C_MODULES = [Extension("dnsd._udploop", ["dnsd/_udploop.c"])] if sys.platform.startswith("linux") else []


class OptionalBuildExt(build_ext):
    """build_ext that warns and leaves the pure-Python modules when compiling fails."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1  # one gcc per core: the build takes minutes otherwise

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all: distutils raises before any module
            _skipped(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # gcc or Python.h missing, or a compile error
            _skipped(f"{ext.name}: {type(exc).__name__}: {exc}")


def _skipped(why: str) -> None:
    print(f"carousel: compiled modules skipped, they run as pure Python ({why})", file=sys.stderr)


def _extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("CAROUSEL_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _skipped("Cython is not installed: the edge's modules")
        return list(C_MODULES)
    return list(C_MODULES) + cythonize(
        HOT_MODULES,
        # Python semantics exactly: annotations are not turned into C type checks.
        compiler_directives={"language_level": 3, "annotation_typing": False, "binding": True},
        quiet=True,
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
