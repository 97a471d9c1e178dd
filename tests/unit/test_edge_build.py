"""The compiled modules (setup.py) and the pure-Python path that CAROUSEL_PURE_PYTHON forces."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge
from edge.upstream.client import NotSent, UpstreamConnection

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import edge, edge.upstream.proxy, edge.front.connection, edge.features.headers;"
    "print(','.join(edge.compiled_modules()))"
)


def _hot_modules() -> list[str]:
    """HOT_MODULES as written in setup.py, as module names."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HOT_MODULES":
            paths = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no HOT_MODULES")


def _compiled_in(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    return [m for m in out.split(",") if m]


def test_the_pure_path_is_forced_by_the_environment() -> None:
    env = {**os.environ, edge.PURE_ENV: "1"}
    assert _compiled_in(env) == []


def test_every_hot_module_runs_compiled_when_built() -> None:
    hot = _hot_modules()
    built = [m for m in hot if list((ROOT / Path(*m.split(".")[:-1])).glob(m.split(".")[-1] + ".*.so"))]
    if not built:
        pytest.skip("no compiled modules here (no C compiler at install time, or a pure install)")
    env = {k: v for k, v in os.environ.items() if k != edge.PURE_ENV}
    # A module whose source was edited after the build runs from source (with a warning).
    fresh = [m for m in built if _fresh(m)]
    assert sorted(_compiled_in(env)) == sorted(fresh)


def _fresh(module: str) -> bool:
    source = ROOT / (module.replace(".", "/") + ".py")
    compiled = next(source.parent.glob(source.stem + ".*.so"))
    return compiled.stat().st_mtime >= source.stat().st_mtime


class _ClosedTransport:
    def is_closing(self) -> bool:
        return True


async def test_a_connection_reset_before_the_request_is_written_is_not_sent() -> None:
    """NotSent is a ConnectFailed: the proxy retries it whatever the method."""
    import asyncio

    conn = UpstreamConnection(asyncio.get_running_loop())
    conn.transport = _ClosedTransport()  # type: ignore[assignment]
    with pytest.raises(NotSent):
        conn.start(b"POST / HTTP/1.1\r\n\r\n", False, 5.0)
