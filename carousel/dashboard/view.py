"""ClusterView: the registry and the latest scrapes, turned into the document the page shows.

Theory of operation: the collector (collect.py) feeds this object: registry
changes from the etcd mirrors as they happen, lease TTLs and scrapes once per
interval. Each scrape's counters go into a per-target window of (time,
counters); rates are the increase over the last few seconds, ratios (hit
ratio, status mix, first-place shares) the increase over ``window`` seconds.
``tick()`` appends one chart point per interval to a history bounded to
``history`` seconds. ``document()`` is plain JSON data, computed on demand.

A node's state, from what the registry holds (a down node is one the view has
seen registered and that is gone without a drain)::

    record up, no flag      healthy
    record draining         draining     (also: flag set, agent not there yet)
    flag, no record         maintenance  (drained; `undrain` brings it back)
    no record, no flag      down
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from carousel.dashboard.scrape import DnsFigures, EdgeFigures, delta
from carousel.registry import BanRecord, MaintenanceFlag, ServiceRecord

RATE_SPAN = 5.0  # seconds the "now" rates are measured over
ACTIONS_KEPT = 50


@dataclass
class Scrape:
    """The last scrape of one admin endpoint."""

    ok: bool = False
    error: str = ""
    at: float = 0.0
    figures: Any = None  # EdgeFigures, DnsFigures, a dict (etcd) or agent checks
    window: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)


@dataclass
class Known:
    """What the view remembers of a registered instance, also after it is gone."""

    record: ServiceRecord
    gone_at: float = 0.0  # wall time it left the registry; 0 while present


def _rate(window: deque[tuple[float, dict[str, float]]], span: float) -> tuple[dict[str, float], float]:
    """Counter increases over the last ``span`` seconds of a window, and the seconds they cover."""
    if len(window) < 2:
        return {}, 0.0
    t_last, last = window[-1]
    first_t, first = window[0]
    for t, counters in window:
        if t >= t_last - span:
            first_t, first = t, counters
            break
    if first_t >= t_last:
        first_t, first = window[-2]
    return delta(last, first), t_last - first_t


def _per_second(increase: dict[str, float], seconds: float, key: str) -> float:
    return round(increase.get(key, 0.0) / seconds, 2) if seconds > 0 else 0.0


class ClusterView:
    """The dashboard's model of the cluster."""

    def __init__(self, *, window: float = 60.0, history: float = 900.0, interval: float = 2.0) -> None:
        self.window = window
        self.interval = interval
        self.records: dict[tuple[str, str], ServiceRecord] = {}
        self.known: dict[tuple[str, str], Known] = {}
        self.flags: dict[str, MaintenanceFlag] = {}
        self.bans: dict[str, BanRecord] = {}
        self.ttl: dict[tuple[str, str], int] = {}
        self.scrapes: dict[str, Scrape] = {}  # by target key: "edge:edge1", "agent:edge1", "dns:dnsd"
        self.targets: dict[str, tuple[str, str]] = {}  # static targets: name -> (role, url)
        self.history: deque[dict[str, Any]] = deque(maxlen=max(2, int(history / interval) + 1))
        self.actions: deque[dict[str, Any]] = deque(maxlen=ACTIONS_KEPT)
        self.registry_ok = False
        self.registry_error = ""
        self.version = 0  # bumped on every change, so the stream knows when to send

    # --- feeding -----------------------------------------------------------------------

    def set_records(self, records: dict[tuple[str, str], ServiceRecord]) -> None:
        """The registry's service records now (from the mirror)."""
        now = time.time()
        for key, rec in records.items():
            self.known[key] = Known(rec)
        for key, k in self.known.items():
            if key not in records and not k.gone_at:
                k.gone_at = now
        self.records = dict(records)
        self.version += 1

    def set_flags(self, flags: dict[str, MaintenanceFlag]) -> None:
        self.flags = dict(flags)
        self.version += 1

    def set_bans(self, bans: dict[str, BanRecord]) -> None:
        self.bans = dict(bans)
        self.version += 1

    def set_ttls(self, ttl: dict[tuple[str, str], int]) -> None:
        self.ttl = dict(ttl)

    def record_scrape(self, key: str, figures: Any, counters: dict[str, float] | None, at: float) -> None:
        """A successful scrape; ``counters`` go into the target's window."""
        s = self.scrapes.setdefault(key, Scrape())
        s.ok, s.error, s.at, s.figures = True, "", at, figures
        if counters is not None:
            s.window.append((at, counters))
            while s.window and s.window[0][0] < at - self.window:
                s.window.popleft()

    def scrape_failed(self, key: str, error: str, at: float) -> None:
        s = self.scrapes.setdefault(key, Scrape())
        s.ok, s.error, s.at = False, error, at

    def add_action(self, entry: dict[str, Any]) -> None:
        self.actions.appendleft(entry)
        self.version += 1

    # --- reading -----------------------------------------------------------------------

    def node_state(self, service: str, node: str) -> str:
        rec = self.records.get((service, node))
        if rec is not None:
            return "draining" if rec.state == "draining" or node in self.flags else "healthy"
        return "maintenance" if node in self.flags else "down"

    def _edge(self, node: str) -> dict[str, Any]:
        s = self.scrapes.get(f"edge:{node}")
        if s is None or s.figures is None:
            return {"node": node, "scraped": False, "error": s.error if s else "not scraped yet"}
        fig: EdgeFigures = s.figures
        now_inc, now_s = _rate(s.window, RATE_SPAN)
        win_inc, _ = _rate(s.window, self.window)
        classes = {k.split(":", 1)[1]: v for k, v in win_inc.items() if k.startswith("status:")}
        answered = sum(classes.values())
        mix = {k: round(v / answered, 3) for k, v in sorted(classes.items()) if v} if answered else {}
        cache = {k.split(":", 1)[1]: v for k, v in win_inc.items() if k.startswith("cache:")}
        lookups = sum(cache.values())
        return {
            "node": node,
            "scraped": s.ok,
            "error": s.error,
            "rps": _per_second(now_inc, now_s, "requests"),
            "status_mix": mix,
            "hit_ratio": round(cache.get("HIT", 0.0) / lookups, 3) if lookups else None,
            "upstream_errors": fig.upstream_failures,
            "upstream_errors_per_s": _per_second(now_inc, now_s, "upstream_failures"),
            "errors_5xx_per_s": _per_second(now_inc, now_s, "status:5xx"),
            "queue_depth": fig.queue_depth,
            "queue_timeouts": fig.queue_timeouts,
            "bans": fig.bans,
            "dos": fig.dos,
            "connections": fig.connections,
        }

    def _address_owner(self) -> dict[str, str]:
        owners = {}
        for (service, node), k in self.known.items():
            if service == "edge":
                for a in k.record.addresses:
                    owners[a] = node
        return owners

    def _dns(self) -> dict[str, Any]:
        servers = []
        qps = drops = 0.0
        drops_total = 0.0
        first: dict[str, float] = {}
        for name, (role, url) in sorted(self.targets.items()):
            if role != "dns":
                continue
            s = self.scrapes.get(f"dns:{name}")
            fig: DnsFigures | None = s.figures if s is not None else None
            if s is None or fig is None:
                servers.append({"name": name, "url": url, "scraped": False, "error": s.error if s else ""})
                continue
            now_inc, now_s = _rate(s.window, RATE_SPAN)
            win_inc, _ = _rate(s.window, self.window)
            qps += _per_second(now_inc, now_s, "queries")
            drops += _per_second(now_inc, now_s, "rrl_dropped")
            drops_total += fig.rrl_dropped
            for k, v in win_inc.items():
                if k.startswith("first:"):
                    first[k[6:]] = first.get(k[6:], 0.0) + v
            # The feed is healthy while etcd proves the copy current (PROBE_INTERVAL is 1 s).
            last_known = (not fig.connected) or fig.seconds_since_sync > 3.0
            servers.append(
                {
                    "name": name,
                    "url": url,
                    "scraped": s.ok,
                    "error": s.error,
                    "last_known_state": last_known,
                    "seconds_since_sync": round(fig.seconds_since_sync, 1),
                }
            )
        owners = self._address_owner()
        firsts = sum(first.values())
        shares = [
            {"address": a, "node": owners.get(a, "?"), "share": round(v / firsts, 3)}
            for a, v in sorted(first.items())
            if v > 0
        ]
        return {
            "servers": servers,
            "qps": round(qps, 2),
            "rrl_drops_per_s": round(drops, 2),
            "rrl_drops": drops_total,
            "first_place": shares,
            "last_known_state": any(srv.get("last_known_state") for srv in servers),
        }

    def _nodes(self) -> list[dict[str, Any]]:
        rows = []
        for (service, node), k in sorted(self.known.items()):
            rec = k.record
            agent = self.scrapes.get(f"agent:{node}")
            checks = agent.figures.get(service) if agent is not None and agent.ok and agent.figures else None
            flag = self.flags.get(node)
            present = (service, node) in self.records
            gone = flag.since if flag and flag.since else k.gone_at
            rows.append(
                {
                    "service": service,
                    "node": node,
                    "address": ", ".join(
                        f"[{a}]:{rec.port}" if ":" in a else f"{a}:{rec.port}" for a in rec.addresses
                    ),
                    "state": self.node_state(service, node),
                    "ttl_left": self.ttl.get((service, node)) if present else None,
                    "last_change": rec.since if present else gone,
                    "checks": checks,
                    "agent_error": "" if agent is None or agent.ok else agent.error,
                    "maintenance_reason": flag.reason if flag else "",
                }
            )
        seen = {n for _, n in self.known}
        for node, flag in sorted(self.flags.items()):
            if node not in seen:
                rows.append(
                    {
                        "service": "-",
                        "node": node,
                        "address": "",
                        "state": "maintenance",
                        "ttl_left": None,
                        "last_change": flag.since,
                        "checks": None,
                        "agent_error": "",
                        "maintenance_reason": flag.reason,
                    }
                )
        for name, (role, url) in sorted(self.targets.items()):
            s = self.scrapes.get(f"{role}:{name}")
            extra = s.figures if role == "etcd" and s is not None and s.ok else None
            rows.append(
                {
                    "service": role,
                    "node": name,
                    "address": urlsplit(url).netloc,
                    "state": "healthy" if s is not None and s.ok else "down",
                    "ttl_left": None,
                    "last_change": None,
                    "checks": extra,
                    "agent_error": "" if s is None or s.ok else s.error,
                    "maintenance_reason": "",
                }
            )
        return rows

    def edge_nodes(self) -> list[str]:
        return sorted({node for service, node in self.known if service == "edge"})

    def document(self) -> dict[str, Any]:
        """The whole page's data, as JSON-able values."""
        now = time.time()
        return {
            "t": now,
            "registry": {"ok": self.registry_ok, "error": self.registry_error},
            "nodes": self._nodes(),
            "dns": self._dns(),
            "edges": [self._edge(n) for n in self.edge_nodes()],
            "bans": [
                {"address": b.address, "reason": b.reason, "left": max(0, round(b.until - now)), "by": b.by}
                for b in sorted(self.bans.values(), key=lambda b: b.address)
            ],
            "actions": list(self.actions),
        }

    def tick(self) -> dict[str, Any]:
        """Append one chart point (now) to the history and return it."""
        dns = self._dns()
        edges = {}
        for node in self.edge_nodes():
            e = self._edge(node)
            if e.get("scraped"):
                edges[node] = {
                    "rps": e["rps"],
                    "hit": e["hit_ratio"],
                    "err": e["errors_5xx_per_s"],
                    "up_err": e["upstream_errors_per_s"],
                }
        point = {"t": round(time.time(), 1), "qps": dns["qps"], "edges": edges}
        self.history.append(point)
        self.version += 1
        return point
