"""Header hygiene, both ways: hop-by-hop stripping, forwarding headers, hidden backend identity.

Request side: the client's hop-by-hop headers and the headers its
``Connection`` names are dropped *before* the edge adds its own, so a client
can never remove X-Forwarded-For & co by naming them in Connection. A sender
must not name a field meant for every recipient (RFC 9110 7.6.1); a client
that does is not obeyed for ``PROTECTED`` fields (Host, the fields the edge or
the member read end to end, the route's cache-key fields and the pool's hash
field), nor for any field at all on a route whose responses may be cached,
since a Vary may name any field and the stored variant must be the one the
member built. An incoming X-Forwarded-For / Forwarded / X-Forwarded-* is
extended only when the peer is a trusted proxy; from anyone else it is
replaced. Host, X-Forwarded-Host and ``Forwarded: host=`` carry the validated,
normalised host the cache key uses (edge/routing.py ``parse_host``), never the
client's raw value; ``Forwarded`` is built per RFC 7239 4 (quoted-string where
a value is not a token). X-Forwarded-For hops are parsed as IP addresses
(``TrustedProxies.client_of``): a hop that is not one never becomes a client.

Response side (``ResponseCleaner``): the member's hop-by-hop headers (and
those its Connection names), its framing headers (the edge re-frames every
response), Server, X-Powered-By and the configured ``hide_headers`` are
removed where a member's response enters the edge (edge/proxy.py), before any
feature sees it: the cache stores it clean, and a hit has nothing to clean.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from multidict import CIMultiDict, CIMultiDictProxy

from edge.config import Config
from edge.pipeline import EdgeContext, Exchange, Handler, NowHandler, Reply

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
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
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


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def forwarded_value(value: str, *, quote: bool = False) -> str:
    """A Forwarded parameter value: the token itself, or a quoted-string (RFC 7239 4, RFC 9110 5.6.4)."""
    if not quote and _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _forwarded_node(address: str) -> str:
    """The for= node of an address (RFC 7239 6): IPv6 in brackets, quoted; "unknown" if none."""
    if not address:
        return "unknown"
    return forwarded_value(f"[{address}]" if ":" in address else address)


class ResponseCleaner:
    """Removes from a member's response what must not reach the client."""

    def __init__(self, config: Config) -> None:
        self.hidden = (
            HOP_BY_HOP | FRAMING | BACKEND_IDENTITY | frozenset(h.lower() for h in config.edge.hide_headers)
        )

    def __call__(self, headers: CIMultiDict[str]) -> None:
        hidden = self.hidden
        if "Connection" in headers:
            hidden = hidden | connection_tokens(headers)
        for name in [k for k in headers if k.lower() in hidden]:
            headers.popall(name, None)

    def fields(self, pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...] | None:
        """The same for stored pairs: the pairs to keep, or None when nothing goes."""
        hidden = self.hidden
        if any(k.lower() == "connection" for k, _ in pairs):
            hidden = hidden | connection_tokens(CIMultiDict(pairs))
        kept = tuple((k, v) for k, v in pairs if k.lower() not in hidden)
        return None if len(kept) == len(pairs) else kept


class HeaderHygiene:
    """The `headers` feature (always on): the request side."""

    def __init__(self, config: Config) -> None:
        self.trusted = TrustedProxies(config.edge.trusted_proxies)
        # CGI, WSGI and PHP map "X_Forwarded_For" and "X-Forwarded-For" to one variable:
        # a client could set what the edge sets. Dropped unless allowed (as nginx does).
        self.underscores = config.edge.underscores_in_headers
        # What the edge itself reads end to end: the cache key's and the hash's fields too.
        extra = {h.lower() for r in config.route for h in r.cache_key_headers}
        extra |= {p.hash_key[7:].lower() for p in config.pool.values() if p.hash_key.startswith("header:")}
        self.protected = PROTECTED | frozenset(extra)
        self.cache_on = config.cache.enabled

    def _honoured(self, ex: Exchange, incoming: CIMultiDictProxy[str]) -> frozenset[str]:
        """HOP_BY_HOP plus the Connection options this request may have removed."""
        tokens = connection_tokens(incoming) - self.protected
        if not tokens:
            return HOP_BY_HOP
        if self.cache_on:
            cfg = ex.route.config
            if cfg.cache if cfg.cache is not None else cfg.buffering:
                return HOP_BY_HOP  # a Vary may name any field: keep what the variant is keyed on
        return HOP_BY_HOP | tokens

    def upstream_headers(self, ex: Exchange) -> CIMultiDict[str]:
        """The request headers to send upstream; sets ``ex.client_ip``."""
        incoming = ex.request.headers
        drop = self._honoured(ex, incoming) if "Connection" in incoming else HOP_BY_HOP
        peer = ex.request.remote
        trusted = self.trusted.is_trusted(peer)
        if not trusted:
            drop = drop | FORWARDING
        out: CIMultiDict[str] = CIMultiDict()
        underscores = self.underscores
        for name, value in incoming.items():
            if name.lower() not in drop and (underscores or "_" not in name):
                out.add(name, value)
        # The host the cache key and the routes saw, validated and normalised (edge/routing.py).
        host = ex.host
        if host:
            out["Host"] = host
        else:
            out.popall("Host", None)
        fwd = f"for={_forwarded_node(peer)};proto={ex.scheme}"
        if trusted:
            previous = incoming.getall("X-Forwarded-For", [])
            self._set_client(ex)
            chain = ", ".join([*previous, peer]) if previous else peer
            out["X-Forwarded-For"] = chain
            out.setdefault("X-Forwarded-Proto", ex.scheme)
            if host:
                out.setdefault("X-Forwarded-Host", host)
            if "Forwarded" in out:
                out["Forwarded"] = ", ".join([*incoming.getall("Forwarded"), fwd])
            else:
                out["Forwarded"] = fwd + (f";host={forwarded_value(host, quote=True)}" if host else "")
        else:
            out["X-Forwarded-For"] = peer
            out["X-Forwarded-Proto"] = ex.scheme
            if host:
                out["X-Forwarded-Host"] = host
            out["Forwarded"] = fwd + (f";host={forwarded_value(host, quote=True)}" if host else "")
        return out

    def now(self, ex: Exchange, call_next: NowHandler) -> Reply | None:
        """Only a cache hit answers a pool route at once: it needs the client address, not the
        upstream headers (built by __call__ when the request does go upstream)."""
        if ex.route.kind == "pool":
            self._set_client(ex)
        return call_next(ex)

    def _set_client(self, ex: Exchange) -> None:
        """ex.client_ip: the peer, or the client a trusted proxy in front speaks for."""
        peer = ex.request.remote
        if self.trusted.networks and self.trusted.is_trusted(peer):
            ex.client_ip = self.trusted.client_of(peer, ex.request.headers.getall("X-Forwarded-For", []))

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        if ex.route.kind == "pool":
            ex.upstream_headers = self.upstream_headers(ex)
        return await call_next(ex)


def feature(config: Config, ctx: EdgeContext) -> HeaderHygiene:
    """Factory for the pipeline."""
    return HeaderHygiene(config)
