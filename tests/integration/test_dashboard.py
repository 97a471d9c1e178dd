"""`carousel dashboard` against a real etcd and a real admin listener: the live stream, the scrapes,
and actions refused without the token or from another origin, done and logged with it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from carousel.admin import AdminServer
from carousel.config import AdminConfig, EtcdConfig, from_dict
from carousel.dashboard.collect import Collector
from carousel.dashboard.config import Config, DashboardSection
from carousel.dashboard.server import DashboardServer, Hub
from carousel.dashboard.view import ClusterView
from carousel.etcd import Etcd
from carousel.registry import BanRecord, Keys, MaintenanceFlag, ServiceRecord
from edge.core.metrics import Metrics

TOKEN = "s3cret-admin-token-0123"
ALICE = "alice-token-abcdefghij"


class Running:
    """A dashboard served in this event loop, and an etcd client to look behind it."""

    def __init__(self, server: DashboardServer, task: asyncio.Task[None], etcd: Etcd, cfg: EtcdConfig):
        self.server, self.task, self.etcd, self.cfg = server, task, etcd, cfg
        self.url = f"http://127.0.0.1:{server.port}"
        self.keys = Keys(cfg.prefix)


async def _start(etcd_cfg: EtcdConfig, **section: Any) -> Running:
    d = from_dict(DashboardSection, {"port": 0, "scrape_interval": 0.2, **section})
    config = Config(dashboard=d, etcd=etcd_cfg)
    view = ClusterView(window=d.window, history=d.history, interval=d.scrape_interval)
    hub = Hub()
    collector = Collector(config, view, hub.notify)
    server = DashboardServer(config, view, hub, collector.etcd)
    await server.start()
    return Running(server, asyncio.ensure_future(collector.run()), Etcd(etcd_cfg), etcd_cfg)


@pytest.fixture
async def dash(etcd_cfg: EtcdConfig, tmp_path: Path) -> AsyncIterator[Running]:
    r = await _start(etcd_cfg, token=TOKEN, tokens={"alice": ALICE}, audit_log=str(tmp_path / "audit.jsonl"))
    yield r
    await r.server.stop()
    r.task.cancel()
    await asyncio.gather(r.task, return_exceptions=True)
    await r.etcd.close()


async def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        h = {"Content-Type": "application/json", **(headers or {})}
        async with s.post(url, data=data, headers=h) as r:
            return r.status, await r.json(content_type=None)


async def _state(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/api/state", headers=headers or {}) as r:
        return r.status, await r.json(content_type=None)


async def _wait(what: str, probe: Any, limit: float = 5.0) -> Any:
    deadline = time.monotonic() + limit
    while True:
        got = await probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {limit} s"
        await asyncio.sleep(0.05)


def _record(node: str, ip: str, meta: dict[str, str] | None = None, state: str = "up") -> ServiceRecord:
    return ServiceRecord("edge", node, 8080, (ip,), state=state, meta=meta or {}, since=time.time())  # type: ignore[arg-type]


async def test_actions_need_the_token_and_the_same_origin(dash: Running, tmp_path: Path):
    drain = dash.url + "/api/drain"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    refused = [
        ({}, 401),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({**bearer, "Origin": "http://evil.example"}, 403),
        ({**bearer, "Sec-Fetch-Site": "cross-site"}, 403),
        ({**bearer, "Content-Type": "text/plain"}, 403),  # what a cross-site <form> can send
        ({**bearer, "Content-Type": "application/x-www-form-urlencoded"}, 403),
    ]
    for headers, status in refused:
        got, body = await _post(drain, {"node": "edge2"}, headers)
        assert got == status, (headers, body)
    assert await dash.etcd.get(dash.keys.maintenance_flag("edge2")) is None, "nothing was drained"

    status, body = await _post(drain, {"node": "edge2", "reason": "disk"}, {**bearer, "Origin": dash.url})
    assert status == 200 and body["who"] == "admin" and body["result"] == "done", body
    flag = MaintenanceFlag.decode((await dash.etcd.get(dash.keys.maintenance_flag("edge2"))).value)  # type: ignore[union-attr]
    assert flag.reason == "admin via the dashboard: disk"

    alice = {"Authorization": f"Bearer {ALICE}"}
    status, body = await _post(dash.url + "/api/undrain", {"node": "edge2"}, alice)
    assert status == 200 and body["who"] == "alice"
    assert await dash.etcd.get(dash.keys.maintenance_flag("edge2")) is None

    for bad in (b"{not json", {"node": "../../x"}, ["edge2"]):
        status, body = await _post(drain, bad, bearer)
        assert status == 400, body

    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["who"], a["action"], a["target"], a["client"]) for a in audit] == [
        ("admin", "drain", "edge2", "127.0.0.1"),
        ("alice", "undrain", "edge2", "127.0.0.1"),
    ]
    _, doc = await _state(dash.url)
    assert [a["who"] for a in doc["actions"]] == ["alice", "admin"], "newest first on the page"


async def test_purge_and_lift_ban_reach_etcd(dash: Running):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, body = await _post(dash.url + "/api/purge", {"kind": "prefix", "target": "/static/"}, bearer)
    assert status == 200, body
    events = (await dash.etcd.get_prefix(dash.keys.purges)).items
    assert len(events) == 1 and events[0].lease, "a purge event under a short lease"
    assert json.loads(events[0].value)["target"] == "/static/"

    lease = await dash.etcd.grant(60)
    ban = BanRecord("192.0.2.9", "too fast", time.time() + 60, "edge1/0")
    await dash.etcd.put(dash.keys.ban("192.0.2.9"), ban.encode(), lease=lease.id)

    async def shown() -> bool:
        return any(b["address"] == "192.0.2.9" for b in (await _state(dash.url))[1]["bans"])

    await _wait("ban on the page", shown)
    status, body = await _post(dash.url + "/api/unban", {"address": "192.0.2.9"}, bearer)
    assert status == 200 and body["result"] == "lifted", body
    assert await dash.etcd.get(dash.keys.ban("192.0.2.9")) is None
    status, body = await _post(dash.url + "/api/unban", {"address": "192.0.2.9"}, bearer)
    assert body["result"] == "no such ban"


async def test_live_stream_shows_a_drain_and_the_scraped_edge(dash: Running):
    metrics = Metrics(lambda: {"connections": 3, "pools": {}})
    admin = AdminServer(AdminConfig(port=0), registry=metrics.registry)
    port = await admin.start()
    lease = await dash.etcd.grant(10)
    key = dash.keys.service("edge", "edge1")
    record = _record("edge1", "127.0.0.11", {"admin": f"http://127.0.0.1:{port}"})
    try:
        await dash.etcd.put(key, record.encode(), lease=lease.id)
        async with aiohttp.ClientSession() as s, s.get(dash.url + "/api/events") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"

            async def next_event() -> dict[str, Any]:
                block = b""
                while b"\n\n" not in block:
                    block += await asyncio.wait_for(resp.content.readline(), 5)
                data = [ln[6:] for ln in block.decode().splitlines() if ln.startswith("data: ")]
                return json.loads("".join(data)) if data else {}

            async def edge1(state: str) -> dict[str, Any] | None:
                doc = await next_event()
                rows = [n for n in doc.get("nodes", []) if n["node"] == "edge1" and n["state"] == state]
                return doc if rows else None

            await _wait("edge1 healthy in the stream", lambda: edge1("healthy"))
            for _ in range(50):
                metrics.count_request("app", 200)
            await dash.etcd.put(key, record.with_state("draining").encode(), lease=lease.id)
            t0 = time.monotonic()
            await _wait("edge1 draining in the stream", lambda: edge1("draining"), 2.0)
            drain_seen = time.monotonic() - t0
            assert drain_seen < 1.0, f"a registry change reaches the page in {drain_seen:.3f} s"

            async def scraped() -> dict[str, Any] | None:
                doc = await next_event()
                edges = [e for e in doc.get("edges", []) if e.get("scraped") and e["connections"] == 3]
                return edges[0] if edges else None

            e = await _wait("edge1 scraped", scraped)
            assert e["status_mix"] in ({}, {"2xx": 1.0})
        await dash.etcd.revoke(lease.id)  # the agent died: its lease ends, the edge is down

        async def down() -> bool:
            nodes = (await _state(dash.url))[1]["nodes"]
            return any(n["node"] == "edge1" and n["state"] == "down" for n in nodes)

        await _wait("edge1 down", down)
    finally:
        await admin.stop()


async def test_view_can_require_the_token(etcd_cfg: EtcdConfig):
    r = await _start(etcd_cfg, token=TOKEN, view_requires_token=True)
    try:
        assert (await _state(r.url))[0] == 401
        status, doc = await _state(r.url, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and "nodes" in doc
        async with aiohttp.ClientSession() as s, s.get(r.url + "/") as page:
            assert page.status == 200, "the page itself holds no data"
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    finally:
        await r.server.stop()
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
        await r.etcd.close()


async def test_without_a_token_the_dashboard_is_read_only(etcd_cfg: EtcdConfig):
    r = await _start(etcd_cfg)
    try:
        status, body = await _post(r.url + "/api/drain", {"node": "edge2"}, {"Authorization": "Bearer x" * 3})
        assert status == 403 and "read-only" in body["error"]
        assert (await _state(r.url))[0] == 200
    finally:
        await r.server.stop()
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
        await r.etcd.close()


async def test_lifting_a_ban_frees_the_client_on_the_edge_that_made_it(etcd_cfg: EtcdConfig):
    """The edge that banned keeps its own copy of the ban; lifting it in etcd must end that copy too."""
    from carousel import ops
    from edge.testing import running_edge
    from tests.integration.test_dos import Client, dos_config, flood, refused

    etcd = Etcd(etcd_cfg)
    cfg = dos_config(cluster=True)
    cfg["etcd"] = {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix}
    flooder = "127.0.0.7"
    try:
        async with running_edge(cfg) as edge:
            seen = await flood(Client(edge.port, flooder), time.monotonic() + 10)
            assert "first_403" in seen, seen
            key = Keys(etcd_cfg.prefix).ban(flooder)
            await _wait("ban published", lambda: etcd.get(key))
            assert await refused(edge.port, flooder)
            # Two rate windows, so the flood itself is forgotten and cannot ban it again at once.
            await asyncio.sleep(2.2)
            assert await refused(edge.port, flooder), "still banned before the lift"
            assert await ops.lift_ban(etcd, etcd_cfg, flooder)
            t0 = time.monotonic()

            async def served() -> bool:
                return not await refused(edge.port, flooder)

            await _wait("served again", served, 2.0)
            assert time.monotonic() - t0 < 1.0
            assert await Client(edge.port, flooder).get() == 200
    finally:
        await etcd.close()
