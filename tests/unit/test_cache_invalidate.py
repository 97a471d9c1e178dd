"""Invalidation after an unsafe method (RFC 9111 4.4) keys on the host the edge routed by."""

from __future__ import annotations

from types import SimpleNamespace

from multidict import CIMultiDict

from edge.core.config import from_dict
from edge.core.pipeline import BytesBody, Exchange, Reply
from edge.features.cache.key import DEFAULT_RULE
from edge.features.cache.purge import Purges
from edge.features.cache.store import Entry, MemoryStore
from edge.http.http1 import Head, RequestParser
from edge.http.request import Request


def _stored(store: MemoryStore, key: str) -> None:
    entry = Entry(key, "", 200, None)
    entry.body = b"x"
    assert store.put(entry)


def test_location_is_resolved_against_the_routed_host_not_the_host_field() -> None:
    # An HTTP/2 request names its target in :authority, which wins over a Host field
    # (RFC 9113 8.3.1): the front routes and keys it by www.example.test, and the
    # invalidation of a relative Location must resolve against that same host.
    raw = b"POST /form HTTP/1.1\r\nHost: alias.example.test\r\nContent-Length: 0\r\n\r\n"
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, Head)
    request = Request(head, SimpleNamespace(peer="192.0.2.1", transport=None), None)
    ex = Exchange(request, None, "www.example.test", "192.0.2.1", "http")  # type: ignore[arg-type]
    config = from_dict({"route": [{"path": "/", "respond": 200}]})
    store = MemoryStore(1 << 20)
    purges = Purges(config, store, None)
    for key in (
        "http://www.example.test/form",
        "http://www.example.test/done",
        "http://alias.example.test/done",
    ):
        _stored(store, key)
    reply = Reply(303, CIMultiDict({"Location": "/done"}), BytesBody(b""))
    purges.invalidate(ex, reply, DEFAULT_RULE)
    assert "http://www.example.test/form" not in store.index
    assert "http://www.example.test/done" not in store.index
    assert "http://alias.example.test/done" in store.index  # another host: not this response's
