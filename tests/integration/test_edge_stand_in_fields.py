"""Answers that stand for a 200 carry what that 200 would say (RFC 9110 14.3, 15.4.5).

A cache hit honours byte ranges, so its 200 says ``Accept-Ranges: bytes`` as the static route's
does, whatever the origin sent; a member's own 304 on a compressing route (a client's
conditional passed through, not answered from the cache) carries the Vary and the ETag form
of the 200 this request would get: ``Vary: Accept-Encoding``, and a weak ETag when that 200
would be a compressed variant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from edge.testing import running_edge
from edge.testing.cache import ScriptedOrigin, origin_and_edge

pytestmark = pytest.mark.timeout(60)

CSS = (b"body { margin: 0; font-family: sans-serif; }\n" * 80)[:3000]  # compressible


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


async def test_a_cache_hit_advertises_the_byte_ranges_it_honours(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        # aiohttp's Response sends no Accept-Ranges; another origin says "none" of its own.
        origin.reply("/plain.css", CSS, content_type="text/css", cache_control="max-age=300")
        origin.reply(
            "/none.css", CSS, content_type="text/css", cache_control="max-age=300", accept_ranges="none"
        )
        base = f"http://127.0.0.1:{edge.port}"
        for path in ("/plain.css", "/none.css"):
            for _ in range(3):  # the cache admits an object on its second miss
                async with session.get(base + path) as r:
                    assert r.status == 200 and await r.read() == CSS
            assert "hit" in r.headers["Cache-Status"], r.headers
            assert r.headers.getall("Accept-Ranges") == ["bytes"], (path, r.headers)
            fetched = len(origin.seen(path))
            async with session.head(base + path) as r:
                assert "hit" in r.headers["Cache-Status"] and r.headers.getall("Accept-Ranges") == ["bytes"]
            async with session.get(base + path, headers={"Range": "bytes=0-9"}) as r:
                assert r.status == 206 and await r.read() == CSS[:10] and "hit" in r.headers["Cache-Status"]
            assert len(origin.seen(path)) == fetched


async def test_a_compressed_cache_hit_offers_no_ranges(session: aiohttp.ClientSession) -> None:
    # The edge's gzip variant is answered whole (a range of it is not what a client asks for).
    extra = {"compression": {"enabled": True}}
    async with origin_and_edge(extra=extra) as (origin, edge):
        origin.reply("/c.css", CSS, content_type="text/css", cache_control="max-age=300")
        url = f"http://127.0.0.1:{edge.port}/c.css"
        for _ in range(3):
            async with session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                await r.read()
        assert "hit" in r.headers["Cache-Status"] and "Accept-Ranges" not in r.headers, r.headers


def conditional_origin(origin: ScriptedOrigin, path: str, etag: str, media: str, typed_304: bool) -> None:
    """A member that answers a matching If-None-Match (weak comparison) with its own 304,
    naming its Content-Type there or not (nginx does not)."""
    fields = {"ETag": etag, "Cache-Control": "no-cache"}

    async def handler(request: web.Request) -> web.Response:
        tags = [t.strip().removeprefix("W/") for t in request.headers.get("If-None-Match", "").split(",")]
        if etag.removeprefix("W/") in tags:
            return web.Response(
                status=304, headers={**fields, "Content-Type": media} if typed_304 else fields
            )
        return web.Response(body=CSS, headers={**fields, "Content-Type": media})

    origin.on(path, handler)


async def test_a_members_304_carries_the_vary_and_etag_of_the_200_it_stands_for(
    session: aiohttp.ClientSession,
) -> None:
    origin = ScriptedOrigin()
    port = await origin.start()
    # A member's 304 as nginx sends one (no Content-Type), and one that names its type.
    conditional_origin(origin, "/bare.css", '"v1"', "text/css", typed_304=False)
    conditional_origin(origin, "/typed.css", '"v2"', "text/css", typed_304=True)
    conditional_origin(origin, "/image.png", '"v3"', "image/png", typed_304=True)
    config = {
        "pool": {"o": {"members": [{"address": f"127.0.0.1:{port}"}]}},
        "route": [{"path": "/", "pool": "o"}],  # no cache: the client's conditional goes through
        "compression": {"enabled": True},
    }
    try:
        async with running_edge(config) as edge:
            base = f"http://127.0.0.1:{edge.port}"

            async def get(path: str, **headers: str) -> tuple[int, aiohttp.typedefs.LooseHeaders]:
                async with session.get(base + path, headers=headers) as r:
                    await r.read()
                    return r.status, r.headers

            for path in ("/bare.css", "/typed.css"):
                status, ok = await get(path, **{"Accept-Encoding": "gzip"})
                assert status == 200 and ok["Content-Encoding"] == "gzip" and ok["ETag"].startswith("W/")
                status, nm = await get(path, **{"Accept-Encoding": "gzip", "If-None-Match": ok["ETag"]})
                assert status == 304, path
                assert (nm["ETag"], nm.get("Vary")) == (ok["ETag"], "Accept-Encoding"), (path, nm)
            # An identity client's 200 says Vary too; its 304 keeps the origin's strong ETag.
            status, ok = await get("/typed.css", **{"Accept-Encoding": "identity"})
            assert status == 200 and ok["Vary"] == "Accept-Encoding" and ok["ETag"] == '"v2"'
            status, nm = await get("/typed.css", **{"Accept-Encoding": "identity", "If-None-Match": '"v2"'})
            assert status == 304 and (nm["ETag"], nm.get("Vary")) == ('"v2"', "Accept-Encoding"), nm
            # A type that is never compressed: neither its 200 nor its 304 says Vary.
            status, ok = await get("/image.png", **{"Accept-Encoding": "gzip"})
            status, nm = await get("/image.png", **{"Accept-Encoding": "gzip", "If-None-Match": '"v3"'})
            assert status == 304 and nm["ETag"] == '"v3"' and "Vary" not in nm, nm
    finally:
        await origin.stop()
