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

import re
from collections.abc import Awaitable
from functools import lru_cache

from multidict import CIMultiDict, CIMultiDictProxy, istr

from edge.core.config import Config
from edge.core.fields import FORWARDING, HOP_BY_HOP, PROTECTED, TrustedProxies, connection_tokens
from edge.core.pipeline import EdgeContext, Exchange, Handler, NowHandler, Reply
from edge.http.http1 import CONNECTION, HOST

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_XFF = istr("X-Forwarded-For")
_XFP = istr("X-Forwarded-Proto")
_XFH = istr("X-Forwarded-Host")
_FORWARDED = istr("Forwarded")


def forwarded_value(value: str, *, quote: bool = False) -> str:
    """A Forwarded parameter value: the token itself, or a quoted-string (RFC 7239 4, RFC 9110 5.6.4)."""
    if not quote and _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@lru_cache(maxsize=4096)
def _forwarded_node(address: str) -> str:
    """The for= node of an address (RFC 7239 6): IPv6 in brackets, quoted; "unknown" if none."""
    if not address:
        return "unknown"
    return forwarded_value(f"[{address}]" if ":" in address else address)


@lru_cache(maxsize=4096)
def _host_param(host: str) -> str:
    """``;host=`` of a Forwarded element: per validated host, made once (the hosts a route
    table answers are few; the cache is bounded whatever clients send)."""
    return f";host={forwarded_value(host, quote=True)}"


@lru_cache(maxsize=4096)
def _forwarded(peer: str, scheme: str, host: str) -> str:
    """The edge's own Forwarded element for an untrusted peer (``for=``, ``proto=``, and
    ``host=`` when there is one), made once per peer, scheme and host (bounded)."""
    fwd = f"for={_forwarded_node(peer)};proto={scheme}"
    return fwd + _host_param(host) if host else fwd


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
        # What an untrusted peer's request loses: made once, not a set union per request.
        self._untrusted_drop = HOP_BY_HOP | FORWARDING
        # With no trusted proxies, now() only calls the next handler (ex.client_ip is the
        # peer already): the synchronous chain leaves this feature out (pipeline.chain_now).
        self.now_passes_through = not self.trusted.networks

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
        peer = ex.request.remote
        trusted = self.trusted.is_trusted(peer)
        if CONNECTION in incoming:
            drop = self._honoured(ex, incoming)
            if not trusted:
                drop = drop | FORWARDING
        else:
            drop = HOP_BY_HOP if trusted else self._untrusted_drop
        out: CIMultiDict[str] = CIMultiDict()
        underscores = self.underscores
        for name, value in incoming.items():
            if name.lower() not in drop and (underscores or "_" not in name):
                out.add(name, value)
        # The host the cache key and the routes saw, validated and normalised (edge/routing.py).
        host = ex.host
        if host:
            out[HOST] = host
        else:
            out.popall(HOST, None)
        if not trusted:
            # Set on every proxied request: istr names, folded once (edge/http/http1.py). The
            # client's own values were all dropped above (FORWARDING): added, not replaced.
            # The Forwarded element is made once per peer, scheme and host. (One CIMultiDict
            # made from a list and one extend, in place of the adds, cost 2.4k instructions
            # more per request, callgrind: multidict's bulk path is the slower one here.)
            scheme = ex.scheme
            out.add(_XFF, peer)
            out.add(_XFP, scheme)
            if host:
                out.add(_XFH, host)
            out.add(_FORWARDED, _forwarded(peer, scheme, host))
            return out
        # A trusted proxy in front: its forwarding fields are kept and extended.
        fwd = f"for={_forwarded_node(peer)};proto={ex.scheme}"
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
            out["Forwarded"] = fwd + _host_param(host) if host else fwd
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

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[Reply]:
        # Nothing to do on the way back: the next handler's awaitable is handed back as it
        # is, with no coroutine of this feature's own around it.
        if ex.route.kind == "pool":
            ex.upstream_headers = self.upstream_headers(ex)
        return call_next(ex)


def feature(config: Config, ctx: EdgeContext) -> HeaderHygiene:
    """Factory for the pipeline."""
    return HeaderHygiene(config)
