"""The feature contract: a SyncFeature's two chains come from one before/after pair."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from edge.core.pipeline import BytesBody, Exchange, Reply, SyncFeature, chain, chain_now
from edge.features.https import HttpsPolicy
from edge.http.http1 import Head, RequestParser
from edge.http.request import Request


def _exchange(path: str = "/", scheme: str = "http") -> Exchange:
    head = RequestParser().feed(f"GET {path} HTTP/1.1\r\nHost: www.example.test\r\n\r\n".encode())[0]
    assert isinstance(head, Head)
    request = Request(head, SimpleNamespace(peer="192.0.2.1", transport=None), None)
    return Exchange(request, None, "www.example.test", "192.0.2.1", scheme)  # type: ignore[arg-type]


def _ok_now(ex: Exchange) -> Reply | None:
    return Reply(200, CIMultiDict(), BytesBody(b"ok"))


async def _ok(ex: Exchange) -> Reply:
    return Reply(200, CIMultiDict(), BytesBody(b"ok"))


def _must_wait(ex: Exchange) -> Reply | None:
    return None  # what a cache miss's terminal says on the synchronous chain


class Stamp(SyncFeature):
    """Answers /blocked itself; stamps every other answer; counts its request-side runs."""

    def __init__(self) -> None:
        self.before_runs = 0

    def before(self, ex: Exchange) -> Reply | None:
        self.before_runs += 1
        ex.notes["stamped-by"] = "stamp"
        return Reply(403, CIMultiDict({"X-Own": "1"})) if ex.request.path == "/blocked" else None

    def after(self, ex: Exchange, reply: Reply) -> Reply:
        reply.headers["X-Stamp"] = ex.notes["stamped-by"]
        return reply


def _view(reply: Reply | None) -> tuple[int, dict[str, str]] | None:
    return None if reply is None else (reply.status, dict(reply.headers))


async def test_both_chains_of_a_sync_feature_answer_alike() -> None:
    feature = Stamp()
    for path in ("/", "/blocked"):
        sync = _view(chain_now([feature], _ok_now)(_exchange(path)))
        async_ = _view(await chain([feature], _ok)(_exchange(path)))
        assert sync == async_
    assert _view(chain_now([feature], _ok_now)(_exchange("/"))) == (200, {"X-Stamp": "stamp"})
    # Its own answer skips `after`: the response side is for what came back from further in.
    assert _view(chain_now([feature], _ok_now)(_exchange("/blocked"))) == (403, {"X-Own": "1"})


async def test_a_sync_feature_gives_up_with_the_chain_then_decides_the_same_way_again() -> None:
    feature = Stamp()
    ex = _exchange("/")
    assert chain_now([feature], _must_wait)(ex) is None  # the edge then runs the async chain
    reply = await chain([feature], _ok)(ex)  # on the same exchange, from the start
    assert _view(reply) == (200, {"X-Stamp": "stamp"})
    assert feature.before_runs == 2


def test_a_sync_feature_cannot_hand_write_either_chain() -> None:
    with pytest.raises(TypeError, match="defines before/after, not now"):

        class OwnNow(SyncFeature):
            def now(self, ex: Exchange, call_next: object) -> Reply | None:  # type: ignore[override]
                return None

    with pytest.raises(TypeError, match="defines before/after, not __call__"):

        class OwnCall(SyncFeature):
            async def __call__(self, ex: Exchange, call_next: object) -> Reply:  # type: ignore[override]
                raise AssertionError


async def test_the_tls_feature_answers_alike_on_both_chains() -> None:
    tls = SimpleNamespace(
        hsts_max_age=600,
        hsts_include_subdomains=False,
        hsts_preload=False,
        redirect_http=True,
        redirect_port=443,
    )
    policy = HttpsPolicy(tls)  # type: ignore[arg-type]
    cases = [("/a?b=1", "http"), ("/.well-known/acme-challenge/t", "http"), ("/a", "https")]
    for path, scheme in cases:
        sync = _view(chain_now([policy], _ok_now)(_exchange(path, scheme)))
        async_ = _view(await chain([policy], _ok)(_exchange(path, scheme)))
        assert sync == async_, (path, scheme)
    assert _view(chain_now([policy], _ok_now)(_exchange("/a?b=1"))) == (
        301,
        {"Location": "https://www.example.test/a?b=1"},
    )
    assert _view(chain_now([policy], _ok_now)(_exchange("/a", "https"))) == (
        200,
        {"Strict-Transport-Security": "max-age=600"},
    )
    assert chain_now([policy], _must_wait)(_exchange("/a", "https")) is None


async def test_a_proxied_request_awaits_the_proxys_own_coroutine_and_no_wrapper() -> None:
    """On the async chain, the headers feature, the cache on a route it is off for and the
    Edge's terminal hand the proxy's coroutine through as it is: one coroutine for the whole
    pipeline of a proxied request (each wrapper was a coroutine made, stepped twice and
    finished per request)."""
    from edge.core.config import from_dict
    from edge.front.server import Edge
    from edge.upstream.proxy import ProxyHandler

    config = from_dict(
        {
            "edge": {"host": "127.0.0.1", "port": 0},
            "admin": {"port": 0},
            "cache": {"enabled": True, "cluster_purge": False},
            "pool": {"ap": {"members": [{"address": "127.0.0.1:9"}]}},
            "route": [{"path": "/", "pool": "ap", "cache": False}],
        },
        "<test>",
    )
    edge = Edge(config)
    ex = _exchange()
    route = edge.routes.find("www.example.test", "/", "GET")
    assert route is not None
    ex.route = route
    pending = edge.handle(ex)
    try:
        assert pending.cr_code is ProxyHandler._forward.__code__  # type: ignore[attr-defined]
    finally:
        pending.close()  # type: ignore[attr-defined]
