"""Prometheus figures of the cache, read at scrape time (the hit path only bumps a dict)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from edge.features.cache.store import MemoryStore


class CacheFigures(Protocol):
    """What the collector reads from the cache feature (feature.py) at scrape time."""

    @property
    def counts(self) -> dict[str, int]: ...

    @property
    def store(self) -> MemoryStore: ...


class _CacheCollector(Collector):
    def __init__(self, cache: CacheFigures) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        cache = self.cache
        outcomes = CounterMetricFamily(
            "carousel_edge_cache_outcomes",
            "Cache lookups and what became of them (HIT, MISS, STORED, UPDATING, ...)",
            labels=["outcome"],
        )
        for outcome, count in cache.counts.items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        size = GaugeMetricFamily("carousel_edge_cache_bytes", "Bytes held by the memory tier")
        size.add_metric([], cache.store.bytes)
        yield size
        objects = GaugeMetricFamily("carousel_edge_cache_objects", "Stored responses in the memory tier")
        objects.add_metric([], len(cache.store))
        yield objects
        evictions = CounterMetricFamily("carousel_edge_cache_evictions", "Entries evicted for room")
        evictions.add_metric([], cache.store.evictions)
        yield evictions


def register(registry: CollectorRegistry, cache: CacheFigures) -> None:
    """Add the cache's collector to the edge's registry."""
    registry.register(_CacheCollector(cache))
