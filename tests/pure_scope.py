"""Which unit test files the pure-Python pass can leave out: those it would run unchanged.

CAROUSEL_PURE_PYTHON=1 changes what runs in two places only: edge/__init__.py loads every
``edge.*`` module from its source instead of its compiled twin, and dnsd/mmsg.py declines
the compiled receive loop. A test file whose code reaches neither runs the same code in
both passes, so `make test` runs it once. "Reaches" is read from the source, conservatively:

- every import in the file and, transitively, in each of the project's modules it imports,
  function-local imports included;
- a file in that closure that starts a Python process (``sys.executable``, ``carousel.cli``)
  or imports by name (``import_module(``) could reach anything, so it counts as reaching;
- so does a test that asks for tests/conftest.py's ``procs`` fixture (it starts daemons).

Anything unsure is kept: the cost of a wrong answer is a test run twice, never one skipped.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PURE_SENSITIVE = ("edge", "dnsd.mmsg")
STARTS_OUR_CODE = ("sys.executable", "carousel.cli", "import_module(")
DAEMON_FIXTURE = re.compile(r"\bprocs\b")


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _imports(path: Path) -> frozenset[str]:
    """Dotted names the file imports (and, for ``from x import y``, ``x.y`` too)."""
    rel = path.relative_to(REPO).with_suffix("")
    package = rel.parts[:-1]  # for an __init__.py, its own package
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(n for n in names if n)


@functools.cache
def _closure(path: Path) -> frozenset[tuple[str, Path]]:
    """(module name, file) of every project module the file reaches by imports."""
    seen: dict[Path, str] = {}
    stack = [("", path)]
    while stack:
        name, current = stack.pop()
        if current in seen:
            continue
        seen[current] = name
        for imported in _imports(current):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
                prefix = ".".join(parts[:i])
                found = _module_file(prefix)
                if found is not None:
                    stack.append((prefix, found))
    return frozenset((n, p) for p, n in seen.items())


def runs_the_same_pure(test_file: Path) -> bool:
    """True when CAROUSEL_PURE_PYTHON=1 cannot change what the test file runs."""
    test_file = test_file.resolve()
    if DAEMON_FIXTURE.search(test_file.read_text()):
        return False
    for name, path in _closure(test_file):
        if any(name == s or name.startswith(s + ".") for s in PURE_SENSITIVE):
            return False
        text = path.read_text()
        if any(word in text for word in STARTS_OUR_CODE):
            return False
    return True
