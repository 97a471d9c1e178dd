"""Shared by the VM lab tests: vagrant/vmlab.py imported as a module."""

from __future__ import annotations

import os
import shutil
from types import ModuleType

import pytest

from tests import vagrant_scripts


def load_vmlab() -> ModuleType:
    """vagrant/vmlab.py, which is a script, not a package module."""
    return vagrant_scripts.load("vmlab")


@pytest.fixture(scope="session")
def vmlab() -> ModuleType:
    """The lab driver module."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("ip missing (apt-get install iproute2)")
    return load_vmlab()
