"""Stopping what follows the registry: a cancelled watch ends promptly, etcd up or down.

A daemon stops by cancelling its tasks and waiting for them; a task that
swallows its cancel (Python 3.11's ``asyncio.wait_for`` does when the cancel
lands in the loop turn its call finishes) keeps watching forever and the daemon
never exits. These tests cancel mirrors at every moment of their start, with
etcd up and down, and stop real dnsd processes whose watches are open.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import EtcdProcess, free_port
from carousel.mirror import PrefixMirror
from tests.integration.test_dnsd_helpers import dnsd_toml, start_dnsd
from tests.procs import ProcessGroup

# A cancelled mirror must be gone within this (the dashboard gives its mirrors 2 s).
STOP_BOUND = 1.0


async def _cancel_after(etcd: Etcd, prefix: str, delay: float) -> float:
    """Start a mirror, cancel it after ``delay`` s; seconds until it ended (inf: never within the bound)."""
    mirror = PrefixMirror(etcd, prefix, lambda k, v: v, name="t")
    task = asyncio.create_task(mirror.run())
    await asyncio.sleep(delay)
    task.cancel()
    started = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=STOP_BOUND)
    took = time.monotonic() - started
    if not done:
        # Left running, it would hold the loop open: stop its client under it.
        await etcd.close()
        await asyncio.wait({task}, timeout=5)
        return float("inf")
    return took


async def test_a_mirror_cancelled_at_any_moment_of_its_start_stops_at_once(etcd_cfg: EtcdConfig) -> None:
    # The cancels land over the first 12 ms: connect, the first list, the watch set-up and
    # its first wait. Before the adapter awaited its calls with asyncio.wait, 22 of 200
    # such mirrors on a loaded machine never ended.
    etcd = Etcd(etcd_cfg)
    times = []
    try:
        for i in range(80):
            times.append(await _cancel_after(etcd, etcd_cfg.prefix, (i % 40) * 0.0003))
            await etcd.close()  # each start connects afresh, as a daemon does
    finally:
        await etcd.close()
    hung = [i for i, t in enumerate(times) if t == float("inf")]
    assert not hung, f"{len(hung)} of {len(times)} cancelled mirrors did not end within {STOP_BOUND} s"
    print(f"cancelled mirrors ended in at most {max(times) * 1000:.1f} ms")


async def test_a_mirror_cancelled_while_etcd_is_down_stops_at_once(tmp_path) -> None:
    # Nothing listens on the port: every call and watch set-up waits on a channel that
    # never connects; the cancel must not wait for gRPC's timeouts.
    cfg = EtcdConfig(endpoints=[f"127.0.0.1:{free_port()}"], prefix="/down/", timeout=1.0)
    etcd = Etcd(cfg)
    try:
        for delay in (0.0, 0.05, 0.3, 1.2):  # 1.2: after the first failed call, in its back-off
            took = await _cancel_after(etcd, cfg.prefix, delay)
            assert took < STOP_BOUND, f"cancelled {delay} s after start: still running after {STOP_BOUND} s"
    finally:
        await etcd.close()


async def test_a_mirror_whose_etcd_dies_under_its_watch_stops_at_once(own_etcd: EtcdProcess) -> None:
    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix="/died/", timeout=1.0)
    etcd = Etcd(cfg)
    mirror = PrefixMirror(etcd, cfg.prefix, lambda k, v: v, name="t")
    task = asyncio.create_task(mirror.run())
    try:
        await asyncio.wait_for(mirror.synced.wait(), 10)
        own_etcd.stop()
        await asyncio.sleep(0.5)  # the watch stream breaks, the mirror retries
        task.cancel()
        started = time.monotonic()
        done, _ = await asyncio.wait({task}, timeout=STOP_BOUND)
        assert done, f"mirror still running {STOP_BOUND} s after its cancel, etcd down"
        print(f"mirror stopped {1000 * (time.monotonic() - started):.1f} ms after its cancel, etcd down")
    finally:
        task.cancel()
        await etcd.close()


# dnsd stops its listeners, waits for its tasks and closes etcd; 3 s covers the
# interpreter's exit on a loaded machine (measured: well under 1 s unloaded).
DAEMON_STOP_BOUND = 3.0


@pytest.mark.parametrize("etcd_state", ["up", "down"])
def test_dnsd_with_an_open_watch_exits_promptly_on_sigterm(
    own_etcd: EtcdProcess, procs: ProcessGroup, etcd_state: str
) -> None:
    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix="/carousel/", timeout=1.0)
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(cfg))  # synced: its watch is open
    if etcd_state == "down":
        own_etcd.stop()
        time.sleep(1.5)  # the watch breaks and the mirror is retrying against nothing
    started = time.monotonic()
    dnsd.daemon.signal(15)
    try:
        code = dnsd.daemon.wait(DAEMON_STOP_BOUND)
    except Exception:
        still = f"dnsd (etcd {etcd_state}) still running {DAEMON_STOP_BOUND} s after SIGTERM"
        raise AssertionError(f"{still}:\n{dnsd.daemon.output()}") from None
    took = time.monotonic() - started
    print(f"dnsd with etcd {etcd_state} exited {took * 1000:.0f} ms after SIGTERM (status {code})")
    assert code == 0, dnsd.daemon.output()
