"""Strict HTTP/1.1 request parsing, without I/O: bytes in, requests out.

Theory of operation
-------------------
``RequestParser.feed(data)`` appends to a buffer and returns events:
``Head`` (a parsed request head), ``BodyChunk`` and ``EndOfMessage``. The
connection decides what to do with them (see edge/connection.py). After a
``ParseError`` the connection answers 400 (or 431/413) and closes: there is
no resynchronising on a stream whose framing is in doubt.

The rules are the ones request smuggling feeds on (RFC 9112 sections 2-7,
RFC 9110 5): lines end with CRLF; header names are tokens with no space before
the colon; no obs-fold; values hold no CTL but HTAB; Content-Length is one
decimal number (duplicates must agree); Transfer-Encoding on a request must
end in ``chunked`` and may not come with Content-Length; chunk sizes are hex
of bounded length. Anything else is a 400, never a guess.

A parser made with ``proxy=True`` (the forward-proxy listener, edge/front/forward/)
also accepts CONNECT's authority-form target (``CONNECT host:443``; RFC 9112
3.2.3), which stands in for Host like an absolute-form one does; such a
CONNECT may carry no body, and its connection is kept whatever the version,
since it becomes a tunnel after a 2xx. Parsing stops after it: the bytes that
followed are left in ``rest`` for the connection to route. Other listeners
refuse authority-form.

Path normalisation (``normalize_path``): the reverse-proxy listeners route,
look up static files, key the cache and forward upstream on one path, made
once per request from the target (RFC 3986 6.2.2 and 5.2.4, and nginx's
``merge_slashes``): percent-encoded unreserved characters are decoded (``%2e``
is a ``.``, ``%7E`` a ``~``), other escapes get upper-case hex, runs of ``/``
become one, ``.`` and ``..`` segments are removed. A path that cannot be
normalised without guessing what the member will make of it is a 400: a bad
escape, an encoded ``/``, ``\\`` or NUL (``%2F``, ``%5C``, ``%00``), a literal
``\\`` or ``#``, or a ``..`` that climbs above the root. The forward proxy's
parser keeps the path as sent: it is the origin's, not ours to rewrite.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy, istr

TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Visible ASCII, space, tab and obs-text; no CTL.
FIELD_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")
TARGET = re.compile(r"^[\x21-\x7e\x80-\xff]+$")
MAX_CHUNK_SIZE_DIGITS = 16
# Field names looked up on every request, as multidict istr: a case-insensitive lookup folds
# a str key on every call, an istr carries its folded form (multidict 7.2, measured on the
# loaded machine: a test for an absent name 146 against 23 ns, getall of a present one 457
# against 291 ns; a request head was looked up eight times this way).
HOST = istr("Host")
CONTENT_LENGTH = istr("Content-Length")
TRANSFER_ENCODING = istr("Transfer-Encoding")
CONNECTION = istr("Connection")
EXPECT = istr("Expect")
UPGRADE = istr("Upgrade")

# ``Head.seen``: which of these fields a request may carry. The fast parser sets the bits of
# those it met (the framing rules and the hot paths read them); any other Head has every bit
# set (-1), so a clear bit always means "absent" and a set one "look in the headers". A cache
# hit tested six fields and a static file three, each a multidict scan (callgrind).
SEEN_HOST = 1
SEEN_TRANSFER_ENCODING = 2
SEEN_CONTENT_LENGTH = 4
SEEN_CONNECTION = 8
SEEN_EXPECT = 16
_SEEN_HOST_TWICE = 32  # a second Host (the framing rules refuse it)
SEEN_UPGRADE = 64
SEEN_CACHE_CONTROL = 128
SEEN_PRAGMA = 256
SEEN_AUTHORIZATION = 512
SEEN_IF_NONE_MATCH = 1024
SEEN_IF_MODIFIED_SINCE = 2048
SEEN_RANGE = 4096
_SEEN_BITS: dict[str, int] = {
    "host": SEEN_HOST,
    "transfer-encoding": SEEN_TRANSFER_ENCODING,
    "content-length": SEEN_CONTENT_LENGTH,
    "connection": SEEN_CONNECTION,
    "expect": SEEN_EXPECT,
    "upgrade": SEEN_UPGRADE,
    "cache-control": SEEN_CACHE_CONTROL,
    "pragma": SEEN_PRAGMA,
    "authorization": SEEN_AUTHORIZATION,
    "if-none-match": SEEN_IF_NONE_MATCH,
    "if-modified-since": SEEN_IF_MODIFIED_SINCE,
    "range": SEEN_RANGE,
}
# RFC 3986 2.3: decoding these never changes what a URI means (6.2.2.2).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _escape_table() -> dict[str, str]:
    """Every two-hex-digit escape -> its normal form ("" for the ones refused)."""
    table = {}
    for code in range(256):
        char = chr(code)
        normal = "" if char in "/\\\x00" else char if char in _UNRESERVED else f"%{code:02X}"
        for spelled in {
            f"{code:02x}",
            f"{code:02X}",
            f"{code:02x}"[0] + f"{code:02X}"[1],
            f"{code:02X}"[0] + f"{code:02x}"[1],
        }:
            table[spelled] = normal
    return table


# "2e" -> ".", "2f" -> "" (refused), "c3" -> "%C3": one lookup per escape (RFC 3986 6.2.2.1-2).
_ESCAPES = _escape_table()
_MULTI_SLASH = re.compile(r"//+")
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"


class ParseError(Exception):
    """The request cannot be framed safely; answer ``status`` and close."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Head:
    """A parsed request head."""

    __slots__ = (
        "body_length",
        "chunked",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "raw_path",
        "scheme",
        "seen",
        "version",
    )

    def __init__(
        self,
        method: str,
        raw_path: str,
        version: str,
        headers: CIMultiDictProxy[str],
        body_length: int,
        chunked: bool,
        keep_alive: bool,
        expect_continue: bool,
        scheme: str = "",
        seen: int = -1,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.body_length = body_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        # "http" or "https" when the target came in absolute-form (a proxy request), else "".
        self.scheme = scheme
        # The SEEN_* bits of the fields it may carry (-1: any; a clear bit: that field is absent).
        self.seen = seen
        path, _, query = raw_path.partition("?")
        self.path = unquote(path, errors="surrogateescape") if "%" in path else path
        self.query = query


class BodyChunk:
    """Body bytes of the current request."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class EndOfMessage:
    """The current request is complete."""

    __slots__ = ()


END = EndOfMessage()
_object_new = object.__new__
Event = Head | BodyChunk | EndOfMessage


def normalize_path(path: str) -> str:
    """The normalised form of an origin-form path (no query); ParseError when it is unsafe.

    The result is what the edge routes on (decoded by Head) and what it forwards.
    Most paths are already normal: four substring scans and they come back as they are.
    """
    if "%" not in path and "//" not in path and "/." not in path and "\\" not in path:
        return path
    if "\\" in path:
        raise ParseError("backslash in the path")  # not in RFC 3986; some servers read it as "/"
    if "%" in path:
        pieces = path.split("%")
        out = [pieces[0]]
        for piece in pieces[1:]:
            replacement = _ESCAPES.get(piece[:2])
            if replacement is None:
                raise ParseError("bad percent-encoding in the path")
            if not replacement:
                # An encoded separator (or NUL) is one segment to us and two to a member that
                # decodes before it routes: no normal form both sides agree on.
                raise ParseError("encoded '/', '\\' or NUL in the path")
            out.append(replacement + piece[2:])
        path = "".join(out)
    if "//" in path:
        path = _MULTI_SLASH.sub("/", path)
    if "/." in path:
        segments = path.split("/")[1:]
        kept: list[str] = []
        last = len(segments) - 1
        for i, segment in enumerate(segments):
            if segment == "." or segment == "..":
                if segment == "..":
                    if not kept:
                        raise ParseError("'..' above the root of the path")
                    kept.pop()
                if i == last:
                    kept.append("")  # "/a/b/.." is "/a/", a directory (RFC 3986 5.2.4)
            else:
                kept.append(segment)
        path = "/" + "/".join(kept)
    return path


def parse_head(block: bytes, max_headers: int, max_field: int, proxy: bool = False) -> Head:
    """Parse everything before the empty line (CRLFs included, the empty line excluded).

    Most heads are taken by ``_parse_head_fast`` (the same grammar as the line-by-line
    parser below, for an origin-form target); a head it leaves, or one with an absolute or
    authority-form target, takes the line-by-line parser, which names the fault.
    """
    text = block.decode("latin-1")
    # No line longer than max_field (the head itself is not), and no CTL but HTAB, CR and LF
    # (CR and LF are counted against the line breaks): bytes.translate deletes them in one C
    # loop, a third of a regular expression's search (1.09 against 0.32 us, measured).
    if len(text) + 2 <= max_field and len(block.translate(None, _CTL_BYTES)) == len(block):
        fast = _parse_head_fast(text, max_headers, proxy)
        if fast is not None:
            method, target, version, pairs, seen = fast
            return _head(method, target, version, CIMultiDict(pairs), None, "", proxy, seen)
    return _parse_head_lines(block, max_headers, max_field, proxy)


# Field names seen in requests -> their lower case, each checked once as a token: clients
# send the same few names on every request, so one dict lookup checks and folds a name (the
# regular expression over the whole head, then a findall for its pairs, cost more than the
# split, partition and lookup per line that replace them).
_NAMES: dict[str, str] = {}
MAX_FIELD_NAMES = 512  # names remembered per parser: names are the peer's choice
_METHOD = re.compile(_TOKEN)
# Methods seen -> True once checked as tokens (the few every client sends; bounded like names).
_METHODS: dict[str, bool] = {}
_MAX_METHODS = 64
_FIELD_NAME = re.compile(_TOKEN)
# Control characters but HTAB, CR and LF (those two are counted against the line breaks).
_CTL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


def _parse_head_fast(
    text: str, max_headers: int, proxy: bool
) -> tuple[str, str, str, list[tuple[str, str]], int] | None:
    """A head (no final CRLF) in origin-form as (method, target, version, pairs, the SEEN_*
    bits of its fields), or None when it is not plainly valid: the line-by-line parser then decides.

    Takes exactly what ``token SP "/" *(VCHAR / obs-text) SP HTTP/1.[01] CRLF
    *(token ":" field-value CRLF)`` takes, OWS stripped from each value: the grammar the
    line-by-line parser applies, so both give the same head (a property test holds them to it),
    for a ``text`` that ``parse_head`` found free of CTLs but HTAB, CR and LF. Typed for the
    compiled build by edge/http/http1.pxd.
    """
    lines = text.split("\r\n")
    n = len(lines) - 1
    # Every CR and LF is part of a line break (parse_head has refused the other CTLs).
    if n > max_headers or text.count("\r") != n or text.count("\n") != n:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    method = parts[0]
    target = parts[1]
    version = parts[2]
    if (
        (version != "HTTP/1.1" and version != "HTTP/1.0")
        or not target.startswith("/")
        or "\t" in target
        or (proxy and method == "CONNECT")
    ):
        return None
    if method not in _METHODS:
        if _METHOD.fullmatch(method) is None:
            return None
        if len(_METHODS) < _MAX_METHODS:
            _METHODS[method] = True
    fields = split_fields(lines, _NAMES)
    if fields is None:
        return None
    # One dict lookup per field for what the framing rules and the hot paths test for.
    bits = _SEEN_BITS
    seen = 0
    for lower in fields[1]:
        bit = bits.get(lower, 0)
        if bit:
            if bit == SEEN_HOST and seen & SEEN_HOST:
                seen |= _SEEN_HOST_TWICE
            seen |= bit
    return method, target, version, fields[0], seen


def split_fields(lines: list[str], known: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]] | None:
    """The field lines of a head split at CRLF (``lines[0]`` is the start line) as
    (name, value) pairs with each value's OWS stripped, and the names in lower case; None
    when a line is not ``token ":" value``. ``known`` maps names already checked to their
    lower case (the request and the member parsers keep one each, at most MAX_FIELD_NAMES).

    Written for both builds (edge/http/http1.pxd types it): compiled, the index loops over
    the value's ends are C loops over the characters and ``find``, the slices and the dict
    lookup are direct C-API calls, where ``partition`` and ``strip`` were generic method
    calls of some 600 instructions each (callgrind); interpreted, it does what they did.
    """
    pairs: list[tuple[str, str]] = []
    names: list[str] = []
    for i in range(1, len(lines)):
        line = lines[i]
        colon = line.find(":")
        name = line[:colon] if colon >= 0 else line
        lower = known.get(name)
        if lower is None:
            if colon < 0 or _FIELD_NAME.fullmatch(name) is None:
                return None
            lower = name.lower()
            if len(known) < MAX_FIELD_NAMES:
                known[name] = lower
        elif colon < 0:
            return None
        # The value with its OWS (SP and HTAB) stripped at both ends: value.strip(" \t").
        start = colon + 1
        end = len(line)
        while start < end and (line[start] == " " or line[start] == "\t"):
            start += 1
        while end > start and (line[end - 1] == " " or line[end - 1] == "\t"):
            end -= 1
        pairs.append((name, line[start:end]))
        names.append(lower)
    return pairs, names


def _parse_head_lines(block: bytes, max_headers: int, max_field: int, proxy: bool) -> Head:
    text = block.decode("latin-1")
    crlf = text.count("\r\n")
    if text.count("\n") != crlf or text.count("\r") != crlf:
        raise ParseError("line endings other than CRLF")
    lines = text.split("\r\n")
    request_line = lines[0]
    if len(request_line) > max_field:
        raise ParseError("request line too long", 414)
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise ParseError("bad request line")
    method, target, version = parts
    if not TOKEN.match(method):
        raise ParseError("bad method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ParseError("unsupported HTTP version", 505 if version.startswith("HTTP/") else 400)
    if not TARGET.match(target):
        raise ParseError("bad request target")
    scheme = ""
    if proxy and method == "CONNECT":
        # authority-form: host:port and nothing else; the proxy checks the parts
        if "/" in target or "@" in target or ":" not in target:
            raise ParseError("CONNECT needs a host:port target")
        lines.append(f"Host: {target}")  # replaced below
        absolute_host: str | None = target
    elif target[0] != "/":
        if target.startswith(("http://", "https://")):
            # absolute-form: the authority stands in for Host (RFC 9112 3.2.2)
            scheme_end = target.index("//") + 2
            scheme = target[: scheme_end - 3]
            # The authority ends at the path or, for "http://host?q", at the query.
            ends = [i for i in (target.find("/", scheme_end), target.find("?", scheme_end)) if i >= 0]
            end = min(ends) if ends else len(target)
            authority = target[scheme_end:end]
            target = target[end:] or "/"
            if target[0] == "?":
                target = "/" + target
            lines.append(f"Host: {authority}")  # replaced below
            absolute_host = authority
        elif target == "*" and method == "OPTIONS":
            absolute_host = None
        else:
            raise ParseError("bad request target")
    else:
        absolute_host = None
    if len(lines) - 1 > max_headers:
        raise ParseError("too many headers", 431)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if len(line) > max_field:
            raise ParseError("header too long", 431)
        name, sep, value = line.partition(":")
        if not sep or not TOKEN.match(name):
            raise ParseError("bad header line")  # includes obs-fold and space before colon
        value = value.strip(" \t")
        if not FIELD_VALUE.match(value):
            raise ParseError("control character in a header value")
        headers.add(name, value)
    return _head(method, target, version, headers, absolute_host, scheme, proxy, -1)


def _head(
    method: str,
    target: str,
    version: str,
    headers: CIMultiDict[str],
    absolute_host: str | None,
    scheme: str,
    proxy: bool,
    seen: int,
) -> Head:
    """The framing rules on parsed fields (Host, Content-Length, Transfer-Encoding, Connection).

    ``seen``: the SEEN_* bits of the fields present, when the parser knows them (-1 when
    not): a field whose bit is clear is not looked up in ``headers`` (most requests carry
    no framing field but Host).
    """
    if (
        not proxy
        and target[0] == "/"
        and ("%" in target or "/." in target or "//" in target or "\\" in target or "#" in target)
    ):
        if "#" in target:
            raise ParseError("fragment in the request target")  # RFC 9112 3.2: none in origin-form
        path, sep, query = target.partition("?")
        normal = normalize_path(path)
        if normal is not path:
            target = normal + sep + query
    if absolute_host is not None:
        headers.popall("Host", None)
        headers["Host"] = absolute_host
    if seen < 0:
        hosts = len(headers.getall(HOST, []))
        te_in = TRANSFER_ENCODING in headers
        cl_in = CONTENT_LENGTH in headers
        connection_in = expect_in = True
    else:
        hosts = 2 if seen & _SEEN_HOST_TWICE else 1 if seen & SEEN_HOST else 0
        te_in = (seen & SEEN_TRANSFER_ENCODING) != 0
        cl_in = (seen & SEEN_CONTENT_LENGTH) != 0
        connection_in = (seen & SEEN_CONNECTION) != 0
        expect_in = (seen & SEEN_EXPECT) != 0
    if hosts > 1 or (version == "HTTP/1.1" and not hosts):
        raise ParseError("missing or repeated Host")

    chunked = False
    length = 0
    # Tested before they are read: most requests carry neither (no list made for nothing).
    if te_in:
        if cl_in:
            raise ParseError("Content-Length with Transfer-Encoding")
        te = headers.getall(TRANSFER_ENCODING)
        # OWS is SP and HTAB only (RFC 9110 5.6.3): str.strip() would also take NBSP and
        # other Unicode spaces, so "chunked\xa0" would read as chunked here and as an
        # unknown coding to a stricter parser in front.
        codings = [c.strip(" \t").lower() for c in ",".join(te).split(",")]
        if codings != ["chunked"]:
            raise ParseError("unsupported Transfer-Encoding")
        if version == "HTTP/1.0":
            raise ParseError("Transfer-Encoding in HTTP/1.0")
        chunked = True
    elif cl_in:
        cl = headers.getall(CONTENT_LENGTH)
        values = {v.strip(" \t") for v in ",".join(cl).split(",")}
        if len(values) != 1:
            raise ParseError("conflicting Content-Length")
        value = values.pop()
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise ParseError("bad Content-Length")
        length = int(value)
    connection = headers.get(CONNECTION, "").lower() if connection_in else ""
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    if proxy and method == "CONNECT":
        if chunked or length:
            raise ParseError("CONNECT with a body")  # those bytes would be the tunnel's
        keep_alive = True  # after a 2xx the connection is the tunnel, whatever the version
    expect = expect_in and headers.get(EXPECT, "").lower() == "100-continue"
    # Head(method, target, version, CIMultiDictProxy(headers), length, chunked, keep_alive,
    # expect and (chunked or length > 0), scheme, seen), written out: its attributes set
    # here, with no call of __init__ (the call and its ten arguments were about 1k
    # instructions of every request, callgrind). Head.__init__ does the same.
    head = _object_new(Head)
    head.method = method
    head.raw_path = target
    head.version = version
    head.headers = CIMultiDictProxy(headers)
    head.body_length = length
    head.chunked = chunked
    head.keep_alive = keep_alive
    head.expect_continue = expect and (chunked or length > 0)
    head.scheme = scheme
    head.seen = seen
    path, _, query = target.partition("?")
    head.path = unquote(path, errors="surrogateescape") if "%" in path else path
    head.query = query
    return head


def field_lines(pairs: Iterable[tuple[str, str]]) -> str:
    """Header fields as "Name: value\\r\\n" lines; ValueError if a name or value holds CR or LF
    (a member's or a feature's value must never smuggle a line into a response)."""
    lines = [f"{name}: {value}\r\n" for name, value in pairs]
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("CR or LF inside a response header")
    return text


def chunk_size(line: bytes) -> int | None:
    """The size on a chunk-size line (extensions ignored), or None unless it is plain hex.

    Shared by the request and the member-response parsers: Python's int(x, 16) alone
    would also take "0x10", "+10" and "1_0", which other HTTP parsers read differently.
    """
    size_text = line.partition(b";")[0].rstrip(b" \t")
    if (
        not size_text
        or len(size_text) > MAX_CHUNK_SIZE_DIGITS
        or not all(c in b"0123456789abcdefABCDEF" for c in size_text)
    ):
        return None
    return int(size_text, 16)


class RequestParser:
    """Turns a client byte stream into request events; raises ParseError on bad framing."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_chunk_state",
        "_left",
        "_state",
        "error",
        "max_field",
        "max_head",
        "max_headers",
        "proxy",
        "rest",
    )

    def __init__(
        self,
        max_head: int = 65536,
        max_headers: int = 100,
        max_field: int = 8190,
        *,
        proxy: bool = False,
    ) -> None:
        self.max_head = max_head
        # A forward-proxy listener's parser: CONNECT's authority-form is allowed.
        self.proxy = proxy
        # Bytes that followed a CONNECT head, not parsed: the tunnel's if it opens.
        self.rest = b""
        self.max_headers = max_headers
        self.max_field = max_field
        self._buf = b""
        self._state = "head"  # head, length, chunked
        self._left = 0
        self._chunk_left = 0
        self._chunk_state = "size"
        # Set when the stream went bad; the requests completed before it stay valid.
        self.error: ParseError | None = None

    @property
    def idle(self) -> bool:
        """Between requests with nothing buffered."""
        return self._state == "head" and not self._buf

    def feed(self, data: bytes) -> list[Event]:
        """Consume bytes; return the events they complete.

        On bad framing ``error`` is set and the events before it are still
        returned (pipelined requests that came first deserve their answers);
        nothing is parsed after that. (One method, not a wrapper around another: a
        method call per request less, compiled.)
        """
        if self.error is not None:
            return []
        events: list[Event] = []
        try:
            buf = self._buf + data if self._buf else data
            self._buf = b""
            while buf:
                state = self._state
                if state == "head":
                    # Tolerate empty lines before a request (RFC 9112 2.2).
                    while buf.startswith(b"\r\n"):
                        buf = buf[2:]
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > self.max_head:
                            raise ParseError("request head too large", 431)
                        if buf.count(b"\n") != buf.count(b"\r\n"):
                            raise ParseError("line endings other than CRLF")
                        self._buf = buf
                        return events
                    if end > self.max_head:
                        raise ParseError("request head too large", 431)
                    head = parse_head(buf[:end], self.max_headers, self.max_field, self.proxy)
                    buf = buf[end + 4 :]
                    events.append(head)
                    if head.chunked:
                        self._state = "chunked"
                        self._chunk_state = "size"
                    elif head.body_length:
                        self._state = "length"
                        self._left = head.body_length
                    else:
                        events.append(END)
                        if self.proxy and head.method == "CONNECT":
                            # What follows is the tunnel's, or the next request's if the CONNECT
                            # is refused: the connection decides, so stop and hand it over.
                            self.rest = buf
                            return events
                elif state == "length":
                    take = buf[: self._left]
                    buf = buf[len(take) :]
                    self._left -= len(take)
                    events.append(BodyChunk(take))
                    if not self._left:
                        self._state = "head"
                        events.append(END)
                else:
                    buf = self._chunked(buf, events)
        except ParseError as exc:
            self.error = exc
        return events

    def _chunked(self, buf: bytes, events: list[Event]) -> bytes:
        while buf:
            cs = self._chunk_state
            if cs == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ParseError("chunk size line too long")
                    self._buf = buf
                    return b""
                line = buf[:end]
                buf = buf[end + 2 :]
                size = chunk_size(line)
                if size is None:
                    raise ParseError("bad chunk size")
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    self._chunk_left = size
                    self._chunk_state = "data"
            elif cs == "data":
                take = buf[: self._chunk_left]
                buf = buf[len(take) :]
                self._chunk_left -= len(take)
                events.append(BodyChunk(take))
                if not self._chunk_left:
                    self._chunk_state = "crlf"
            elif cs == "crlf":
                if len(buf) < 2:
                    self._buf = buf
                    return b""
                if buf[:2] != b"\r\n":
                    raise ParseError("bad chunk terminator")
                buf = buf[2:]
                self._chunk_state = "size"
            else:  # trailer fields, ignored, up to the empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > self.max_field:
                        raise ParseError("trailer too long", 431)
                    self._buf = buf
                    return b""
                line = buf[:end]
                buf = buf[end + 2 :]
                if not line:
                    self._state = "head"
                    events.append(END)
                    return buf
                if b":" not in line or line[:1] in (b" ", b"\t"):
                    raise ParseError("bad trailer")
        return b""


class ParserPool:
    """Request parsers for connections between requests: an idle keep-alive connection
    holds none (a parser is 120 bytes of each idle connection's 1.7 KiB, measured), it
    takes one when bytes come and gives it back when it is idle again."""

    __slots__ = ("max_field", "max_headers", "proxy", "spare")

    #: Spare parsers kept: enough for the connections busy at once; the rest are freed.
    KEEP = 256

    def __init__(self, max_headers: int = 100, max_field: int = 8190, *, proxy: bool = False) -> None:
        self.max_headers = max_headers
        self.max_field = max_field
        self.proxy = proxy
        self.spare: list[RequestParser] = []

    def take(self) -> RequestParser:
        """A parser in its initial state."""
        spare = self.spare
        if spare:
            return spare.pop()
        return RequestParser(max_headers=self.max_headers, max_field=self.max_field, proxy=self.proxy)

    def give(self, parser: RequestParser) -> bool:
        """Keep ``parser`` for another connection if it is back in its initial state (between
        requests, nothing buffered, no error, nothing held for a tunnel); False if not."""
        # parser.idle, inlined: this runs once per answered request.
        if parser._state != "head" or parser._buf or parser.error is not None or parser.rest:
            return False
        spare = self.spare
        if len(spare) < self.KEEP:
            spare.append(parser)
        return True
