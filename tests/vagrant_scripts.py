"""The scripts in vagrant/ (failover.py, vmlab.py) imported as modules by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

VAGRANT_DIR = Path(__file__).resolve().parents[1] / "vagrant"


def load(name: str) -> ModuleType:
    """vagrant/<name>.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location(name, VAGRANT_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
