"""Prometheus metrics and the structured access log.

Counters touched per request use pre-resolved label children (a dict lookup,
no label parsing). State that already lives in the pools (queue depth, member
state, active connections) and the plain request counts are read only when
/metrics is scraped, by a custom collector, so the hot path pays almost
nothing for them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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


class _LatencyCollector(Collector):
    """carousel_edge_upstream_seconds from plain per-pool bucket counts (see observe_upstream)."""

    def __init__(self, latency: dict[str, list[float]]) -> None:
        self.latency = latency

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily(
            "carousel_edge_upstream_seconds", "Time to get a whole response from a member", labels=["pool"]
        )
        bounds = [*(str(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for pool, counts in list(self.latency.items()):
            cumulative = 0.0
            buckets = []
            for bound, count in zip(bounds, counts[:-1], strict=True):  # the last one is the sum
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([pool], buckets, sum_value=counts[-1])
        yield family


class Metrics:
    """The edge's metrics, in a registry of its own (several edges may share a process)."""

    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        # Per pool: one count per bucket of LATENCY_BUCKETS, one for +Inf, then the sum of
        # the seconds. A plain list update per response instead of prometheus_client's
        # Histogram.observe (a lock and a walk over the buckets per call: 3 % of a proxied
        # request's CPU, bench/hotpath_bench.py under cProfile).
        self.upstream_latency: dict[str, list[float]] = {}
        self.registry.register(_LatencyCollector(self.upstream_latency))
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

    def count_request(self, route: str, status: int) -> None:
        """One answered request."""
        counts = self.request_counts
        key = (route, status)
        counts[key] = counts.get(key, 0) + 1

    def observe_upstream(self, pool: str, seconds: float) -> None:
        """Upstream latency of one successful attempt."""
        counts = self.upstream_latency.get(pool)
        if counts is None:
            counts = self.upstream_latency[pool] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def upstream_failure(self, pool: str, member: str) -> None:
        """One failed attempt."""
        self.failures.labels(pool, member).inc()
