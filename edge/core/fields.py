"""HTTP field rules that more than one part of the edge applies.

Which fields are hop-by-hop, framing, forwarding or backend identity (RFC 9110
7.6.1), the names a Connection field lists, which peers may speak for the
client, the cleaning every member response gets as it enters the edge, and two
request fields read by several features: Range (RFC 9110 14.2; static files
and cache hits) and Accept-Encoding (RFC 9110 12.5.3; the cache's variants and
compression). The features that use them (headers, cache, compression, DoS,
static) and the upstream side import them from here, never from each other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

from edge.core.pipeline import Wire
from edge.http.http1 import CONNECTION

if TYPE_CHECKING:
    from edge.core.config import Config

# RFC 9110 7.6.1, plus the proxy-only headers that are never meant for the next hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Replaced by the edge's own values unless the peer is trusted.
FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"})
# End-to-end request fields (RFC 9110, 9111, 6455) that a Connection option never removes.
PROTECTED = FORWARDING | frozenset(
    {
        "host",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "authorization",
        "cache-control",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "cookie",
        "date",
        "expect",
        "from",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "max-forwards",
        "origin",
        "pragma",
        "range",
        "referer",
        "user-agent",
        "via",
        "sec-websocket-extensions",
        "sec-websocket-key",
        "sec-websocket-protocol",
        "sec-websocket-version",
    }
)
# The edge writes its own framing for every response.
FRAMING = frozenset({"content-length", "transfer-encoding"})
BACKEND_IDENTITY = frozenset({"server", "x-powered-by"})


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection (lower-case)."""
    return _tokens(headers.getall(CONNECTION, ()))


def _tokens(values: Iterable[str]) -> set[str]:
    """The lower-case tokens of comma-separated field values (Connection's)."""
    tokens: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


class TrustedProxies:
    """Which peers may speak for the client in X-Forwarded-For."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self.is_trusted = lru_cache(maxsize=4096)(self._is_trusted)

    def _is_trusted(self, address: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def client_of(self, peer: str, forwarded_for: list[str]) -> str:
        """The client address: the rightmost X-Forwarded-For hop not ours (peer if untrusted).

        Each hop is parsed as an IP address (``1.2.3.4``, ``1.2.3.4:port``, ``2001:db8::1``,
        ``[2001:db8::1]:port``); anything else (a network, a name, junk) is skipped, so
        the client is always one address in canonical form, never a range.
        """
        if not self.is_trusted(peer):
            return peer
        hops = [a for v in forwarded_for for h in v.split(",") if (a := hop_address(h)) is not None]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer


@lru_cache(maxsize=4096)
def hop_address(hop: str) -> str | None:
    """One X-Forwarded-For hop as a canonical IP address string, or None if it is not one."""
    hop = hop.strip()
    if hop.startswith("["):
        end = hop.find("]")
        if end < 0 or (hop[end + 1 :] and not _is_port(hop[end + 2 :], hop[end + 1])):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:
        hop, _, port = hop.partition(":")  # IPv4 with a port, as some proxies write it
        if not _is_port(port, ":"):
            return None
    if not hop or "%" in hop or "/" in hop:
        return None
    try:
        ip = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_port(port: str, colon: str) -> bool:
    return colon == ":" and 0 < len(port) <= 5 and port.isascii() and port.isdigit()


class MemberFields:
    """A member's response fields, cleaned and serialised: ``StoredFields`` for a ``Reply``."""

    __slots__ = ("fields", "wire")

    def __init__(self, fields: tuple[tuple[str, str], ...], wire: Wire) -> None:
        self.fields = fields
        self.wire = wire


class ResponseCleaner:
    """Removes from a member's response what must not reach the client."""

    def __init__(self, config: Config) -> None:
        self.hidden = (
            HOP_BY_HOP | FRAMING | BACKEND_IDENTITY | frozenset(h.lower() for h in config.edge.hide_headers)
        )

    def __call__(self, headers: CIMultiDict[str]) -> None:
        hidden = self.hidden
        if CONNECTION in headers:
            tokens = connection_tokens(headers)
            if not tokens <= hidden:
                hidden = hidden | tokens
        for name in [k for k in headers if k.lower() in hidden]:
            headers.popall(name, None)

    def member_fields(self, pairs: list[tuple[str, str]], names: list[str]) -> MemberFields | None:
        """What ``__call__`` leaves of a member's fields (``pairs``, their lower-case ``names``),
        serialised once; None when a Location or Content-Location is among them (the proxy
        rewrites those on the fields as a CIMultiDict).

        A proxied response that no feature looks into goes out as these bytes (a cache hit's
        way, edge/core/pipeline.py ``Reply``): no CIMultiDict built, cleaned and written again.
        """
        return _member_fields(pairs, names, self.hidden)

    def fields(self, pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...] | None:
        """The same for stored pairs: the pairs to keep, or None when nothing goes."""
        hidden = self.hidden
        if any(k.lower() == "connection" for k, _ in pairs):
            hidden = hidden | _tokens(v for k, v in pairs if k.lower() == "connection")
        kept = tuple((k, v) for k, v in pairs if k.lower() not in hidden)
        return None if len(kept) == len(pairs) else kept


# What _member_fields notes of a kept name: a Location (the proxy rewrites it), a Date, a Server.
_LOCATION = 1
_DATE = 2
_SERVER = 3
_NOTED: dict[str, int] = {
    "location": _LOCATION,
    "content-location": _LOCATION,
    "date": _DATE,
    "server": _SERVER,
}
_object_new = object.__new__
# tuple.__new__ itself: a Wire made in C (Wire(...) runs the NamedTuple's Python __new__).
_tuple_new: Callable[[type[Wire], tuple[bytes, bool, bool]], Wire] = tuple.__new__

# A member's Connection values -> their tokens (bounded: the values are the member's choice).
_CONNECTION_TOKENS: dict[str, frozenset[str]] = {}
_MAX_CONNECTION_VALUES = 64


def _member_fields(
    pairs: list[tuple[str, str]], names: list[str], hidden: frozenset[str]
) -> MemberFields | None:
    """``ResponseCleaner.member_fields``' loop, at module level so that edge/core/fields.pxd
    can type it for the compiled build (list indexing and the set test as C-API calls)."""
    if "connection" in names:
        for i in range(len(names)):
            if names[i] == "connection":
                # Its tokens, remembered per value: members send the same one or two values
                # ("keep-alive", "close") on every response (a generator and a set made per
                # response cost 6k instructions, callgrind).
                value = pairs[i][1]
                tokens = _CONNECTION_TOKENS.get(value)
                if tokens is None:
                    tokens = frozenset(_tokens((value,)))
                    if len(_CONNECTION_TOKENS) < _MAX_CONNECTION_VALUES:
                        _CONNECTION_TOKENS[value] = tokens
                if not tokens <= hidden:  # "keep-alive" or "close": nothing new
                    hidden = hidden | tokens
    kept: list[tuple[str, str]] = []
    lines: list[str] = []
    date = server = False
    noted = _NOTED
    for i in range(len(names)):
        name = names[i]
        if name in hidden:
            continue
        # One lookup for the four names that matter here (four comparisons per field were
        # 2.6k instructions of a proxied response, callgrind).
        note = noted.get(name, 0)
        if note:
            if note == _LOCATION:
                return None
            if note == _DATE:
                date = True
            else:
                server = True
        pair = pairs[i]
        kept.append(pair)
        lines.append(": ".join(pair))  # one C call; "+" and f-strings were three (callgrind)
    # The member's head was read as latin-1 and checked for CR, LF and NUL: every value
    # encodes back to the bytes it came as. The last "" gives the last line its CRLF.
    if lines:
        lines.append("")
    data = "\r\n".join(lines).encode("latin-1")
    # Both objects made without a Python-level call: Wire's NamedTuple __new__ and
    # MemberFields' __init__ were two of a proxied response's costlier calls (~1.3k each).
    fields = _object_new(MemberFields)
    fields.fields = tuple(kept)
    fields.wire = _tuple_new(Wire, (data, date, server))
    return fields


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """One byte range as (start, end inclusive); None = ignore the header; False = 416."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multiple ranges: answer with the whole file
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return False
            return (max(0, size - n), size - 1) if size else False
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0:
        return None
    if start >= size:
        return False
    if end < start:
        return None
    return start, min(end, size - 1)


# Content codings a client may accept; the set, not its q-value order, selects a variant.
_CODINGS = frozenset({"br", "gzip", "x-gzip", "deflate", "compress", "zstd", "*"})


@lru_cache(maxsize=1024)  # a handful of distinct values in practice; bounded, as clients choose them
def accepted_codings(value: str) -> str:
    """Accept-Encoding reduced to the sorted codings it accepts (q > 0): "br,gzip"."""
    accepted = set()
    for item in value.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if name not in _CODINGS:
            continue
        q = 1.0
        for param in params.split(";"):
            k, _, v = param.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0:
            accepted.add("gzip" if name == "x-gzip" else name)
    return ",".join(sorted(accepted))
