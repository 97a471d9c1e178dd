"""edge/http/h2.py without I/O: RFC 9113 section 8 request rules, response fields, flood meters,
and the server connection's limits (header list size, header block bytes): edge/http/h2wire.py."""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hpack import Decoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

from edge.core.routing import parse_host
from edge.http import h2 as h2_module
from edge.http.h2 import FloodMeter, Malformed, request_head, response_fields
from edge.http.h2hpack import ResponseEncoder
from edge.http.h2wire import H2Error, ServerWire
from edge.http.http1 import ParseError, normalize_path
from tests.unit.test_h2wire import Recorder

BASE = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"Example.TEST:8443"),
    (b":path", b"/a"),
]


def test_a_request_becomes_the_same_head_as_http1() -> None:
    head = request_head([*BASE, (b"accept", b"*/*"), (b"cookie", b"a=1; b=2")], 100)
    assert head.method == "GET" and head.raw_path == "/a" and head.version == "HTTP/2"
    assert head.headers["Host"] == "Example.TEST:8443"  # :authority stands in for Host
    assert parse_host(head.headers["Host"]) == "example.test"  # and normalises the same way
    assert head.headers["Accept"] == "*/*" and head.keep_alive


@pytest.mark.parametrize("path", ["/a/./b/../c", "/a//b", "/%7euser/%2e%2e/x", "/x?q=%2F"])
def test_paths_are_normalised_as_http1_does(path: str) -> None:
    fields = [*BASE[:3], (b":path", path.encode())]
    bare, sep, query = path.partition("?")
    assert request_head(fields, 100).raw_path == normalize_path(bare) + sep + query


@pytest.mark.parametrize("path", ["/a/%2f/b", "/../etc/passwd", "/a\\b", "/a#frag"])
def test_unsafe_paths_are_a_400_as_in_http1(path: str) -> None:
    with pytest.raises(ParseError):
        request_head([*BASE[:3], (b":path", path.encode())], 100)


@pytest.mark.parametrize(
    "fields",
    [
        [*BASE, (b"Accept", b"x")],
        [*BASE, (b"connection", b"keep-alive")],
        [*BASE, (b"keep-alive", b"5")],
        [*BASE, (b"proxy-connection", b"x")],
        [*BASE, (b"transfer-encoding", b"chunked")],
        [*BASE, (b"upgrade", b"h2c")],
        [*BASE, (b"te", b"gzip")],
        [BASE[0], (b"x", b"1"), *BASE[1:]],
        [*BASE, (b":method", b"POST")],
        [*BASE, (b":status", b"200")],
        [*BASE, (b":protocol", b"websocket")],
        BASE[1:],
        [BASE[0], BASE[2], BASE[3]],
        BASE[:3],
        [*BASE[:3], (b":path", b"a")],
        [*BASE, (b"x", b"a\nb")],
        [*BASE, (b"x", b"a\x00")],
        [*BASE, (b"x", b"a ")],
        [*BASE, (b"bad name", b"x")],
        [*BASE, (b"host", b"other.test")],
        [*BASE, (b"content-length", b"1, 2")],
        [*BASE, (b"content-length", b"1\xa0")],
        [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
    ],
)
def test_rfc9113_section8_malformed_requests(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed):
        request_head(fields, 100)


def test_host_from_the_authority_is_the_first_field_as_in_http1() -> None:
    head = request_head([*BASE, (b"accept", b"*/*"), (b"host", b"example.test:8443"), (b"x-a", b"1")], 100)
    assert list(head.headers.items()) == [("Host", "Example.TEST:8443"), ("accept", "*/*"), ("x-a", "1")]


def test_te_trailers_and_a_matching_host_are_allowed() -> None:
    head = request_head([*BASE, (b"te", b"trailers"), (b"host", b"example.test:8443")], 100)
    assert head.headers.getall("Host") == ["Example.TEST:8443"]


def test_too_many_fields_is_a_431() -> None:
    with pytest.raises(ParseError) as err:
        request_head(BASE + [(b"x-%d" % i, b"1") for i in range(11)], 10)
    assert err.value.status == 431


def test_response_fields_drop_connection_specific_ones_and_refuse_crlf() -> None:
    out = response_fields(
        200,
        [
            ("Content-Type", "text/plain"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("Server", "x"),
        ],
        [("X-Route", "1")],
        "carousel",
        "Sun, 06 Dec 2026 00:00:00 GMT",
        5,
    )
    assert out == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"x-route", b"1"),
        (b"server", b"carousel"),
        (b"date", b"Sun, 06 Dec 2026 00:00:00 GMT"),
        (b"content-length", b"5"),
    ]
    assert (b"content-length", b"0") not in response_fields(304, [], (), "", "d", 0)
    with pytest.raises(ValueError):
        response_fields(200, [("X", "a\r\nSet-Cookie: x")], (), "", "d", None)


def test_flood_meter_counts_per_window() -> None:
    meter = FloodMeter(3, 10.0)
    assert not any(meter.hit(1.0) for _ in range(3))
    assert meter.hit(2.0)
    assert not meter.hit(12.0)  # a new window
    assert not meter.hit(12.0, n=5, allowance=10)


def _client() -> H2Connection:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


def new_server(max_header_list_size: int = 4096) -> ServerWire:
    server = ServerWire(
        Recorder(),
        max_concurrent_streams=10,
        max_header_list_size=max_header_list_size,
        initial_window_size=65535,
    )
    server.start()
    return server


def test_the_server_enforces_its_header_list_size_from_the_first_frame() -> None:
    server = new_server()
    client = _client()
    client.send_headers(1, [*BASE, (b"x-big", b"a" * 5000)], end_stream=True)
    with pytest.raises(H2Error) as err:
        server.receive(client.data_to_send())
    assert err.value.code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_block_is_bounded_in_bytes_before_it_ends() -> None:
    server = new_server()
    client = _client()
    server.receive(client.data_to_send())
    data = HeadersFrame(1, b"\x82").serialize()
    with pytest.raises(H2Error) as err:
        for _ in range(10):  # 10 x 1 KiB, no END_HEADERS: over 2 x 4 KiB
            data += ContinuationFrame(1, b"\x00" * 1024).serialize()
            server.receive(data)
            data = b""
    assert err.value.code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_settings_ack_with_a_payload_is_a_frame_size_error() -> None:
    server = new_server()
    client = _client()
    server.receive(client.data_to_send())
    ack = SettingsFrame(0, flags=["ACK"]).serialize()
    bad = (6).to_bytes(3, "big") + ack[3:] + b"\0" * 6  # RFC 9113 6.5: an ACK carries nothing
    with pytest.raises(H2Error) as err:
        server.receive(bad)
    assert err.value.code == ErrorCodes.FRAME_SIZE_ERROR
    # An empty ACK is fine.
    new_server().receive(_client().data_to_send() + ack)


RESPONSES = [
    [(b":status", b"200"), (b"content-type", b"text/plain"), (b"server", b"carousel")],
    [
        (b":status", b"404"),
        (b"x-custom", b"v\xe9"),
        (b"set-cookie", b"a=1"),
        (b"cache-status", b"carousel; hit"),
    ],
    [(b":status", b"304"), (b"date", b"Sun, 06 Dec 2026 00:00:00 GMT"), (b"content-length", b"0")],
]


def test_response_blocks_decode_to_their_fields_without_the_dynamic_table() -> None:
    encoder, decoder = ResponseEncoder(), Decoder()
    first = encoder.encode(RESPONSES[0])
    assert first[:1] == b"\x20"  # RFC 7541 6.3: size 0 announced in the first block
    assert decoder.decode(first, raw=True) == RESPONSES[0]
    for fields in RESPONSES[1:] + RESPONSES:
        block = encoder.encode(fields)
        assert block[:1] != b"\x20"
        assert decoder.decode(block, raw=True) == fields
        assert len(decoder.header_table.dynamic_entries) == 0  # nothing indexed, ever
    assert encoder.encode([(b":status", b"200")]) == b"\x88"  # a static table entry: one byte
    set_cookie = encoder.encode([(b"set-cookie", b"a=1")])
    assert set_cookie[0] & 0xF0 == 0x10  # never indexed (RFC 7541 7.1.3)


def test_a_table_size_change_is_acknowledged_in_the_next_block() -> None:
    encoder, decoder = ResponseEncoder(), Decoder()
    decoder.decode(encoder.encode(RESPONSES[0]), raw=True)
    encoder.header_table_size = 0  # the client's SETTINGS_HEADER_TABLE_SIZE
    decoder.max_allowed_table_size = 0
    block = encoder.encode(RESPONSES[1])
    assert block[:1] == b"\x20"  # RFC 7541 4.2: at the start of the first block after the change
    assert decoder.decode(block, raw=True) == RESPONSES[1]
    assert encoder.encode(RESPONSES[1])[:1] != b"\x20"


def test_a_cache_hits_stored_fields_are_converted_like_the_others_and_kept_converted() -> None:
    stored = b"Content-Type: text/plain\r\nConnection: x\r\nServer: member\r\nDate: d1\r\n"
    args = (200, [("Age", "3")], (), "carousel", "d2", 5, stored)
    out = response_fields(*args)
    assert out == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"date", b"d1"),
        (b"age", b"3"),
        (b"server", b"carousel"),
        (b"content-length", b"5"),
    ]
    assert (stored, True) in h2_module._stored_fields  # the next hit with this block reuses it
    assert response_fields(*args) == out
    with pytest.raises(ValueError):
        response_fields(200, [], (), "", "d", None, b"X: a\x00b\r\n")
