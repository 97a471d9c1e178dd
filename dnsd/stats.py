"""Statistics without per-query cost: derived from counters when Prometheus scrapes.

The query path only bumps ``Entry.served`` (it has to, for rotation) and a
few plain integers. Queries by type and rcode, and the exposure of every
address, are computed at scrape time from the served counters of the live
table plus what retired tables had served, which ``Counters.retire`` folds
into running totals when a table is replaced.

A ``Snapshot`` is plain data, so worker processes can send theirs to the
supervisor, which adds them up (see workers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress
from typing import TYPE_CHECKING

from dnsd import wire
from dnsd.rotation import Rotation
from dnsd.table import AnswerTable, Entry

if TYPE_CHECKING:  # prometheus_client is imported when first scraped, not at start-up
    from prometheus_client.core import Metric


def qtype_label(qtype: int) -> str:
    """A bounded set of label values: known type names, else 'other'."""
    return wire.TYPE_NAMES.get(qtype, "other")


def rcode_label(rcode: int) -> str:
    return wire.RCODE_NAMES.get(rcode, "other")


@dataclass
class Snapshot:
    """Counters and gauges of one process at one moment."""

    queries: dict[tuple[str, str], int] = field(default_factory=dict)  # (qtype, rcode)
    included: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, address)
    first: dict[tuple[str, str], int] = field(default_factory=dict)
    ignored: int = 0
    rrl_dropped: int = 0
    rrl_slipped: int = 0
    udp_send_errors: int = 0
    tcp_connections: int = 0
    tcp_accepted: int = 0
    tcp_rejected: int = 0
    tcp_idle_closed: int = 0

    def add(self, other: Snapshot) -> None:
        """Add another process's numbers to these."""
        for mine, theirs in (
            (self.queries, other.queries),
            (self.included, other.included),
            (self.first, other.first),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for name in (
            "ignored",
            "rrl_dropped",
            "rrl_slipped",
            "udp_send_errors",
            "tcp_connections",
            "tcp_accepted",
            "tcp_rejected",
            "tcp_idle_closed",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _bump(d: dict[tuple[str, str], int], key: tuple[str, str], n: int) -> None:
    if n:
        d[key] = d.get(key, 0) + n


# What a process folds (see workers.py): everything (one process), or with workers = N,
# a worker's own query counts plus the exposure of answers it rotates alone ("own"), and
# the supervisor's share: the exposure of answers rotated by node-wide counters ("shared").
ALL, OWN, SHARED = "all", "own", "shared"


def _fold_entry(snap: Snapshot, entry: Entry, served: int, part: str = ALL) -> None:
    if entry.qtype and part != SHARED:  # entries shared by many types (qtype 0) are counted by the answerer
        _bump(snap.queries, (qtype_label(entry.qtype), rcode_label(entry.rcode)), served - entry.start)
    rot = entry.rotation
    if rot is None:
        return
    counter = entry.shared
    if counter is None:
        if part == SHARED:
            return
        start, end = entry.start, served
    else:
        if part == OWN:  # the node's counter is the supervisor's to count, once
            if entry.missed:  # answers this worker gave from its own steps
                _bump_exposure(snap, rot, *rot.counts_of(entry.missed))
            return
        start = entry.shared_start
        end = entry.shared_end if entry.shared_end is not None else counter[0]
    if end > start:
        _bump_exposure(snap, rot, *rot.counts_between(start, end))


def _bump_exposure(snap: Snapshot, rot: Rotation, incl: list[int], first: list[int]) -> None:
    addresses, name = rot.addresses, rot.name
    # Only the addresses that were served (a short window at 10,000 edges touches
    # few), inlined: this runs on every rebuild under churn, ~2 bumps per query.
    for counts, into in ((incl, snap.included), (first, snap.first)):
        get = into.get
        for i in compress(range(len(counts)), counts):
            key = (name, addresses[i])
            into[key] = get(key, 0) + counts[i]


class Counters:
    """The running totals of one process: retired tables plus what the live one served."""

    def __init__(self, part: str = ALL) -> None:
        self.retired = Snapshot()
        self.part = part

    def retire(self, table: AnswerTable) -> None:
        """Fold a table that is being replaced into the running totals."""
        for entry in table.entries():
            if not entry.continued:  # else its successor counts the same window
                _fold_entry(self.retired, entry, entry.served, self.part)

    def snapshot(self, table: AnswerTable, answer_counts: Iterable[dict[tuple[int, int], int]]) -> Snapshot:
        """Totals so far: retired tables, the live table, and answers built outside tables."""
        snap = Snapshot()
        snap.add(self.retired)
        for entry in table.entries():
            _fold_entry(snap, entry, entry.served, self.part)
        for counts in answer_counts:
            for (qtype, rcode), n in counts.items():
                _bump(snap.queries, (qtype_label(qtype), rcode_label(rcode)), n)
        return snap


@dataclass
class RegistryView:
    """What the metrics report about the registry feed."""

    revision: int
    seconds_since_sync: float
    connected: bool
    builds: int
    services: dict[str, tuple[str, int]]  # service -> (mode, addresses served)


class DnsCollector:
    """Prometheus collector reading a snapshot function at scrape time (prometheus_client's protocol)."""

    def __init__(self, snapshot: Callable[[], Snapshot], registry: Callable[[], RegistryView]) -> None:
        self._snapshot = snapshot
        self._registry = registry

    def describe(self) -> list[object]:
        return []  # collected lazily; no fixed description needed

    def collect(self) -> Iterator[Metric]:
        """The metrics of this scrape."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snapshot()
        reg = self._registry()
        q = CounterMetricFamily(
            "dnsd_queries", "DNS responses by query type and rcode", labels=["qtype", "rcode"]
        )
        for (qtype, rcode), n in sorted(snap.queries.items()):
            q.add_metric([qtype, rcode], n)
        yield q
        inc = CounterMetricFamily(
            "dnsd_answer_exposure",
            "Times an address was included in an answer",
            labels=["name", "address"],
        )
        for (name, address), n in sorted(snap.included.items()):
            inc.add_metric([name, address], n)
        yield inc
        first = CounterMetricFamily(
            "dnsd_answer_first",
            "Times an address was listed first in an answer",
            labels=["name", "address"],
        )
        for (name, address), n in sorted(snap.first.items()):
            first.add_metric([name, address], n)
        yield first
        for name, help_text, value in (
            ("dnsd_ignored", "Messages answered with silence (unreadable, or responses)", snap.ignored),
            ("dnsd_rrl_dropped", "UDP responses dropped by response rate limiting", snap.rrl_dropped),
            ("dnsd_rrl_slipped", "UDP responses sent truncated by RRL slip", snap.rrl_slipped),
            ("dnsd_udp_send_errors", "UDP responses the kernel refused to send", snap.udp_send_errors),
            ("dnsd_tcp_accepted", "TCP connections accepted", snap.tcp_accepted),
            ("dnsd_tcp_rejected", "TCP connections closed at once by connection limits", snap.tcp_rejected),
            ("dnsd_tcp_idle_closed", "TCP connections closed by the idle timeout", snap.tcp_idle_closed),
            ("dnsd_table_builds", "Answer tables built from the registry", reg.builds),
        ):  # fmt: skip
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], value)
            yield c
        gauges: tuple[tuple[str, str, float], ...] = (
            ("dnsd_tcp_connections", "Open TCP connections", snap.tcp_connections),
            ("dnsd_registry_revision", "etcd revision of the answers being served", reg.revision),
            ("dnsd_registry_seconds_since_sync", "Seconds since etcd last proved our copy current",
             reg.seconds_since_sync if reg.seconds_since_sync != float("inf") else -1),
            ("dnsd_registry_connected", "1 while the registry watch is healthy", int(reg.connected)),
        )  # fmt: skip
        for name, help_text, level in gauges:
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], level)
            yield g
        svc = GaugeMetricFamily(
            "dnsd_service_addresses",
            "Addresses served per mapped service, by answer mode",
            labels=["service", "mode"],
        )
        for service, (mode, count) in sorted(reg.services.items()):
            svc.add_metric([service, mode], count)
        yield svc
