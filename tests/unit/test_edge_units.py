"""Edge logic without sockets: config, routing, path safety, ranges, balancers, the queue."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carousel.config import ConfigError
from carousel.registry import Keys
from edge.core.config import from_dict
from edge.core.fields import TrustedProxies, connection_tokens, parse_range
from edge.core.pipeline import load_factory
from edge.core.routing import RouteTable, normalize_host
from edge.features import FEATURE_ORDER, USER_FEATURES
from edge.features.static import safe_relative_path
from edge.upstream.balancer import ConsistentHash, LeastConnections, SmoothRoundRobin
from edge.upstream.client import ResponseParser, UpstreamProtocolError, serialize_request
from edge.upstream.pool import Member, NoMember, QueueFull, QueueTimeout, UpstreamPool

# --- config ------------------------------------------------------------------------------


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"route\[0\]\.pool: no pool named 'nope'"):
        from_dict({"route": [{"path": "/", "pool": "nope"}]}, "e.toml")
    with pytest.raises(ConfigError, match=r"route\[0\]\.pool: a route needs exactly one of"):
        from_dict({"route": [{"path": "/"}]}, "e.toml")
    with pytest.raises(ConfigError, match=r"pool\.a\.hash_key"):
        from_dict({"pool": {"a": {"service": "x", "hash_key": "ip"}}}, "e.toml")
    with pytest.raises(ConfigError, match=r"pool\.a\.members\[0\]\.address"):
        from_dict({"pool": {"a": {"members": [{"address": "nohost"}]}}}, "e.toml")
    with pytest.raises(ConfigError, match=r"edge\.bogus: unknown key"):
        from_dict({"edge": {"bogus": 1}}, "e.toml")
    with pytest.raises(ConfigError, match=r"route\[0\]\.regex"):
        from_dict({"route": [{"path": "/", "regex": "(", "respond": 200}]}, "e.toml")
    # Written into every response: a CR or LF would smuggle a line in.
    with pytest.raises(ConfigError, match=r"edge\.server_header: no CR, LF"):
        from_dict({"edge": {"server_header": "x\r\nSet-Cookie: a=1"}}, "e.toml")
    with pytest.raises(ConfigError, match=r"cache\.name: no CR, LF"):
        from_dict({"cache": {"name": "c\nX: y"}}, "e.toml")


def test_sample_config_is_valid() -> None:
    from pathlib import Path

    from edge.core.config import load

    cfg = load(str(Path(__file__).parents[2] / "deploy/examples/edge.toml"))
    assert cfg.route and cfg.pool


# --- routing -----------------------------------------------------------------------------


def _table(*routes: dict) -> RouteTable:
    return RouteTable(from_dict({"route": list(routes)}).route)


def test_route_precedence() -> None:
    t = _table(
        {"name": "any", "path": "/", "respond": 200},
        {"name": "api", "path": "/api", "respond": 200},
        {"name": "api-v2", "path": "/api/v2/", "respond": 200},
        {"name": "exact", "hosts": ["a.test"], "path": "/", "respond": 200},
        {"name": "wild", "hosts": ["*.a.test"], "path": "/", "respond": 200},
        {"name": "deep", "hosts": ["*.b.a.test"], "path": "/", "respond": 200},
        {"name": "re", "regex": r"\.php$", "path": "/", "respond": 200},
        {"name": "post", "path": "/form", "methods": ["POST"], "respond": 200},
    )

    def name(host: str, path: str, method: str = "GET") -> str | None:
        r = t.find(host, path, method)
        return r.name if r else None

    assert name("x.test", "/") == "any"
    assert name("x.test", "/api") == "api"
    assert name("x.test", "/api/users") == "api"
    assert name("x.test", "/apix") == "any"
    assert name("x.test", "/api/v2/users") == "api-v2"
    assert name("a.test", "/api") == "exact"  # a host's own table wins over catch-alls
    assert name("c.a.test", "/") == "wild"
    assert name("c.b.a.test", "/") == "deep"  # longest wildcard first
    assert name("x.test", "/index.php") == "re"
    assert name("x.test", "/form", "POST") == "post"
    assert name("x.test", "/form", "GET") == "any"


def test_no_match_and_default() -> None:
    t = _table({"hosts": ["a.test"], "path": "/", "respond": 200})
    assert t.find("b.test", "/", "GET") is None
    t = _table(
        {"hosts": ["a.test"], "path": "/", "respond": 200},
        {"name": "d", "hosts": ["z.test"], "path": "/", "respond": 404, "default": True},
    )
    found = t.find("b.test", "/", "GET")
    assert found is not None and found.name == "d"


@pytest.mark.parametrize(
    ("raw", "host"),
    [("A.Test:8080", "a.test"), ("a.test.", "a.test"), ("[::1]:80", "[::1]"), ("x", "x")],
)
def test_normalize_host(raw: str, host: str) -> None:
    assert normalize_host(raw) == host


# --- static path safety and ranges -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "/s/../x",
        "/s/%2e%2e/x",
        "/s/%2E%2e%2fx",
        "/s/%252e%252e/x",
        "/s/a%5c..%5cb",
        "/s/a\\b",
        "/s/a%00b",
        "/s/./a",
        "/s/%c0%ae%c0%ae/x",
        "/other/a",
    ],
)
def test_unsafe_paths_are_refused(raw: str) -> None:
    assert safe_relative_path(raw, "/s/") is None


def test_safe_paths() -> None:
    assert safe_relative_path("/s/css/a.css?v=1", "/s/") == "css/a.css"
    assert safe_relative_path("/s/a%20b.txt", "/s/") == "a b.txt"
    assert safe_relative_path("/s/dir/", "/s/") == "dir/"
    assert safe_relative_path("/s", "/s/") == ""


@given(st.text(max_size=40))
def test_no_decoded_result_ever_climbs(raw: str) -> None:
    rel = safe_relative_path("/s/" + raw, "/s/")
    if rel is not None:
        assert ".." not in rel.split("/") and "\\" not in rel and "\x00" not in rel


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=90-200", (90, 99)),
        ("bytes=100-", False),
        ("bytes=-0", False),
        ("bytes=5-1", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=x-y", None),
    ],
)
def test_parse_range(header: str, expected: object) -> None:
    assert parse_range(header, 100) == expected


# --- headers -----------------------------------------------------------------------------


def test_connection_tokens_and_trusted_chain() -> None:
    from multidict import CIMultiDict

    h = CIMultiDict([("Connection", "close, X-A"), ("Connection", " x-b ,")])
    assert connection_tokens(h) == {"close", "x-a", "x-b"}
    t = TrustedProxies(["10.0.0.0/8"])
    assert t.client_of("192.0.2.1", ["1.2.3.4"]) == "192.0.2.1"  # untrusted peer
    assert t.client_of("10.0.0.2", ["1.2.3.4, 10.0.0.9"]) == "1.2.3.4"
    assert t.client_of("10.0.0.2", []) == "10.0.0.2"


def test_feature_order_is_declared_once() -> None:
    # The documented order: cheap refusals first, headers cleaned before user features see
    # the request, compression inside the cache so compressed variants are stored.
    expected = [
        "edge.features.dos:feature",
        "edge.features.https:feature",
        "edge.features.headers:feature",
        USER_FEATURES,
    ]
    expected += ["edge.features.cache:feature", "edge.features.compress:feature"]
    assert list(FEATURE_ORDER) == expected
    assert len(set(FEATURE_ORDER)) == len(FEATURE_ORDER)
    assert callable(load_factory("edge.features.headers:feature"))
    with pytest.raises(ValueError, match="cannot import"):
        load_factory("no.such.module:f")
    with pytest.raises(ValueError, match="no callable"):
        load_factory("edge.features.headers:nothing")


# --- balancers ---------------------------------------------------------------------------


def _members(*weights: int) -> list[Member]:
    return [Member(f"m{i}", "127.0.0.1", 1000 + i, w, "static") for i, w in enumerate(weights)]


def test_smooth_round_robin_is_smooth_and_weighted() -> None:
    ms = _members(5, 1, 1)
    b = SmoothRoundRobin()
    b.rebuild(ms)
    picks = [b.pick(lambda m: True, None).name for _ in range(7)]  # type: ignore[union-attr]
    assert Counter(picks) == {"m0": 5, "m1": 1, "m2": 1}
    assert picks[:3] != ["m0", "m0", "m0"]  # nginx's smooth order: a a b a c a a


def test_least_connections_prefers_the_least_loaded_per_weight() -> None:
    ms = _members(1, 2)
    ms[0].active, ms[1].active = 1, 1
    b = LeastConnections()
    b.rebuild(ms)
    assert b.pick(lambda m: True, None) is ms[1]  # 1/2 < 1/1


def test_consistent_hash_moves_only_the_removed_members_keys() -> None:
    ms = _members(1, 1, 1, 1)
    b = ConsistentHash()
    b.rebuild(ms)
    keys = [f"user{i}" for i in range(400)]
    before = {k: b.pick(lambda m: True, k) for k in keys}
    assert len(set(before.values())) == 4
    gone = ms[2]
    after = {k: b.pick(lambda m: m is not gone, k) for k in keys}
    for k in keys:
        if before[k] is not gone:
            assert after[k] is before[k]
        else:
            assert after[k] is not gone


# --- the pool's admission queue ----------------------------------------------------------


def _pool(max_conns: int, queue: int = 10, timeout: float = 5.0, n: int = 1) -> UpstreamPool:
    cfg = from_dict(
        {
            "pool": {
                "p": {
                    "members": [{"address": f"127.0.0.1:{9000 + i}"} for i in range(n)],
                    "max_conns": max_conns,
                    "max_queue": queue,
                    "queue_timeout": timeout,
                }
            }
        }
    )
    return UpstreamPool("p", cfg.pool["p"], None, Keys())


async def test_freed_slot_goes_to_the_first_waiter_at_once() -> None:
    pool = _pool(max_conns=1)
    first = await pool.acquire(None, set())
    order: list[int] = []

    async def wait(i: int) -> None:
        m = await pool.acquire(None, set())
        order.append(i)
        await asyncio.sleep(0)
        pool.release(m)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert len(pool.queue) == 3
    pool.release(first)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]  # FIFO
    assert pool.members["127.0.0.1:9000"].active == 0


async def test_queue_bounds_and_timeouts() -> None:
    pool = _pool(max_conns=1, queue=1, timeout=0.05)
    await pool.acquire(None, set())
    queued = asyncio.create_task(pool.acquire(None, set()))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await pool.acquire(None, set())
    with pytest.raises(QueueTimeout):
        await queued
    assert not pool.queue and pool.queue_timeouts == 1


async def test_cancelled_waiter_gives_a_handed_slot_back() -> None:
    pool = _pool(max_conns=1)
    held = await pool.acquire(None, set())
    waiter = asyncio.create_task(pool.acquire(None, set()))
    await asyncio.sleep(0)
    pool.release(held)  # handed to the waiter...
    waiter.cancel()  # ...who left before running
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.members["127.0.0.1:9000"].active == 0


async def test_no_member_and_draining() -> None:
    pool = _pool(max_conns=0, n=2)
    a, b = pool.members.values()
    b.state = "draining"
    assert {(await pool.acquire(None, set())).name for _ in range(4)} == {a.name}
    with pytest.raises(NoMember):
        await pool.acquire(None, {a})


async def test_passive_ejection_and_expiry() -> None:
    pool = _pool(max_conns=0, n=2)
    a, _ = pool.members.values()
    for _ in range(3):
        pool.report_failure(a)
    assert a.ejected_until > 0
    picked = [await pool.acquire(None, set()) for _ in range(4)]
    assert a not in picked


# --- the upstream response parser --------------------------------------------------------


def _parse(data: bytes, head: bool = False, split: int = 1) -> tuple[ResponseParser, bytes]:
    """Feed ``data`` in pieces of ``split`` bytes; return the parser and the body."""
    p = ResponseParser(head)
    body = b""
    for i in range(0, len(data), split):
        body += b"".join(p.feed(data[i : i + split]))
    return p, body


@pytest.mark.parametrize("split", [1, 7, 10_000])
def test_parser_content_length_and_chunked(split: int) -> None:
    p, body = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello", split=split)
    assert (p.state, p.status, body, p.headers["X"], p.keep_alive) == ("done", 200, b"hello", "y", True)
    chunked = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    p, body = _parse(chunked, split=split)
    assert (p.state, p.status, body) == ("done", 201, b"hello world")  # TE wins over CL


def test_parser_interim_eof_head_and_no_body() -> None:
    p, body = _parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert (p.status, body) == (200, b"ok")
    p, body = _parse(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    assert p.state == "body" and not p.keep_alive
    p.feed_eof()
    assert (p.state, body) == ("done", b"until close")
    p, body = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", head=True)
    assert (p.state, body) == ("done", b"")
    p, _ = _parse(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    assert p.state == "done"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nInjected: b\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nBad Header: x\r\n\r\n",
    ],
)
def test_parser_rejects_broken_responses(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        _parse(raw)


@pytest.mark.parametrize("split", [1, 10_000])
def test_parser_bytes_past_the_framing_end_the_response_and_the_connection(split: int) -> None:
    # RFC 9112 6.3: extra data after a complete response may be discarded and must never
    # be taken for a separate response; the connection cannot be reused.
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabHTTP/1.1 200 OK\r\nX-Forged: 1\r\n\r\n"
    p, body = _parse(raw, split=split)
    assert (p.state, p.status, body, p.excess, p.keep_alive) == ("done", 200, b"ab", True, False)
    assert "X-Forged" not in p.headers
    p, _ = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab\r\n")  # a stray CRLF is no excess
    assert (p.excess, p.keep_alive) == (False, True)


def test_parser_sets_interim_responses_aside() -> None:
    raw = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    for split in (1, 10_000):
        p, body = _parse(raw, split=split)
        assert (p.status, body) == (200, b"ok")
        assert p.interim == [
            (103, "Early Hints", [("Link", "</s.css>; rel=preload")]),
            (102, "Processing", []),
        ]
        assert "Link" not in p.headers  # the final response's fields are its own


def test_parser_truncated_body_is_an_error() -> None:
    p, _ = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(UpstreamProtocolError):
        p.feed_eof()


def test_serialized_request_is_framed_by_the_edge() -> None:
    from multidict import CIMultiDict

    raw = serialize_request("POST", "/a?b=1", CIMultiDict({"Host": "h"}), b"xyz", close=True)
    assert raw == (b"POST /a?b=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nxyz")


def test_a_forwarded_head_keeps_the_clients_bytes() -> None:
    """obs-text (0x80-0xff) in a field value or the target reaches the member byte for byte:
    the head is read as latin-1 and written back as latin-1, not as UTF-8 (which made each
    such byte two, "caf\xc3\xa9" arriving as "caf\xc3\x83\xc2\xa9")."""
    from multidict import CIMultiDict

    from edge.http.http1 import RequestParser

    sent = (
        b"GET /a?q=\xee HTTP/1.1\r\nHost: h\r\n"
        b'Content-Disposition: attachment; filename="caf\xc3\xa9"\r\n\r\n'
    )
    (head, _) = RequestParser().feed(sent)
    raw = serialize_request(head.method, head.raw_path, CIMultiDict(head.headers), None, close=False)
    assert raw == sent
    # A character no byte stands for (a configured value) still goes out, as UTF-8.
    raw = serialize_request("GET", "/", CIMultiDict({"Host": "h", "X-Note": "caf\u00e9 \u2713"}), None, False)
    assert raw == b"GET / HTTP/1.1\r\nHost: h\r\nX-Note: caf\xc3\xa9 \xe2\x9c\x93\r\n\r\n"
    # Beside the client's own fields, only the configured one: the client's bytes are kept.
    headers = CIMultiDict(head.headers)
    headers["X-Note"] = "\u2713"
    raw = serialize_request(head.method, head.raw_path, headers, None, close=False)
    assert raw == sent[:-2] + b"X-Note: \xe2\x9c\x93\r\n\r\n"
    # A path percent-decoded with surrogateescape gets its byte back.
    headers = CIMultiDict({"Host": "h", "X-Note": "\u2713"})
    raw = serialize_request("GET", "/caf\udcc3\udca9", headers, None, close=False)
    assert raw == b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\nX-Note: \xe2\x9c\x93\r\n\r\n"


class _IdleTransport(asyncio.Transport):
    """Enough of a member connection's transport for the idle pool (no socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_a_pooled_member_connection_closes_idle_timeout_after_its_last_use() -> None:
    from edge.upstream.client import MemberConnections, ResponseParser, UpstreamConnection

    loop = asyncio.get_running_loop()
    conns = MemberConnections("127.0.0.1", 9, True, 0.3)
    conn = UpstreamConnection(loop)
    transport = _IdleTransport()
    conn.transport = transport

    def finished() -> None:
        conn.parser = ResponseParser()
        conn.parser.state = "done"
        conn.parser.keep_alive = True

    finished()
    conns.put(conn)
    await asyncio.sleep(0.2)
    assert conns.take() is conn  # reused before its idle timeout
    await asyncio.sleep(0.2)  # the first put's timer comes while it is in use: nothing closes
    assert not transport.closed
    finished()
    conns.put(conn)  # idle again: 0.3 s from now, not from the first put
    await asyncio.sleep(0.15)
    assert not transport.closed and list(conns.idle) == [conn]
    await asyncio.sleep(0.35)
    assert transport.closed and not conns.idle and conn.closed
