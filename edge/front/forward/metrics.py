"""Prometheus figures of the forward proxy, in the edge's registry (edge/metrics.py's pattern).

Per request only plain dict updates happen; they become counters when /metrics
is scraped. Open tunnels and the forward cache's outcomes are read at scrape
time from where they already live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.core.metrics import LATENCY_BUCKETS


class ForwardMetrics:
    """Counts kept by the forward listener; ``count_request`` is what ClientConnection calls."""

    def __init__(self, registry: CollectorRegistry, open_tunnels: Callable[[], int]) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.refused: dict[str, int] = {}
        self.origin_failures: dict[str, int] = {}
        self.tunnels_opened = 0
        self.tunnel_bytes = {"up": 0, "down": 0}
        self.tunnel_idle_closes = 0
        self.cache_counts: Callable[[], dict[str, int]] | None = None
        self._open_tunnels = open_tunnels
        self._origin = Histogram(
            "carousel_edge_forward_origin_seconds",
            "Time to connect to an origin and read its whole response (plain HTTP)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        registry.register(_ForwardCollector(self))

    def count_request(self, kind: str, status: int) -> None:
        """One answered request; ``kind`` is "http", "connect" or "-" (unparsable)."""
        key = (kind, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_refused(self, reason: str) -> None:
        """One request refused by the chain: auth, port, denied, not-allowed, network."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def origin_failure(self, kind: str) -> None:
        """One origin that could not be used: dns, network, connect, timeout, protocol."""
        self.origin_failures[kind] = self.origin_failures.get(kind, 0) + 1

    def observe_origin(self, seconds: float) -> None:
        """Latency of one plain-HTTP origin exchange."""
        self._origin.observe(seconds)

    @property
    def open_tunnels(self) -> int:
        return self._open_tunnels()


class _ForwardCollector(Collector):
    def __init__(self, metrics: ForwardMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m = self.m
        requests = CounterMetricFamily(
            "carousel_edge_forward_requests",
            "Forward-proxy requests answered, by kind (http, connect) and status",
            labels=["kind", "status"],
        )
        for (kind, status), count in list(m.requests.items()):
            requests.add_metric([kind, str(status)], count)
        yield requests
        refused = CounterMetricFamily(
            "carousel_edge_forward_refused",
            "Forward-proxy requests refused, by reason (auth, port, denied, not-allowed, network)",
            labels=["reason"],
        )
        for reason, count in list(m.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        failures = CounterMetricFamily(
            "carousel_edge_forward_origin_failures",
            "Origins that could not be used, by kind (dns, network, connect, timeout, protocol)",
            labels=["kind"],
        )
        for kind, count in list(m.origin_failures.items()):
            failures.add_metric([kind], count)
        yield failures
        yield GaugeMetricFamily(
            "carousel_edge_forward_tunnels_open", "CONNECT tunnels open now", value=m.open_tunnels
        )
        yield CounterMetricFamily(
            "carousel_edge_forward_tunnels", "CONNECT tunnels opened", value=m.tunnels_opened
        )
        yield CounterMetricFamily(
            "carousel_edge_forward_tunnel_idle_closes",
            "Tunnels closed after tunnel_idle_timeout without a byte",
            value=m.tunnel_idle_closes,
        )
        tunnel_bytes = CounterMetricFamily(
            "carousel_edge_forward_tunnel_bytes",
            "Bytes carried by closed tunnels, up (client to origin) and down",
            labels=["direction"],
        )
        for direction, count in m.tunnel_bytes.items():
            tunnel_bytes.add_metric([direction], count)
        yield tunnel_bytes
        if m.cache_counts is not None:
            outcomes = CounterMetricFamily(
                "carousel_edge_forward_cache_outcomes",
                "Forward cache lookups and what became of them (HIT, MISS, STORED, ...)",
                labels=["outcome"],
            )
            for outcome, count in list(m.cache_counts().items()):
                outcomes.add_metric([outcome], count)
            yield outcomes
