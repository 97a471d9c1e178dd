"""Fixtures shared by several integration test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_deploy_ansible import EXAMPLE_INVENTORY, render


@pytest.fixture(scope="session")
def example_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every template rendered for every host of the example inventory, once per session.

    The tests that take it only read the tree; one ansible-playbook run over the nine
    hosts costs tens of CPU seconds, so the files that check it share one.
    """
    tmp = tmp_path_factory.mktemp("render-example")
    out = render(tmp, EXAMPLE_INVENTORY)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return tmp / "rendered"
