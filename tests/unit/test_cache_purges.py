"""Purges: the observer a node forwards removals through, replays, and URLs that name a port."""

from __future__ import annotations

from types import SimpleNamespace

from multidict import CIMultiDict

from edge.core.config import from_dict
from edge.core.pipeline import BytesBody, Exchange, Reply
from edge.features.cache.key import DEFAULT_RULE
from edge.features.cache.purge import Purges, prefix_matcher
from edge.features.cache.store import Entry, MemoryStore
from edge.http.http1 import Head, RequestParser
from edge.http.request import Request


def _stored(store: MemoryStore, *keys: str, tags: tuple[str, ...] = ()) -> None:
    for key in keys:
        entry = Entry(key, "", 200, None)
        entry.body = b"x"
        entry.tags = frozenset(tags)
        assert store.put(entry)


def _exchange(raw: bytes, host: str = "www.example.test") -> Exchange:
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, Head)
    request = Request(head, SimpleNamespace(peer="127.0.0.1", transport=None), None)
    return Exchange(request, None, host, "127.0.0.1", "http")  # type: ignore[arg-type]


def _purges() -> tuple[Purges, MemoryStore, list[tuple[str, str]]]:
    store = MemoryStore(1 << 20)
    purges = Purges(from_dict({"route": [{"path": "/", "respond": 200}]}), store, None)
    seen: list[tuple[str, str]] = []
    purges.observer = lambda kind, target: seen.append((kind, target))
    return purges, store, seen


def test_the_observer_hears_every_local_removal_and_a_replay_repeats_it() -> None:
    purges, _, seen = _purges()
    # PURGE of one URL: both schemes' keys.
    purges.from_request(_exchange(b"PURGE /a HTTP/1.1\r\nHost: www.example.test\r\n\r\n"), DEFAULT_RULE)
    assert seen == [("key", "http://www.example.test/a"), ("key", "https://www.example.test/a")]
    seen.clear()
    purges.from_request(
        _exchange(b"PURGE /static/* HTTP/1.1\r\nHost: www.example.test\r\n\r\n"), DEFAULT_RULE
    )
    assert seen == [("prefix", "http://www.example.test/static/")]
    seen.clear()
    raw = b"PURGE / HTTP/1.1\r\nHost: www.example.test\r\nSurrogate-Key: t1 t2\r\n\r\n"
    purges.from_request(_exchange(raw), DEFAULT_RULE)
    assert seen == [("tag", "t1"), ("tag", "t2")]
    seen.clear()
    # An unsafe method's invalidation (RFC 9111 4.4): the target and its Location.
    ex = _exchange(b"POST /form HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: 0\r\n\r\n")
    purges.invalidate(ex, Reply(303, CIMultiDict({"Location": "/done"}), BytesBody(b"")), DEFAULT_RULE)
    assert seen == [("key", "http://www.example.test/form"), ("key", "http://www.example.test/done")]
    seen.clear()
    # Cluster events and replays are not observed (every worker follows etcd; a replay came from one).
    purges.apply("url", "http://www.example.test/a")
    purges.replay("key", "http://www.example.test/a")
    assert seen == []

    # Another worker's observer told us: the replay removes the same entries here.
    other, other_store, _ = _purges()
    _stored(
        other_store,
        "http://www.example.test/form",
        "http://www.example.test/done",
        "http://www.example.test/x",
    )
    _stored(other_store, "http://www.example.test/static/s.css", "http://www.example.test/t", tags=("t1",))
    for kind, target in [
        ("key", "http://www.example.test/form"),
        ("key", "http://www.example.test/done"),
        ("prefix", "http://www.example.test/static/"),
        ("tag", "t1"),
    ]:
        other.replay(kind, target)
    assert list(other_store.index) == ["http://www.example.test/x"]
    assert other.replay("bogus", "x") == 0


def test_the_purge_attributes_are_the_class_methods() -> None:
    # No wrapper swaps a Purges method for one of its own: a node forwards through the observer.
    purges, _, _ = _purges()
    for name in ("key", "apply", "from_request", "invalidate"):
        assert name not in vars(purges), name


def test_a_url_purge_with_a_port_reaches_forward_proxy_keys() -> None:
    # The forward proxy keys an origin as host:port unless the port is 80 (its format_authority);
    # the reverse side keys by the host alone. A URL with a port purges both, never another port.
    purges, store, _ = _purges()
    keys = (
        "http://origin.test:8080/a",
        "http://origin.test/a",
        "http://origin.test:9090/a",
        "http://[2001:db8::1]:8080/a",
    )
    _stored(store, *keys)
    assert purges.apply("url", "http://Origin.test:8080/a") == 2
    assert set(store.index) == {"http://origin.test:9090/a", "http://[2001:db8::1]:8080/a"}
    assert purges.apply("url", "http://[2001:DB8::1]:8080/a?") == 0  # another target: "/a?"
    assert purges.apply("url", "http://[2001:db8::1]:8080/a") == 1
    # Default ports add nothing; user info and a query do not hide the port.
    _stored(store, "http://origin.test/b", "https://origin.test/c", "http://origin.test:8080/d?q=1")
    assert purges.apply("url", "http://origin.test:80/b") == 1
    assert purges.apply("url", "https://origin.test:443/c") == 1
    assert purges.apply("url", "http://user@origin.test:8080/d?q=1") == 1
    # A prefix with a port matches the forward keys of that port and the reverse keys.
    match = prefix_matcher("http://origin.test:8080/static/")
    assert match is not None
    assert match("http://origin.test:8080/static/a.css")
    assert match("http://origin.test/static/a.css")
    assert not match("http://origin.test:9090/static/a.css")
