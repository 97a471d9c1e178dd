"""The DoS detector's Prometheus families, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

ACTIONS = ("rejected", "delayed", "banned", "blocked")


class Counted(Protocol):
    """What the collector reads from the detector (detector.py)."""

    @property
    def counts(self) -> dict[str, int]: ...

    @property
    def would(self) -> dict[str, int]: ...

    @property
    def bans(self) -> Sized: ...

    @property
    def clients(self) -> Sized: ...

    @property
    def untracked(self) -> int: ...


class DosCollector(Collector):
    """The detector's figures for /metrics, read at scrape time."""

    def __init__(self, dos: Counted) -> None:
        self.dos = dos

    def collect(self) -> Iterator[Any]:
        dos = self.dos
        actions = CounterMetricFamily(
            "carousel_edge_dos_actions",
            "DoS detector actions: rejected (429), delayed, banned (bans made here), blocked (403)",
            labels=["action", "dry_run"],
        )
        for action in ACTIONS:
            actions.add_metric([action, "false"], dos.counts[action])
            actions.add_metric([action, "true"], dos.would[action])
        yield actions
        yield GaugeMetricFamily(
            "carousel_edge_dos_bans", "Bans in force (this edge's and the cluster's)", value=len(dos.bans)
        )
        yield GaugeMetricFamily(
            "carousel_edge_dos_clients", "Clients tracked by the DoS detector", value=len(dos.clients)
        )
        yield CounterMetricFamily(
            "carousel_edge_dos_untracked",
            "Requests not counted because max_clients was reached",
            value=dos.untracked,
        )
