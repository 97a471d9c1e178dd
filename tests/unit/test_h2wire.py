"""edge/http/h2wire.py without I/O: every connection and stream error it raises (RFC 9113
5.1, 5.4, 6.x), flow control both ways, SETTINGS, PING, trailers and what it writes.

The client's bytes come from the ``h2`` package's client side (its preface and
SETTINGS, HPACK blocks) and raw frames built by hand for what the RFC forbids.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import Decoder, Encoder

from edge.http.h2wire import (
    DEFAULT_WINDOW,
    PREFACE,
    ErrorCodes,
    H2Error,
    ServerWire,
    StreamClosed,
)

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]
POST = [(b":method", b"POST"), *REQUEST[1:]]


class Recorder:
    """A WireHandler that writes down what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def on_request(self, sid: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.calls.append(("request", sid, list(fields), ended))

    def on_data(self, sid: int, data: bytes, ended: bool) -> None:
        self.calls.append(("data", sid, data, ended))

    def on_reset(self, sid: int) -> None:
        self.calls.append(("reset", sid))

    def on_stream_error(self, sid: int) -> None:
        self.calls.append(("stream_error", sid))

    def on_window(self, sid: int) -> None:
        self.calls.append(("window", sid))

    def on_control(self, kind: str) -> None:
        self.calls.append(("control", kind))

    def on_goaway(self, code: int) -> None:
        self.calls.append(("goaway", code))


def raw(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def frames(data: bytes | bytearray) -> list[tuple[int, int, int, bytes]]:
    """What the server wrote: (type, flags, stream, payload) per frame."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        out.append((kind, flags, sid, bytes(data[pos + 9 : pos + 9 + length])))
        pos += 9 + length
    return out


def resets(server: ServerWire) -> dict[int, int]:
    """The RST_STREAM frames written, stream -> error code."""
    return {sid: int.from_bytes(p, "big") for kind, _, sid, p in frames(server.out) if kind == 0x3}


class Peer:
    """A server wire with a client that has sent its preface and SETTINGS."""

    def __init__(self, initial_window_size: int = 65535, max_header_list_size: int = 4096) -> None:
        self.handler = Recorder()
        self.server = ServerWire(
            self.handler,
            max_concurrent_streams=10,
            max_header_list_size=max_header_list_size,
            initial_window_size=initial_window_size,
        )
        self.server.start()
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        self.server.receive(client.data_to_send())
        self.server.out.clear()
        self.handler.calls.clear()
        self.encoder = Encoder()

    def block(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(fields)

    def headers(self, sid: int, fields: list[tuple[bytes, bytes]] = REQUEST, end: bool = True) -> bytes:
        return raw(0x1, 0x4 | (0x1 if end else 0), sid, self.block(fields))

    def send(self, *data: bytes) -> None:
        self.server.receive(b"".join(data))


def connection_error(send: Callable[[Peer], bytes], **peer: int) -> ErrorCodes:
    p = Peer(**peer)
    with pytest.raises(H2Error) as err:
        p.send(send(p))
    return err.value.code


U32 = struct.Struct(">L").pack


@pytest.mark.parametrize(
    "send, code",
    [
        # 4.2: larger than SETTINGS_MAX_FRAME_SIZE (refused on the frame header alone).
        (lambda p: raw(0x0, 0, 1, b"x" * 16385)[:20], ErrorCodes.FRAME_SIZE_ERROR),
        (lambda p: raw(0x1, 0x4, 0, p.block(REQUEST)), ErrorCodes.PROTOCOL_ERROR),  # 6.2: stream 0
        (lambda p: p.headers(1) + p.headers(5) + p.headers(3), ErrorCodes.PROTOCOL_ERROR),  # 5.1.1
        (lambda p: raw(0x1, 0x24, 1, b"\0\0"), ErrorCodes.FRAME_SIZE_ERROR),  # priority fields cut
        (lambda p: raw(0x0, 0x8, 0, b"\5abc"), ErrorCodes.PROTOCOL_ERROR),  # 6.1: DATA on 0
        (lambda p: p.headers(1, POST, False) + raw(0x0, 0x8, 1, b"\5abc"), ErrorCodes.PROTOCOL_ERROR),
        (lambda p: raw(0x1, 0x5, 1, b"\xff\xff"), ErrorCodes.COMPRESSION_ERROR),  # HPACK index
        (
            lambda p: p.headers(1, POST, False) + raw(0x1, 0x0, 1, b"\x82") + raw(0x9, 0x4, 3, b"\x82"),
            ErrorCodes.PROTOCOL_ERROR,  # 6.10: CONTINUATION on another stream
        ),
        (lambda p: raw(0x2, 0, 0, b"\0" * 5), ErrorCodes.PROTOCOL_ERROR),  # 6.3
        (lambda p: raw(0x3, 0, 1, b"\0" * 4), ErrorCodes.PROTOCOL_ERROR),  # 6.4: idle stream
        (lambda p: raw(0x3, 0, 0, b"\0" * 4), ErrorCodes.PROTOCOL_ERROR),  # 6.4: stream 0
        (lambda p: p.headers(1, POST, False) + raw(0x3, 0, 1, b"\0" * 3), ErrorCodes.FRAME_SIZE_ERROR),
        (lambda p: raw(0x4, 0, 1), ErrorCodes.PROTOCOL_ERROR),  # 6.5: SETTINGS on a stream
        (lambda p: raw(0x4, 0, 0, struct.pack(">HL", 4, 2**31)), ErrorCodes.FLOW_CONTROL_ERROR),
        (lambda p: raw(0x4, 0, 0, struct.pack(">HL", 5, 16383)), ErrorCodes.PROTOCOL_ERROR),
        (lambda p: raw(0x4, 0, 0, struct.pack(">HL", 5, 2**24)), ErrorCodes.PROTOCOL_ERROR),
        (lambda p: raw(0x4, 0, 0, struct.pack(">HL", 8, 2)), ErrorCodes.PROTOCOL_ERROR),  # RFC 8441
        (lambda p: raw(0x5, 0x4, 1, U32(2) + p.block(REQUEST)), ErrorCodes.PROTOCOL_ERROR),  # 8.4
        (lambda p: raw(0x6, 0, 1, b"\0" * 8), ErrorCodes.PROTOCOL_ERROR),  # 6.7: PING on a stream
        (lambda p: raw(0x6, 0, 0, b"\0" * 7), ErrorCodes.FRAME_SIZE_ERROR),
        (lambda p: raw(0x7, 0, 1, b"\0" * 8), ErrorCodes.PROTOCOL_ERROR),  # 6.8
        (lambda p: raw(0x7, 0, 0, b"\0" * 7), ErrorCodes.FRAME_SIZE_ERROR),
        (lambda p: raw(0x8, 0, 0, b"\0" * 3), ErrorCodes.FRAME_SIZE_ERROR),  # 6.9
        (lambda p: raw(0x8, 0, 0, U32(2**31 - 1)), ErrorCodes.FLOW_CONTROL_ERROR),  # over 2^31-1
        (lambda p: raw(0x8, 0, 9, U32(1)), ErrorCodes.PROTOCOL_ERROR),  # 5.1: idle stream
    ],
    ids=[
        "frame-over-max-frame-size",
        "headers-on-stream-0",
        "stream-id-backwards",
        "headers-priority-too-short",
        "padded-data-on-stream-0",
        "padding-longer-than-frame",
        "hpack-bad-index",
        "continuation-other-stream",
        "priority-on-stream-0",
        "rst-on-idle-stream",
        "rst-on-stream-0",
        "rst-length-not-4",
        "settings-on-a-stream",
        "initial-window-over-2^31-1",
        "max-frame-size-too-small",
        "max-frame-size-too-large",
        "enable-connect-protocol-2",
        "push-promise-from-client",
        "ping-on-a-stream",
        "ping-length-not-8",
        "goaway-on-a-stream",
        "goaway-too-short",
        "window-update-length-not-4",
        "connection-window-overflow",
        "window-update-on-idle-stream",
    ],
)
def test_connection_errors(send: Callable[[Peer], bytes], code: ErrorCodes) -> None:
    assert connection_error(send) == code


def test_the_preface_and_a_first_settings_frame_are_required() -> None:
    wire = ServerWire(Recorder(), max_concurrent_streams=1, max_header_list_size=4096, initial_window_size=1)
    wire.receive(PREFACE[:10])  # too early to tell
    with pytest.raises(H2Error) as err:
        wire.receive(b"GET / HTTP/1.1\r\n\r\n")
    assert err.value.code == ErrorCodes.PROTOCOL_ERROR
    wire = ServerWire(Recorder(), max_concurrent_streams=1, max_header_list_size=4096, initial_window_size=1)
    with pytest.raises(H2Error) as err:
        wire.receive(PREFACE + raw(0x6, 0, 0, b"\0" * 8))  # 3.4: SETTINGS first
    assert err.value.code == ErrorCodes.PROTOCOL_ERROR


def test_data_beyond_the_stream_window_is_a_stream_error() -> None:
    p = Peer(initial_window_size=1000)
    p.send(raw(0x4, 0x1, 0))  # the client acknowledged the smaller window
    p.send(p.headers(1, POST, False), raw(0x0, 0, 1, b"x" * 1001))
    assert resets(p.server) == {1: ErrorCodes.FLOW_CONTROL_ERROR}  # 6.9.1
    assert p.server.recv_window == DEFAULT_WINDOW - 1001  # and it counted on the connection's


def test_before_the_settings_ack_the_default_window_still_holds() -> None:
    p = Peer(initial_window_size=1000)
    p.send(p.headers(1, POST, False), raw(0x0, 0, 1, b"x" * 16384))
    assert resets(p.server) == {}  # the client may not have seen our SETTINGS yet (6.9.2)


def test_a_settings_window_change_that_overflows_a_stream_is_a_connection_error() -> None:
    p = Peer()
    p.send(p.headers(1))
    p.send(raw(0x8, 0, 1, U32(2**31 - 1 - 65535)))  # the stream's window at the maximum
    with pytest.raises(H2Error) as err:
        p.send(raw(0x4, 0, 0, struct.pack(">HL", 4, 65536)))  # 6.9.2: + 1 overflows it
    assert err.value.code == ErrorCodes.FLOW_CONTROL_ERROR


# --- stream errors (5.4.2): RST_STREAM, the connection goes on ---------------------------------


@pytest.mark.parametrize(
    "send, sid, code",
    [
        (lambda p: p.headers(1, POST, False) + p.headers(1, [(b"x-t", b"1")], False), 1, 0x1),
        (lambda p: p.headers(1, POST, False) + p.headers(1, [(b":path", b"/")]), 1, 0x1),  # pseudo
        (lambda p: p.headers(1, POST, False) + p.headers(1, [(b"X-Up", b"1")]), 1, 0x1),  # upper case
        (lambda p: raw(0x2, 0, 3, b"\0" * 4), 3, 0x6),  # 6.3: PRIORITY not 5 bytes
        (lambda p: raw(0x2, 0, 3, U32(3) + b"\0"), 3, 0x1),  # 5.3.1: depends on itself
        (lambda p: raw(0x1, 0x25, 1, U32(1) + b"\0" + p.block(REQUEST)), 1, 0x1),  # HEADERS, itself
        (lambda p: p.headers(1, POST, False) + raw(0x8, 0, 1, U32(0)), 1, 0x1),  # 6.9: increment 0
        (lambda p: p.headers(1, POST, False) + raw(0x8, 0, 1, U32(2**31 - 1)), 1, 0x3),  # overflow
    ],
    ids=[
        "trailers-without-end-stream",
        "trailers-with-a-pseudo-header",
        "trailers-with-an-upper-case-name",
        "priority-length-not-5",
        "priority-on-itself",
        "headers-priority-on-itself",
        "window-update-0-on-a-stream",
        "stream-window-overflow",
    ],
)
def test_stream_errors(send: Callable[[Peer], bytes], sid: int, code: int) -> None:
    p = Peer()
    p.send(send(p))
    assert resets(p.server) == {sid: code}
    assert ("stream_error", sid) in p.handler.calls
    p.server.out.clear()
    p.send(p.headers(5))  # the connection goes on
    assert p.handler.calls[-1] == ("request", 5, REQUEST, True)


def test_frames_on_a_half_closed_stream_are_stream_closed_errors() -> None:
    p = Peer()
    p.send(p.headers(1))  # half-closed (remote): the edge still answers
    p.send(raw(0x0, 0, 1, b"x"))
    assert resets(p.server) == {1: ErrorCodes.STREAM_CLOSED}
    p = Peer()
    p.send(p.headers(1), p.headers(1))
    assert resets(p.server) == {1: ErrorCodes.STREAM_CLOSED}


@pytest.mark.parametrize("late", ["data", "headers"])
def test_a_frame_after_both_sides_ended_is_a_stream_closed_connection_error(late: str) -> None:
    p = Peer()
    p.send(p.headers(1))
    p.server.send_headers(1, [(b":status", b"204")], True)  # closed: both sides ended (5.1)
    with pytest.raises(H2Error) as err:
        p.send(raw(0x0, 0, 1, b"x") if late == "data" else p.headers(1))
    assert err.value.code == ErrorCodes.STREAM_CLOSED


def test_after_a_client_reset_data_is_a_stream_error_once_and_headers_a_connection_error() -> None:
    p = Peer()
    p.send(p.headers(1, POST, False), raw(0x3, 0, 1, U32(8)))
    assert ("reset", 1) in p.handler.calls
    p.send(raw(0x0, 0, 1, b"x"), raw(0x0, 0, 1, b"x"))
    assert frames(p.server.out) == [(0x3, 0, 1, U32(ErrorCodes.STREAM_CLOSED))]  # 5.1, once
    p = Peer()
    p.send(p.headers(1, POST, False), raw(0x3, 0, 1, U32(8)))
    with pytest.raises(H2Error) as err:
        p.send(p.headers(1))
    assert err.value.code == ErrorCodes.STREAM_CLOSED


def test_after_our_reset_late_frames_are_ignored_but_count_against_the_window() -> None:
    p = Peer()
    p.send(p.headers(1, POST, False))
    p.server.reset(1, ErrorCodes.REFUSED_STREAM)
    p.handler.calls.clear()
    p.send(raw(0x0, 0, 1, b"x" * 100), raw(0x8, 0, 1, U32(5)), raw(0x3, 0, 1, U32(0)))
    assert p.server.recv_window == DEFAULT_WINDOW - 100  # 6.9: counted though discarded
    p.send(p.headers(1, [(b"x-trailer", b"1")]))  # crossed our reset: decoded, then ignored
    assert [c[0] for c in p.handler.calls] == ["control", "control"]  # WINDOW_UPDATE, RST metered
    assert resets(p.server) == {1: ErrorCodes.REFUSED_STREAM}  # only ours


# --- what works ----------------------------------------------------------------------------------


def test_a_request_with_a_body_padding_and_trailers() -> None:
    p = Peer()
    p.send(p.headers(1, POST, False))
    p.send(raw(0x0, 0x8, 1, b"\3abc\0\0\0"))  # PADDED: 3 bytes of padding
    p.send(raw(0x1, 0x1, 1, p.block([(b"x-checksum", b"1")])), raw(0x9, 0x4, 1, b""))
    assert p.handler.calls == [
        ("request", 1, POST, False),
        ("data", 1, b"abc", False),
        ("data", 1, b"", True),  # the trailers end the request
    ]


def test_cookie_crumbs_and_continuation_frames_arrive_as_one_block() -> None:
    p = Peer()
    block = p.block([*REQUEST, (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    p.send(raw(0x1, 0x1, 1, block[:3]), raw(0x9, 0, 1, block[3:6]))
    assert p.server.in_header_block
    p.send(raw(0x9, 0x4, 1, block[6:]))
    assert p.handler.calls == [("request", 1, [*REQUEST, (b"cookie", b"a=1"), (b"cookie", b"b=2")], True)]
    assert not p.server.in_header_block


def test_settings_are_acknowledged_and_an_initial_window_change_moves_open_streams() -> None:
    p = Peer()
    p.send(p.headers(1))
    assert p.server.window(1) == 65535
    p.send(raw(0x4, 0, 0, struct.pack(">HLHLHL", 4, 100, 5, 32768, 0x99, 7)))  # an unknown one too
    assert frames(p.server.out) == [(0x4, 0x1, 0, b"")]
    assert p.server.window(1) == 100 and p.server.frame_size == 32768
    assert ("window", 0) in p.handler.calls


def test_ping_is_answered_with_its_payload() -> None:
    p = Peer()
    p.send(raw(0x6, 0, 0, b"12345678"), raw(0x6, 0x1, 0, b"87654321"))
    assert frames(p.server.out) == [(0x6, 0x1, 0, b"12345678")]  # the ACK itself is not answered
    assert p.handler.calls == [("control", "ping"), ("control", "ping")]


def test_unknown_frames_are_ignored_and_goaway_is_reported() -> None:
    p = Peer()
    p.send(raw(0x42, 0, 1, b"anything"), raw(0x7, 0, 0, U32(1) + U32(0) + b"debug"))
    assert p.handler.calls == [("control", "unknown"), ("goaway", 0)]


def test_sending_respects_both_windows_and_the_frame_size() -> None:
    p = Peer()
    p.send(p.headers(1))
    server = p.server
    big = [(b":status", b"200"), (b"x-big", b"v" * 20000)]
    server.send_headers(1, big)
    sent = frames(server.out)
    assert [(k, f) for k, f, _, _ in sent] == [(0x1, 0x0), (0x9, 0x4)]  # HEADERS, CONTINUATION
    assert Decoder().decode(b"".join(x[3] for x in sent), raw=True) == big
    server.send_data(1, b"x" * 16384)
    assert server.window(1) == 65535 - 16384 and server.send_window == 65535 - 16384
    p.send(raw(0x8, 0, 0, U32(100)))
    assert server.window(1) == 65535 - 16384  # the stream's window is now the smaller
    server.send_data(1, b"", True)
    assert not server.is_open(1) and 1 not in server.streams  # both sides ended: closed
    with pytest.raises(StreamClosed):
        server.send_data(1, b"x")
    server.reset(1, ErrorCodes.CANCEL)  # nothing for a closed stream
    assert resets(server) == {}


def test_request_windows_are_handed_back_as_they_are_used() -> None:
    p = Peer()
    p.send(p.headers(1, POST, False))
    p.server.out.clear()
    p.send(raw(0x0, 0, 1, b"x" * 16384), raw(0x0, 0, 1, b"x" * 16384))
    updates = {sid: int.from_bytes(pl, "big") for k, _, sid, pl in frames(p.server.out) if k == 0x8}
    assert updates == {1: 32768, 0: 32768}  # half of each window used: handed back


def test_a_repeated_block_is_decoded_once_and_again_after_the_table_changed() -> None:
    p = Peer()
    mirror = Decoder()  # what any decoder makes of the same bytes, in the same order
    first = p.block([*REQUEST, (b"x-a", b"1")])  # literals with indexing: the table changes
    repeat = p.block([*REQUEST, (b"x-a", b"1")])  # all indexed now
    p.send(raw(0x1, 0x5, 1, first), raw(0x1, 0x5, 3, repeat), raw(0x1, 0x5, 5, repeat))
    for block in (first, repeat, repeat):
        assert p.handler.calls.pop(0)[2] == mirror.decode(block, raw=True)
    assert list(p.server._decoded) == [repeat]
    # A new entry shifts every dynamic index: the same bytes now mean other fields.
    changed = p.block([*REQUEST, (b"x-b", b"2")])
    p.send(raw(0x1, 0x5, 7, changed), raw(0x1, 0x5, 9, repeat))
    for block in (changed, repeat):
        assert p.handler.calls.pop(0)[2] == mirror.decode(block, raw=True)
    assert p.server._decoded == {repeat: mirror.decode(repeat, raw=True)}


def test_a_stream_window_over_the_default_raises_the_connection_window_too() -> None:
    wire = ServerWire(
        Recorder(), max_concurrent_streams=1, max_header_list_size=4096, initial_window_size=1 << 20
    )
    wire.start()
    sent = frames(wire.out)
    assert sent[1] == (0x8, 0, 0, U32((1 << 20) - DEFAULT_WINDOW))  # 6.9.2: only WINDOW_UPDATE can
    assert wire.recv_window == 1 << 20
