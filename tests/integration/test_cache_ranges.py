"""HEAD and Range requests answered from the cache, misses included (RFC 9110 14, 9.3.2)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from edge.front.server import Edge
from edge.testing.cache import origin_and_edge

pytestmark = pytest.mark.timeout(60)

BODY = b"0123456789"


class Client:
    """Requests against one edge, returning (status, headers, body)."""

    def __init__(self, session: aiohttp.ClientSession, edge: Edge) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{edge.port}"

    async def __call__(
        self, path: str, method: str = "GET", **headers: str
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        async with self.session.request(method, self.base + path, headers=hdrs, allow_redirects=False) as r:
            return r.status, r.headers, await r.read()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def http_date(offset: float = 0.0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


async def test_a_range_miss_fetches_the_whole_response_stores_it_and_answers_206(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/r", BODY, cache_control="max-age=60", etag='"r1"')
        get = Client(session, edge)
        status, headers, body = await get("/r", range="bytes=2-4")
        assert (status, body, headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")
        assert "stored" in headers["Cache-Status"]
        seen = origin.seen("/r")
        assert len(seen) == 1 and "Range" not in seen[0].headers  # the whole representation
        status, headers, body = await get("/r", range="bytes=-3")
        assert (status, body, headers["Content-Range"]) == (206, b"789", "bytes 7-9/10")
        assert "hit" in headers["Cache-Status"]
        status, _, body = await get("/r")
        assert (status, body) == (200, BODY)
        assert len(origin.seen("/r")) == 1


async def test_unsatisfiable_and_invalid_ranges(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/r", BODY, cache_control="max-age=60")
        get = Client(session, edge)
        await get("/r")
        status, headers, body = await get("/r", range="bytes=20-")
        assert (status, headers["Content-Range"], body) == (416, "bytes */10", b"")
        status, headers, _ = await get("/r", range="bytes=20-30, 40-")
        assert (status, headers["Content-Range"]) == (416, "bytes */10")  # no spec satisfiable
        assert (await get("/r", range="bytes=-0"))[0] == 416
        # Invalid syntax, another unit, last < first: the field is ignored (14.2), a 200.
        for value in ("bytes=5-2", "bytes=a-b", "items=0-1", "bytes 0-1", "bytes=0-1,x"):
            status, headers, body = await get("/r", range=value)
            assert (status, body) == (200, BODY), value
            assert "Content-Range" not in headers
        status, headers, body = await get("/r", range="bytes=8-100")  # last-pos past the end
        assert (status, body, headers["Content-Range"]) == (206, b"89", "bytes 8-9/10")
        status, _, body = await get("/r", range="bytes=2-4, 20-30")  # only one part satisfiable
        assert (status, body) == (206, b"234")
        assert len(origin.seen("/r")) == 1


async def test_several_ranges_make_a_multipart_byteranges_answer(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/r", BODY, cache_control="max-age=60", content_type="text/plain")
        get = Client(session, edge)
        status, headers, body = await get("/r", range="bytes=0-1, 5-6")
        assert status == 206 and "Content-Range" not in headers
        ctype = headers["Content-Type"]
        assert ctype.startswith("multipart/byteranges; boundary=")
        boundary = ctype.partition("boundary=")[2]
        expected = (
            f"\r\n--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n01"
            f"\r\n--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 5-6/10\r\n\r\n56"
            f"\r\n--{boundary}--\r\n"
        ).encode()
        assert body == expected
        assert int(headers["Content-Length"]) == len(expected)
        # Overlapping or touching ranges are coalesced (14.6): one part, so no multipart.
        status, headers, body = await get("/r", range="bytes=0-3, 2-5, 6-6")
        assert (status, body, headers["Content-Range"]) == (206, b"0123456", "bytes 0-6/10")
        # Too many parts: the whole representation (a server MAY ignore such a field, 14.2).
        many = ",".join(f"{i}-{i}" for i in range(0, 10, 2)) + "," + ",".join(["9-9"] * 40)
        status, _, body = await get("/r", range=f"bytes={many}")
        assert (status, body) == (200, BODY)


async def test_if_range_needs_a_strong_match(session: aiohttp.ClientSession) -> None:
    modified = http_date(-3600)
    async with origin_and_edge() as (origin, edge):
        origin.reply("/s", BODY, cache_control="max-age=60", etag='"v1"', last_modified=modified)
        origin.reply("/w", BODY, cache_control="max-age=60", etag='W/"v1"')
        get = Client(session, edge)
        await get("/s")
        await get("/w")
        assert (await get("/s", range="bytes=0-1", if_range='"v1"'))[:3:2] == (206, b"01")
        assert (await get("/s", range="bytes=0-1", if_range='"v0"'))[:3:2] == (200, BODY)
        assert (await get("/s", range="bytes=0-1", if_range='W/"v1"'))[:3:2] == (200, BODY)
        # A date: the exact Last-Modified, strong as the Date is an hour later (RFC 9110 8.8.2.2).
        assert (await get("/s", range="bytes=0-1", if_range=modified))[:3:2] == (206, b"01")
        assert (await get("/s", range="bytes=0-1", if_range=http_date(-60)))[:3:2] == (200, BODY)
        # A weak stored ETag never validates a range.
        assert (await get("/w", range="bytes=0-1", if_range='W/"v1"'))[:3:2] == (200, BODY)
        assert (await get("/w", range="bytes=0-1", if_range='"v1"'))[:3:2] == (200, BODY)
        assert len(origin.seen("/s")) == len(origin.seen("/w")) == 1
        # Modified in the second of its Date: a weak Last-Modified, so no range by date.
        now = http_date()
        origin.reply("/d", BODY, cache_control="max-age=60", last_modified=now, date=now)
        await get("/d")
        assert (await get("/d", range="bytes=0-1", if_range=now))[:3:2] == (200, BODY)


async def test_range_on_a_head_is_ignored(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/r", BODY, cache_control="max-age=60")
        get = Client(session, edge)
        await get("/r")
        status, headers, body = await get("/r", method="HEAD", range="bytes=0-1")
        assert (status, body, headers["Content-Length"]) == (200, b"", "10")
        assert "Content-Range" not in headers


async def test_a_head_miss_is_fetched_as_a_get_stored_and_answered_without_body(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/h", "x" * 100, cache_control="max-age=60")
        get = Client(session, edge)
        status, headers, body = await get("/h", method="HEAD")
        assert (status, body, headers["Content-Length"]) == (200, b"", "100")
        assert "stored" in headers["Cache-Status"]
        status, headers, body = await get("/h")
        assert (status, body) == (200, b"x" * 100)
        assert "hit" in headers["Cache-Status"]
        assert [r.method for r in origin.requests] == ["GET"]


async def test_an_uncacheable_head_miss_answers_the_fields_without_the_body(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/n", "y" * 50, cache_control="no-store", x_origin="1")
        get = Client(session, edge)
        status, headers, body = await get("/n", method="HEAD")
        assert (status, body, headers["Content-Length"], headers["X-Origin"]) == (200, b"", "50", "1")
        status, _, body = await get("/n", range="bytes=0-4")
        assert (status, body) == (200, b"y" * 50)  # not stored: the whole response (14.2 allows it)


async def test_a_range_from_a_disk_entry(session: aiohttp.ClientSession, tmp_path: object) -> None:
    big = bytes(range(256)) * 64  # 16 KiB: past max_object_size, kept on disk only
    cache = {"disk_dir": str(tmp_path), "max_object_size": 1024, "memory_size": 1 << 20}
    async with origin_and_edge(cache) as (origin, edge):

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=big, headers={"Cache-Control": "max-age=60"})

        origin.on("/big", handler)
        get = Client(session, edge)
        status, _, body = await get("/big", range="bytes=1000-1999")
        assert (status, body) == (206, big[1000:2000])
        status, _, body = await get("/big", range="bytes=0-9, 16000-")
        assert status == 206
        assert big[:10] in body and big[16000:] in body
        assert len(origin.seen("/big")) == 1
