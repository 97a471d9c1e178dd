"""The edge: an L7 reverse proxy that routes, serves static files, balances and buffers.

Layers, top to bottom; each imports only from the layers below it (import-linter
contracts in pyproject.toml; edge/README.md draws the request's path through them):

    main.py, testing/   run the edge; helpers that start one in tests and benchmarks
    front/              what faces clients: listeners, the client connection, TLS, passthrough,
                        the forward proxy, and the Edge that assembles everything
    features/           pipeline steps (dos, tls redirect/HSTS, headers, cache, compression,
                        static files), each on its own
    upstream/           beside them, the way to members: client, pools, balancing, the proxy
    core/               the pipeline interface (Exchange, Reply, Body, Feature), config schema,
                        routing, shared HTTP field rules, errors, metrics, limits
    http/               HTTP without I/O: the HTTP/1.1 parser, the Request the pipeline sees
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

# The hot modules are also built as C extensions (Cython, setup.py) when `pip install` finds a C
# compiler; each sits beside its source, which stays the reference and the fallback.
# CAROUSEL_PURE_PYTHON=1 loads the sources instead (the suite runs both ways, `make test-pure`).
PURE_ENV = "CAROUSEL_PURE_PYTHON"


class _SourceOverStale(MetaPathFinder):
    """Loads an edge module from its source when pure Python is asked for, or when the
    compiled module is older than the source (an edit not yet rebuilt must not be ignored)."""

    def __init__(self, pure: bool) -> None:
        self.pure = pure

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or not name.startswith("edge."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return spec
        compiled = spec.origin or ""
        source = os.path.join(os.path.dirname(compiled), name.rpartition(".")[2] + ".py")
        if not os.path.exists(source):
            return spec
        if not self.pure:
            if os.path.getmtime(source) <= os.path.getmtime(compiled):
                return spec
            warnings.warn(
                f"{name}: the compiled module is older than {source}; using the source "
                "(rebuild with `pip install -e .`)",
                RuntimeWarning,
                stacklevel=2,
            )
        loader = importlib.machinery.SourceFileLoader(name, source)
        return importlib.util.spec_from_file_location(name, source, loader=loader)


sys.meta_path.insert(0, _SourceOverStale(bool(os.environ.get(PURE_ENV))))


def compiled_modules() -> list[str]:
    """The edge modules running compiled, by name (empty: all pure Python)."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("edge.")
        and isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
    )
