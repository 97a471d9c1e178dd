"""Purges: PURGE on one edge, the admin route, and `carousel purge` across three edges via etcd."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import free_port
from carousel.ops import publish_purge
from edge.features.cache import CacheFeature
from edge.front.server import Edge
from edge.testing import running_edge
from edge.testing.cache import ScriptedOrigin, edge_config, origin_and_edge
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def cache_of(edge: Edge) -> CacheFeature:
    return next(f for f in edge.features if isinstance(f, CacheFeature))


async def cache_status(session: aiohttp.ClientSession, url: str, **headers: str) -> str:
    async with session.get(url, headers=headers) as r:
        await r.read()
        return r.headers.get("Cache-Status", "")


def is_hit(status: str) -> bool:
    return "; hit" in status


def script(origin: ScriptedOrigin, *paths: str, tags: str = "") -> None:
    for path in paths:
        extra = {"surrogate_key": tags} if tags else {}
        origin.reply(path, f"body of {path}", cache_control="max-age=300", **extra)


async def test_purge_method_removes_a_url_for_allowed_peers_only(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        script(origin, "/a", "/b")
        base = f"http://127.0.0.1:{edge.port}"
        for path in ("/a", "/a", "/b"):
            await cache_status(session, base + path)
        async with session.request("PURGE", base + "/a") as r:
            assert r.status == 200 and (await r.json()) == {"purged": 1}
        assert not is_hit(await cache_status(session, base + "/a"))
        assert is_hit(await cache_status(session, base + "/b"))
    async with origin_and_edge({"purge_from": ["10.9.8.0/24"]}) as (origin, edge):
        script(origin, "/a")
        base = f"http://127.0.0.1:{edge.port}"
        await cache_status(session, base + "/a")
        async with session.request("PURGE", base + "/a") as r:
            assert r.status == 403
        assert is_hit(await cache_status(session, base + "/a"))
        assert not any(r.method == "PURGE" for r in origin.requests)  # never forwarded


async def test_purge_method_by_prefix_and_by_surrogate_key(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        script(origin, "/static/1.css", "/static/2.js", "/page")
        script(origin, "/news/1", "/news/2", tags="news front")
        base = f"http://127.0.0.1:{edge.port}"
        for path in ("/static/1.css", "/static/2.js", "/page", "/news/1", "/news/2"):
            await cache_status(session, base + path)
        async with session.get(base + "/news/1") as r:
            assert "Surrogate-Key" not in r.headers  # tags are the edge's business
        async with session.request("PURGE", base + "/static/*") as r:
            assert (await r.json()) == {"purged": 2}
        async with session.request("PURGE", base + "/", headers={"Surrogate-Key": "news"}) as r:
            assert (await r.json()) == {"purged": 2}
        results = {
            p: is_hit(await cache_status(session, base + p)) for p in ("/static/1.css", "/page", "/news/2")
        }
        assert results == {"/static/1.css": False, "/page": True, "/news/2": False}


async def test_admin_route_purges_by_url_prefix_and_tag(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        script(origin, "/x/1", "/x/2", "/y")
        script(origin, "/t", tags="blue")
        base = f"http://127.0.0.1:{edge.port}"
        for path in ("/x/1", "/x/2", "/y", "/t"):
            await cache_status(session, base + path)
        # The edge mounts the cache's routes on its own admin listener.
        port = edge.admin_port
        api = f"http://127.0.0.1:{port}/cache/purge"
        async with session.post(api, params={"url": f"http://127.0.0.1:{edge.port}/y"}) as r:
            assert (await r.json())["purged"] == 1
        async with session.post(api, params={"prefix": "/x/"}) as r:
            assert (await r.json())["purged"] == 2
        async with session.post(api, params={"tag": "blue"}) as r:
            assert (await r.json())["purged"] == 1
        async with session.post(api) as r:
            assert r.status == 400
        async with session.get(f"http://127.0.0.1:{port}/cache") as r:
            assert (await r.json())["objects"] == 0
        async with session.get(f"http://127.0.0.1:{port}/status") as r:
            assert (await r.json())["cache"]["objects"] == 0


async def test_cluster_events_apply_once_and_old_ones_are_ignored(etcd_cfg: EtcdConfig) -> None:
    origin = ScriptedOrigin()
    port = await origin.start()
    etcd = Etcd(etcd_cfg)
    try:
        script(origin, "/old", "/new")
        await publish_purge(etcd, etcd_cfg, "url", "http://127.0.0.1/old")  # before the edge starts
        await asyncio.sleep(0.05)
        cfg = edge_config(port, {"cluster_purge": True})
        cfg["etcd"] = {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix}
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            watcher = cache_of(edge).purger
            assert watcher is not None and watcher.mirror is not None
            await asyncio.wait_for(watcher.mirror.synced.wait(), 10)
            assert watcher.applied_count == 0  # the old event concerned nothing in this edge
            base = f"http://127.0.0.1:{edge.port}"
            await cache_status(s, base + "/new")
            await publish_purge(etcd, etcd_cfg, "url", "http://127.0.0.1/new")
            for _ in range(100):
                if watcher.applied_count:
                    break
                await asyncio.sleep(0.01)
            assert watcher.applied_count == 1
            assert not is_hit(await cache_status(s, base + "/new"))
            await watcher.mirror.sync_once()  # a re-list (after an etcd hiccup) re-reads every event
            assert watcher.applied_count == 1
            assert is_hit(await cache_status(s, base + "/new"))
    finally:
        await etcd.close()
        await origin.stop()


EDGE_TOML = """
[edge]
host = "127.0.0.1"
port = {port}
access_log = false
[admin]
host = "127.0.0.1"
port = {admin}
[log]
level = "warning"
[etcd]
endpoints = ["{etcd}"]
prefix = "{prefix}"
[cache]
enabled = true
[pool.origin]
members = [{{ address = "127.0.0.1:{origin}" }}]
[[route]]
path = "/"
pool = "origin"
"""


async def test_carousel_purge_reaches_three_edges_within_a_second(
    etcd_cfg: EtcdConfig, procs: ProcessGroup
) -> None:
    origin = ScriptedOrigin()
    origin_port = await origin.start()
    try:
        script(origin, "/page", "/static/app.css", "/static/app.js")
        script(origin, "/tagged", tags="promo")
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            procs.daemon(
                "edge",
                f"edge{i}",
                EDGE_TOML.format(
                    port=port,
                    admin=free_port(),
                    etcd=etcd_cfg.endpoints[0],
                    prefix=etcd_cfg.prefix,
                    origin=origin_port,
                ),
            )
        paths = ("/page", "/static/app.css", "/static/app.js", "/tagged")
        async with aiohttp.ClientSession() as s:
            for port in ports:
                for _ in range(100):
                    try:
                        await cache_status(s, f"http://127.0.0.1:{port}/page")
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                for path in paths:
                    await cache_status(s, f"http://127.0.0.1:{port}{path}")
                    assert is_hit(await cache_status(s, f"http://127.0.0.1:{port}{path}"))
            await asyncio.sleep(0.5)  # the edges' watches are up

            async def purge_everywhere(
                args: list[str], gone: tuple[str, ...], kept: tuple[str, ...]
            ) -> float:
                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "carousel.cli", "purge", *args,
                    "--etcd", etcd_cfg.endpoints[0], "--registry-prefix", etcd_cfg.prefix,
                    stdout=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                assert await cli.wait() == 0
                published = time.monotonic()
                pending = {(p, path) for p in ports for path in gone}
                while pending:
                    assert time.monotonic() - published < 1.0, f"still cached after 1 s: {sorted(pending)}"
                    for port, path in list(pending):
                        # only-if-cached looks without refilling the entry (a miss is a 504).
                        headers = {"Cache-Control": "only-if-cached"}
                        async with s.get(f"http://127.0.0.1:{port}{path}", headers=headers) as r:
                            await r.read()
                            if not is_hit(r.headers.get("Cache-Status", "")):
                                pending.discard((port, path))
                    await asyncio.sleep(0.01)
                elapsed = time.monotonic() - published
                for port in ports:
                    for path in kept:
                        assert is_hit(await cache_status(s, f"http://127.0.0.1:{port}{path}")), (port, path)
                return elapsed

            url = await purge_everywhere(["http://127.0.0.1/page"], ("/page",), ("/tagged",))
            prefix = await purge_everywhere(
                ["--prefix", "/static/"], ("/static/app.css", "/static/app.js"), ("/tagged",)
            )
            tag = await purge_everywhere(["--tag", "promo"], ("/tagged",), ())
        print(f"cluster purge on 3 edges: url {url:.3f} s, prefix {prefix:.3f} s, tag {tag:.3f} s")
        for port in ports:  # and the next GET misses, then is cached again
            async with aiohttp.ClientSession() as s:
                status = await cache_status(s, f"http://127.0.0.1:{port}/page")
                assert "fwd=uri-miss" in status
    finally:
        await origin.stop()


async def test_purge_target_hosts_are_normalised(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hi", headers={"Cache-Control": "max-age=300"})

        origin.on("/n", hello)
        base = f"http://127.0.0.1:{edge.port}"
        await cache_status(session, base + "/n", Host="WWW.Example.TEST")
        assert cache_of(edge).purges.url("https://www.example.test:443/n") == 1
