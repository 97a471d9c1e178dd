"""Every data file of carousel's packages is declared, so the wheel the roles install has it.

The deployment installs a wheel, not the source tree: a file missing from
[tool.setuptools.package-data] is missing on every node (the sample AP exited at start on
the VM lab: its static directory was not in the wheel), while editable installs and the
tests, which run from the tree, never notice.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Files the build compiles or setuptools packages by itself.
CODE = {".py", ".pyx", ".pxd", ".pyi", ".c", ".h"}


def test_every_data_file_in_a_package_is_in_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    roots = [p.rstrip("*") for p in setuptools["packages"]["find"]["include"]]
    declared = setuptools.get("package-data", {})
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", *roots], capture_output=True, text=True, timeout=30
    )
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    missing = []
    for name in listing.stdout.split():
        path = REPO / name
        if path.suffix in CODE or path.name.startswith("README"):
            continue
        # The package a file belongs to: the nearest directory with an __init__.py.
        package = path.parent
        while not (package / "__init__.py").exists():
            package = package.parent
        patterns = declared.get(".".join(package.relative_to(REPO).parts), [])
        if not any(path in set(package.glob(pattern)) for pattern in patterns):
            missing.append(name)
    assert missing == [], f"not in [tool.setuptools.package-data]: {missing[:10]}"
