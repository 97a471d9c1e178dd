"""Shared by the VM lab tests: vagrant/vmlab.py imported as a module."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_vmlab() -> ModuleType:
    """vagrant/vmlab.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("vmlab", REPO / "vagrant" / "vmlab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def vmlab() -> ModuleType:
    """The lab driver module."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("ip missing (apt-get install iproute2)")
    return load_vmlab()
