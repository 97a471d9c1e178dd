"""dnsd stops within its shutdown deadline even when one of its tasks will not (real etcd, loopback)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import dnsd.main
from carousel.config import EtcdConfig
from carousel.tasks import SHUTDOWN_DEADLINE
from dnsd.daemon import run_loop
from tests.integration.test_dnsd_helpers import dnsd_toml


async def _stuck_credentials_check(feed: Any, refused: Any) -> None:
    """Stands in for the credentials task: its cleanup waits for a peer that never answers."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(3600)


def test_dnsd_stops_within_the_deadline_when_a_task_is_stuck(
    etcd_cfg: EtcdConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dnsd.toml"
    path.write_text(dnsd_toml(etcd_cfg))
    config = dnsd.main.load_config(str(path))
    ready = threading.Event()
    stopping: dict[str, float] = {}

    def stop_soon(stop: asyncio.Event) -> None:  # instead of SIGTERM: stop once it is serving
        def fire() -> None:
            stopping["at"] = time.monotonic()
            stop.set()

        asyncio.get_running_loop().call_later(0.5, fire)

    monkeypatch.setattr(dnsd.main, "check_credentials", _stuck_credentials_check)
    monkeypatch.setattr(dnsd.main, "install_stop_handlers", stop_soon)
    result: dict[str, Any] = {}

    def run() -> None:
        with capture_logs() as logs:
            result["code"] = run_loop(dnsd.main.serve(config, on_ready=lambda _: ready.set()))
        result["logs"] = logs
        result["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(20), "dnsd did not start"
    thread.join(SHUTDOWN_DEADLINE + 15)
    assert not thread.is_alive(), "dnsd did not stop: shutdown waits for a stuck task without a deadline"
    assert result["code"] == 0
    took = result["ended"] - stopping["at"]
    assert took < SHUTDOWN_DEADLINE + 5, took
    stuck = [e for e in result["logs"] if "shutdown deadline" in e["event"]]
    assert len(stuck) == 1 and stuck[0]["tasks"] == ["etcd-credentials"], result["logs"]
