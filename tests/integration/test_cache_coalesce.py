"""Coalescing (100 -> 1), hit-for-miss, stale-while-revalidate and stale-if-error, on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web

from edge.testing.cache import origin_and_edge

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as s:
        yield s


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str, float]:
    """(status, body, Cache-Status, monotonic time the answer was complete)."""
    async with session.get(url) as r:
        body = await r.text()
        return r.status, body, r.headers.get("Cache-Status", ""), time.monotonic()


async def test_100_concurrent_misses_make_one_upstream_request_and_wake_at_once(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        done_at: list[float] = []

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(0.5)
            done_at.append(time.monotonic())
            return web.Response(text="the one answer", headers={"Cache-Control": "max-age=60"})

        origin.on("/cold", slow)
        url = f"http://127.0.0.1:{edge.port}/cold"
        results = await asyncio.gather(*(fetch(session, url) for _ in range(100)))
        assert len(origin.seen("/cold")) == 1
        assert {(status, body) for status, body, _, _ in results} == {(200, "the one answer")}
        statuses = [cs for _, _, cs, _ in results]
        assert sum("stored" in cs for cs in statuses) == 1
        assert sum("collapsed" in cs for cs in statuses) == 99
        # Waiters are woken by the fetch completing, not by a timer: every answer is
        # out within moments of the origin's.
        assert max(t for *_, t in results) - done_at[0] < 0.3


async def test_uncacheable_answers_mark_hit_for_miss_so_requests_run_in_parallel(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):

        async def personal(request: web.Request) -> web.Response:
            await asyncio.sleep(0.4)
            return web.Response(text="for you", headers={"Cache-Control": "private"})

        origin.on("/me", personal)
        url = f"http://127.0.0.1:{edge.port}/me"
        # Cold: one leader, the waiters learn it cannot be shared and all go at once.
        started = time.monotonic()
        await asyncio.gather(*(fetch(session, url) for _ in range(10)))
        assert time.monotonic() - started < 1.2  # two rounds at most, never ten
        assert len(origin.seen("/me")) == 10
        # Marked: no waiting at all now.
        origin.peak_in_flight = 0
        started = time.monotonic()
        await asyncio.gather(*(fetch(session, url) for _ in range(10)))
        assert time.monotonic() - started < 0.8
        assert origin.peak_in_flight == 10


async def test_stale_while_revalidate_answers_at_cache_speed_with_one_background_refresh(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        version = {"n": 1}

        async def page(request: web.Request) -> web.Response:
            if version["n"] > 1:
                await asyncio.sleep(0.5)  # a slow refresh: nobody should wait for it
            return web.Response(
                text=f"v{version['n']}",
                headers={"Cache-Control": "max-age=1, stale-while-revalidate=30"},
            )

        origin.on("/swr", page)
        url = f"http://127.0.0.1:{edge.port}/swr"
        await fetch(session, url)
        version["n"] = 2
        await asyncio.sleep(1.2)
        started = time.monotonic()
        results = await asyncio.gather(*(fetch(session, url) for _ in range(20)))
        slowest = max(t for *_, t in results) - started
        assert {body for _, body, _, _ in results} == {"v1"}
        assert all('detail="stale-while-revalidate"' in cs for _, _, cs, _ in results)
        assert slowest < 0.25  # the origin takes 0.5 s: nobody waited for it
        await asyncio.sleep(0.8)
        assert len(origin.seen("/swr")) == 2  # exactly one background refresh
        status, body, cache_status, _ = await fetch(session, url)
        assert (status, body) == (200, "v2") and cache_status.startswith("carousel; hit")


async def test_stale_if_error_serves_stale_with_age_and_cache_status_when_the_origin_is_down(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply(
            "/sie",
            "still here",
            cache_control="max-age=1, stale-if-error=60",
            date=formatdate(time.time(), usegmt=True),
        )
        url = f"http://127.0.0.1:{edge.port}/sie"
        await fetch(session, url)
        await origin.stop()  # the origin is gone: connections are refused
        await asyncio.sleep(2.2)
        async with session.get(url) as r:
            assert r.status == 200 and await r.text() == "still here"
            age = int(r.headers["Age"])
            cache_status = r.headers["Cache-Status"]
        assert 2 <= age <= 3
        assert cache_status.startswith("carousel; fwd=stale; fwd-status=502; ttl=-")
        assert cache_status.endswith('detail="stale-if-error"')
        ttl = int(cache_status.split("ttl=")[1].split(";")[0])
        assert ttl == 1 - age or ttl == -age  # lifetime minus age, floored


async def test_stale_if_error_covers_origin_5xx_only_within_its_window(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/five", "good", cache_control="max-age=1, stale-if-error=2")
        url = f"http://127.0.0.1:{edge.port}/five"
        await fetch(session, url)
        origin.reply("/five", "broken", status=503)
        await asyncio.sleep(1.3)
        status, body, cache_status, _ = await fetch(session, url)
        assert (status, body) == (200, "good") and "fwd-status=503" in cache_status
        await asyncio.sleep(2.1)  # now stale for longer than stale-if-error allows
        status, body, _, _ = await fetch(session, url)
        assert (status, body) == (503, "broken")
