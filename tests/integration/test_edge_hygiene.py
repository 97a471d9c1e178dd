"""Header hygiene both ways, backend identity hidden, and a request-smuggling corpus."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from edge.testing import raw_request, running_edge
from sampleapp.main import start_app

pytestmark = pytest.mark.timeout(60)

LEAKY_HEADERS = {
    "Server": "Apache/2.4.1 (internal-build)",
    "X-Powered-By": "PHP/5.3",
    "X-Internal-Node": "ap-17.dc1",
    "Keep-Alive": "timeout=5",
    "Connection": "X-Secret-Hop",
    "X-Secret-Hop": "1",
    "Proxy-Authenticate": "Basic",
    "Upgrade": "h2c",
    "Trailer": "X-Checksum",
    "X-Kept": "yes",
}


@pytest.fixture
async def leaky_upstream() -> AsyncIterator[tuple[int, list[dict[str, str]]]]:
    """An upstream that echoes request headers and answers with every header it should not."""
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        resp = web.json_response(dict(request.headers))
        for k, v in LEAKY_HEADERS.items():
            resp.headers[k] = v
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1], seen  # type: ignore[union-attr]
    await runner.cleanup()


def _cfg(port: int, **edge: object) -> dict:
    return {
        "edge": {"hide_headers": ["X-Internal-Node"], **edge},
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{port}"}]}},
        "route": [{"path": "/", "pool": "app"}],
    }


async def test_hop_by_hop_headers_are_stripped_both_ways(leaky_upstream) -> None:
    port, seen = leaky_upstream
    async with running_edge(_cfg(port)) as edge:
        request = (
            "GET /x HTTP/1.1\r\n"
            "Host: www.example.test\r\n"
            # A client naming the edge's own headers in Connection must not remove them.
            "Connection: keep-alive, X-Forwarded-For, Forwarded, X-Client-Hop\r\n"
            "X-Client-Hop: secret\r\n"
            "Keep-Alive: timeout=99\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            "TE: trailers\r\n"
            "Upgrade: h2c\r\n"
            "X-Forwarded-For: 6.6.6.6\r\n"
            "X-Forwarded-Host: evil.test\r\n"
            "X-End-To-End: kept\r\n"
            "\r\n"
        )
        resp = await raw_request(edge.port, request.encode())
    assert resp is not None and resp.status == 200
    got = seen[-1]
    for name in ("x-client-hop", "keep-alive", "proxy-connection", "proxy-authorization",
                 "te", "upgrade"):  # fmt: skip
        assert name not in got, name
    assert got["x-end-to-end"] == "kept"
    assert got["host"] == "www.example.test"
    # Untrusted peer: its X-Forwarded-* claims are replaced, never extended.
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-host"] == "www.example.test"
    assert got["x-forwarded-proto"] == "http"
    assert got["forwarded"] == 'for=127.0.0.1;proto=http;host="www.example.test"'
    names = resp.names()
    for name in ("x-powered-by", "x-internal-node", "keep-alive", "x-secret-hop",
                 "proxy-authenticate", "upgrade", "trailer"):  # fmt: skip
        assert name not in names, name
    assert resp.header("server") == "carousel"
    assert resp.header("x-kept") == "yes"
    assert "Apache" not in str(resp.headers)


async def test_redirects_to_the_member_address_are_rewritten() -> None:
    async def redirect(request: web.Request) -> web.Response:
        own = f"http://{request.transport.get_extra_info('sockname')[0]}:{port}"  # type: ignore[union-attr]
        raise web.HTTPFound(own + "/login?next=/a")

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with running_edge(_cfg(port)) as edge, aiohttp.ClientSession() as s:
            async with s.get(
                f"http://127.0.0.1:{edge.port}/x",
                headers={"Host": "www.example.test"},
                allow_redirects=False,
            ) as r:
                assert r.status == 302
                assert r.headers["Location"] == "http://www.example.test/login?next=/a"
                assert str(port) not in str(r.headers)
    finally:
        await runner.cleanup()


async def test_trusted_proxy_chain_is_extended(leaky_upstream) -> None:
    port, seen = leaky_upstream
    async with running_edge(_cfg(port, trusted_proxies=["127.0.0.0/8"])) as edge:
        async with aiohttp.ClientSession() as s:
            async with s.get(
                f"http://127.0.0.1:{edge.port}/",
                headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
            ) as r:
                assert r.status == 200
    got = seen[-1]
    assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert got["x-forwarded-proto"] == "https"


async def test_sample_app_identity_is_hidden() -> None:
    runner, port = await start_app("127.0.0.1", 0, "ap")
    try:
        cfg = {
            "pool": {"app": {"members": [{"address": f"127.0.0.1:{port}"}]}},
            "route": [{"path": "/", "pool": "app"}],
        }
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{edge.port}/echo") as r:
                assert r.headers["Server"] == "carousel"
                assert "X-Powered-By" not in r.headers
                assert str(port) not in str(r.headers)
    finally:
        await runner.cleanup()


SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
# (name, raw request, must the edge answer exactly 400?)
CORPUS = [
    ("CL.TE", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
              "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, True),
    ("TE.CL", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              "Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n" + SMUGGLED, True),
    ("duplicate CL", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                     f"Content-Length: {len(SMUGGLED)}\r\n\r\n" + SMUGGLED, True),
    ("CL list", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 37\r\n\r\n" + SMUGGLED,
     True),
    ("CL sign", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +37\r\n\r\n" + SMUGGLED, True),
    ("bad chunk size", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "zz\r\nabc\r\n0\r\n\r\n" + SMUGGLED, True),
    ("chunk size overflow", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n" + SMUGGLED, True),
    ("TE xchunked", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n"
                    "Content-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED, True),
    ("TE space before colon", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n"
                              "Content-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED, True),
    ("TE obs-fold", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n"
                    "Content-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED, True),
    ("TE twice", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 "Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED, True),
    # Python's str.strip() takes NBSP (obs-text) as whitespace; RFC 9110's OWS is SP and
    # HTAB only, so a parser in front reads "chunked\xa0" as an unknown coding.
    ("TE NBSP", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xa0\r\n\r\n"
                "0\r\n\r\n" + SMUGGLED, True),
    ("CL NBSP", "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\xa0\r\n\r\n" + SMUGGLED,
     True),
    ("HTTP/1.0 TE", "POST /echo HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "0\r\n\r\n" + SMUGGLED, True),
    ("chunk ext quoted CRLF", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              "2;a=\"\r\nxx\"\r\nab\r\n0\r\n\r\n" + SMUGGLED, True),
    ("chunk line bare LF", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "2\nab\r\n0\r\n\r\n" + SMUGGLED, True),
    ("chunk data without CRLF", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                "2\r\nabXX0\r\n\r\n" + SMUGGLED, True),
    ("trailer obs-fold", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "0\r\nX: a\r\n b\r\n\r\n" + SMUGGLED, True),
    ("Expect obs-fold", "POST /echo HTTP/1.1\r\nHost: x\r\nExpect:\r\n 100-continue\r\n"
                        "Content-Length: 5\r\n\r\nabcde" + SMUGGLED, True),
    ("TE chunked,identity", "POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
     True),
    ("TE tab", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n"
               "0\r\n\r\n" + SMUGGLED, False),
    ("TE upper case", "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
                      "0\r\n\r\n" + SMUGGLED, False),
    ("bare LF", "POST /echo HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n0\n\n" + SMUGGLED,
     False),
    ("NUL in header", "GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED, True),
    ("CR in header", "GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\rb: c\r\n\r\n" + SMUGGLED, True),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "must_400"), CORPUS, ids=[c[0] for c in CORPUS])
async def test_smuggling_corpus_is_refused_or_handled_safely(name: str, raw: str, must_400: bool) -> None:
    runner, port = await start_app("127.0.0.1", 0, "ap")
    stats = runner.app["sample"].stats
    try:
        cfg = {
            "pool": {"app": {"members": [{"address": f"127.0.0.1:{port}"}]}},
            "route": [{"path": "/", "pool": "app"}],
        }
        async with running_edge(cfg) as edge:
            resp = await raw_request(edge.port, raw.encode("latin-1"), wait=3.0)
    finally:
        await runner.cleanup()
    status = None if resp is None else resp.status
    if must_400:
        assert status == 400, (name, status)
        # The hidden request never became a request of its own.
        assert "/smuggled" not in stats.by_path, name
    else:
        # Unambiguous framing that RFC 9112 parsers read alike: the body ends at "0",
        # so what follows is an honest pipelined request. Safe means the edge framed
        # it exactly so (the upstream gets Content-Length framing from the edge anyway).
        assert status in (200, 400), (name, status)
        if status == 200:
            assert stats.by_path["/echo"] == 1, name


async def test_garbage_never_breaks_the_edge(capsys) -> None:
    """Random and mutated requests get 400 or a normal answer; the edge keeps serving."""
    import logging
    import random

    rng = random.Random(1234)
    # The edge passes obs-text bytes (0x80-0xff) in the target on, as nginx does; the AP in
    # this process, an aiohttp server, refuses some of them with a logged traceback. That
    # log is the AP's, not the edge's: keep it out of what the last assertion reads.
    ap_log = logging.getLogger("aiohttp.server")
    ap_log.disabled = True
    base = (
        b"POST /echo?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nCookie: a=b\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    runner, port = await start_app("127.0.0.1", 0, "ap")
    try:
        cfg = {
            "pool": {"app": {"members": [{"address": f"127.0.0.1:{port}"}]}},
            "route": [{"path": "/", "pool": "app"}],
        }
        async with running_edge(cfg) as edge:
            statuses = set()
            for i in range(150):
                if i % 3 == 0:
                    blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                else:
                    data = bytearray(base)
                    for _ in range(rng.randrange(1, 6)):
                        pos = rng.randrange(len(data))
                        data[pos : pos + 1] = bytes([rng.randrange(256)]) * rng.randrange(0, 3)
                    blob = bytes(data)
                resp = await raw_request(edge.port, blob + b"\r\n\r\n", wait=1.0)
                statuses.add(None if resp is None else resp.status)
            ok = await raw_request(edge.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok is not None and ok.status == 200
    finally:
        await runner.cleanup()
        ap_log.disabled = False
    assert statuses <= {None, 200, 400, 404, 405, 413, 431, 501, 505}, statuses
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


async def test_headers_with_underscores_are_dropped_unless_allowed(leaky_upstream) -> None:
    port, seen = leaky_upstream
    request = (
        "GET /x HTTP/1.1\r\nHost: www.example.test\r\nX_Forwarded_For: 6.6.6.6\r\n"
        "X_Custom: 1\r\nX-Custom: 2\r\nConnection: close\r\n\r\n"
    )
    async with running_edge(_cfg(port)) as edge:
        resp = await raw_request(edge.port, request.encode())
        assert resp is not None and resp.status == 200
    assert "x_forwarded_for" not in seen[-1] and "x_custom" not in seen[-1]
    assert seen[-1]["x-custom"] == "2" and "6.6.6.6" not in seen[-1]["x-forwarded-for"]
    async with running_edge(_cfg(port, underscores_in_headers=True)) as edge:
        resp = await raw_request(edge.port, request.encode())
        assert resp is not None and resp.status == 200
    assert seen[-1]["x_custom"] == "1"
