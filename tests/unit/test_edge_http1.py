"""The client-side request parser (edge/http1.py), fed bytes directly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.http.http1 import BodyChunk, EndOfMessage, Head, ParseError, RequestParser, chunk_size
from edge.upstream.client import ResponseParser, UpstreamProtocolError


def parse(data: bytes, step: int = 0) -> list[object]:
    """All events; raises the parser's ParseError if the stream went bad."""
    p = RequestParser()
    events: list[object] = []
    for i in range(0, len(data), step or len(data) or 1):
        events += p.feed(data[i : i + (step or len(data))])
    if p.error is not None:
        raise p.error
    return events


def requests(events: list[object]) -> list[tuple[Head, bytes]]:
    """(head, whole body) per complete request."""
    out: list[tuple[Head, bytes]] = []
    head, body = None, b""
    for ev in events:
        if isinstance(ev, Head):
            head, body = ev, b""
        elif isinstance(ev, BodyChunk):
            body += ev.data
        elif isinstance(ev, EndOfMessage):
            assert head is not None
            out.append((head, body))
    return out


@pytest.mark.parametrize("step", [0, 1, 5])
def test_pipelined_requests_with_bodies(step: int) -> None:
    data = (
        b"GET /a%20b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    reqs = requests(parse(data, step))
    assert [(h.method, h.path, b) for h, b in reqs] == [
        ("GET", "/a b", b""),
        ("POST", "/p", b"hello"),
        ("PUT", "/c", b"abcde"),
    ]
    assert reqs[0][0].raw_path == "/a%20b?x=1" and reqs[0][0].query == "x=1"


def test_keep_alive_expect_and_absolute_form() -> None:
    ((h, _),) = requests(parse(b"GET / HTTP/1.0\r\n\r\n"))
    assert not h.keep_alive
    ((h, _),) = requests(parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))
    assert h.keep_alive
    ((h, _),) = requests(parse(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
    assert not h.keep_alive
    events = parse(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert isinstance(events[0], Head) and events[0].expect_continue and len(events) == 1
    ((h, _),) = requests(parse(b"GET http://Example.test:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n"))
    assert (h.headers["Host"], h.raw_path) == ("Example.test:8080", "/x?y")


BAD = [
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n", 400),
    # NBSP (obs-text) is not OWS: "chunked\xa0" is an unknown coding, "3\xa0" no length.
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\xa0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \xa0chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\xa0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \x853\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET nope HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"fffffffffffffffff\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "status"), BAD, ids=range(len(BAD)))
def test_ambiguous_or_malformed_requests_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(ParseError) as err:
        parse(raw)
    assert err.value.status == status


def test_an_endless_head_is_refused() -> None:
    p = RequestParser(max_head=1000)
    for _ in range(200):
        p.feed(b"X-Long: aaaaaaaaaa\r\n")
    assert p.error is not None and p.error.status == 431


def test_requests_before_a_bad_one_survive() -> None:
    p = RequestParser()
    events = p.feed(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nBad Name: x\r\n\r\n")
    assert [e.path for e in events if isinstance(e, Head)] == ["/1"]
    assert p.error is not None and p.feed(b"GET / HTTP/1.1\r\n\r\n") == []


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_parse_error(data: bytes) -> None:
    try:
        parse(data)
    except ParseError:
        pass


def test_chunk_sizes_are_plain_hex_on_both_sides() -> None:
    assert chunk_size(b"1a") == 26 and chunk_size(b"1A;ext=1") == 26 and chunk_size(b"0 ") == 0
    for bad in (b"", b"0x10", b"+10", b"1_0", b"-1", b" 10", b"1" * 17):
        assert chunk_size(bad) is None, bad
    member = ResponseParser()
    with pytest.raises(UpstreamProtocolError, match="bad chunk size"):
        member.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n")
    with pytest.raises(UpstreamProtocolError, match="invalid Content-Length"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\xa0\r\n\r\nab")


# --- the whole-head fast path agrees with the line-by-line parser ---------------------------

_HEAD_PIECES = st.sampled_from(
    [
        "GET / HTTP/1.1",
        "CONNECT /x HTTP/1.1",
        "CONNECT h:443 HTTP/1.1",
        "GET /a?b=c HTTP/1.0",
        "POST /x HTTP/1.1",
        "GET  / HTTP/1.1",
        "GET / HTTP/2.0",
        "G@T / HTTP/1.1",
        "GET http://h/ HTTP/1.1",
        "GET /\x7f HTTP/1.1",
        "GET /\xe9 HTTP/1.1",
        "Host: a",
        "Host: b",
        "host:a",
        "Host : a",
        " Host: a",
        "\tX: folded",
        "X: a\rb",
        "X: a\nb",
        "X: \x01",
        "X:\t tab \t",
        "X:",
        "X_Y: 1",
        "Content-Length: 5",
        "Content-Length: 5, 5",
        "Content-Length: +5",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Connection: close",
        "Connection: keep-alive",
        "Expect: 100-continue",
        "X: \xff\x80",
        "",
        "X: " + "v" * 120,
        "upgrade: websocket",
        "Range: bytes=0-1",
        "CACHE-CONTROL: no-cache",
        "If-None-Match: *",
    ]
)


def _outcome(parse: object, block: bytes, max_headers: int, max_field: int, proxy: bool) -> object:
    try:
        h = parse(block, max_headers, max_field, proxy)  # type: ignore[operator]
    except ParseError as exc:
        return ("error", exc.status)
    return (h.method, h.raw_path, h.version, list(h.headers.items()), h.body_length, h.chunked,
            h.keep_alive, h.expect_continue)  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(_HEAD_PIECES, min_size=1, max_size=7),
    st.integers(1, 6),
    st.sampled_from([40, 200, 8190]),
    st.booleans(),
)
def test_fast_head_parser_agrees_with_line_parser(
    pieces: list[str], max_headers: int, max_field: int, proxy: bool
) -> None:
    """Same head, same fields or same status, whichever of the two parsers reads it."""
    from edge.http.http1 import _parse_head_lines, parse_head

    block = "\r\n".join(pieces).encode("latin-1")
    fast = _outcome(parse_head, block, max_headers, max_field, proxy)
    assert fast == _outcome(_parse_head_lines, block, max_headers, max_field, proxy)
    if fast[0] != "error":
        # Head.seen: a bit the fast parser clears is a field the head does not carry.
        from edge.http.http1 import _SEEN_BITS

        head = parse_head(block, max_headers, max_field, proxy)
        for name, bit in _SEEN_BITS.items():
            assert head.seen & bit or name not in head.headers, (name, head.seen)
        if head.seen != -1:
            assert all(bool(head.seen & bit) == (name in head.headers) for name, bit in _SEEN_BITS.items())


def test_framing_fields_are_found_in_any_letter_case() -> None:
    """Field names are case-insensitive (RFC 9110 5.1): the framing rules see "content-length"
    and "TRANSFER-ENCODING" as they see the usual spelling (the parser looks them up as istr)."""
    for raw in (
        b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHOST: h\r\nCONTENT-LENGTH: 3\r\nContent-length: 4\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nhOsT: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nx: y\r\n\r\n",
    ):
        with pytest.raises(ParseError):
            parse(raw)
    ((h, body),) = requests(
        parse(b"POST / HTTP/1.1\r\nhost: h\r\ntRaNsFeR-eNcOdInG: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    )
    assert h.chunked and body == b"abc"
    events = parse(b"POST / HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
    assert isinstance(events[0], Head) and events[0].expect_continue and events[0].body_length == 3
    ((h, _),) = requests(parse(b"GET / HTTP/1.1\r\nhost: h\r\nCONNECTION: Close\r\n\r\n"))
    assert not h.keep_alive and h.headers["Host"] == "h"
    ((h, _),) = requests(parse(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"))
    assert h.keep_alive


_RESPONSE_PIECES = st.sampled_from(
    [
        "HTTP/1.1 200 OK",
        "HTTP/1.0 404",
        "HTTP/1.1 204 No Content",
        "Content-Length: 0",
        "Content-Length:  0 \t",
        "X-Empty:",
        "X-Spaces:   \t ",
        "X-Inner: a  b\tc",
        "X-Tab:\tv\t",
        "X-Ctl: a\x01b",
        "X-High: \xa0v\xa0",
        "X-Nul: a\x00b",
        "Bad Name: v",
        "Bad : v",
        "NoColon",
        "Server: nginx",
        "",
    ]
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(_RESPONSE_PIECES, min_size=1, max_size=6))
def test_fast_response_head_parser_agrees_with_line_parser(pieces: list[str]) -> None:
    """A member's head gives the same status and fields (OWS stripped, nothing else) on the
    one-regex path as line by line, or the same error."""
    from edge.upstream.client import _parse_head_lines

    block = "\r\n".join(pieces).encode("latin-1")
    fast = ResponseParser()
    try:
        fast._parse_head(block)
        # No reason phrase at all is None on one path and "" on the other: the edge writes
        # its own phrase for both.
        got: object = (fast.status, fast.reason or "", list(fast.headers.items()))
    except UpstreamProtocolError:
        got = "error"
    try:
        _, status, reason, pairs = _parse_head_lines(block.decode("latin-1"))
        want: object = (status, reason, pairs)
    except UpstreamProtocolError:
        want = "error"
    if want != "error" and 100 <= want[0] < 200 and want[0] != 101:  # type: ignore[index]
        got = (want[0], fast.interim[0][1] or "", fast.interim[0][2])  # type: ignore[index]
    assert got == want


def test_the_field_name_caches_stay_bounded_and_still_check_names() -> None:
    """Both head parsers remember the field names they checked (a dict lookup per field, not
    a regular expression); clients and members choose names, so the memory is bounded, and
    a name past the bound is still checked and folded."""
    from edge.http import http1
    from edge.upstream import client

    for i in range(http1.MAX_FIELD_NAMES + 20):
        ((h, _),) = requests(parse(f"GET / HTTP/1.1\r\nHost: h\r\nX-Name-{i}: v\r\n\r\n".encode()))
        assert h.headers[f"x-name-{i}"] == "v"
        member = ResponseParser()
        member.feed(f"HTTP/1.1 204 No Content\r\nX-Name-{i}: v\r\n\r\n".encode())
        assert member.headers[f"x-name-{i}"] == "v" and member.names == [f"x-name-{i}"]
    assert len(http1._NAMES) <= http1.MAX_FIELD_NAMES and len(client._NAMES) <= http1.MAX_FIELD_NAMES
    with pytest.raises(ParseError):
        parse(b"GET / HTTP/1.1\r\nHost: h\r\nX Bad: v\r\n\r\n")
    with pytest.raises(UpstreamProtocolError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nX Bad: v\r\n\r\n")


def test_a_parsed_head_is_the_head_its_init_makes() -> None:
    """parse_head sets a Head's attributes itself, with no call of Head.__init__ (a call less
    per request): every slot holds what __init__ would have put there, the decoded path and
    the query included."""
    from edge.http.http1 import parse_head

    for raw, scheme in (
        (b"GET /a%20b/c?x=1&y=%20 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue", ""),
        (b"GET /plain HTTP/1.0\r\nConnection: keep-alive", ""),
        (b"GET http://h.example/p%41th?q HTTP/1.1\r\nHost: h.example", "http"),
    ):
        head = parse_head(raw, 100, 8190, proxy=bool(scheme))
        made = Head(
            head.method,
            head.raw_path,
            head.version,
            head.headers,
            head.body_length,
            head.chunked,
            head.keep_alive,
            head.expect_continue,
            head.scheme,
            head.seen,
        )
        assert head.scheme == scheme
        for slot in Head.__slots__:
            assert getattr(head, slot) == getattr(made, slot), (raw, slot)


def test_a_members_single_content_length_and_the_general_rule_agree() -> None:
    """One plain Content-Length takes a short way through the member's framing rules; lists,
    OWS and bad values take the general rule, with the same outcome as before."""
    for length, want in (
        ("5", 5),
        ("0005", 5),
        ("5, 5", 5),
        ("5,5", 5),
        ("9" * 18, int("9" * 18)),
        ("9" * 19, None),
        ("5, 6", None),
        ("-5", None),
        ("+5", None),
        ("\xb2", None),
        ("", None),
    ):
        parser = ResponseParser()
        raw = f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode("latin-1")
        if want is None:
            with pytest.raises(UpstreamProtocolError):
                parser.feed(raw)
        else:
            parser.feed(raw)
            assert parser._mode == "length" and parser._length == want, length
