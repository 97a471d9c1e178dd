"""HTTP/2 requests made into ``Head``s, responses into field lists, and the flood meter.

Theory of operation
-------------------
The framing, the stream states and flow control are the edge's own
(edge/http/h2wire.py); this module is what HTTP/2 means for a request and a
response (RFC 9113 section 8).

``request_head`` applies the section 8 rules to a decoded header list
(pseudo-header set and order, lower-case names, no connection-specific fields,
``te: trailers`` only, no CR/LF/NUL, no leading or trailing whitespace) and
raises ``Malformed`` (answered with RST_STREAM PROTOCOL_ERROR, a stream error as
8.1.1 says); then the same path normalisation as HTTP/1.1 (``normalize_path``),
whose ``ParseError`` is a 400 answer. ``:authority`` stands in for Host (RFC 9113
8.3.1), so the front calls the same ``parse_host`` on it; cookie crumbs are
joined into one field (8.2.3).

``FloodMeter`` counts the frames that cost the server work but answer no
request (SETTINGS, PING, PRIORITY, empty DATA, WINDOW_UPDATE, client resets)
in fixed windows; the connection closes with ENHANCE_YOUR_CALM past a budget
(CVE-2019-9512/9515/9518, CVE-2023-44487).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

from edge.http.h2wire import PREFACE
from edge.http.http1 import TOKEN, Head, ParseError, normalize_path

__all__ = ["PREFACE", "FloodMeter", "Malformed", "request_head", "response_fields"]

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


# RFC 9113 8.2.1: a field name is a lower-case token; checked in one match per field.
_LOWER_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9113 8.2.1 and RFC 9110 5.5: no CR, LF, NUL or other controls, and no SP/HTAB at either end.
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")


def request_head(pairs: Iterable[tuple[bytes, bytes]], max_headers: int) -> Head:
    """The request an HTTP/2 header list carries, as the HTTP/1.1 parser would give it.

    Raises ``Malformed`` for what RFC 9113 section 8 forbids (a stream error) and
    ``ParseError`` for what HTTP/1.1 would answer 400/431 (a bad path, too many fields).
    Host (from ``:authority``) is the first field, where an HTTP/1.1 client puts it
    (RFC 9112 3.2), so the member sees the same request either way.
    """
    method = scheme = path = authority = None
    fields: list[tuple[str, str]] = []
    hosts: list[str] = []
    length_fields: list[str] = []
    cookies: list[str] = []
    regular = False
    for name, value in pairs:
        if _VALUE.fullmatch(value) is None:
            # Empty values are fine; a control character or edge whitespace is not.
            if value and (value[0] in b" \t" or value[-1] in b" \t"):
                raise Malformed("whitespace around a field value")  # RFC 9113 8.2.1
            raise Malformed("control character in a field value")
        text = value.decode("latin-1")
        if name[:1] == b":":
            if regular:
                raise Malformed("pseudo-header after a regular field")  # RFC 9113 8.3
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
            elif name == b":authority":
                if authority is not None:
                    raise Malformed("repeated :authority")
                authority = text
            else:
                raise Malformed("unknown or response pseudo-header")
            continue
        regular = True
        if _LOWER_TOKEN.fullmatch(name) is None:
            if not name:
                raise Malformed("empty field name")
            if name.lower() != name:
                raise Malformed("upper-case field name")  # RFC 9113 8.2.1
            raise Malformed("field name is not a token")
        if name in CONNECTION_SPECIFIC:
            raise Malformed("connection-specific field")  # RFC 9113 8.2.2
        field = name.decode("latin-1")
        if name == b"te":
            if text != "trailers":
                raise Malformed("te other than trailers")
        elif name == b"host":
            hosts.append(text)
            continue  # placed first below
        elif name == b"content-length":
            length_fields.append(text)
        elif name == b"cookie":
            # RFC 9113 8.2.3: crumbs joined with "; " into one field, where the first was.
            if cookies:
                cookies.append(text)
                continue
            cookies.append(text)
        fields.append((field, text))
    if method is None:
        raise Malformed("no :method")
    if TOKEN.match(method) is None:
        raise Malformed("bad :method")
    if method == "CONNECT":
        # RFC 9113 8.5: :authority only. Extended CONNECT (RFC 8441) is not offered.
        if scheme is not None or path is not None or not authority:
            raise Malformed("CONNECT with :scheme or :path, or without :authority")
        path = "/"
    elif scheme is None or not path:
        raise Malformed("no :scheme or empty :path")  # RFC 9113 8.3.1
    if len(cookies) > 1:
        at = fields.index(("cookie", cookies[0]))
        fields[at] = ("cookie", "; ".join(cookies))
    if len(fields) + len(hosts) > max_headers:
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
    if len(hosts) > 1:
        raise Malformed("repeated host")
    if authority is not None:
        # RFC 9113 8.3.1: a Host naming another entity than :authority is malformed.
        if hosts and hosts[0].lower() != authority.lower():
            raise Malformed("host differs from :authority")
        fields.insert(0, ("Host", authority))
    elif hosts:
        fields.insert(0, ("host", hosts[0]))
    length = 0
    if length_fields:
        values = {v.strip(" \t") for v in ",".join(length_fields).split(",")}
        digits = values.pop() if len(values) == 1 else ""
        if not digits.isdigit() or not digits.isascii() or len(digits) > 18:
            raise Malformed("bad content-length")
        length = int(digits)
    return Head(method, path, "HTTP/2", CIMultiDictProxy(CIMultiDict(fields)), length, False, True, False)


def response_fields(
    status: int,
    pairs: Iterable[tuple[str, str]],
    extra: Iterable[tuple[str, str]],
    server: str,
    date: str,
    length: int | None,
    stored: bytes = b"",
) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 response header list: lower-case names, no connection-specific fields
    (RFC 9113 8.2.2), the edge's Server and Date. ValueError when a value holds CR, LF or NUL.

    ``stored``: a cache hit's stored fields as they would go out over HTTP/1.1 ("Name:
    value\r\n" each, ``Wire.data``), placed before ``pairs``; their conversion is kept per
    distinct block, so a repeated hit converts only the fields it adds (Age, Cache-Status).
    """
    out = [_STATUS.get(status) or (b":status", str(status).encode())]
    dated = False
    if stored:
        converted = _stored_fields.get((stored, bool(server)))
        if converted is None:
            fields: list[tuple[bytes, bytes]] = []
            pieces = stored.decode("latin-1").split("\r\n")
            stored_dated = _convert([p.partition(": ")[::2] for p in pieces if p], server, fields)
            converted = (fields, stored_dated)
            if len(_stored_fields) >= STORED_BLOCKS:
                _stored_fields.clear()
            _stored_fields[(stored, bool(server))] = converted
        out += converted[0]
        dated = converted[1]
    dated = _convert(pairs, server, out) or dated
    if extra:
        dated = _convert(extra, server, out) or dated
    if server:
        out.append((b"server", server.encode("latin-1")))
    if not dated:
        out.append((b"date", date.encode("latin-1")))
    if length is not None and status not in _NO_BODY_STATUS and status >= 200:
        out.append((b"content-length", str(length).encode()))
    return out


_STATUS = {code: (b":status", str(code).encode()) for code in range(100, 600)}
STORED_BLOCKS = 1024  # distinct stored field blocks kept converted (a bounded dict, refilled when full)
_stored_fields: dict[tuple[bytes, bool], tuple[list[tuple[bytes, bytes]], bool]] = {}


def _convert(pairs: Iterable[tuple[str, str]], server: str, out: list[tuple[bytes, bytes]]) -> bool:
    """Append ``pairs`` as HTTP/2 fields to ``out``; True when a Date was among them."""
    dated = False
    for name, value in pairs:
        lower = name.lower()
        if lower in _DROP_RESPONSE or lower == "content-length" or (server and lower == "server"):
            continue
        if lower == "date":
            dated = True
        if "\r" in value or "\n" in value or "\0" in value or "\r" in name or "\n" in name:
            raise ValueError("CR, LF or NUL in a response field")
        out.append((lower.encode("latin-1"), value.encode("latin-1", "replace")))
    return dated


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
