"""Prometheus text exposition and agent /status into the plain figures the view needs (no I/O).

The daemons' metric names, as they are exported (a counter's samples carry ``_total``):

    edge   carousel_edge_requests_total{route,status}, carousel_edge_cache_outcomes_total{outcome},
           carousel_edge_upstream_failures_total{pool,member}, carousel_edge_queue_depth{pool},
           carousel_edge_queue_timeouts_total{pool}, carousel_edge_dos_bans,
           carousel_edge_dos_actions_total{action,dry_run}, carousel_edge_active_connections
    dnsd   dnsd_queries_total{qtype,rcode}, dnsd_answer_first_total{name,address},
           dnsd_rrl_dropped_total, dnsd_registry_connected, dnsd_registry_seconds_since_sync
    etcd   etcd_server_has_leader, etcd_server_is_leader
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


class ScrapeError(ValueError):
    """An admin endpoint answered with something that is not Prometheus text."""


# The families each figure function below reads (name prefixes, as `# TYPE` declares them).
EDGE_FAMILIES = (
    "carousel_edge_requests",
    "carousel_edge_cache_outcomes",
    "carousel_edge_upstream_failures",
    "carousel_edge_queue_timeouts",
    "carousel_edge_dos_actions",
    "carousel_edge_queue_depth",
    "carousel_edge_dos_bans",
    "carousel_edge_active_connections",
)
DNS_FAMILIES = (
    "dnsd_queries",
    "dnsd_answer_first",
    "dnsd_rrl_dropped",
    "dnsd_registry_connected",
    "dnsd_registry_seconds_since_sync",
)
ETCD_FAMILIES = ("etcd_server_has_leader", "etcd_server_is_leader")

# A line that is not blank, not a comment and not a sample (`name{labels} value [timestamp]`).
_NOT_TEXT_FORMAT = re.compile(
    r"^(?!#|[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^\n]*\})?[ \t]+[-+]?(?:[0-9.][0-9.eE+-]*|Inf|NaN)"
    r"(?:[ \t]+-?[0-9]+)?[ \t]*$)[^\n]*\S",
    re.M,
)


def _wanted(line: str, families: tuple[str, ...]) -> bool:
    if line.startswith("#"):
        words = line.split(None, 3)  # "# TYPE name kind", "# HELP name text"
        return len(words) >= 3 and words[2].startswith(families)
    return line.startswith(families)


def parse_metrics(text: str, families: tuple[str, ...] = ()) -> Samples:
    """Every sample by its exposed name (``foo_total``, not the family name ``foo``).

    With ``families``, only the samples of the families named so are parsed; the other lines
    are only checked to be text format. An etcd member exposes ~1,600 lines of which the page
    reads two: prometheus_client's parser took 95 ms over all of them, which at the demo's 1 s
    scrape interval was a tenth of a core (a loaded 2-core host), and on a TCG VM most of one.
    """
    if families:
        bad = _NOT_TEXT_FORMAT.search(text)
        if bad is not None:
            raise ScrapeError(f"not Prometheus text: {bad.group(0)[:80]!r}")
        text = "\n".join(line for line in text.splitlines() if _wanted(line, families))
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as exc:
        raise ScrapeError(f"not Prometheus text: {exc}") from None
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``match``."""
    return sum(v for labels, v in samples.get(name, ()) if all(labels.get(k) == m for k, m in match.items()))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``name`` summed per value of one label."""
    out: dict[str, float] = {}
    for labels, v in samples.get(name, ()):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class EdgeFigures:
    """One scrape of an edge: counters (only their deltas mean something) and gauges."""

    requests: float = 0.0
    by_class: dict[str, float] = field(default_factory=dict)  # "2xx" -> count
    cache: dict[str, float] = field(default_factory=dict)  # outcome -> count
    upstream_failures: float = 0.0
    queue_timeouts: float = 0.0
    dos: dict[str, float] = field(default_factory=dict)  # rejected / delayed / banned / blocked
    queue_depth: float = 0.0
    bans: float = 0.0
    connections: float = 0.0

    def counters(self) -> dict[str, float]:
        """The counters flattened to one dict, for rates and windows."""
        out = {"requests": self.requests, "upstream_failures": self.upstream_failures}
        out["queue_timeouts"] = self.queue_timeouts
        out.update({f"status:{k}": v for k, v in self.by_class.items()})
        out.update({f"cache:{k}": v for k, v in self.cache.items()})
        out.update({f"dos:{k}": v for k, v in self.dos.items()})
        return out


def edge_figures(samples: Samples) -> EdgeFigures:
    """What the page shows of an edge, from its /metrics."""
    fig = EdgeFigures()
    for labels, v in samples.get("carousel_edge_requests_total", ()):
        fig.requests += v
        cls = labels.get("status", "0")[:1] + "xx"
        fig.by_class[cls] = fig.by_class.get(cls, 0.0) + v
    fig.cache = by_label(samples, "carousel_edge_cache_outcomes_total", "outcome")
    fig.upstream_failures = total(samples, "carousel_edge_upstream_failures_total")
    fig.queue_timeouts = total(samples, "carousel_edge_queue_timeouts_total")
    fig.dos = {}
    for labels, v in samples.get("carousel_edge_dos_actions_total", ()):
        if labels.get("dry_run") == "false":
            fig.dos[labels.get("action", "")] = v
    fig.queue_depth = total(samples, "carousel_edge_queue_depth")
    fig.bans = total(samples, "carousel_edge_dos_bans")
    fig.connections = total(samples, "carousel_edge_active_connections")
    return fig


@dataclass
class DnsFigures:
    """One scrape of a dnsd."""

    queries: float = 0.0
    first: dict[str, float] = field(default_factory=dict)  # address -> times listed first
    rrl_dropped: float = 0.0
    connected: bool = True
    seconds_since_sync: float = 0.0

    def counters(self) -> dict[str, float]:
        out = {"queries": self.queries, "rrl_dropped": self.rrl_dropped}
        out.update({f"first:{k}": v for k, v in self.first.items()})
        return out


def dns_figures(samples: Samples) -> DnsFigures:
    """What the page shows of a dnsd, from its /metrics."""
    return DnsFigures(
        queries=total(samples, "dnsd_queries_total"),
        first=by_label(samples, "dnsd_answer_first_total", "address"),
        rrl_dropped=total(samples, "dnsd_rrl_dropped_total"),
        connected=total(samples, "dnsd_registry_connected") >= 1,
        seconds_since_sync=total(samples, "dnsd_registry_seconds_since_sync"),
    )


def etcd_figures(samples: Samples) -> dict[str, Any]:
    """Leader status of one etcd member."""
    return {
        "has_leader": total(samples, "etcd_server_has_leader") >= 1,
        "is_leader": total(samples, "etcd_server_is_leader") >= 1,
    }


def agent_checks(status: Any) -> dict[str, dict[str, Any]]:
    """Per service: healthy and the last check's detail, from an agent's /status JSON."""
    if not isinstance(status, dict) or not isinstance(status.get("services"), dict):
        raise ScrapeError("agent /status without a services table")
    out: dict[str, dict[str, Any]] = {}
    for name, svc in status["services"].items():
        if isinstance(svc, dict):
            out[str(name)] = {
                "healthy": bool(svc.get("healthy")),
                "last_check": str(svc.get("last_check") or ""),
                "published": svc.get("published"),
            }
    return out


def delta(new: dict[str, float], old: dict[str, float]) -> dict[str, float]:
    """Counter increase per key; a counter that went down restarted from 0 (Prometheus' rule)."""
    out = {}
    for k, v in new.items():
        before = old.get(k, 0.0)
        out[k] = v - before if v >= before else v
    return out


def add(into: dict[str, float], more: Iterable[tuple[str, float]]) -> None:
    """Add values into a dict of sums."""
    for k, v in more:
        into[k] = into.get(k, 0.0) + v
