"""Response framing (edge/front/framing.py) and the deadline wheel (edge/front/deadlines.py).

No sockets: a reply in, bytes out; connections stand-ins filed in a real loop's wheel.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from multidict import CIMultiDict

from edge.core.pipeline import EMPTY, BytesBody, FixedFields, Reply
from edge.front.deadlines import DEADLINE_SLOT, WHEELS, unlink, wheel
from edge.front.framing import response_head

SERVER = b"Server: carousel\r\n"
DATE = re.compile(rb"Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")


def lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def test_a_plain_reply_is_framed_by_the_edge_alone() -> None:
    headers = CIMultiDict(
        [("Content-Type", "text/plain"), ("content-length", "99"), ("Transfer-Encoding", "gzip"),
         ("Connection", "x"), ("Keep-Alive", "1"), ("server", "member/1.0")]
    )  # fmt: skip
    head = response_head(Reply(200, headers, BytesBody(b"abc")), "GET", "HTTP/1.1", 3, True, (), SERVER)
    got = lines(head)
    assert got[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: text/plain" in got and b"Server: carousel" in got and b"Content-Length: 3" in got
    assert not [x for x in got if x.lower().startswith((b"transfer-encoding", b"connection", b"keep-alive"))]
    assert [x for x in got if x.lower().startswith(b"server")] == [b"Server: carousel"]
    assert len([x for x in got if DATE.fullmatch(x + b"\r\n")]) == 1


def test_lengths_chunking_and_connection_lines() -> None:
    def head(
        status: int, length: int | None, keep: bool, version: str = "HTTP/1.1", method: str = "GET"
    ) -> bytes:
        return response_head(Reply(status, CIMultiDict()), method, version, length, keep, ())

    assert b"Transfer-Encoding: chunked\r\n" in head(200, None, True)
    assert b"Transfer-Encoding" not in head(200, None, True, method="HEAD")
    for status in (204, 304, 101, 103):
        assert b"Content-Length" not in head(status, 0, True) and b"chunked" not in head(status, None, True)
    assert b"Connection: close\r\n" in head(200, 0, False)
    assert b"Connection: keep-alive\r\n" in head(200, 0, True, "HTTP/1.0")
    assert b"Connection" not in head(200, 0, True)


def test_stored_fields_go_out_as_serialised_and_the_added_ones_after_them() -> None:
    stored = FixedFields((("Content-Type", "text/html"), ("Date", "Mon, 07 Dec 2026 05:00:00 GMT")))
    reply = Reply(200, CIMultiDict([("Age", "5")]), BytesBody(b"x"), stored=stored)
    got = lines(response_head(reply, "GET", "HTTP/1.1", 1, True, (("X-Route", "r"),), SERVER))
    assert got[1:6] == [
        b"Content-Type: text/html", b"Date: Mon, 07 Dec 2026 05:00:00 GMT", b"Age: 5", b"X-Route: r",
        b"Server: carousel",
    ]  # fmt: skip
    assert got[6:] == [b"Content-Length: 1"]  # the stored Date stands: no second one


def test_the_edges_added_lines_go_out_as_made_and_merge_when_a_feature_reads_the_fields() -> None:
    """A hit's Age and Cache-Status come as serialised lines (``added``): written after the
    stored fields with no field object built; a feature that reads ``headers`` sees them as
    fields (after the stored ones, before any it adds), and the head is the same either way."""
    stored = FixedFields((("Content-Type", "text/html"), ("ETag", '"a"')))
    added = b"Age: 7\r\nCache-Status: edge; hit; ttl=3593\r\n"

    def reply() -> Reply:
        return Reply(200, None, BytesBody(b"x"), stored=stored, added=added)

    untouched = reply()
    assert untouched.wire_parts() == (stored.wire, added, None)
    head = response_head(untouched, "GET", "HTTP/1.1", 1, True, (), SERVER)
    got = lines(head)
    assert got[1:5] == [
        b"Content-Type: text/html", b'ETag: "a"', b"Age: 7", b"Cache-Status: edge; hit; ttl=3593"
    ]  # fmt: skip
    read = reply()
    assert list(read.headers.items()) == [
        ("Content-Type", "text/html"), ("ETag", '"a"'), ("Age", "7"), ("Cache-Status", "edge; hit; ttl=3593"),
    ]  # fmt: skip
    assert read.wire_parts() is None
    merged = response_head(read, "GET", "HTTP/1.1", 1, True, (), SERVER)
    assert DATE.sub(b"", merged) == DATE.sub(b"", head)
    # The HTTP/2 writer's view of an untouched reply carries them as fields too.
    wire, fields = reply().unmerged()  # type: ignore[misc]
    assert wire == stored.wire
    assert list(fields.items()) == [("Age", "7"), ("Cache-Status", "edge; hit; ttl=3593")]
    # No headers given: an empty set, made when read.
    bare = Reply(204)
    assert response_head(bare, "GET", "HTTP/1.1", 0, True, ()).startswith(b"HTTP/1.1 204 No Content\r\n")
    bare.headers["X"] = "y"
    assert b"X: y\r\n" in response_head(bare, "GET", "HTTP/1.1", 0, True, ())


def test_a_line_smuggled_into_a_field_or_the_reason_is_refused() -> None:
    with pytest.raises(ValueError):
        response_head(Reply(200, CIMultiDict([("X", "a\r\nSet-Cookie: b")])), "GET", "HTTP/1.1", 0, True, ())
    with pytest.raises(ValueError):
        response_head(Reply(200, CIMultiDict(), EMPTY, "OK\r\nX: y"), "GET", "HTTP/1.1", 0, True, ())
    with pytest.raises(ValueError):
        response_head(Reply(200, CIMultiDict()), "GET", "HTTP/1.1", 0, True, (("X", "a\nb"),))


class _Conn:
    """What the wheel files: two link slots and a callback."""

    def __init__(self) -> None:
        self._wheel_next: object = None
        self._wheel_prev: object = None
        self.reached = 0

    def _deadline_reached(self) -> None:
        self.reached += 1


async def test_the_wheel_calls_each_connection_when_its_slot_comes() -> None:
    loop = asyncio.get_running_loop()
    w = wheel()
    early, late, gone = _Conn(), _Conn(), _Conn()
    now = loop.time()
    w.add(early, now + 0.05)  # type: ignore[arg-type]
    w.add(late, now + 0.25)  # type: ignore[arg-type]
    w.add(gone, now + 0.05)  # type: ignore[arg-type]
    unlink(gone)  # type: ignore[arg-type]
    await asyncio.sleep(0.05 + 2 * DEADLINE_SLOT + 0.05)
    assert (early.reached, late.reached, gone.reached) == (1, 0, 0)
    assert early._wheel_next is None  # taken out of its slot before the call
    await asyncio.sleep(0.25)
    assert late.reached == 1
    await asyncio.sleep(2 * DEADLINE_SLOT)
    assert loop not in WHEELS  # emptied: the wheel forgets its loop, its timer is gone


def test_a_members_fields_go_out_cleaned_as_serialised_and_equal_to_the_field_path() -> None:
    """A proxied response nobody looks into is written from the member's cleaned pairs as
    serialised once (ResponseCleaner.member_fields): no CIMultiDict is built, and the head is
    byte for byte the one the CIMultiDict path writes; a feature that reads the fields gets
    them merged."""
    from edge.core.config import from_dict
    from edge.core.fields import ResponseCleaner
    from edge.upstream.client import ResponseParser

    config = from_dict(
        {"edge": {"hide_headers": ["X-Secret"]}, "route": [{"path": "/", "respond": 200}]}, "<test>"
    )
    clean = ResponseCleaner(config)
    member = ResponseParser()
    member.feed(
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 2\r\nX-Secret: s\r\n"
        b'x-keep:  v \t\r\nKeep-Alive: timeout=5\r\nETag: "e"\r\n\r\nok'
    )
    stored = clean.member_fields(member.pairs, member.names)
    assert stored is not None
    assert member._headers is None  # nothing asked for the parser's CIMultiDict
    fields = CIMultiDict(member.pairs)
    clean(fields)
    assert (
        stored.fields
        == tuple(fields.items())
        == (
            ("Date", "Mon, 07 Dec 2026 10:00:00 GMT"),
            ("x-keep", "v"),
            ("ETag", '"e"'),
        )
    )
    assert stored.wire.date and not stored.wire.server
    extra = (("X-Route", "r"),)
    as_stored = response_head(
        Reply(200, None, BytesBody(b"ok"), stored=stored), "GET", "HTTP/1.1", 2, True, extra, b"Server: e\r\n"
    )
    as_fields = response_head(
        Reply(200, fields, BytesBody(b"ok")), "GET", "HTTP/1.1", 2, True, extra, b"Server: e\r\n"
    )
    assert as_stored == as_fields
    read = Reply(200, None, BytesBody(b"ok"), stored=stored)
    read.headers["X-Added"] = "1"
    assert list(read.headers.items()) == [*fields.items(), ("X-Added", "1")]
    # A Location goes the CIMultiDict way: the proxy rewrites a member's own address there.
    located = ResponseParser()
    located.feed(b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1:8080/x\r\nContent-Length: 0\r\n\r\n")
    assert clean.member_fields(located.pairs, located.names) is None
