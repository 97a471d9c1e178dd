"""The forward proxy's chain: the same Feature interface as the reverse side, its own order.

ORDER MATTERS. It is fixed here and nowhere else (``FORWARD_ORDER``):

* ``dos`` before anything: the reverse side's DoS detector, the same instance,
  so a client's requests through both listeners count together, and a flood of
  bad credentials or refused destinations is limited and banned like any other.
* ``auth`` next: a client without valid credentials learns nothing, not even
  which destinations the policy allows (407 before 403).
* ``destination`` next: ports, names and literal addresses are checked before
  anything is resolved or cached; a refused request costs no DNS lookup.
* ``headers`` then: what the origin gets (hop-by-hop and proxy credentials
  dropped, the client's address withheld unless ``reveal_client``), and Via
  on the way back, on cache hits too.
* ``cache`` last, just before the terminal: the edge's RFC 9111 cache
  (edge/cache/), in an instance of its own so forward entries never mix with
  the reverse side's (a forward client must not be able to plant a response
  for a site this edge serves). Only plain-HTTP GET/HEAD are looked up;
  CONNECT passes straight through. It follows the cluster's purge events
  (``carousel purge``) with a watch of its own, as the reverse cache does.

The terminal is ``OriginFetch`` (edge/front/forward/origin.py) for absolute-form
requests and ``TunnelOpen`` (edge/front/forward/tunnel.py) for CONNECT.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from multidict import CIMultiDict

from edge.core.fields import FORWARDING, HOP_BY_HOP, connection_tokens
from edge.core.pipeline import BytesBody, Exchange, Feature, Handler, Reply
from edge.front.forward.auth import ProxyAuthenticator
from edge.front.forward.pages import auth_required, denied, too_many_failures
from edge.front.forward.policy import DestinationPolicy

if TYPE_CHECKING:
    from edge.core.config import Config

log = structlog.get_logger("carousel.edge.forward")

FORWARD_ORDER: tuple[str, ...] = ("dos", "auth", "destination", "headers", "cache")

# Never forwarded: hop-by-hop fields (Proxy-Authorization and Proxy-Connection among
# them) and, unless reveal_client, anything that may carry a client address.
_CLIENT_ADDRESS_FIELDS = FORWARDING | {
    "via",
    "client-ip",
    "true-client-ip",
    "x-client-ip",
    "x-originating-ip",
}
_MAX_FORWARDS_METHODS = frozenset({"OPTIONS", "TRACE"})
# Left out of a TRACE the proxy answers itself.
_SECRET_FIELDS = frozenset({"authorization", "proxy-authorization", "cookie"})


class ProxyAuth:
    """The `auth` step: 407 unless Proxy-Authorization names a configured user."""

    def __init__(self, authenticator: ProxyAuthenticator) -> None:
        self.authenticator = authenticator

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        client = ex.request.remote
        wait = self.authenticator.retry_after(client)
        if wait:
            ex.notes["forward"].refused = "auth"
            return too_many_failures(wait)
        user = await self.authenticator.user(ex.request.headers.get("Proxy-Authorization"), client)
        if user is None:
            ex.notes["forward"].refused = "auth"
            return auth_required(self.authenticator.challenge)
        ex.notes["forward"].user = user
        return await call_next(ex)


class DestinationCheck:
    """The `destination` step: 403 for a port, name or literal address the policy refuses."""

    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        target = ex.notes["forward"]
        reason = self.policy.check(target.host, target.port, target.tunnel)
        if reason is not None:
            target.refused = reason
            return denied(reason, target.authority)
        return await call_next(ex)


class ForwardHeaders:
    """The `headers` step: what the origin sees of the client, and Via both ways."""

    def __init__(self, config: Config) -> None:
        f = config.forward
        self.reveal = f.reveal_client
        self.via = f"1.1 {f.via}" if f.via else ""
        self.drop = HOP_BY_HOP if self.reveal else HOP_BY_HOP | _CLIENT_ADDRESS_FIELDS

    def origin_headers(self, ex: Exchange) -> CIMultiDict[str]:
        """The request fields for the origin."""
        incoming = ex.request.headers
        drop = self.drop
        if "Connection" in incoming:
            # Named by the client as hop-by-hop; dropped before the proxy adds its own.
            drop = drop | connection_tokens(incoming)
        out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)
        if self.reveal:
            peer = ex.client_ip
            node = f'"[{peer}]"' if ":" in peer else peer
            previous = incoming.getall("X-Forwarded-For", [])
            out["X-Forwarded-For"] = ", ".join([*previous, peer])
            out.add("Forwarded", f"for={node}")
        if self.via:
            previous_via = incoming.getall("Via", []) if self.reveal else []
            out["Via"] = ", ".join([*previous_via, self.via])
        return out

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        if not ex.notes["forward"].tunnel:
            headers = self.origin_headers(ex)
            if ex.request.method in _MAX_FORWARDS_METHODS and "Max-Forwards" in headers:
                hops = headers["Max-Forwards"].strip()
                if hops == "0":
                    return self.answer_here(ex)  # RFC 9110 7.6.2: the proxy is the final recipient
                if hops.isdigit() and hops.isascii():
                    headers["Max-Forwards"] = str(int(hops) - 1)
            ex.upstream_headers = headers
        reply = await call_next(ex)
        if self.via and reply.tunnel is None and (ex.member or ex.cache_status):
            # On what came from an origin or the cache; the proxy's own pages are not forwarded.
            reply.headers.add("Via", self.via)
        return reply

    def answer_here(self, ex: Exchange) -> Reply:
        """OPTIONS or TRACE with Max-Forwards: 0, answered by the proxy itself."""
        request = ex.request
        if request.method == "OPTIONS":
            return Reply(
                200, CIMultiDict({"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT"})
            )
        # TRACE: the request as received, minus fields that may carry secrets (RFC 9110 9.3.8).
        lines = [f"TRACE {request.raw_path} {request.version}"]
        lines += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in _SECRET_FIELDS]
        body = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        return Reply(200, CIMultiDict({"Content-Type": "message/http"}), BytesBody(body))


def _cache_feature(config: Config) -> Feature | None:
    """The edge's RFC 9111 cache in an instance of its own (None when off or not installed)."""
    if not config.forward.cache or not getattr(getattr(config, "cache", None), "enabled", False):
        return None
    try:
        from edge.features.cache import CacheFeature
    except ImportError:  # the cache package is not part of this build
        log.warning("forward cache asked for, but edge.cache is not available")
        return None
    # Memory tier only: the disk tier's directory belongs to the reverse side's cache.
    # Cluster purges (etcd events) reach this instance too, through a watch of its own.
    own = dataclasses.replace(config.cache, disk_dir="")
    cache: Feature = CacheFeature(dataclasses.replace(config, cache=own), _NoMetrics(config))
    return cache


class _NoMetrics:
    """A factory context without `metrics`: the forward collector exports the forward cache's figures."""

    def __init__(self, config: Config) -> None:
        self.config = config


class ChainOwner(Protocol):
    """What the chain is built from: the forward proxy's config and destination policy."""

    @property
    def config(self) -> Config: ...

    @property
    def policy(self) -> DestinationPolicy: ...

    @property
    def dos(self) -> Feature | None: ...


def build_chain(proxy: ChainOwner) -> dict[str, Any]:
    """The enabled forward features by name, in FORWARD_ORDER (dicts keep insertion order)."""
    config = proxy.config
    steps: dict[str, Any] = {
        "dos": proxy.dos,
        "auth": ProxyAuth(ProxyAuthenticator(config.forward.users, config.forward.realm))
        if config.forward.users
        else None,
        "destination": DestinationCheck(proxy.policy),
        "headers": ForwardHeaders(config),
        "cache": _cache_feature(config),
    }
    return {name: steps[name] for name in FORWARD_ORDER if steps[name] is not None}
