"""Member failure (a `carousel app` process killed mid-test) and registry-driven membership."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest

from carousel.etcd import Etcd
from carousel.etcdserver import free_port
from carousel.registry import Keys, ServiceRecord
from edge.testing import running_edge
from sampleapp.main import start_app
from tests.procs import Daemon, ProcessGroup, wait_for

pytestmark = pytest.mark.timeout(120)


def _stats(port: int) -> dict:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
        return json.loads(r.read())


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


APP_TOKEN = "failover-test-admin-token"
ADMIN = {"Authorization": f"Bearer {APP_TOKEN}"}


@pytest.fixture
def app_procs(procs: ProcessGroup) -> Iterator[list[tuple[Daemon, int]]]:
    """Two `carousel app` processes on free ports."""
    started = []
    for name in ("ap1", "ap2"):
        port = free_port()
        args = ["app", "--host", "127.0.0.1", "--port", str(port), "--name", name, "--admin-token", APP_TOKEN]
        d = procs.start(name, args)
        started.append((d, port))
    for _, port in started:
        wait_for(lambda p=port: _up(p), 15, what=f"AP on {port}")
    yield started


async def test_killed_member_gets_get_retries_and_refused_posts_go_on_once(app_procs) -> None:
    (_ap1, p1), (ap2, p2) = app_procs
    cfg = {
        "pool": {
            "app": {
                "members": [{"address": f"127.0.0.1:{p1}"}, {"address": f"127.0.0.1:{p2}"}],
                # No ejection here, so every other new request really meets the dead member.
                "eject": {"failures": 1000},
                "connect_timeout": 1.0,
            }
        },
        "route": [{"path": "/", "pool": "app"}],
    }
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{edge.port}"
        statuses: list[int] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                async with s.get(url + "/slow?ms=100") as r:
                    await r.read()
                    statuses.append(r.status)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        await asyncio.sleep(1.0)
        ap2.proc.kill()  # SIGKILL mid-test: in-flight requests to it break
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*clients)
        assert len(statuses) > 50
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}

        before = _stats(p1)["by_path"].get("/echo", 0)
        post_statuses = []
        for _ in range(10):
            async with s.post(url + "/echo", data=b"x" * 100) as r:
                await r.read()
                post_statuses.append(r.status)
        after = _stats(p1)["by_path"].get("/echo", 0)
        # The dead member refuses connections: those POSTs never reached it, so they go on
        # to ap1 (as nginx and HAProxy retry connect failures), each delivered exactly once.
        # A POST that did reach a member is never replayed
        # (tests/integration/test_edge_retry_sendfile.py).
        assert post_statuses == [200] * 10
        assert after - before == 10


async def test_passive_ejection_moves_traffic_away(app_procs) -> None:
    (_, p1), (ap2, p2) = app_procs
    cfg = {
        "pool": {
            "app": {
                "members": [{"address": f"127.0.0.1:{p1}"}, {"address": f"127.0.0.1:{p2}"}],
                "eject": {"failures": 2, "window": 10.0, "cooldown": 30.0},
            }
        },
        "route": [{"path": "/", "pool": "app"}],
    }
    ap2.proc.kill()
    ap2.proc.wait(5)
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.post(f"http://127.0.0.1:{edge.port}/echo") as r:
                await r.read()
        ejected = edge.pools["app"].status()["members"][1]
        assert ejected["ejected_for"] > 0
        statuses = []
        for _ in range(10):
            async with s.post(f"http://127.0.0.1:{edge.port}/echo") as r:
                statuses.append(r.status)
        assert statuses == [200] * 10  # POSTs no longer meet the dead member


async def test_active_health_checks_follow_the_ap(app_procs) -> None:
    (_, p1), (_, p2) = app_procs
    cfg = {
        "pool": {
            "app": {
                "members": [{"address": f"127.0.0.1:{p1}"}, {"address": f"127.0.0.1:{p2}"}],
                "health": {"enabled": True, "interval": 0.1, "rise": 2, "fall": 2},
            }
        },
        "route": [{"path": "/", "pool": "app"}],
    }
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        pool = edge.pools["app"]
        await s.post(f"http://127.0.0.1:{p2}/admin/health?ok=0", headers=ADMIN)
        await _until(lambda: not pool.status()["members"][1]["healthy"], 3)
        seen = set()
        for _ in range(10):
            async with s.get(f"http://127.0.0.1:{edge.port}/echo") as r:
                seen.add((await r.json())["ap"])
        assert seen == {"ap1"}
        await s.post(f"http://127.0.0.1:{p2}/admin/health?ok=1", headers=ADMIN)
        await _until(lambda: pool.status()["members"][1]["healthy"], 3)


async def _until(predicate, limit: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > limit:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_registry_members_appear_within_a_second_and_drain(etcd_cfg) -> None:
    runners = [await start_app("127.0.0.1", 0, name) for name in ("r1", "r2")]
    etcd = Etcd(etcd_cfg)
    keys = Keys(etcd_cfg.prefix)
    try:
        cfg = {
            "etcd": {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix, "timeout": 1.0},
            "pool": {"app": {"service": "app"}},
            "route": [{"path": "/", "pool": "app"}],
        }
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{edge.port}/echo"

            async def served_by() -> str | None:
                async with s.get(url) as r:
                    return (await r.json())["ap"] if r.status == 200 else None

            assert await served_by() is None  # no member yet: 503
            lease = await etcd.grant(5)
            records = [
                ServiceRecord("app", name, port, ("127.0.0.1",))
                for name, (_, port) in zip(("r1", "r2"), runners, strict=True)
            ]
            t0 = time.monotonic()
            await etcd.put(keys.service("app", "r1"), records[0].encode(), lease=lease.id)
            while await served_by() != "r1":
                assert time.monotonic() - t0 < 1.0, "registered AP got no traffic within 1 s"
                await asyncio.sleep(0.01)
            await etcd.put(keys.service("app", "r2"), records[1].encode(), lease=lease.id)
            await _until(lambda: len(edge.pools["app"].members) == 2, 1.0)
            assert {await served_by() for _ in range(6)} == {"r1", "r2"}

            draining = records[1].with_state("draining")
            await etcd.put(keys.service("app", "r2"), draining.encode(), lease=lease.id)
            await _until(lambda: edge.pools["app"].members["r2"].state == "draining", 1.0)
            assert {await served_by() for _ in range(10)} == {"r1"}

            await etcd.revoke(lease.id)  # both gone: nothing left to serve
            await _until(lambda: not edge.pools["app"].members, 1.0)
            assert await served_by() is None
    finally:
        await etcd.close()
        for runner, _ in runners:
            await runner.cleanup()


def _agent_toml(etcd_cfg, node: str, app_port: int) -> str:  # type: ignore[no-untyped-def]
    import json as _json

    return f"""
[agent]
node = "{node}"
ttl = 3
drain_delay = 5.0
[etcd]
endpoints = {_json.dumps(etcd_cfg.endpoints)}
prefix = "{etcd_cfg.prefix}"
timeout = 1.0
[[service]]
name = "app"
port = {app_port}
ipv4 = ["127.0.0.1"]
[service.check]
interval = 0.2
timeout = 0.5
rise = 1
fall = 2
"""


@pytest.mark.slow
async def test_agent_registered_ap_gets_traffic_and_drain_stops_it(etcd_cfg, procs: ProcessGroup) -> None:
    """Real `carousel agent` processes register two APs; `carousel drain` takes one out."""
    runners = [await start_app("127.0.0.1", 0, name) for name in ("n1", "n2")]
    etcd = Etcd(etcd_cfg)
    keys = Keys(etcd_cfg.prefix)
    try:
        cfg = {
            "etcd": {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix, "timeout": 1.0},
            "pool": {"app": {"service": "app"}},
            "route": [{"path": "/", "pool": "app"}],
        }
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{edge.port}/echo"

            async def served_by() -> str | None:
                async with s.get(url) as r:
                    return (await r.json())["ap"] if r.status == 200 else None

            procs.daemon("agent", "agent-n1", _agent_toml(etcd_cfg, "n1", runners[0][1]))
            # From the moment the agent's record exists to the first request it serves.
            deadline = time.monotonic() + 20
            while await etcd.get(keys.service("app", "n1")) is None:
                assert time.monotonic() < deadline, "agent never registered the AP"
                await asyncio.sleep(0.01)
            registered = time.monotonic()
            while await served_by() != "n1":
                assert time.monotonic() - registered < 1.0, "no traffic within 1 s"
                await asyncio.sleep(0.01)

            procs.daemon("agent", "agent-n2", _agent_toml(etcd_cfg, "n2", runners[1][1]))
            await _until(lambda: len(edge.pools["app"].members) == 2, 20)
            assert {await served_by() for _ in range(6)} == {"n1", "n2"}

            drain = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "carousel.cli", "drain", "n2",
                "--etcd", etcd_cfg.endpoints[0], "--registry-prefix", etcd_cfg.prefix,
            )  # fmt: skip
            assert await drain.wait() == 0
            await _until(
                lambda: (
                    "n2" not in edge.pools["app"].members
                    or edge.pools["app"].members["n2"].state == "draining"
                ),
                5,
            )
            n2_stats = runners[1][0].app["sample"].stats
            before = n2_stats.requests
            assert {await served_by() for _ in range(10)} == {"n1"}
            assert n2_stats.requests == before  # not one new request for the drained AP
    finally:
        await etcd.close()
        for runner, _ in runners:
            await runner.cleanup()
