"""tests/pure_scope.py: the pure-Python pass leaves out only files it would run unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import pure_scope


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    files = {
        "edge/__init__.py": "",
        "edge/http/__init__.py": "",
        "edge/http/http1.py": "X = 1\n",
        "dnsd/__init__.py": "",
        "dnsd/table.py": "import struct\n",
        "dnsd/mmsg.py": "",
        "dnsd/query.py": "from . import table\n",
        "helpers/__init__.py": "",
        "helpers/lazy.py": "def make():\n    from edge.http import http1\n    return http1\n",
        "helpers/spawn.py": "import subprocess, sys\nRUN = [sys.executable, '-c', 'pass']\n",
        "helpers/deep.py": "from .lazy import make\n",
        "test_plain.py": "from dnsd.query import table\n",
        "test_edge.py": "import edge.http.http1\n",
        "test_lazy_edge.py": "from helpers import deep\n",
        "test_loop.py": "from dnsd import mmsg\n",
        "test_spawns.py": "from helpers.spawn import RUN\n",
        "test_daemons.py": "def test_x(procs):\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(pure_scope, "REPO", tmp_path)
    return tmp_path


def test_only_files_that_reach_no_compiled_twin_and_start_no_python_are_left_out(repo: Path) -> None:
    same = {p.name for p in repo.glob("test_*.py") if pure_scope.runs_the_same_pure(p)}
    # test_lazy_edge reaches edge through a function-local import two modules down;
    # test_spawns through a helper that starts Python; test_daemons through the procs fixture.
    assert same == {"test_plain.py"}


def test_the_real_suite_keeps_every_edge_and_dnsd_loop_test() -> None:
    unit = Path(__file__).parent
    kept = {p.name for p in unit.glob("test_*.py") if not pure_scope.runs_the_same_pure(p)}
    assert {"test_edge_http1.py", "test_edge_build.py", "test_config.py", "test_pure_scope.py"} <= kept
    assert not pure_scope.runs_the_same_pure(unit.parent / "integration" / "test_dnsd_mmsg_batch.py")
    assert pure_scope.runs_the_same_pure(unit / "test_dns_table.py")
