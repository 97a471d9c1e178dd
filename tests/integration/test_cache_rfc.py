"""RFC 9111 rules, one test each, against a real origin on loopback through a real edge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from edge.front.server import Edge
from edge.testing.cache import ScriptedOrigin, origin_and_edge

pytestmark = pytest.mark.timeout(60)


class Client:
    """GETs against one edge, returning (status, headers, body)."""

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


def status_of(headers: CIMultiDictProxy[str]) -> str:
    return headers.get("Cache-Status", "")


def now_date(offset: float = 0.0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


# --- storing and reusing -------------------------------------------------------------------


async def test_fresh_response_is_stored_and_reused_with_age_and_origin_date(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/a", "hello", cache_control="max-age=60", date=now_date(-5))
        get = Client(session, edge)
        status, h1, body1 = await get("/a")
        assert (status, body1) == (200, b"hello")
        assert status_of(h1) == "carousel; fwd=uri-miss; fwd-status=200; stored"
        await asyncio.sleep(1.1)
        status, h2, body2 = await get("/a")
        assert (status, body2) == (200, b"hello")
        assert len(origin.seen("/a")) == 1
        assert h2["Date"] == h1["Date"]  # the origin's Date is kept
        assert 6 <= int(h2["Age"]) <= 7  # 5 s old on arrival + 1 s in the cache
        assert status_of(h2).startswith("carousel; hit; ttl=5")


async def test_head_is_answered_from_a_stored_get(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/h", "x" * 100, cache_control="max-age=60")
        get = Client(session, edge)
        await get("/h")
        status, headers, body = await get("/h", method="HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == "100"
        assert [r.method for r in origin.requests] == ["GET"]


async def test_other_methods_are_forwarded_and_never_stored(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/p", "done", cache_control="max-age=60")
        get = Client(session, edge)
        for method in ("POST", "PUT", "POST"):
            status, headers, _ = await get("/p", method=method)
            assert status == 200 and "fwd=method" in status_of(headers)
        assert [r.method for r in origin.requests] == ["POST", "PUT", "POST"]


async def test_no_freshness_and_no_validator_is_never_stored(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/plain", "dynamic")
        get = Client(session, edge)
        for _ in range(3):
            _, headers, _ = await get("/plain")
            assert "stored" not in status_of(headers)
        assert len(origin.seen("/plain")) == 3


async def test_validator_only_response_is_revalidated_with_a_conditional_request(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):

        async def etagged(request: web.Request) -> web.Response:
            if request.headers.get("If-None-Match") == '"v1"':
                return web.Response(status=304, headers={"ETag": '"v1"', "X-Checked": "yes"})
            return web.Response(text="body v1", headers={"ETag": '"v1"'})

        origin.on("/e", etagged)
        get = Client(session, edge)
        _, h1, _ = await get("/e")
        assert "stored" in status_of(h1)
        status, h2, b2 = await get("/e", if_none_match='"client-old"')
        assert (status, b2) == (200, b"body v1")
        assert status_of(h2).startswith("carousel; fwd=stale; fwd-status=304")
        assert h2["X-Checked"] == "yes"  # the 304's fields merged into the stored response
        seen = origin.seen("/e")
        assert len(seen) == 2 and seen[1].headers["If-None-Match"] == '"v1"'  # ours, not the client's


async def test_expires_gives_freshness_and_an_invalid_expires_means_expired(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/exp", "e", expires=now_date(60), date=now_date())
        origin.reply("/zero", "z", expires="0", etag='"z"')
        get = Client(session, edge)
        for _ in range(2):
            await get("/exp")
            await get("/zero")
        assert len(origin.seen("/exp")) == 1
        assert len(origin.seen("/zero")) == 2  # stored, but stale at once


async def test_s_maxage_wins_over_max_age_in_a_shared_cache(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/s", "s", cache_control="max-age=0, s-maxage=60")
        get = Client(session, edge)
        await get("/s")
        _, headers, _ = await get("/s")
        assert status_of(headers).startswith("carousel; hit")
        assert len(origin.seen("/s")) == 1


async def test_heuristic_freshness_is_off_by_default_and_on_when_enabled(
    session: aiohttp.ClientSession,
) -> None:
    for heuristic, expected in ((False, 2), (True, 1)):
        async with origin_and_edge({"heuristic": heuristic}) as (origin, edge):
            origin.reply("/lm", "old", last_modified=now_date(-10 * 86400))
            get = Client(session, edge)
            await get("/lm")
            await get("/lm")
            assert len(origin.seen("/lm")) == expected, heuristic


async def test_age_from_upstream_shortens_the_freshness(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/aged", "a", cache_control="max-age=60", age="59")
        get = Client(session, edge)
        await get("/aged")
        _, hit, _ = await get("/aged")
        assert int(hit["Age"]) >= 59
        await asyncio.sleep(1.2)
        _, later, _ = await get("/aged")
        assert "fwd=" in status_of(later)
        assert len(origin.seen("/aged")) == 2


# --- Vary ----------------------------------------------------------------------------------


async def test_vary_keeps_variants_apart(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):

        async def by_lang(request: web.Request) -> web.Response:
            lang = request.headers.get("X-Lang", "none")
            return web.Response(text=f"in {lang}", headers={"Cache-Control": "max-age=60", "Vary": "X-Lang"})

        origin.on("/v", by_lang)
        get = Client(session, edge)
        assert (await get("/v", x_lang="fr"))[2] == b"in fr"
        assert (await get("/v", x_lang="de"))[2] == b"in de"
        _, headers, body = await get("/v", x_lang="fr")
        assert body == b"in fr" and status_of(headers).startswith("carousel; hit")
        assert (await get("/v", x_lang="de"))[2] == b"in de"
        _, missing, body = await get("/v")
        assert body == b"in none" and "fwd=vary-miss" in status_of(missing)
        assert len(origin.seen("/v")) == 3


async def test_vary_star_is_never_reused(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/star", "s", cache_control="max-age=60", vary="*")
        get = Client(session, edge)
        await get("/star")
        await get("/star")
        assert len(origin.seen("/star")) == 2


# --- Authorization and response directives -------------------------------------------------


async def test_authorization_requests_use_the_cache_only_when_the_response_allows(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/private-by-default", "mine", cache_control="max-age=60")
        origin.reply("/shared", "ours", cache_control="public, max-age=60")
        get = Client(session, edge)
        for _ in range(2):
            await get("/private-by-default", authorization="Bearer a")
            await get("/shared", authorization="Bearer a")
        assert len(origin.seen("/private-by-default")) == 2
        assert len(origin.seen("/shared")) == 1
        # A response stored for an anonymous request is not handed to an authorised one.
        await get("/private-by-default")
        await get("/private-by-default", authorization="Bearer b")
        assert len(origin.seen("/private-by-default")) == 4


async def test_no_store_and_private_are_not_stored(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/ns", "x", cache_control="no-store, max-age=60")
        origin.reply("/pv", "x", cache_control="private, max-age=60")
        get = Client(session, edge)
        for _ in range(2):
            await get("/ns")
            await get("/pv")
        assert len(origin.seen("/ns")) == len(origin.seen("/pv")) == 2


async def test_request_no_store_keeps_the_response_out(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/rns", "x", cache_control="max-age=60")
        get = Client(session, edge)
        await get("/rns", cache_control="no-store")
        await get("/rns")
        assert len(origin.seen("/rns")) == 2


async def test_no_cache_response_is_validated_before_every_reuse(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):

        async def handler(request: web.Request) -> web.Response:
            headers = {"Cache-Control": "no-cache, max-age=60", "ETag": '"n1"'}
            if request.headers.get("If-None-Match") == '"n1"':
                return web.Response(status=304, headers=headers)
            return web.Response(text="nc", headers=headers)

        origin.on("/nc", handler)
        get = Client(session, edge)
        for _ in range(3):
            assert (await get("/nc"))[2] == b"nc"
        seen = origin.seen("/nc")
        assert len(seen) == 3 and all(r.headers.get("If-None-Match") == '"n1"' for r in seen[1:])


async def test_qualified_no_cache_and_private_fields_are_not_stored(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply(
            "/q",
            "q",
            cache_control='max-age=60, no-cache="X-Token", private="X-User"',
            x_token="t",
            x_user="u",
            x_public="p",
        )
        get = Client(session, edge)
        _, first, _ = await get("/q")
        assert first["X-Token"] == "t"  # the fetching client gets them
        _, hit, _ = await get("/q")
        assert hit["X-Public"] == "p" and "X-Token" not in hit and "X-User" not in hit


async def test_request_no_cache_and_max_age_zero_revalidate(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/rc", "r", cache_control="max-age=60", etag='"r"')
        get = Client(session, edge)
        await get("/rc")
        _, headers, _ = await get("/rc", cache_control="no-cache")
        assert "fwd=" in status_of(headers)
        await get("/rc", pragma="no-cache")
        await get("/rc", cache_control="max-age=0")
        await get("/rc", cache_control="max-stale=5")  # fresh anyway: a hit
        assert len(origin.seen("/rc")) == 4


async def test_only_if_cached_gets_504_on_a_miss(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/oic", "o", cache_control="max-age=60")
        get = Client(session, edge)
        status, _, _ = await get("/oic", cache_control="only-if-cached")
        assert status == 504 and not origin.requests
        await get("/oic")
        status, _, body = await get("/oic", cache_control="only-if-cached")
        assert (status, body) == (200, b"o")


async def test_must_revalidate_never_serves_stale_when_the_origin_is_down(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge({"stale_if_error": 300}) as (origin, edge):
        origin.reply("/mr", "m", cache_control="max-age=1, must-revalidate", etag='"m"')
        origin.reply("/loose", "l", cache_control="max-age=1", etag='"l"')
        get = Client(session, edge)
        await get("/mr")
        await get("/loose")
        await origin.stop()
        await asyncio.sleep(1.2)
        assert (await get("/mr"))[0] == 502
        status, headers, body = await get("/loose")  # the configured stale-if-error applies
        assert (status, body) == (200, b"l") and 'detail="stale-if-error"' in status_of(headers)


async def test_304_fields_update_the_stored_response(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        version = {"n": 1}

        async def handler(request: web.Request) -> web.Response:
            headers = {"Cache-Control": "max-age=1", "ETag": '"same"', "X-Version": str(version["n"])}
            if request.headers.get("If-None-Match") == '"same"':
                return web.Response(status=304, headers=headers)
            return web.Response(text="payload", headers=headers)

        origin.on("/u", handler)
        get = Client(session, edge)
        await get("/u")
        version["n"] = 2
        await asyncio.sleep(1.1)
        _, revalidated, body = await get("/u")
        assert body == b"payload" and revalidated["X-Version"] == "2"
        _, hit, _ = await get("/u")
        assert hit["X-Version"] == "2" and status_of(hit).startswith("carousel; hit")
        assert len(origin.seen("/u")) == 2


async def test_connection_listed_fields_are_never_stored(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):

        async def handler(request: web.Request) -> web.Response:
            headers = CIMultiDict(
                [("Cache-Control", "max-age=60"), ("Connection", "X-Hop"), ("X-Hop", "1"), ("X-Kept", "2")]
            )
            return web.Response(text="c", headers=headers)

        origin.on("/conn", handler)
        get = Client(session, edge)
        await get("/conn")
        _, hit, _ = await get("/conn")
        assert status_of(hit).startswith("carousel; hit")
        assert hit["X-Kept"] == "2" and "X-Hop" not in hit


# --- invalidation --------------------------------------------------------------------------


async def test_unsafe_method_invalidates_url_and_same_origin_locations(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/list", "list", cache_control="max-age=60")
        origin.reply("/other", "other", cache_control="max-age=60")

        async def item(request: web.Request) -> web.Response:
            if request.method == "POST":
                return web.Response(
                    status=201,
                    headers={"Location": "/list", "Content-Location": "http://elsewhere.test/other"},
                )
            return web.Response(text="item", headers={"Cache-Control": "max-age=60"})

        origin.on("/item", item)
        get = Client(session, edge)
        for path in ("/item", "/list", "/other"):
            await get(path)
        assert (await get("/item", method="POST"))[0] == 201
        for path in ("/item", "/list", "/other"):
            await get(path)
        # /item and /list went again; /other is on another origin and stays cached.
        assert [len(origin.seen(p)) for p in ("/item", "/list", "/other")] == [3, 2, 1]


async def test_error_answer_to_an_unsafe_method_invalidates_nothing(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):

        async def handler(request: web.Request) -> web.Response:
            if request.method == "DELETE":
                return web.Response(status=403)
            return web.Response(text="kept", headers={"Cache-Control": "max-age=60"})

        origin.on("/k", handler)
        get = Client(session, edge)
        await get("/k")
        await get("/k", method="DELETE")
        await get("/k")
        assert [r.method for r in origin.seen("/k")] == ["GET", "DELETE"]


# --- targeted fields, Cache-Status, keys, cookies ------------------------------------------


async def test_cdn_cache_control_governs_the_edge_and_reaches_the_client(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/cdn", "c", cache_control="no-store", cdn_cache_control="max-age=60")
        origin.reply("/bad", "b", cache_control="max-age=60", cdn_cache_control="max-age=5 max-age=6")
        get = Client(session, edge)
        for _ in range(2):
            _, headers, _ = await get("/cdn")
            await get("/bad")
        assert headers["Cache-Control"] == "no-store"  # browsers still get the origin's policy
        assert len(origin.seen("/cdn")) == 1
        assert len(origin.seen("/bad")) == 1  # invalid targeted field: Cache-Control governs


async def test_cache_status_names_the_cache_and_appends_to_upstream_members(
    session: aiohttp.ClientSession,
) -> None:
    async with origin_and_edge({"name": "edge-a"}) as (origin, edge):
        origin.reply("/cs", "c", cache_control="max-age=60", cache_status="origin-cache; hit")
        get = Client(session, edge)
        _, miss, _ = await get("/cs")
        assert miss.getall("Cache-Status") == [
            "origin-cache; hit",
            "edge-a; fwd=uri-miss; fwd-status=200; stored",
        ]
        _, hit, _ = await get("/cs")
        assert hit.getall("Cache-Status")[-1].startswith("edge-a; hit; ttl=")


async def test_key_ignores_and_sorts_query_parameters_per_route(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge(cache_ignore_query=["utm_*"], cache_sort_query=True) as (origin, edge):
        origin.reply("/q", "q", cache_control="max-age=60")
        get = Client(session, edge)
        await get("/q?b=2&a=1&utm_source=mail")
        await get("/q?a=1&b=2")
        await get("/q?a=1&b=2&utm_campaign=x")
        await get("/q?a=1&b=3")
        assert len(origin.seen("/q")) == 2


async def test_key_adds_configured_headers_and_cookies(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge(cache_key_headers=["X-Device"], cache_key_cookies=["lang"]) as (origin, edge):
        origin.reply("/k", "k", cache_control="max-age=60")
        get = Client(session, edge)
        await get("/k", x_device="phone", cookie="lang=fr; session=1")
        await get("/k", x_device="phone", cookie="session=2; lang=fr")
        await get("/k", x_device="desk", cookie="lang=fr")
        await get("/k", x_device="phone", cookie="lang=de")
        assert len(origin.seen("/k")) == 3


async def test_host_is_part_of_the_key(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):

        async def by_host(request: web.Request) -> web.Response:
            return web.Response(text=request.host, headers={"Cache-Control": "max-age=60"})

        origin.on("/host", by_host)
        get = Client(session, edge)
        assert (await get("/host", host="a.test"))[2] == b"a.test"
        assert (await get("/host", host="b.test"))[2] == b"b.test"
        assert (await get("/host", host="A.TEST:80"))[2] == b"a.test"  # normalised: a hit
        assert len(origin.seen("/host")) == 2


async def test_set_cookie_responses_are_stored_only_where_the_route_allows(
    session: aiohttp.ClientSession,
) -> None:
    for allowed, expected in ((False, 2), (True, 1)):
        async with origin_and_edge(cache_set_cookie=allowed) as (origin, edge):
            origin.reply("/sc", "s", cache_control="max-age=60", set_cookie="id=1")
            get = Client(session, edge)
            _, first, _ = await get("/sc")
            _, second, _ = await get("/sc")
            assert first["Set-Cookie"] == "id=1"
            assert len(origin.seen("/sc")) == expected
            if allowed:
                assert "Set-Cookie" not in second  # one client's cookie is never replayed


async def test_scripted_origin_counts_every_request() -> None:
    """The helper the tests above rely on sees what reaches it, including methods."""
    origin = ScriptedOrigin()
    port = await origin.start()
    try:
        origin.reply("/x", "x")
        async with aiohttp.ClientSession() as s:
            async with s.put(f"http://127.0.0.1:{port}/x?y=1") as r:
                assert r.status == 200
        assert [(r.method, r.path_qs) for r in origin.requests] == [("PUT", "/x?y=1")]
    finally:
        await origin.stop()


async def test_max_stale_never_overrides_must_revalidate(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/ms", "m", cache_control="max-age=1, must-revalidate", etag='"m"')
        origin.reply("/loose", "l", cache_control="max-age=1", etag='"l"')
        get = Client(session, edge)
        await get("/ms")
        await get("/loose")
        await asyncio.sleep(1.2)
        _, headers, _ = await get("/ms", cache_control="max-stale=60")
        assert "fwd=stale" in status_of(headers)
        _, headers, _ = await get("/loose", cache_control="max-stale=60")
        assert status_of(headers).startswith("carousel; hit; ttl=-")  # the client accepts stale
        assert len(origin.seen("/ms")) == 2 and len(origin.seen("/loose")) == 1


async def test_websocket_upgrades_pass_through_a_caching_route() -> None:
    async with origin_and_edge(websocket=True) as (origin, edge):

        async def ws_echo(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str("echo " + msg.data)
            return ws

        origin.on("/ws", ws_echo)
        async with aiohttp.ClientSession() as s:
            sockets = [await s.ws_connect(f"http://127.0.0.1:{edge.port}/ws") for _ in range(2)]
            for i, ws in enumerate(sockets):
                await ws.send_str(f"hi {i}")
                assert (await ws.receive_str()) == f"echo hi {i}"
            for ws in sockets:
                await ws.close()


async def test_client_conditionals_on_a_hit_get_304_from_the_cache(session: aiohttp.ClientSession) -> None:
    lm = now_date(-3600)
    async with origin_and_edge() as (origin, edge):
        origin.reply("/c", "content", cache_control="max-age=60", etag='"c1"', last_modified=lm)
        get = Client(session, edge)
        await get("/c")
        status, headers, body = await get("/c", if_none_match='"x", "c1"')
        assert (status, body) == (304, b"")
        assert headers["ETag"] == '"c1"' and headers["Cache-Control"] == "max-age=60" and "Age" in headers
        assert status_of(headers).startswith("carousel; hit")
        assert (await get("/c", if_modified_since=now_date()))[0] == 304
        assert (await get("/c", if_modified_since=now_date(-7200)))[0] == 200
        assert (await get("/c", if_none_match='"other"', if_modified_since=now_date()))[0] == 200
        assert len(origin.seen("/c")) == 1


async def test_cache_figures_reach_the_metrics_endpoint(session: aiohttp.ClientSession) -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/m", "m", cache_control="max-age=60")
        get = Client(session, edge)
        for _ in range(3):
            await get("/m")
        async with session.get(f"http://127.0.0.1:{edge.admin_port}/metrics") as r:
            text = await r.text()
        assert 'carousel_edge_cache_outcomes_total{outcome="HIT"} 2.0' in text
        assert 'carousel_edge_cache_outcomes_total{outcome="STORED"} 1.0' in text
        assert "carousel_edge_cache_objects 1.0" in text
