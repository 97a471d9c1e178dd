"""HTTP/2 frames (RFC 9113 section 4, 6): their types, flags, error codes and settings, one
frame's bytes, and the connection error raised while parsing them (edge/http/h2wire.py)."""

from __future__ import annotations

import struct
from enum import IntEnum

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

MAX_WINDOW = 2**31 - 1  # 6.9.1
DEFAULT_WINDOW = 65535  # 6.9.2
DEFAULT_FRAME_SIZE = 16384  # 4.2
MAX_FRAME_SIZE = 2**24 - 1
HEADER_TABLE_SIZE = 4096  # the decoder's table: the protocol's default, never advertised larger


class ErrorCodes(IntEnum):
    """RFC 9113 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(IntEnum):
    """RFC 9113 6.5.2, and RFC 8441 3."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8


class H2Error(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamClosed(Exception):
    """The edge wrote on a stream that is no longer open for sending."""


# Length (24 bits as 16 + 8), type, flags, stream identifier (its reserved bit masked off).
HEAD = struct.Struct(">HBBBL")
U32 = struct.Struct(">L")
SETTING = struct.Struct(">HL")
GOAWAY_FIELDS = struct.Struct(">LL")


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame's bytes (4.1)."""
    n = len(payload)
    return HEAD.pack(n >> 8, n & 0xFF, kind, flags, sid) + payload


def unpad(payload: bytes) -> bytes:
    """The payload of a PADDED frame without its padding (6.1, 6.2)."""
    if not payload or payload[0] >= len(payload):
        raise H2Error(ErrorCodes.PROTOCOL_ERROR, "padding as long as the frame")
    return payload[1 : len(payload) - payload[0]]
