"""Header hygiene, both ways: hop-by-hop stripping, forwarding headers, hidden backend identity.

Request side: the client's hop-by-hop headers and every header its
``Connection`` names are dropped *before* the edge adds its own, so a client
can never remove X-Forwarded-For & co by naming them in Connection. An
incoming X-Forwarded-For / Forwarded / X-Forwarded-* is extended only when the
peer is a trusted proxy; from anyone else it is replaced.

Response side (``ResponseCleaner``): the member's hop-by-hop headers (and
those its Connection names), its framing headers (the edge re-frames every
response), Server, X-Powered-By and the configured ``hide_headers`` are
removed where a member's response enters the edge (edge/proxy.py), before any
feature sees it: the cache stores it clean, and a hit has nothing to clean.
"""

from __future__ import annotations

from multidict import CIMultiDict

from edge.core.config import Config
from edge.core.fields import FORWARDING, HOP_BY_HOP, TrustedProxies, connection_tokens
from edge.core.pipeline import EdgeContext, Exchange, Handler, NowHandler, Reply


def _forwarded_node(address: str) -> str:
    return f'"[{address}]"' if ":" in address else address


class HeaderHygiene:
    """The `headers` feature (always on): the request side."""

    def __init__(self, config: Config) -> None:
        self.trusted = TrustedProxies(config.edge.trusted_proxies)
        # CGI, WSGI and PHP map "X_Forwarded_For" and "X-Forwarded-For" to one variable:
        # a client could set what the edge sets. Dropped unless allowed (as nginx does).
        self.underscores = config.edge.underscores_in_headers

    def upstream_headers(self, ex: Exchange) -> CIMultiDict[str]:
        """The request headers to send upstream; sets ``ex.client_ip``."""
        incoming = ex.request.headers
        drop = HOP_BY_HOP
        if "Connection" in incoming:
            drop = drop | connection_tokens(incoming)
        peer = ex.request.remote
        trusted = self.trusted.is_trusted(peer)
        if not trusted:
            drop = drop | FORWARDING
        out: CIMultiDict[str] = CIMultiDict()
        underscores = self.underscores
        for name, value in incoming.items():
            if name.lower() not in drop and (underscores or "_" not in name):
                out.add(name, value)
        host = incoming.get("Host", "")
        if trusted:
            previous = incoming.getall("X-Forwarded-For", [])
            self._set_client(ex)
            chain = ", ".join([*previous, peer]) if previous else peer
            out["X-Forwarded-For"] = chain
            out.setdefault("X-Forwarded-Proto", ex.scheme)
            out.setdefault("X-Forwarded-Host", host)
            fwd = f"for={_forwarded_node(peer)};proto={ex.scheme}"
            if "Forwarded" in out:
                out["Forwarded"] = ", ".join([*incoming.getall("Forwarded"), fwd])
            else:
                out["Forwarded"] = fwd + (f';host="{host}"' if host else "")
        else:
            out["X-Forwarded-For"] = peer
            out["X-Forwarded-Proto"] = ex.scheme
            if host:
                out["X-Forwarded-Host"] = host
            out["Forwarded"] = f"for={_forwarded_node(peer)};proto={ex.scheme}" + (
                f';host="{host}"' if host else ""
            )
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
