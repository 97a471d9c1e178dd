"""HTTP/2 attacks and forbidden frame orders, against a live edge over h2c (prior knowledge).

The client side is written with the ``h2`` package (validation off, so it can
send what RFC 9113 forbids) and raw ``hyperframe`` frames; what comes back is
read frame by frame. Each attack test fails without the defence it names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from edge.testing import raw_request, running_edge
from sampleapp.main import start_app

pytestmark = pytest.mark.timeout(60)


def raw_frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame hyperframe refuses to build (a DATA frame on stream 0)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


class RawH2:
    """A client that writes whatever frames it is given and reads the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.encoder = Encoder()
        self.frames: list[Frame] = []

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.h2.initiate_connection()
        client.flush()
        if settings:
            client.send(SettingsFrame(0, settings=settings))
        return client

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    def send(self, *frames: Frame | bytes) -> None:
        """Raw frames, written as they are (the client's h2 state is bypassed)."""
        self.writer.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(headers)

    async def read_frame(self, wait: float = 5.0) -> Frame | None:
        """The next frame, or None when the server closed the connection."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(9), wait)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        frame, length = Frame.parse_frame_header(memoryview(header))
        body = await asyncio.wait_for(self.reader.readexactly(length), wait) if length else b""
        frame.parse_body(memoryview(body))
        self.frames.append(frame)
        return frame

    async def until(self, kind: type, wait: float = 10.0, stream: int | None = None) -> Any:
        """Read until a frame of ``kind`` (on ``stream``), or None if the connection ended first."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.read_frame(left)
            except TimeoutError:
                return None
            if frame is None:
                return None
            if isinstance(frame, kind) and (stream is None or frame.stream_id == stream):
                return frame
        return None

    async def response(self, sid: int, wait: float = 10.0) -> tuple[int, bytes]:
        """Read this stream's response head and body (status, body)."""
        status = 0
        body = b""
        deadline = time.monotonic() + wait
        from hpack import Decoder

        decoder = getattr(self, "_decoder", None) or Decoder()
        self._decoder = decoder
        while time.monotonic() < deadline:
            frame = await self.read_frame(deadline - time.monotonic())
            if frame is None:
                raise ConnectionError("closed before the response ended")
            if isinstance(frame, HeadersFrame):
                fields = dict(decoder.decode(frame.data, raw=True))
                if frame.stream_id == sid:
                    status = int(fields[b":status"])
                    if "END_STREAM" in frame.flags:
                        return status, body
            elif isinstance(frame, DataFrame) and frame.stream_id == sid:
                body += frame.data
                if frame.data:
                    self.send(WindowUpdateFrame(0, window_increment=len(frame.data)))
                    self.send(WindowUpdateFrame(sid, window_increment=len(frame.data)))
                if "END_STREAM" in frame.flags:
                    return status, body
            elif isinstance(frame, RstStreamFrame) and frame.stream_id == sid:
                raise ConnectionError(f"stream reset: {frame.error_code}")
            elif isinstance(frame, GoAwayFrame):
                raise ConnectionError(f"GOAWAY {frame.error_code}")
        raise TimeoutError

    def get(self, sid: int, end: bool = True) -> HeadersFrame:
        """A GET of /ok as one HEADERS frame (END_STREAM unless ``end`` is False)."""
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/ok")]
        return HeadersFrame(
            sid, self.block(fields), flags=["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        )

    def request(self, sid: int, path: bytes = b"/ok", extra: list[tuple[bytes, bytes]] | None = None) -> None:
        fields = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"example.test"),
            (b":path", path),
        ]
        self.send(HeadersFrame(sid, self.block(fields + (extra or [])), flags=["END_HEADERS", "END_STREAM"]))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class Pause:
    """In a frame sequence: wait for stream 1's response before sending the rest."""


def base_config(**http2: Any) -> dict[str, Any]:
    return {
        "http2": {"h2c": True, **http2},
        "route": [
            {"path": "/ok", "respond": 200, "body": "ok\n"},
            {"path": "/", "respond": 200, "body": "x" * 200_000},
        ],
    }


@pytest.fixture
async def edge() -> AsyncIterator[Any]:
    async with running_edge(base_config()) as e:
        yield e


async def goaway(client: RawH2) -> GoAwayFrame | None:
    frame = await client.until(GoAwayFrame, wait=10)
    return frame


# --- frames in orders the RFC forbids: connection errors (RFC 9113 5.4.1) ----------------------


@pytest.mark.parametrize(
    "frames, code",
    [
        # DATA on stream 0 (RFC 9113 6.1).
        (lambda c: [raw_frame(0, 0, 0, b"x")], ErrorCodes.PROTOCOL_ERROR),
        # DATA on an idle stream (5.1).
        (lambda c: [DataFrame(7, b"x")], ErrorCodes.PROTOCOL_ERROR),
        # CONTINUATION with no HEADERS before it (6.10).
        (
            lambda c: [ContinuationFrame(1, c.block([(b"a", b"b")]), flags=["END_HEADERS"])],
            ErrorCodes.PROTOCOL_ERROR,
        ),
        # A frame of another kind inside a header block (6.10).
        (
            lambda c: [HeadersFrame(1, c.block([(b":method", b"GET")])), PingFrame(0, b"\0" * 8)],
            ErrorCodes.PROTOCOL_ERROR,
        ),
        # A client-initiated stream with an even identifier (5.1.1).
        (
            lambda c: [HeadersFrame(2, c.block([(b":method", b"GET")]), flags=["END_HEADERS"])],
            ErrorCodes.PROTOCOL_ERROR,
        ),
        # WINDOW_UPDATE of 0 on the connection (6.9).
        (lambda c: [WindowUpdateFrame(0, window_increment=0)], ErrorCodes.PROTOCOL_ERROR),
        # SETTINGS_ENABLE_PUSH other than 0 or 1 (6.5.2).
        (lambda c: [SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 2})], ErrorCodes.PROTOCOL_ERROR),
        # SETTINGS with ACK and a payload (6.5): FRAME_SIZE_ERROR, not h2's PROTOCOL_ERROR.
        (lambda c: [raw_frame(0x4, 0x1, 0, b"\0" * 6)], ErrorCodes.FRAME_SIZE_ERROR),
        # SETTINGS whose length is not a multiple of 6 (6.5).
        (lambda c: [raw_frame(0x4, 0x0, 0, b"\0" * 5)], ErrorCodes.FRAME_SIZE_ERROR),
        # A frame larger than SETTINGS_MAX_FRAME_SIZE (4.2), refused on its header.
        (lambda c: [raw_frame(0x0, 0x0, 1, b"x" * 16385)[:100]], ErrorCodes.FRAME_SIZE_ERROR),
        # A stream identifier lower than one already used (5.1.1).
        (lambda c: [c.get(5), c.get(3)], ErrorCodes.PROTOCOL_ERROR),
        # DATA on a stream both sides have ended (5.1, closed).
        (lambda c: [c.get(1), Pause(), DataFrame(1, b"x")], ErrorCodes.STREAM_CLOSED),
        # HEADERS on a stream the client reset (5.1, closed).
        (
            lambda c: [c.get(1, end=False), RstStreamFrame(1, error_code=8), c.get(1)],
            ErrorCodes.STREAM_CLOSED,
        ),
        # WINDOW_UPDATE taking the connection window past 2^31-1 (6.9.1).
        (lambda c: [WindowUpdateFrame(0, window_increment=2**31 - 1)], ErrorCodes.FLOW_CONTROL_ERROR),
        # SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1, SETTINGS_MAX_FRAME_SIZE under 2^14 (6.5.2).
        (lambda c: [raw_frame(0x4, 0, 0, b"\0\x04\x80\0\0\0")], ErrorCodes.FLOW_CONTROL_ERROR),
        (lambda c: [raw_frame(0x4, 0, 0, b"\0\x05\0\0\x3f\xff")], ErrorCodes.PROTOCOL_ERROR),
        # PUSH_PROMISE from a client (8.4).
        (lambda c: [raw_frame(0x5, 0x4, 1, b"\0\0\0\x02\x82")], ErrorCodes.PROTOCOL_ERROR),
        # An HPACK block that does not decode (4.3).
        (lambda c: [raw_frame(0x1, 0x5, 1, b"\xff\xff")], ErrorCodes.COMPRESSION_ERROR),
        # PING on a stream, and of a length other than 8 (6.7).
        (lambda c: [raw_frame(0x6, 0, 1, b"\0" * 8)], ErrorCodes.PROTOCOL_ERROR),
        (lambda c: [raw_frame(0x6, 0, 0, b"\0" * 4)], ErrorCodes.FRAME_SIZE_ERROR),
        # WINDOW_UPDATE on an idle stream (5.1).
        (lambda c: [WindowUpdateFrame(9, window_increment=1)], ErrorCodes.PROTOCOL_ERROR),
    ],
    ids=[
        "data-on-stream-0",
        "data-on-idle-stream",
        "continuation-alone",
        "ping-inside-header-block",
        "even-stream-id",
        "window-update-zero",
        "enable-push-2",
        "settings-ack-with-payload",
        "settings-length-not-6n",
        "frame-over-max-frame-size",
        "stream-id-backwards",
        "data-after-both-ended",
        "headers-after-client-reset",
        "window-update-overflow",
        "initial-window-over-2^31-1",
        "max-frame-size-under-2^14",
        "push-promise-from-client",
        "hpack-undecodable",
        "ping-on-a-stream",
        "ping-length-not-8",
        "window-update-on-idle-stream",
    ],
)
async def test_forbidden_frame_orders_get_the_rfc_connection_error(edge: Any, frames: Any, code: int) -> None:
    client = await RawH2.connect(edge.port)
    try:
        for item in frames(client):
            if isinstance(item, Pause):
                assert await client.response(1) == (200, b"ok\n")  # the stream is answered: closed
            else:
                client.send(item)
        frame = await goaway(client)
        assert frame is not None, "no GOAWAY"
        assert frame.error_code == code
        assert await client.read_frame(5) is None  # and the connection is closed
    finally:
        await client.close()


# --- RFC 9113 section 8: malformed requests are stream errors ------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/ok"),
            (b"X-Upper", b"1"),
        ],
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/ok"),
            (b"connection", b"x"),
        ],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b"transfer-encoding", b"chunked")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b"upgrade", b"websocket")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b"te", b"gzip")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b"accept", b"*/*"), (b":path", b"/ok")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b":status", b"200")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b":path", b"/ok")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":path", b"/ok")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b":protocol", b"websocket")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b"x", b"a\r\nb: c")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), (b"x", b" padded")],
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/ok"),
            (b"host", b"b"),
        ],
    ],
    ids=[
        "uppercase-name",
        "connection",
        "transfer-encoding",
        "upgrade",
        "te-gzip",
        "pseudo-after-regular",
        "response-pseudo",
        "repeated-path",
        "no-path",
        "no-scheme",
        "protocol-without-extended-connect",
        "crlf-in-value",
        "leading-space",
        "host-not-authority",
    ],
)
async def test_malformed_requests_get_a_stream_error_and_the_connection_goes_on(
    edge: Any, fields: list[tuple[bytes, bytes]]
) -> None:
    client = await RawH2.connect(edge.port)
    try:
        client.send(HeadersFrame(1, client.block(fields), flags=["END_HEADERS", "END_STREAM"]))
        reset = await client.until(RstStreamFrame, stream=1)
        assert reset is not None and reset.error_code == ErrorCodes.PROTOCOL_ERROR
        client.request(3)
        assert await client.response(3) == (200, b"ok\n")  # a stream error, not a connection error
    finally:
        await client.close()


# --- the attacks ---------------------------------------------------------------------------------


async def test_rapid_reset_gets_enhance_your_calm_and_a_ban() -> None:
    """CVE-2023-44487: open-and-reset floods close the connection and ban the client."""
    config = base_config()
    config["dos"] = {
        "enabled": True,
        "cluster": False,
        "allowlist": [],
        "soft_rate": 100000,
        "hard_rate": 100000,
    }
    async with running_edge(config) as e:
        client = await RawH2.connect(e.port)
        try:
            fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/ok")]
            frames: list[Frame] = []
            for i in range(1000):
                sid = 1 + 2 * i
                frames.append(HeadersFrame(sid, client.block(fields), flags=["END_HEADERS"]))
                frames.append(RstStreamFrame(sid, error_code=ErrorCodes.CANCEL))
            client.send(*frames)
            frame = await goaway(client)
            assert frame is not None and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
            # Well under the thousand streams the client opened were answered or refused.
            assert frame.last_stream_id < 1000
        finally:
            await client.close()
        # The dos feature counts the client as abusive: banned, refused at accept.
        assert await raw_request(e.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n", wait=2) is None


async def test_continuation_flood_is_cut_at_the_header_list_size(edge: Any) -> None:
    """A header block that never ends is not buffered past max_header_list_size (2x, encoded)."""
    client = await RawH2.connect(edge.port)
    try:
        client.send(HeadersFrame(1, client.block([(b":method", b"GET")])))
        for _ in range(60):  # 60 x 16 KiB: under h2's own 64-frame cap, 30x the header list size
            client.send(ContinuationFrame(1, b"\x00" * 16384))
        frame = await goaway(client)
        assert frame is not None and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        await client.close()


async def test_oversized_header_list_is_refused() -> None:
    """SETTINGS_MAX_HEADER_LIST_SIZE is advertised and enforced (here 8 KiB, h2's default is 64)."""
    async with running_edge(base_config(max_header_list_size=8192)) as e:
        client = await RawH2.connect(e.port)
        try:
            settings = await client.until(SettingsFrame)
            assert settings.settings[SettingCodes.MAX_HEADER_LIST_SIZE] == 8192
            client.request(1, extra=[(b"x-big", b"a" * 12000)])
            frame = await goaway(client)
            assert frame is not None and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        finally:
            await client.close()


async def test_hpack_bomb_is_refused(edge: Any) -> None:
    """A 4 KiB table entry referenced over and over: 40 KiB of fields from a few hundred bytes."""
    client = await RawH2.connect(edge.port)
    try:
        big = (b"x-bomb", b"b" * 4000)
        first = client.block([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok"), big])
        client.send(HeadersFrame(1, first, flags=["END_HEADERS", "END_STREAM"]))
        assert (await client.response(1))[0] == 200
        # The entry is now in the dynamic table: each reference is one byte (RFC 7541 6.1).
        bomb = client.block([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/ok")] + [big] * 10)
        assert len(bomb) < 100
        client.send(HeadersFrame(3, bomb, flags=["END_HEADERS", "END_STREAM"]))
        frame = await goaway(client)
        assert frame is not None and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        await client.close()


@pytest.mark.parametrize(
    "flood",
    [
        lambda i: SettingsFrame(0, settings={SettingCodes.MAX_FRAME_SIZE: 16384}),
        lambda i: PingFrame(0, i.to_bytes(8, "big")),
        lambda i: WindowUpdateFrame(0, window_increment=1),
        lambda i: DataFrame(1, b""),
    ],
    ids=["settings", "ping", "window-update", "empty-data"],
)
async def test_control_frame_floods_get_enhance_your_calm(edge: Any, flood: Any) -> None:
    """CVE-2019-9512/9515/9518: frames that cost the server work and answer nothing."""
    client = await RawH2.connect(edge.port)
    try:
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/ok")]
        client.send(HeadersFrame(1, client.block(fields), flags=["END_HEADERS"]))  # for the empty DATA
        client.send(*[flood(i) for i in range(3000)])
        frame = await goaway(client)
        assert frame is not None and frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        await client.close()


async def test_a_client_that_never_opens_its_window_is_cut_and_holds_no_member() -> None:
    """Zero-window slow reading: the reply waits send_timeout at most; the member was freed at once."""
    runner, ap = await start_app("127.0.0.1", 0, "ap1")
    config = {
        "http2": {"h2c": True, "send_timeout": 1.0},
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{ap}"}], "max_conns": 1, "max_queue": 0}},
        "route": [{"path": "/", "pool": "app"}],
    }
    try:
        async with running_edge(config) as e:
            client = await RawH2.connect(e.port, {SettingCodes.INITIAL_WINDOW_SIZE: 0})
            try:
                fields = [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"a"),
                    (b":path", b"/big?kb=64"),
                ]
                client.send(HeadersFrame(1, client.block(fields), flags=["END_HEADERS", "END_STREAM"]))
                head = await client.until(HeadersFrame, stream=1)
                assert head is not None  # the member answered; the body waits for a window
                # The only member slot is free again: another client is served meanwhile.
                other = await raw_request(e.port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n", wait=5)
                assert other is not None and other.status == 200
                started = time.monotonic()
                assert await client.until(DataFrame, wait=10) is None  # never a byte, then closed
                assert time.monotonic() - started < 5
            finally:
                await client.close()
    finally:
        await runner.cleanup()


async def test_max_concurrent_streams_is_advertised_and_enforced() -> None:
    async with running_edge(base_config(max_concurrent_streams=5)) as e:
        client = await RawH2.connect(e.port)
        try:
            settings = await client.until(SettingsFrame)
            assert settings.settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 5
            # Six request heads whose bodies never come: the sixth is refused.
            fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/ok")]
            for i in range(6):
                client.send(HeadersFrame(1 + 2 * i, client.block(fields), flags=["END_HEADERS"]))
            frame = await client.until((RstStreamFrame, GoAwayFrame))  # type: ignore[arg-type]
            assert frame is not None
            assert isinstance(frame, GoAwayFrame) or frame.error_code == ErrorCodes.REFUSED_STREAM
        finally:
            await client.close()
