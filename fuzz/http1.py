"""Fuzz the edge's HTTP/1.1 parsers: client requests (edge/http1.py) and member responses (edge/upstream.py).

Checked for every input:

* only ``ParseError`` / ``UpstreamProtocolError`` ever escape (a clean 400/502, never a crash);
* the request parser gives the same events and the same error whether the
  bytes arrive at once or in two pieces split anywhere (framing that depends
  on read boundaries is a smuggling bug); after a CONNECT the bytes that
  follow are the connection's to hold (parser.rest and later reads), as
  edge/forward/listener.py does, and must be the same bytes either way;
* the regex fast path of ``parse_head`` and the line-by-line parser agree on
  every head (both refuse it, or both give the same method, target, version
  and fields);
* the same holds for the response parser: one read or two, same outcome, and the
  same body when it is accepted.

The first input byte picks the parser options, the second the split point; the rest is the stream.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["edge.http.http1", "edge.upstream.client"]):
    from edge.http.http1 import (
        BodyChunk,
        EndOfMessage,
        Head,
        ParseError,
        RequestParser,
        _parse_head_lines,
        parse_head,
    )
    from edge.upstream.client import ResponseParser, UpstreamProtocolError

from fuzz.common import run


class Violation(AssertionError):
    """A parser broke a rule; the fuzzer reports it as a crash with this message."""


def _head_view(h: Head) -> tuple[object, ...]:
    return (h.method, h.raw_path, h.version, h.scheme, list(h.headers.items()), h.body_length,
            h.chunked, h.keep_alive, h.expect_continue)  # fmt: skip


def _requests(pieces: list[bytes], proxy: bool) -> tuple[list[object], int | None]:
    p = RequestParser(max_head=4096, max_headers=20, max_field=1024, proxy=proxy)
    events: list[object] = []
    body = b""
    held: bytes | None = None  # after a CONNECT the connection holds the bytes (edge/forward/)
    for piece in pieces:
        if held is not None:
            held += piece
            continue
        for ev in p.feed(piece):
            if isinstance(ev, BodyChunk):
                body += ev.data
                continue
            if body:
                events.append(body)
                body = b""
            if isinstance(ev, Head):
                events.append(_head_view(ev))
                if proxy and ev.method == "CONNECT":
                    held = b""
            else:
                events.append("end" if isinstance(ev, EndOfMessage) else ev)
        if held is not None:
            held += p.rest
            p.rest = b""
    if body:
        events.append(body)
    return [*events, held], None if p.error is None else p.error.status


def _heads(block: bytes, proxy: bool) -> None:
    def outcome(parse: object) -> object:
        try:
            return _head_view(parse(block, 20, 1024, proxy))  # type: ignore[operator]
        except ParseError:
            return "refused"

    fast, slow = outcome(parse_head), outcome(_parse_head_lines)
    if fast != slow:
        raise Violation(f"fast and line-by-line head parsers disagree: {fast!r} != {slow!r}")


def _response(pieces: list[bytes], head_request: bool) -> tuple[bytes, object]:
    r = ResponseParser(head_request)
    body = b""
    try:
        for piece in pieces:
            body += b"".join(r.feed(piece))
        r.feed_eof()
    except UpstreamProtocolError:
        # Body bytes streamed before the fault differ with the read boundary; the outcome may not.
        return b"", "refused"
    return body, (r.status, r.state, list(r.headers.items()), r.tail)


def test_one_input(data: bytes) -> None:
    """One fuzz input: a request stream, a head block and a response stream, each fed two ways."""
    if len(data) < 2:
        return
    knob, stream = data[0], data[2:]
    cut = (data[1] * len(stream)) // 256
    proxy = bool(knob & 1)
    whole = _requests([stream], proxy)
    split = _requests([stream[:cut], stream[cut:]], proxy)
    if whole != split:
        raise Violation(f"request events depend on the read boundary (cut at {cut}): {whole!r} != {split!r}")
    block = stream.split(b"\r\n\r\n", 1)[0]
    _heads(block, proxy)
    head_request = bool(knob & 2)
    r_whole = _response([stream], head_request)
    r_split = _response([stream[:cut], stream[cut:]], head_request)
    if r_whole != r_split:
        raise Violation(f"response depends on the read boundary (cut at {cut}): {r_whole!r} != {r_split!r}")


SEEDS = [
    b"\x00\x20GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x01\x40GET http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"\x01\x30CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\nrest",
    b"\x00\x80POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.0\r\n\r\n",
    b"\x00\x90POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"\x00\x10GET /%41%zz?q HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    b"\x02\x50HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"\x00\x60HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"\x00\x20HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 204 No Content\r\n\r\n",
    b"\x00\x70HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    b"\x02\x30HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"\x00\x30HTTP/1.0 200 OK\r\n\r\nuntil eof",
]

if __name__ == "__main__":
    run("http1", test_one_input, SEEDS)
    sys.exit(0)
