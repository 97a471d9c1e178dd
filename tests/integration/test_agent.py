"""The agent against a real etcd and a real sample AP: registration timing, drain, crash, outage."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import EtcdProcess, free_port
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, ServiceRecord
from tests.procs import Daemon, ProcessGroup, wait_for

INTERVAL = 0.2
TIMEOUT = 0.3
RISE = 2
FALL = 2
TTL = 3
DRAIN = 1.0


def agent_toml(cfg: EtcdConfig, node: str, app_port: int, *, ttl: int = TTL, drain: float = DRAIN) -> str:
    endpoints = json.dumps(cfg.endpoints)
    return f"""
[agent]
node = "{node}"
ttl = {ttl}
drain_delay = {drain}
etcd_election_timeout = 1.0

[etcd]
endpoints = {endpoints}
prefix = "{cfg.prefix}"
timeout = 1.0

[[service]]
name = "app"
port = {app_port}
ipv4 = ["127.0.0.1"]

[service.check]
type = "http"
interval = {INTERVAL}
timeout = {TIMEOUT}
rise = {RISE}
fall = {FALL}
"""


APP_TOKEN = "agent-test-admin-token"


def start_app(procs: ProcessGroup, name: str) -> tuple[Daemon, int]:
    port = free_port()
    args = ["app", "--host", "127.0.0.1", "--port", str(port), "--name", name, "--admin-token", APP_TOKEN]
    d = procs.start(name, args)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5).read()
            return d, port
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sample app did not start: {d.output()}")


def set_app_health(port: int, ok: bool) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/health?ok={int(ok)}",
        method="POST",
        headers={"Authorization": f"Bearer {APP_TOKEN}"},
    )
    urllib.request.urlopen(req, timeout=2).read()


async def read_record(etcd: Etcd, cfg: EtcdConfig, node: str) -> ServiceRecord | None:
    kv = await etcd.get(Keys(cfg.prefix).service("app", node))
    return None if kv is None else ServiceRecord.decode(kv.value)


async def wait_state(etcd: Etcd, cfg: EtcdConfig, node: str, want: str | None, limit: float) -> float:
    """Seconds until the record's state is ``want`` (None = absent); fails after ``limit``."""
    start = time.monotonic()
    while True:
        rec = await read_record(etcd, cfg, node)
        state = None if rec is None else rec.state
        if state == want:
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"{node}: state {state!r}, wanted {want!r} within {limit:.2f}s")
        await asyncio.sleep(0.01)


async def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=20)


@pytest.fixture
async def etcd(etcd_cfg: EtcdConfig):
    client = Etcd(etcd_cfg)
    yield client
    await client.close()


async def test_healthy_service_registers_within_rise_interval(procs, etcd_cfg, etcd):
    _, port = start_app(procs, "ap1")
    procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    took = await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    # Process start-up (imports) is not the agent's reaction time: measure from its first check.
    rec = await read_record(etcd, etcd_cfg, "n1")
    assert rec is not None and rec.port == port and rec.ipv4 == ("127.0.0.1",)
    print(f"registered {took:.2f}s after process start (includes Python start-up)")


async def test_registration_latency_after_service_turns_healthy(procs, etcd_cfg, etcd):
    _, port = start_app(procs, "ap1")
    set_app_health(port, False)
    procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await asyncio.sleep(3)  # agent up and checking, service failing
    assert await read_record(etcd, etcd_cfg, "n1") is None
    set_app_health(port, True)
    took = await wait_state(etcd, etcd_cfg, "n1", "up", limit=RISE * INTERVAL + 0.5)
    print(f"healthy -> registered in {took:.3f}s (bound {RISE * INTERVAL + 0.5:.2f}s)")


async def test_failing_service_is_deregistered_at_once(procs, etcd_cfg, etcd):
    _, port = start_app(procs, "ap1")
    procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    set_app_health(port, False)
    bound = FALL * INTERVAL + TIMEOUT + 0.5
    took = await wait_state(etcd, etcd_cfg, "n1", None, limit=bound)
    print(f"unhealthy -> deleted in {took:.3f}s (bound {bound:.2f}s)")


async def test_dead_service_is_deregistered(procs, etcd_cfg, etcd):
    app, port = start_app(procs, "ap1")
    procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    app.signal(signal.SIGKILL)
    bound = FALL * INTERVAL + TIMEOUT + 0.5
    took = await wait_state(etcd, etcd_cfg, "n1", None, limit=bound)
    print(f"service killed -> deleted in {took:.3f}s (bound {bound:.2f}s)")


async def test_sigkill_of_agent_expires_with_lease(procs, etcd_cfg, etcd):
    _, port = start_app(procs, "ap1")
    agent = procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    agent.signal(signal.SIGKILL)
    took = await wait_state(etcd, etcd_cfg, "n1", None, limit=TTL + 1)
    print(f"agent SIGKILL -> key gone in {took:.2f}s (TTL {TTL}s)")


async def test_sigterm_drains_then_deletes(procs, etcd_cfg, etcd):
    _, port = start_app(procs, "ap1")
    agent = procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port, drain=DRAIN))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    agent.signal(signal.SIGTERM)
    to_draining = await wait_state(etcd, etcd_cfg, "n1", "draining", limit=0.1)
    to_gone = await wait_state(etcd, etcd_cfg, "n1", None, limit=DRAIN + 1.0)
    assert to_draining + to_gone >= DRAIN - 0.05, "key deleted before drain_delay"
    assert agent.wait(5) == 0
    print(f"SIGTERM -> draining in {to_draining * 1000:.0f} ms, deleted after {to_draining + to_gone:.2f}s")


async def test_drain_flag_is_obeyed_and_survives_agent_restart(procs, etcd_cfg, etcd, tmp_path):
    _, port = start_app(procs, "ap1")
    agent = procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    etcd_args = ["--etcd", etcd_cfg.endpoints[0], "--registry-prefix", etcd_cfg.prefix]
    cli = [sys.executable, "-m", "carousel.cli"]
    out = await run_cli(*cli, "drain", "n1", *etcd_args)
    assert out.returncode == 0, out.stderr
    await wait_state(etcd, etcd_cfg, "n1", "draining", limit=1.0)
    await wait_state(etcd, etcd_cfg, "n1", None, limit=DRAIN + 1.0)
    # The flag lives in etcd, not in the agent: a restarted agent stays out.
    agent.signal(signal.SIGTERM)
    agent.wait(10)
    procs.daemon("agent", "agent1b", agent_toml(etcd_cfg, "n1", port))
    await asyncio.sleep(2.0)
    assert await read_record(etcd, etcd_cfg, "n1") is None
    status = await run_cli(*cli, "status", "--json", *etcd_args)
    rows = json.loads(status.stdout)
    assert any(r["node"] == "n1" and r["maintenance"] for r in rows)
    out = await run_cli(*cli, "undrain", "n1", *etcd_args)
    assert out.returncode == 0, out.stderr
    took = await wait_state(etcd, etcd_cfg, "n1", "up", limit=2.0)
    print(f"undrain -> up again in {took:.2f}s")


@pytest.mark.parametrize("how", ["handoff", "crash"])
async def test_agent_restart_does_not_flap(procs, etcd_cfg, etcd, how):
    _, port = start_app(procs, "ap1")
    agent = procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    agent.signal(signal.SIGUSR2 if how == "handoff" else signal.SIGKILL)
    agent.wait(10)
    procs.daemon("agent", "agent2", agent_toml(etcd_cfg, "n1", port))
    # Watch the key for TTL + 2 s: it must be present and up the whole time.
    end = time.monotonic() + TTL + 2
    while time.monotonic() < end:
        rec = await read_record(etcd, etcd_cfg, "n1")
        assert rec is not None and rec.state == "up", f"flapped: {rec}"
        await asyncio.sleep(0.02)


async def test_handoff_leaves_the_successor_a_full_ttl(procs, etcd_cfg, etcd):
    # A long TTL makes the keepalive period (TTL/3 = 4 s) long enough to hand over well
    # after the last periodic keepalive: the lease then has at most TTL - 3 s left, and
    # only a keepalive at the handover itself brings it back above that.
    ttl = 12
    _, port = start_app(procs, "ap1")
    agent = procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port, ttl=ttl))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    kv = await etcd.get(Keys(etcd_cfg.prefix).service("app", "n1"))
    assert kv is not None and kv.lease
    deadline = time.monotonic() + ttl
    while (left := await etcd.time_to_live(kv.lease)) > ttl - 3:
        assert time.monotonic() < deadline, f"lease stays at {left}s"
        await asyncio.sleep(0.05)
    agent.signal(signal.SIGUSR2)
    assert agent.wait(10) == 0
    left = await etcd.time_to_live(kv.lease)
    assert left >= ttl - 2, f"the successor has {left}s of the {ttl}s TTL"
    rec = await read_record(etcd, etcd_cfg, "n1")
    assert rec is not None and rec.state == "up"


async def test_restarted_agent_adopts_its_predecessors_lease(procs, etcd_cfg, etcd):
    # After a crash the old lease has whatever was left since its last keepalive (as little
    # as 2 s of a 3 s TTL); the successor's first registry call keeps that same lease alive,
    # so the keys never depend on how fast the new process starts.
    _, port = start_app(procs, "ap1")
    agent = procs.daemon("agent", "agent1", agent_toml(etcd_cfg, "n1", port))
    await wait_state(etcd, etcd_cfg, "n1", "up", limit=15)
    key = Keys(etcd_cfg.prefix).service("app", "n1")
    before = await etcd.get(key)
    assert before is not None and before.lease
    agent.signal(signal.SIGKILL)
    agent.wait(10)
    successor = procs.daemon("agent", "agent2", agent_toml(etcd_cfg, "n1", port))
    await asyncio.to_thread(wait_for, lambda: "adopted the previous agent" in successor.output(), 15)
    assert await etcd.time_to_live(before.lease) >= TTL - 1
    after = await etcd.get(key)
    assert after is not None and after.lease == before.lease
    assert ServiceRecord.decode(after.value).state == "up"


def _live_nodes(mirror: PrefixMirror[ServiceRecord]) -> set[str]:
    return {r.node for r in mirror.items.values()}


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data-dir", "empty-data-dir"])
async def test_etcd_outage_and_restart(procs, own_etcd: EtcdProcess, tmp_path: Path, wipe: bool):
    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix="/carousel/", timeout=1.0)
    etcd = Etcd(cfg)
    keys = Keys(cfg.prefix)
    mirror = PrefixMirror(etcd, keys.services, lambda k, v: ServiceRecord.decode(v), name="test")
    task = asyncio.create_task(mirror.run())
    try:
        ports = []
        for i in (1, 2):
            _, port = start_app(procs, f"ap{i}")
            ports.append(port)
            procs.daemon("agent", f"agent{i}", agent_toml(cfg, f"n{i}", port))
        for i in (1, 2):
            await wait_state(etcd, cfg, f"n{i}", "up", limit=15)
        await asyncio.wait_for(mirror.synced.wait(), 5)
        t = time.monotonic()
        while _live_nodes(mirror) != {"n1", "n2"}:
            assert time.monotonic() - t < 5, _live_nodes(mirror)
            await asyncio.sleep(0.02)

        own_etcd.kill()
        # While etcd is away, one service dies: when etcd returns it must not come back.
        procs.daemons[2].signal(signal.SIGKILL)  # ap2
        await asyncio.sleep(10)
        assert _live_nodes(mirror) == {"n1", "n2"}, "the reader must keep the last known state"
        if wipe:
            own_etcd.wipe()
        own_etcd.start()
        back = time.monotonic()
        keepalive_period = TTL / 3
        while (rec := await read_record(etcd, cfg, "n1")) is None or rec.state != "up":
            assert time.monotonic() - back < keepalive_period + 1.0, "n1 not re-registered in time"
            await asyncio.sleep(0.02)
        reregistered = time.monotonic() - back
        # The reader converges on exactly the live set: n1, not the dead n2.
        while _live_nodes(mirror) != {"n1"}:
            assert time.monotonic() - back < TTL + 3, f"reader holds {_live_nodes(mirror)}"
            await asyncio.sleep(0.02)
        converged = time.monotonic() - back
        print(
            f"etcd back ({'wiped' if wipe else 'same data'}): n1 registered after {reregistered:.2f}s, "
            f"reader exact after {converged:.2f}s"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await etcd.close()
