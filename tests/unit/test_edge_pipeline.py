"""The feature contract: a SyncFeature's two chains come from one before/after pair."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from edge.core.pipeline import (
    BytesBody,
    Deferred,
    Exchange,
    Reply,
    SyncFeature,
    chain,
    chain_defers,
    chain_now,
)
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


class Order(SyncFeature):
    """Appends its name to X-Order on the response side (shows which after ran first)."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail

    def after(self, ex: Exchange, reply: Reply) -> Reply:
        if self.fail:
            raise RuntimeError("a broken response side")
        reply.headers["X-Order"] = reply.headers.get("X-Order", "") + self.name
        return reply


def test_a_deferred_reply_runs_every_response_side_once_innermost_first() -> None:
    pending: list[Deferred] = []

    def terminal(ex: Exchange) -> Reply | None:
        pending.append(Deferred())
        return pending[-1]

    outer, inner = Order("o"), Order("i")
    run = chain_now([outer, inner], terminal)
    answer = run(_exchange())
    assert isinstance(answer, Deferred) and answer is pending[0] and not answer.ready
    got: list[Reply | None] = []
    answer.wait(got.append)
    assert got == []  # nothing before the terminal's reply is in
    answer.resolve(Reply(200, CIMultiDict(), BytesBody(b"ok")))
    assert len(got) == 1 and got[0] is not None
    assert got[0].status == 200 and got[0].headers["X-Order"] == "io"  # as the async chain unwinds


def test_a_deferred_resolved_before_anyone_waits_is_taken_at_once() -> None:
    def terminal(ex: Exchange) -> Reply | None:
        deferred = Deferred()
        deferred.resolve(Reply(502, CIMultiDict()))  # a failure answered while starting
        return deferred

    answer = chain_now([Order("o")], terminal)(_exchange())
    assert isinstance(answer, Deferred) and answer.ready
    final = answer.result()
    assert final is not None and final.status == 502 and final.headers["X-Order"] == "o"


def test_a_failing_response_side_step_hands_none_to_the_sink() -> None:
    deferred = Deferred()
    answer = chain_now([Order("o"), Order("x", fail=True)], lambda ex: deferred)(_exchange())
    got: list[Reply | None] = []
    assert answer is deferred
    deferred.wait(got.append)
    deferred.resolve(Reply(200, CIMultiDict()))
    assert got == [None]  # the edge answers 500, as the async chain does for an exception


def test_deferring_needs_every_feature_to_say_so() -> None:
    class Plain:
        def now(self, ex: Exchange, call_next: object) -> Reply | None:
            return None

        async def __call__(self, ex: Exchange, call_next: object) -> Reply:
            raise AssertionError

    assert chain_defers([Order("a"), Order("b")])
    assert chain_defers([])
    assert not chain_defers([Order("a"), Plain()])  # type: ignore[list-item]


def test_a_deferred_is_no_reply_until_it_is_resolved() -> None:
    with pytest.raises(AttributeError):
        _ = Deferred().status  # a feature that never heard of it fails loudly, not silently
