"""Reaching origins: resolve, refuse denied addresses, connect; the plain-HTTP terminal handler.

``connect_origin`` resolves the name (the `[forward] hosts` map first, then the
event loop's getaddrinfo), refuses the lot if any address falls in
``deny_networks`` (a name must not smuggle the proxy onto loopback), then tries
the addresses in order, everything within ``connect_timeout``. The address
connected to is the one that was checked: nothing is resolved twice.

``OriginFetch`` forwards one absolute-form request the way the reverse side
forwards to a member (edge/proxy.py): the request was read whole, it goes out
with Content-Length on a fresh connection that is closed after the response,
and the response is read whole (memory, then a temp file) before the client
sees a byte, so a slow client never holds an origin connection. There is one
origin, so nothing is retried.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from multidict import CIMultiDict

from edge.core.fields import FRAMING, HOP_BY_HOP, connection_tokens
from edge.core.pipeline import Exchange, Reply
from edge.core.spool import SpoolBuffer
from edge.front.forward.pages import page
from edge.front.forward.policy import NetworkList
from edge.upstream.client import ReadTimeout, UpstreamConnection, UpstreamProtocolError, serialize_request
from edge.upstream.proxy import HeadBody

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.front.forward.metrics import ForwardMetrics

P = TypeVar("P", bound=asyncio.Protocol)

# Request headers the proxy settles itself.
_NOT_FORWARDED = ("Expect", "Content-Length", "Host")


class OriginFailure(Exception):
    """The origin could not be reached; ``status`` and ``reason`` go on the error page."""

    def __init__(self, status: int, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind  # for metrics: "dns", "network", "connect", "timeout"


async def resolve(host: str, port: int, hosts: dict[str, str]) -> list[str]:
    """The addresses of ``host``: a literal, the static map, or getaddrinfo (in its order)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]
    mapped = hosts.get(host)
    if mapped is not None:
        return [mapped]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise OriginFailure(502, "The destination name does not resolve", "dns") from exc
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OriginFailure(502, "The destination name does not resolve", "dns")
    return addresses


async def connect_origin(
    factory: Callable[[], P],
    host: str,
    port: int,
    *,
    hosts: dict[str, str],
    networks: NetworkList,
    timeout: float,  # noqa: ASYNC109  # one budget for DNS and connect, as the config states it
) -> tuple[asyncio.Transport, P, str]:
    """(transport, protocol, address) of a new connection to the origin; OriginFailure otherwise."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolve(host, port, hosts)
            if any(networks.denied(a) for a in addresses):
                raise OriginFailure(403, "The destination address is not allowed", "network")
            last: OSError | None = None
            for address in addresses:
                try:
                    transport, protocol = await loop.create_connection(factory, address, port)
                except OSError as exc:
                    last = exc
                    continue
                return transport, protocol, address
    except TimeoutError:
        raise OriginFailure(504, "The destination did not answer in time", "timeout") from None
    detail = last.strerror if last is not None and last.strerror else "connection failed"
    raise OriginFailure(502, f"The destination refused the connection ({detail.lower()})", "connect")


def clean_origin_headers(headers: CIMultiDict[str]) -> None:
    """Drop the origin's hop-by-hop fields (and those its Connection names) and its framing."""
    hidden = HOP_BY_HOP | FRAMING
    if "Connection" in headers:
        hidden = hidden | connection_tokens(headers)
    for name in [k for k in headers if k.lower() in hidden]:
        headers.popall(name, None)


class OriginFetch:
    """Terminal handler for absolute-form requests: one origin exchange, buffered both ways."""

    def __init__(self, config: Config, networks: NetworkList, metrics: ForwardMetrics) -> None:
        f = config.forward
        self.hosts = f.hosts
        self.networks = networks
        self.connect_timeout = f.connect_timeout
        self.read_timeout = f.read_timeout
        self.memory_limit = config.edge.response_memory_limit
        self.temp_dir = config.edge.temp_dir
        self.max_response = config.edge.max_response_size
        self.metrics = metrics

    async def __call__(self, ex: Exchange) -> Reply:
        target = ex.notes["forward"]
        request = ex.request
        method = request.method
        headers = ex.upstream_headers
        assert headers is not None  # set by the forward headers step
        for name in _NOT_FORWARDED:
            headers.popall(name, None)
        # The Host the client named (absolute-form authority), first, as RFC 9112 3.2 asks.
        out: CIMultiDict[str] = CIMultiDict(Host=target.authority)
        out.extend(headers)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        conn: UpstreamConnection | None = None
        spool: SpoolBuffer | None = None
        try:
            _, conn, address = await connect_origin(
                lambda: UpstreamConnection(loop),
                target.host,
                target.port,
                hosts=self.hosts,
                networks=self.networks,
                timeout=self.connect_timeout,
            )
            ex.member = address
            head_request = method == "HEAD"
            if not head_request:
                spool = SpoolBuffer(self.memory_limit, self.temp_dir, self.max_response)
                conn.sink = spool.add
            conn.start(
                serialize_request(method, request.raw_path, out, request.body, True),
                head_request,
                self.read_timeout,
            )
            assert conn.done is not None and conn.parser is not None
            await conn.done
            parser = conn.parser
            if parser.status < 200:
                raise UpstreamProtocolError("an informational response nobody asked for")
            body = HeadBody(_content_length(parser.headers)) if spool is None else spool.body()
            spool = None
        except OriginFailure as failure:
            self.metrics.origin_failure(failure.kind)
            return page(failure.status, failure.reason, target.authority)
        except ReadTimeout:
            self.metrics.origin_failure("timeout")
            return page(504, "The destination did not answer in time", target.authority)
        except (UpstreamProtocolError, OSError):
            self.metrics.origin_failure("protocol")
            return page(502, "The destination sent a broken response", target.authority)
        finally:
            if conn is not None:
                if conn.reusable() and conn.transport is not None:
                    conn.transport.close()  # a clean end: we asked for Connection: close anyway
                else:
                    conn.abort()
            if spool is not None:
                spool.discard()
        elapsed = time.monotonic() - started
        ex.upstream_seconds += elapsed
        self.metrics.observe_origin(elapsed)
        clean_origin_headers(parser.headers)
        return Reply(parser.status, parser.headers, body, parser.reason or None)


def _content_length(headers: CIMultiDict[str]) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None
