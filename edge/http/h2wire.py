"""HTTP/2 framing and the server's connection state, without I/O (RFC 9113 sections 4-6).

Theory of operation
-------------------
``ServerWire`` is bytes in, calls out: ``receive`` parses the frames in a
buffer (one ``struct`` unpack per frame header) and calls its ``WireHandler``
(edge/front/h2conn.py) for what the edge acts on: a request's header list, body
bytes, a client reset, an opened window, a frame to meter, a GOAWAY. What the
edge sends (HEADERS, DATA, RST_STREAM, GOAWAY, and the protocol's own SETTINGS
ACK, PING ACK and WINDOW_UPDATE) is appended to ``out``, which the connection
writes once per loop turn.

A connection error (RFC 9113 5.4.1) is raised as ``H2Error`` with its code: the
caller sends GOAWAY (``goaway``) and closes. A stream error (5.4.2) is handled
here: RST_STREAM goes out and the handler hears ``on_stream_error``. Every rule
a peer can break is checked before its frame has any effect; the tests in
tests/unit/test_h2wire.py name the section of each.

Streams carry two flags, ``recv_open`` (the client has not ended its side) and
``send_open`` (the edge has not), which together are the states of 5.1: open,
half-closed (remote) once the request is complete, closed once both are done or
a reset either way. A closed stream is remembered (a bounded dict, oldest out)
with how it closed, which decides what a late frame on it means: ignored after
our RST_STREAM, a stream error after the client's, a connection error after
its END_STREAM (5.1, "closed"). Idle streams are those above ``highest``.

Header blocks are decoded by the ``hpack`` package's Decoder with the
advertised SETTINGS_MAX_HEADER_LIST_SIZE as its limit (an HPACK bomb stops
there) and SETTINGS_HEADER_TABLE_SIZE as the most the client may make its table;
a block is bounded in encoded bytes too while its CONTINUATION frames arrive
(twice the list size), so a CONTINUATION flood never grows a buffer. Every block
is decoded, even for a stream about to be refused: the decoder's table must
follow the client's. Responses are encoded without the dynamic table
(edge/http/h2hpack.py).

Flow control (6.9): what the client may send is handed back as soon as it
arrived (WINDOW_UPDATE once a window is half used), the connection's callers
bound what they hold; what the edge may send is ``window(sid)``, the smaller of
the stream's and the connection's windows, which ``send_data`` spends.
"""

from __future__ import annotations

from typing import Protocol, cast

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

from edge.http.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    GOAWAY_FIELDS,
    HEAD,
    HEADER_TABLE_SIZE,
    HEADERS,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    ErrorCodes,
    H2Error,
    Setting,
    StreamClosed,
    frame,
    unpad,
)
from edge.http.h2hpack import ResponseEncoder

__all__ = ["PREFACE", "ErrorCodes", "H2Error", "ServerWire", "StreamClosed", "WireHandler"]

DECODED_BLOCKS = 16  # decoded header blocks kept per connection while the table is unchanged
CLOSED_REMEMBERED = 1024  # closed streams whose fate is remembered (a bounded dict)

# How a closed stream ended: what a late frame on it means (5.1).
WE_RESET, THEY_RESET, THEY_ENDED = 1, 2, 3


class WireHandler(Protocol):
    """What the connection does with what ``ServerWire.receive`` found."""

    def on_request(self, sid: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        """A new stream's decoded header list (``ended``: no body follows)."""

    def on_data(self, sid: int, data: bytes, ended: bool) -> None:
        """Body bytes; ``ended`` with the last (or with trailers, whose fields are dropped)."""

    def on_reset(self, sid: int) -> None:
        """The client reset an open stream."""

    def on_stream_error(self, sid: int) -> None:
        """The wire reset a stream for a rule the client broke (RST_STREAM is queued)."""

    def on_window(self, sid: int) -> None:
        """A send window grew: the stream's, or (0) the connection's or every stream's."""

    def on_control(self, kind: str) -> None:
        """A frame that costs work and answers no request (to be metered)."""

    def on_goaway(self, code: int) -> None:
        """The client sent GOAWAY with ``code``."""


class WireStream:
    """A stream's protocol state: which sides are open, and its two windows."""

    __slots__ = ("recv_open", "recv_window", "send_open", "send_window")

    def __init__(self, recv_open: bool, send_window: int, recv_window: int) -> None:
        self.recv_open = recv_open
        self.send_open = True
        self.send_window = send_window
        self.recv_window = recv_window


class ServerWire:
    """The server side of one HTTP/2 connection: frames parsed and written, states kept."""

    def __init__(
        self,
        handler: WireHandler,
        *,
        max_concurrent_streams: int,
        max_header_list_size: int,
        initial_window_size: int,
    ) -> None:
        self.handler = handler
        self.out = bytearray()
        self.streams: dict[int, WireStream] = {}
        self.closed: dict[int, int] = {}  # sid -> WE_RESET, THEY_RESET or THEY_ENDED
        self.highest = 0  # the highest stream the client opened (5.1.1)
        self.stopped = False  # the handler ended the connection: stop parsing
        self._buffer = b""
        self._preface = True  # the client preface (3.4) not yet seen
        self._settings_first = True  # and its SETTINGS frame must come first
        self.decoder = Decoder(max_header_list_size=max_header_list_size)
        self.decoder.max_allowed_table_size = HEADER_TABLE_SIZE
        self.encoder = ResponseEncoder()
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}  # block -> fields, see _decode
        self.max_header_list_size = max_header_list_size
        self.local_initial = initial_window_size
        # Until the client acknowledges our SETTINGS it may still count on the default.
        self._recv_initial = max(initial_window_size, DEFAULT_WINDOW)
        # The connection's window for what the client sends starts at the default (6.9.2);
        # start() raises it to the stream window when that is larger.
        self._conn_target = max(initial_window_size, DEFAULT_WINDOW)
        self.recv_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # the connection's, for what the edge sends
        self.remote_initial = DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.frame_size = DEFAULT_FRAME_SIZE  # the client's SETTINGS_MAX_FRAME_SIZE
        # A header block in progress (HEADERS, then CONTINUATION until END_HEADERS).
        self._block_sid = 0
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_flags = 0
        self._block_bad = False  # a PRIORITY self-dependency seen: a stream error once decoded
        self._block_new = False  # the block opens a stream
        self._settings = (
            (Setting.MAX_CONCURRENT_STREAMS, max_concurrent_streams),
            (Setting.INITIAL_WINDOW_SIZE, initial_window_size),
            (Setting.MAX_HEADER_LIST_SIZE, max_header_list_size),
            (Setting.ENABLE_PUSH, 0),
        )
        self._dispatch = (
            self._data,
            self._headers,
            self._priority,
            self._rst_stream,
            self._settings_frame,
            self._push_promise,
            self._ping,
            self._goaway,
            self._window_update,
            self._continuation,
        )

    @property
    def in_header_block(self) -> bool:
        """Is a header block waiting for its CONTINUATION frames?"""
        return self._block_sid != 0

    def start(self) -> None:
        """The server preface (3.4): our SETTINGS."""
        self.out += frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in self._settings))
        if self._conn_target > DEFAULT_WINDOW:
            self.out += frame(WINDOW_UPDATE, 0, 0, U32.pack(self._conn_target - DEFAULT_WINDOW))
            self.recv_window = self._conn_target

    # --- receiving ----------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Parse what arrived; raises H2Error for a connection error."""
        if self._buffer:
            data = self._buffer + data
        if self._preface:
            if len(data) < len(PREFACE):
                if not PREFACE.startswith(data):
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "not the HTTP/2 client preface")
                self._buffer = data
                return
            if not data.startswith(PREFACE):
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "not the HTTP/2 client preface")
            self._preface = False
            data = data[len(PREFACE) :]
        n = len(data)
        pos = 0
        unpack = HEAD.unpack_from
        dispatch = self._dispatch
        while n - pos >= 9:
            hi, lo, kind, flags, sid = unpack(data, pos)
            length = hi << 8 | lo
            # 4.2: we never raise SETTINGS_MAX_FRAME_SIZE above its default. Checked on the
            # header alone, so an oversized frame is refused before it is buffered.
            if length > DEFAULT_FRAME_SIZE:
                raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            end = pos + 9 + length
            if end > n:
                break
            payload = data[pos + 9 : end]
            pos = end
            sid &= 0x7FFFFFFF
            if self._settings_first:
                if kind != SETTINGS or flags & ACK:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "the preface is not followed by SETTINGS")
                self._settings_first = False
            if self._block_sid and (kind != CONTINUATION or sid != self._block_sid):
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "a frame inside a header block")  # 6.10
            if kind < 10:
                dispatch[kind](flags, sid, payload)
            else:
                self.handler.on_control("unknown")  # 5.5: ignored, but metered
            if self.stopped:
                return
        self._buffer = data[pos:] if pos < n else b""

    def _stream_error(self, sid: int, code: ErrorCodes) -> None:
        """5.4.2: RST_STREAM with ``code``; the handler forgets the stream."""
        self.reset(sid, code)
        self.handler.on_stream_error(sid)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")  # 6.1
        flow = len(payload)
        if flags & PADDED:
            payload = unpad(payload)
        if flow > self.recv_window:
            raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")  # 6.9.1
        self.recv_window -= flow  # counted even on a closed stream (6.9)
        st = self.streams.get(sid)
        if st is None or not st.recv_open:
            self._refill(flow)
            if st is not None:
                self._stream_error(sid, ErrorCodes.STREAM_CLOSED)  # half-closed (remote), 5.1
            else:
                self._late(sid, "DATA")
            return
        if flow > st.recv_window:
            self._refill(flow)
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        st.recv_window -= flow
        ended = bool(flags & END_STREAM)
        if ended:
            st.recv_open = False
        elif st.recv_window <= self.local_initial >> 1:
            self.out += frame(WINDOW_UPDATE, 0, sid, U32.pack(self.local_initial - st.recv_window))
            st.recv_window = self.local_initial
        if flow:
            self._refill(flow)
        self.handler.on_data(sid, payload, ended)

    def _refill(self, flow: int) -> None:
        """The connection's window handed back once half used (callers bound what they hold)."""
        if self.recv_window <= self._conn_target >> 1:
            self.out += frame(WINDOW_UPDATE, 0, 0, U32.pack(self._conn_target - self.recv_window))
            self.recv_window = self._conn_target

    def _late(self, sid: int, kind: str) -> None:
        """A frame on a stream not open: idle, or closed in one of three ways (5.1)."""
        if sid > self.highest:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, f"{kind} on an idle stream")
        how = self.closed.get(sid)
        if how == WE_RESET:
            return  # 5.1: ignored, it may have crossed our RST_STREAM
        if how == THEY_RESET:
            # After the client's own RST_STREAM; once: later frames are ignored as after ours.
            self.closed[sid] = WE_RESET
            self.out += frame(RST_STREAM, 0, sid, U32.pack(ErrorCodes.STREAM_CLOSED))
            self.handler.on_control("closed_stream")
            return
        raise H2Error(ErrorCodes.STREAM_CLOSED, f"{kind} on a closed stream")

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")  # 6.2
        if not sid & 1:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "a client stream with an even identifier")  # 5.1.1
        if flags & PADDED:
            payload = unpad(payload)
        bad = False
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            bad = U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid  # 5.3.1: depends on itself
            payload = payload[5:]
        new = sid > self.highest
        if new:
            self.highest = sid  # 5.1.1: the streams below it that were never used are closed
        elif sid not in self.streams:
            how = self.closed.get(sid)
            if how == WE_RESET:
                bad = True  # it crossed our reset: decoded (the table), then ignored
            elif how == THEY_RESET:
                raise H2Error(ErrorCodes.STREAM_CLOSED, "HEADERS on a stream the client reset")
            elif how == THEY_ENDED:
                raise H2Error(ErrorCodes.STREAM_CLOSED, "HEADERS after END_STREAM")
            else:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "a stream identifier that went backwards")
        self._block_flags = flags
        self._block_bad = bad
        self._block_new = new
        if flags & END_HEADERS:
            self._block_done(sid, payload)
        else:
            self._block_sid = sid
            self._block = [payload]
            self._block_size = len(payload)

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or sid != self._block_sid:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")  # 6.10
        self._block_size += len(payload)
        if self._block_size > 2 * self.max_header_list_size:
            # A block that never ends (a CONTINUATION flood) is cut before it is held.
            raise H2Error(ErrorCodes.ENHANCE_YOUR_CALM, "header block over the header list size")
        self._block.append(payload)
        if flags & END_HEADERS:
            block = b"".join(self._block)
            self._block_sid = 0
            self._block = []
            self._block_done(sid, block)

    def _block_done(self, sid: int, block: bytes) -> None:
        """A whole header block: decoded, then a request, trailers, or a stream error."""
        fields = self._decoded.get(block)
        if fields is None:
            fields = self._decode(block)
        ended = bool(self._block_flags & END_STREAM)
        st = self.streams.get(sid)
        if st is not None:
            if not st.recv_open:
                self._stream_error(sid, ErrorCodes.STREAM_CLOSED)  # half-closed (remote), 5.1
            elif not ended or self._block_bad or not _trailers_ok(fields):
                self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR)  # 8.1: malformed trailers
            else:
                st.recv_open = False  # trailers: dropped (the member gets a Content-Length)
                self.handler.on_data(sid, b"", True)
            return
        if not self._block_new:
            return  # a stream we reset: the block only fed the decoder's table
        self.streams[sid] = WireStream(not ended, self.remote_initial, self._recv_initial)
        if self._block_bad:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        self.handler.on_request(sid, fields, ended)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """HPACK-decode a block; kept while the decoder's table stays as it was.

        A block decodes to the same fields as long as the dynamic table is unchanged, and
        a client repeating a request (h2load, a poller) sends the same indexed bytes each
        time: about 20 us of hpack's pure-Python decoding saved per repeat. Any change
        of the table (an entry added or evicted, a size update) drops what was kept.
        """
        table = self.decoder.header_table
        entries = table.dynamic_entries
        count, first, size = len(entries), entries[0] if entries else None, table.maxsize
        try:
            fields = cast("list[tuple[bytes, bytes]]", self.decoder.decode(block, raw=True))
        except OversizedHeaderListError as exc:
            raise H2Error(ErrorCodes.ENHANCE_YOUR_CALM, f"header list too large: {exc}") from None
        except HPACKError as exc:
            raise H2Error(ErrorCodes.COMPRESSION_ERROR, f"HPACK: {exc}") from None  # 4.3
        decoded = self._decoded
        if len(entries) != count or (entries[0] if entries else None) is not first or table.maxsize != size:
            decoded.clear()
        elif len(decoded) < DECODED_BLOCKS:
            decoded[block] = fields
        return fields

    def _priority(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")  # 6.3
        self.handler.on_control("priority")
        if len(payload) != 5:
            self._stream_error(sid, ErrorCodes.FRAME_SIZE_ERROR)  # 6.3
        elif U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR)  # 5.3.1
        # Otherwise ignored: RFC 9113 deprecates the priority scheme (5.3.2).

    def _rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")  # 6.4
        if sid == 0 or sid > self.highest:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle stream")
        if self.streams.pop(sid, None) is not None:
            self._remember(sid, THEY_RESET)
            self.handler.on_reset(sid)
        else:
            self.handler.on_control("reset")  # a closed stream: nothing to do, but metered

    def _settings_frame(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")  # 6.5
        if flags & ACK:
            if payload:
                raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._recv_initial = self.local_initial  # the client now counts on our value
            self.handler.on_control("settings")
            return
        if len(payload) % 6:
            raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self.handler.on_control("settings")
        if self.stopped:
            return
        for i in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, i)
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self.remote_initial
                self.remote_initial = value
                for st in self.streams.values():  # 6.9.2: open windows move by the difference
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.frame_size = value
            elif key == Setting.ENABLE_PUSH or key == Setting.ENABLE_CONNECT_PROTOCOL:
                if value > 1:
                    raise H2Error(ErrorCodes.PROTOCOL_ERROR, "a boolean setting other than 0 or 1")
            elif key == Setting.HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            # Others (MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE: about what the edge
            # would initiate or may send) and unknown ones (6.5.2) need nothing here.
        self.out += frame(SETTINGS, ACK, 0)
        self.handler.on_window(0)  # a larger initial window may let replies go on

    def _push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise H2Error(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE from a client")  # 8.4

    def _ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")  # 6.7
        if len(payload) != 8:
            raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "PING not 8 bytes")
        self.handler.on_control("ping")
        if not flags & ACK and not self.stopped:
            self.out += frame(PING, ACK, 0, payload)

    def _goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")  # 6.8
        if len(payload) < 8:
            raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        self.handler.on_goaway(GOAWAY_FIELDS.unpack_from(payload)[1])

    def _window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")  # 6.9
        self.handler.on_control("window_update")
        if self.stopped:
            return
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2Error(ErrorCodes.FLOW_CONTROL_ERROR, "connection window over 2^31-1")  # 6.9.1
            self.handler.on_window(0)
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.highest:
                raise H2Error(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")  # 5.1
            return  # closed: allowed, ignored (5.1)
        if increment == 0:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR)  # 6.9
            return
        st.send_window += increment
        if st.send_window > MAX_WINDOW:
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR)  # 6.9.1
            return
        self.handler.on_window(sid)

    # --- sending ------------------------------------------------------------------------

    def window(self, sid: int) -> int:
        """What may be sent on ``sid`` now: the smaller of its window and the connection's."""
        st = self.streams.get(sid)
        if st is None:
            return 0
        return st.send_window if st.send_window < self.send_window else self.send_window

    def is_open(self, sid: int) -> bool:
        """May the edge still send on ``sid``?"""
        st = self.streams.get(sid)
        return st is not None and st.send_open

    def send_headers(self, sid: int, fields: list[tuple[bytes, bytes]], end: bool = False) -> None:
        """A response head (HEADERS, and CONTINUATION past the client's frame size)."""
        st = self.streams.get(sid)
        if st is None or not st.send_open:
            raise StreamClosed(sid)
        block = self.encoder.encode(fields)
        flags = END_STREAM if end else 0
        size = self.frame_size
        n = len(block)
        if n <= size:
            self.out += HEAD.pack(n >> 8, n & 0xFF, HEADERS, flags | END_HEADERS, sid)
            self.out += block
        else:
            self.out += frame(HEADERS, flags, sid, block[:size])
            for i in range(size, n, size):
                last = END_HEADERS if i + size >= n else 0
                self.out += frame(CONTINUATION, last, sid, block[i : i + size])
        if end:
            self._sent_end(sid, st)

    def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        """One DATA frame; the caller keeps it within ``window(sid)`` and the frame size."""
        st = self.streams.get(sid)
        if st is None or not st.send_open:
            raise StreamClosed(sid)
        n = len(data)
        st.send_window -= n
        self.send_window -= n
        out = self.out
        out += HEAD.pack(n >> 8, n & 0xFF, DATA, END_STREAM if end else 0, sid)
        out += data
        if end:
            self._sent_end(sid, st)

    def _sent_end(self, sid: int, st: WireStream) -> None:
        st.send_open = False
        if not st.recv_open:
            del self.streams[sid]
            self._remember(sid, THEY_ENDED)

    def reset(self, sid: int, code: ErrorCodes) -> None:
        """RST_STREAM on a stream not yet closed (6.4); nothing for one that is."""
        if self.streams.pop(sid, None) is None and sid in self.closed:
            return
        self._remember(sid, WE_RESET)
        self.out += frame(RST_STREAM, 0, sid, U32.pack(code))

    def goaway(self, code: ErrorCodes, last_sid: int) -> None:
        """GOAWAY (6.8) naming the last stream the edge acted on."""
        self.out += frame(GOAWAY, 0, 0, GOAWAY_FIELDS.pack(last_sid, code))

    def _remember(self, sid: int, how: int) -> None:
        closed = self.closed
        if len(closed) >= CLOSED_REMEMBERED:
            del closed[next(iter(closed))]
        closed[sid] = how


def _trailers_ok(fields: list[tuple[bytes, bytes]]) -> bool:
    """8.1: trailers carry no pseudo-header fields, and their names are lower case."""
    return all(name[:1] != b":" and name == name.lower() for name, _ in fields)
