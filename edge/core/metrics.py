"""Prometheus metrics and the structured access log.

Counters touched per request use pre-resolved label children (a dict lookup,
no label parsing). State that already lives in the pools (queue depth, member
state, active connections) and the plain request counts are read only when
/metrics is scraped, by a custom collector, so the hot path pays almost
nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

access_log = structlog.get_logger("carousel.edge.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        state = self.read()
        conns = GaugeMetricFamily("carousel_edge_active_connections", "Open client connections")
        conns.add_metric([], state["connections"])
        yield conns
        depth = GaugeMetricFamily(
            "carousel_edge_queue_depth", "Requests waiting for a member slot", labels=["pool"]
        )
        timeouts = CounterMetricFamily(
            "carousel_edge_queue_timeouts",
            "Requests answered 503 after queue_timeout",
            labels=["pool"],
        )
        up = GaugeMetricFamily(
            "carousel_edge_member_up",
            "1 when the member may take new requests (registry up, healthy, not ejected)",
            labels=["pool", "member"],
        )
        active = GaugeMetricFamily(
            "carousel_edge_member_active", "Requests in flight per member", labels=["pool", "member"]
        )
        for name, pool in state["pools"].items():
            depth.add_metric([name], len(pool.queue))
            timeouts.add_metric([name], pool.queue_timeouts)
            for member, eligible, in_flight in pool.member_states():
                up.add_metric([name, member], 1 if eligible else 0)
                active.add_metric([name, member], in_flight)
        yield depth
        yield timeouts
        yield up
        yield active
        requests = CounterMetricFamily(
            "carousel_edge_requests", "Requests answered, by route and status", labels=["route", "status"]
        )
        for (route, status), count in list(state["requests"].items()):
            requests.add_metric([route, str(status)], count)
        yield requests


class Metrics:
    """The edge's metrics, in a registry of its own (several edges may share a process)."""

    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.upstream_latency = Histogram(
            "carousel_edge_upstream_seconds",
            "Time to get a whole response from a member",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "carousel_edge_upstream_failures",
            "Failed attempts to a member (connect error, timeout, broken response)",
            ["pool", "member"],
            registry=self.registry,
        )
        # Plain counts, turned into a Prometheus counter at scrape time: the
        # per-request cost is one dict update, with no lock and no label lookup.
        self.request_counts: dict[tuple[str, int], int] = {}
        self.registry.register(_StateCollector(lambda: {**read_state(), "requests": self.request_counts}))
        self._latency_children: dict[str, Any] = {}

    def count_request(self, route: str, status: int) -> None:
        """One answered request."""
        counts = self.request_counts
        key = (route, status)
        counts[key] = counts.get(key, 0) + 1

    def observe_upstream(self, pool: str, seconds: float) -> None:
        """Upstream latency of one successful attempt."""
        child = self._latency_children.get(pool)
        if child is None:
            child = self._latency_children[pool] = self.upstream_latency.labels(pool)
        child.observe(seconds)

    def upstream_failure(self, pool: str, member: str) -> None:
        """One failed attempt."""
        self.failures.labels(pool, member).inc()
