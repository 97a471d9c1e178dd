"""HTTP/2 without I/O: the server side of an ``h2`` connection, and requests made into ``Head``s.

Theory of operation
-------------------
The ``h2`` package (python-hyper) does the framing, HPACK, the stream state
machine and flow-control accounting; ``new_connection`` configures it as a
server with the edge's limits (RFC 9113 6.5.2 settings) and a frame buffer
that also bounds the bytes of one header block (HEADERS + CONTINUATION), so a
CONTINUATION flood is a connection error after ``max_header_list_size`` bytes,
never an unbounded buffer. HPACK bombs stop in the decoder at the same size
(h2 turns that into ENHANCE_YOUR_CALM).

``h2``'s own inbound header validation is off: it makes every malformed request
a connection error, where RFC 9113 8.1.1 asks for a stream error. ``request_head``
applies the section 8 rules instead (pseudo-header set and order, lower-case
names, no connection-specific fields, ``te: trailers`` only, no CR/LF/NUL,
no leading or trailing whitespace) and raises ``Malformed`` (answered with
RST_STREAM PROTOCOL_ERROR); then the same path normalisation as HTTP/1.1
(``normalize_path``), whose ``ParseError`` is a 400 answer. ``:authority``
stands in for Host (RFC 9113 8.3.1), so the front calls the same
``parse_host`` on it.

``FloodMeter`` counts the frames that cost the server work but answer no
request (SETTINGS, PING, PRIORITY, empty DATA, WINDOW_UPDATE, client resets)
in fixed windows; the connection closes with ENHANCE_YOUR_CALM past a budget
(CVE-2019-9512/9515/9518, CVE-2023-44487).
"""

from __future__ import annotations

from collections.abc import Iterable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import DenialOfServiceError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame
from multidict import CIMultiDict, CIMultiDictProxy

from edge.http.http1 import FIELD_VALUE, TOKEN, Head, ParseError, normalize_path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 8.2.2: fields that only mean something to one HTTP/1.1 connection.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# Never forwarded in an HTTP/2 response (RFC 9113 8.2.2); the edge frames by DATA and END_STREAM.
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_NO_BODY_STATUS = frozenset({204, 304})


class Malformed(Exception):
    """A request RFC 9113 8.1.1 calls malformed: a stream error of type PROTOCOL_ERROR."""


class _BoundedFrameBuffer(FrameBuffer):
    """h2's frame buffer, with the bytes of one header block in progress bounded."""

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self.limit = limit
        self.block = 0  # bytes of the header block being assembled

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, (HeadersFrame, ContinuationFrame)) and "END_HEADERS" not in f.flags:
            self.block += len(f.data)
            if self.block > self.limit:
                # Checked before h2 appends it: a flood of CONTINUATION frames never
                # ends its block and would otherwise be held until the frame cap.
                raise DenialOfServiceError("header block over the header list size")
        elif isinstance(f, (HeadersFrame, ContinuationFrame)):
            self.block = 0
        return super()._update_header_buffer(f)

    @property
    def in_header_block(self) -> bool:
        """Is a header block waiting for its CONTINUATION frames?"""
        return bool(self._headers_buffer)


def new_connection(
    *,
    max_concurrent_streams: int,
    max_header_list_size: int,
    initial_window_size: int,
) -> H2Connection:
    """A server-side h2 connection with the edge's settings, its preface not yet sent."""
    config = H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,  # request_head does it, as stream errors
        normalize_inbound_headers=True,  # joins cookie crumbs (RFC 9113 8.2.3)
        validate_outbound_headers=False,  # response_fields builds them clean
        normalize_outbound_headers=False,
    )
    conn = H2Connection(config=config)
    conn.local_settings = Settings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            SettingCodes.INITIAL_WINDOW_SIZE: initial_window_size,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # The decoder obeys the advertised size from the first frame, not after the client's ACK.
    conn.decoder.max_header_list_size = max_header_list_size
    # Encoded bytes may exceed the decoded size a little (Huffman); twice is plenty.
    conn.incoming_buffer = _BoundedFrameBuffer(2 * max_header_list_size)
    return conn


def request_head(pairs: Iterable[tuple[bytes, bytes]], max_headers: int) -> Head:
    """The request an HTTP/2 header list carries, as the HTTP/1.1 parser would give it.

    Raises ``Malformed`` for what RFC 9113 section 8 forbids (a stream error) and
    ``ParseError`` for what HTTP/1.1 would answer 400/431 (a bad path, too many fields).
    """
    method = scheme = path = authority = None
    headers: CIMultiDict[str] = CIMultiDict()
    regular = False
    for name, value in pairs:
        if not name:
            raise Malformed("empty field name")
        if value and (value[0] in b" \t" or value[-1] in b" \t"):
            raise Malformed("whitespace around a field value")  # RFC 9113 8.2.1
        text = value.decode("latin-1")
        if not FIELD_VALUE.match(text):
            raise Malformed("control character in a field value")
        if name[0] == 58:  # ":"
            if regular:
                raise Malformed("pseudo-header after a regular field")  # RFC 9113 8.3
            if name not in _REQUEST_PSEUDO:
                raise Malformed("unknown or response pseudo-header")
            if name == b":method":
                if method is not None:
                    raise Malformed("repeated :method")
                method = text
            elif name == b":scheme":
                if scheme is not None:
                    raise Malformed("repeated :scheme")
                scheme = text
            elif name == b":path":
                if path is not None:
                    raise Malformed("repeated :path")
                path = text
            else:
                if authority is not None:
                    raise Malformed("repeated :authority")
                authority = text
            continue
        regular = True
        field = name.decode("latin-1")
        if field.lower() != field:
            raise Malformed("upper-case field name")  # RFC 9113 8.2.1
        if not TOKEN.match(field):
            raise Malformed("field name is not a token")
        if name in CONNECTION_SPECIFIC:
            raise Malformed("connection-specific field")  # RFC 9113 8.2.2
        if name == b"te" and text != "trailers":
            raise Malformed("te other than trailers")
        headers.add(field, text)
    if method is None:
        raise Malformed("no :method")
    if not TOKEN.match(method):
        raise Malformed("bad :method")
    if method == "CONNECT":
        # RFC 9113 8.5: :authority only. Extended CONNECT (RFC 8441) is not offered.
        if scheme is not None or path is not None or not authority:
            raise Malformed("CONNECT with :scheme or :path, or without :authority")
        path = "/"
    elif scheme is None or not path:
        raise Malformed("no :scheme or empty :path")  # RFC 9113 8.3.1
    if len(headers) > max_headers:
        raise ParseError("too many headers", 431)
    if path == "*":
        if method != "OPTIONS":
            raise Malformed("asterisk path for a method other than OPTIONS")
    elif path[0] != "/":
        raise Malformed(":path is not origin-form")
    elif "#" in path:
        raise ParseError("fragment in the request target")
    else:
        bare, sep, query = path.partition("?")
        normal = normalize_path(bare)  # the same rules as HTTP/1.1: one path everywhere
        if normal is not bare:
            path = normal + sep + query
    hosts = headers.getall("host", ())
    if len(hosts) > 1:
        raise Malformed("repeated host")
    if authority is not None:
        # RFC 9113 8.3.1: a Host naming another entity than :authority is malformed.
        if hosts and hosts[0].lower() != authority.lower():
            raise Malformed("host differs from :authority")
        headers.popall("host", None)
        headers["Host"] = authority
    length = 0
    cl = headers.getall("content-length", ())
    if cl:
        values = {v.strip() for v in ",".join(cl).split(",")}
        digits = values.pop() if len(values) == 1 else ""
        if not digits.isdigit() or not digits.isascii() or len(digits) > 18:
            raise Malformed("bad content-length")
        length = int(digits)
    return Head(method, path, "HTTP/2", CIMultiDictProxy(headers), length, False, True, False)


def response_fields(
    status: int,
    pairs: Iterable[tuple[str, str]],
    extra: Iterable[tuple[str, str]],
    server: str,
    date: str,
    length: int | None,
) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 response header list: lower-case names, no connection-specific fields
    (RFC 9113 8.2.2), the edge's Server and Date. ValueError when a value holds CR, LF or NUL."""
    out = [(b":status", str(status).encode())]
    dated = False
    for source in (pairs, extra):
        for name, value in source:
            lower = name.lower()
            if lower in _DROP_RESPONSE or lower == "content-length" or (server and lower == "server"):
                continue
            if lower == "date":
                dated = True
            if "\r" in value or "\n" in value or "\0" in value or "\r" in name or "\n" in name:
                raise ValueError("CR, LF or NUL in a response field")
            out.append((lower.encode("latin-1"), value.encode("latin-1", "replace")))
    if server:
        out.append((b"server", server.encode("latin-1")))
    if not dated:
        out.append((b"date", date.encode("latin-1")))
    if length is not None and status not in _NO_BODY_STATUS and status >= 200:
        out.append((b"content-length", str(length).encode()))
    return out


class FloodMeter:
    """Frames of one kind counted in fixed windows: ``hit`` is True once over the budget."""

    __slots__ = ("budget", "count", "started", "window")

    def __init__(self, budget: int, window: float) -> None:
        self.budget = budget
        self.window = window
        self.count = 0
        self.started = 0.0

    def hit(self, now: float, n: int = 1, allowance: int = 0) -> bool:
        """Count ``n`` frames; ``allowance`` raises the budget (earned by the server's own sends)."""
        if now - self.started >= self.window:
            self.started = now
            self.count = 0
        self.count += n
        return self.count > self.budget + allowance
