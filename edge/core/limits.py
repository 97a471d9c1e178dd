"""Connection admission (caps per client address and in total, bans) and the edge's limits table.

Every hard limit of the edge, where it is enforced and what the client gets,
in one place so none is enforced twice or forgotten:

=========================================  ===================================  ======================
limit                                      enforced in                          answer
=========================================  ===================================  ======================
request line / header line size            http/http1.parse_head                414 / 431, close
header count, whole head size (64 KiB)     http/http1.RequestParser             431, close
request body size (``max_body_size``)      front/connection.ClientConnection    413, close
body read timeout (``body_timeout``)       front/connection.ClientConnection    408, close
header deadline (``header_timeout``)       front/connection.ClientConnection    close (slowloris)
keep-alive idle (``keepalive_timeout``)    front/connection.ClientConnection    close
TLS handshake (``header_timeout``)         front/tls (ssl_handshake_timeout)    close
connections per address / in total         here: ``ConnectionGuard``            closed at accept
banned addresses (the ``dos`` feature)     here, and features/dos per request   closed at accept / 403
request rate, concurrency per client       features/dos                         429 or delay, ban
upstream response head size and count      upstream/client.ResponseParser       502
=========================================  ===================================  ======================

Passthrough listeners (edge/front/passthrough.py) go through the same guard, so a
client's TLS-passthrough connections count against the same caps.

With ``workers = N`` the guard counts a client's connections in the node's shared
table (edge/core/node.py), so ``max_connections_per_ip`` and the DoS detector's
connection thresholds hold per node; ``max_connections`` (the total) is per
worker, since each worker holds its own sockets and memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.core.node import ClientTable, client_hash

log = structlog.get_logger("carousel.edge.limits")

# Refusals are logged at most this often (with a count), never once per connection.
LOG_EVERY = 10.0


class ConnectionGuard:
    """Counts open client connections per address and in total; refuses what is over a cap."""

    __slots__ = (
        "_logged_at",
        "_unlogged",
        "alarm_at",
        "banned",
        "header_timeouts",
        "max_per_ip",
        "max_total",
        "on_alarm",
        "per_ip",
        "refused",
        "table",
        "total",
    )

    def __init__(self, max_total: int = 0, max_per_ip: int = 0, table: ClientTable | None = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.per_ip: dict[str, int] = {}
        self.total = 0
        # Set by the dos feature: is this peer address banned?
        self.banned: Callable[[str], bool] | None = None
        # Set by the dos feature: called when an address reaches `alarm_at` open connections.
        self.alarm_at = 0
        self.on_alarm: Callable[[str], None] | None = None
        self.refused = {"banned": 0, "total": 0, "per_ip": 0}
        self.header_timeouts = 0
        self._logged_at = 0.0
        self._unlogged = 0
        # workers > 1: open connections per address are counted per node, here.
        self.table = table

    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer``; False means close it at once."""
        banned = self.banned
        if banned is not None and banned(peer):
            return self._refuse("banned", peer)
        if self.max_total and self.total >= self.max_total:
            return self._refuse("total", peer)
        table = self.table
        local = self.per_ip.get(peer, 0) + 1
        n = local if table is None else table.connect(client_hash(peer), 1)
        if self.max_per_ip and n > self.max_per_ip:
            if table is not None:
                table.connect(client_hash(peer), -1)
            return self._refuse("per_ip", peer)
        if self.alarm_at and n >= self.alarm_at and self.on_alarm is not None:
            self.on_alarm(peer)  # may ban the peer, this connection included
            if banned is not None and banned(peer):
                if table is not None:
                    table.connect(client_hash(peer), -1)
                return self._refuse("banned", peer)
        self.per_ip[peer] = local
        self.total += 1
        return True

    def release(self, peer: str) -> None:
        """A connection admitted earlier has closed."""
        if self.table is not None:
            self.table.connect(client_hash(peer), -1)
        n = self.per_ip.get(peer, 0) - 1
        if n > 0:
            self.per_ip[peer] = n
        else:
            self.per_ip.pop(peer, None)
        self.total -= 1

    def connections(self, peer: str) -> int:
        """Open connections from ``peer`` now (on the node, with workers > 1)."""
        if self.table is not None:
            return self.table.connections(client_hash(peer))
        return self.per_ip.get(peer, 0)

    def _refuse(self, reason: str, peer: str) -> bool:
        self.refused[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            log.warning(
                "connections refused",
                reason=reason,
                client=peer,
                refused_since_last_log=self._unlogged + 1,
                open_total=self.total,
            )
            self._logged_at = now
            self._unlogged = 0
        else:
            self._unlogged += 1
        return False

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Export the counts (read at scrape time, nothing on the accept path)."""
        registry.register(_GuardCollector(self))


class _GuardCollector(Collector):
    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Any]:
        g = self.guard
        refused = CounterMetricFamily(
            "carousel_edge_connections_refused",
            "Client connections closed at accept, by reason (banned, total cap, per-address cap)",
            labels=["reason"],
        )
        for reason, count in g.refused.items():
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "carousel_edge_header_timeouts",
            "Connections closed because a request head was not complete within header_timeout",
            value=g.header_timeouts,
        )
        yield GaugeMetricFamily(
            "carousel_edge_client_addresses", "Client addresses with open connections", value=len(g.per_ip)
        )
