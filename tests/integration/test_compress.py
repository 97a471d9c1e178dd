"""Compression: gzip and brotli through real clients (curl, aiohttp), with the cache and without."""

from __future__ import annotations

import asyncio
import gzip
import random
import shutil
import string
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import brotli
import pytest
from aiohttp import web

from edge.testing import running_edge
from edge.testing.cache import ScriptedOrigin, origin_and_edge

pytestmark = pytest.mark.timeout(60)

COMPRESS = {"compression": {"enabled": True}}


def html_page(size: int = 100 * 1024) -> bytes:
    """An HTML page of about `size` bytes with realistic redundancy (and some noise)."""
    rng = random.Random(5)
    rows: list[str] = []
    total = 0
    while total < size:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
        rows.append(
            f'<li class="item"><a href="/items/{word}">{word.title()}</a> &middot; {rng.random():.6f}</li>\n'
        )
        total += len(rows[-1])
    body = "<!doctype html><html><head><title>list</title></head><body><ul>\n" + "".join(rows)
    return (body + "</ul></body></html>\n").encode()[:size]


@pytest.fixture
async def raw_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


async def curl(url: str, encoding: str) -> tuple[bytes, dict[str, str]]:
    """Fetch with curl, asking for one coding and letting curl decode it."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-D", "-", "--compressed", "-H", f"Accept-Encoding: {encoding}",
        "-o", "/dev/stdout", url, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    head, _, body = out.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return body, headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("with_cache", [False, True])
async def test_a_100_kib_page_decompresses_identically_in_real_clients(with_cache: bool) -> None:
    page = html_page()
    cache = {"enabled": with_cache}
    async with origin_and_edge(cache, extra=COMPRESS) as (origin, edge):
        origin.reply("/page.html", page, content_type="text/html; charset=utf-8", cache_control="max-age=60")
        url = f"http://127.0.0.1:{edge.port}/page.html"
        for coding in ("gzip", "br", "gzip", "br"):
            body, headers = await curl(url, coding)
            assert body == page, coding
            assert headers["content-encoding"] == coding
            assert headers["vary"] == "Accept-Encoding"
        async with aiohttp.ClientSession() as s:  # aiohttp decodes both as well
            for coding in ("gzip", "br"):
                async with s.get(url, headers={"Accept-Encoding": coding}) as r:
                    assert await r.read() == page and r.headers["Content-Encoding"] == coding
        # With the cache, each variant was fetched and compressed once.
        assert len(origin.seen("/page.html")) == (2 if with_cache else 6)


async def test_compressed_bytes_are_smaller_and_valid(raw_session: aiohttp.ClientSession) -> None:
    page = html_page()
    async with origin_and_edge({"enabled": False}, extra=COMPRESS) as (origin, edge):
        origin.reply("/p", page, content_type="text/html")
        url = f"http://127.0.0.1:{edge.port}/p"
        async with raw_session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
            packed = await r.read()
            assert gzip.decompress(packed) == page and len(packed) < len(page) // 2
            assert int(r.headers["Content-Length"]) == len(packed)
        async with raw_session.get(url, headers={"Accept-Encoding": "gzip, deflate, br"}) as r:
            assert r.headers["Content-Encoding"] == "br"  # the server's preference among accepted
            assert brotli.decompress(await r.read()) == page
        async with raw_session.get(url, headers={"Accept-Encoding": "identity"}) as r:
            assert await r.read() == page
            assert "Content-Encoding" not in r.headers and r.headers["Vary"] == "Accept-Encoding"


async def test_what_is_never_compressed(raw_session: aiohttp.ClientSession) -> None:
    page = html_page(20_000)
    async with origin_and_edge({"enabled": False}, extra=COMPRESS) as (origin, edge):
        origin.reply("/gz", gzip.compress(page), content_type="text/html", content_encoding="gzip")
        origin.reply("/img", page, content_type="image/png")
        origin.reply("/tiny", b"<p>small</p>", content_type="text/html")
        origin.reply("/nt", page, content_type="text/html", cache_control="no-transform")
        origin.reply("/range", page, content_type="text/html")
        base = f"http://127.0.0.1:{edge.port}"
        ae = {"Accept-Encoding": "gzip, br"}
        async with raw_session.get(base + "/gz", headers=ae) as r:
            assert r.headers["Content-Encoding"] == "gzip" and gzip.decompress(await r.read()) == page
        for path in ("/img", "/tiny", "/nt"):
            async with raw_session.get(base + path, headers=ae) as r:
                assert "Content-Encoding" not in r.headers, path
        async with raw_session.get(base + "/range", headers={**ae, "Range": "bytes=0-99"}) as r:
            assert "Content-Encoding" not in r.headers


async def test_transformed_etag_is_weak_and_revalidation_uses_the_origins(
    raw_session: aiohttp.ClientSession,
) -> None:
    page = html_page(50_000)
    async with origin_and_edge(extra=COMPRESS) as (origin, edge):

        async def handler(request: web.Request) -> web.Response:
            headers = {"ETag": '"strong-1"', "Cache-Control": "max-age=1", "Content-Type": "text/html"}
            if request.headers.get("If-None-Match") == '"strong-1"':
                return web.Response(status=304, headers=headers)
            return web.Response(body=page, headers=headers)

        origin.on("/doc", handler)
        url = f"http://127.0.0.1:{edge.port}/doc"
        async with raw_session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["ETag"] == 'W/"strong-1"'
            assert gzip.decompress(await r.read()) == page
        async with raw_session.get(url, headers={"Accept-Encoding": "identity"}) as r:
            assert r.headers["ETag"] == '"strong-1"'  # untouched body, untouched ETag
        await asyncio.sleep(1.2)
        async with raw_session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["ETag"] == 'W/"strong-1"' and "fwd-status=304" in r.headers["Cache-Status"]
            assert gzip.decompress(await r.read()) == page
        assert origin.seen("/doc")[-1].headers["If-None-Match"] == '"strong-1"'


async def test_large_spilled_bodies_are_compressed_as_a_stream(raw_session: aiohttp.ClientSession) -> None:
    page = html_page(3 * 1024 * 1024)
    extra = {**COMPRESS, "edge": {"response_memory_limit": 256 * 1024}}
    async with origin_and_edge({"enabled": False}, extra=extra) as (origin, edge):
        origin.reply("/big.txt", page, content_type="text/plain")
        async with raw_session.get(
            f"http://127.0.0.1:{edge.port}/big.txt", headers={"Accept-Encoding": "br"}
        ) as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            assert brotli.decompress(await r.read()) == page


async def test_static_files_are_compressed_too(tmp_path: Path, raw_session: aiohttp.ClientSession) -> None:
    css = (b"body { margin: 0; padding: 0 }\n.item { color: #333; font-weight: bold }\n" * 200)[:10_000]
    (tmp_path / "site.css").write_bytes(css)
    config = {"route": [{"path": "/", "static": str(tmp_path)}], **COMPRESS}
    async with running_edge(config) as edge:
        async with raw_session.get(
            f"http://127.0.0.1:{edge.port}/site.css", headers={"Accept-Encoding": "gzip"}
        ) as r:
            assert r.headers["Content-Encoding"] == "gzip" and r.headers["Vary"] == "Accept-Encoding"
            assert gzip.decompress(await r.read()) == css


async def test_a_static_304_or_206_carries_the_vary_and_etag_of_the_200_it_stands_for(
    tmp_path: Path, raw_session: aiohttp.ClientSession
) -> None:
    # RFC 9110 15.4.5 and 15.3.7: a 304 or a 206 sends the Vary and ETag that a 200 would.
    (tmp_path / "site.css").write_bytes(b"body { margin: 0 }\n" * 200)
    (tmp_path / "tiny.css").write_bytes(b"body { margin: 0 }\n")  # under min_size: never compressed
    config = {"route": [{"path": "/", "static": str(tmp_path)}], **COMPRESS}
    async with running_edge(config) as edge:
        base = f"http://127.0.0.1:{edge.port}"

        async def get(path: str, **headers: str) -> tuple[int, aiohttp.typedefs.LooseHeaders]:
            async with raw_session.get(base + path, headers=headers) as r:
                await r.read()
                return r.status, r.headers

        for coding in ("gzip", "br", "identity"):
            status, ok = await get("/site.css", **{"Accept-Encoding": coding})
            assert status == 200 and ok["Vary"] == "Accept-Encoding"
            for condition in ({"If-None-Match": ok["ETag"]}, {"If-Modified-Since": ok["Last-Modified"]}):
                status, nm = await get("/site.css", **{"Accept-Encoding": coding}, **condition)
                assert status == 304, (coding, condition)
                assert (nm["ETag"], nm.get("Vary")) == (ok["ETag"], "Accept-Encoding"), (coding, condition)
            assert ok["ETag"].startswith("W/") == (coding != "identity")
            status, part = await get("/site.css", **{"Accept-Encoding": coding, "Range": "bytes=0-9"})
            assert status == 206 and part["Content-Range"] == "bytes 0-9/3800"
            # A Range request is never compressed: the part is of the identity body, strong ETag.
            assert (part["ETag"], part["Vary"]) == (ok["ETag"].removeprefix("W/"), "Accept-Encoding")
        status, ok = await get("/tiny.css", **{"Accept-Encoding": "gzip"})
        status, nm = await get("/tiny.css", **{"Accept-Encoding": "gzip", "If-None-Match": ok["ETag"]})
        assert status == 304 and "Vary" not in ok and "Vary" not in nm and nm["ETag"] == ok["ETag"]
        status, part = await get("/tiny.css", **{"Accept-Encoding": "gzip", "Range": "bytes=0-1"})
        assert status == 206 and "Vary" not in part


async def test_route_can_turn_compression_off() -> None:
    origin = ScriptedOrigin()
    port = await origin.start()
    try:
        origin.reply("/p", html_page(10_000), content_type="text/html")
        config = {
            "pool": {"o": {"members": [{"address": f"127.0.0.1:{port}"}]}},
            "route": [{"path": "/", "pool": "o", "compress": False}],
            **COMPRESS,
        }
        async with running_edge(config) as edge, aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(f"http://127.0.0.1:{edge.port}/p", headers={"Accept-Encoding": "gzip"}) as r:
                assert "Content-Encoding" not in r.headers and "Vary" not in r.headers
    finally:
        await origin.stop()


async def test_a_cached_static_route_compresses_each_file_once(tmp_path: Path) -> None:
    js = (b"function add(a, b) { return a + b }\nconsole.log(add(1, 2))\n" * 300)[:12_000]
    (tmp_path / "app.js").write_bytes(js)
    config = {
        "route": [{"path": "/", "static": str(tmp_path), "cache": True}],
        "cache": {"enabled": True, "cluster_purge": False},
        **COMPRESS,
    }
    async with running_edge(config) as edge, aiohttp.ClientSession(auto_decompress=False) as s:
        url = f"http://127.0.0.1:{edge.port}/app.js"
        statuses = []
        for _ in range(3):
            async with s.get(url, headers={"Accept-Encoding": "br"}) as r:
                assert brotli.decompress(await r.read()) == js
                statuses.append(r.headers["Cache-Status"])
        # Stored once; then each use is revalidated against the file (a 304 from the
        # static handler) and served from the stored brotli bytes.
        assert "stored" in statuses[0]
        assert all("fwd-status=304" in status for status in statuses[1:]), statuses
