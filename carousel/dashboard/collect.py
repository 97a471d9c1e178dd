"""Collector: the dashboard's I/O. etcd mirrors push registry changes; a timer scrapes everything else.

Registry (through carousel.etcd and carousel.mirror, like every daemon):
services, maintenance flags and bans are each a PrefixMirror, so a drain shows
on the page milliseconds after the agent writes it. Lease TTLs are read once per
interval (one TimeToLive per lease).

Admin endpoints: a record's ``meta.admin`` (the daemon's admin listener: the
edge's /metrics) and ``meta.agent`` (the node agent's /status, for its check
results) are scraped every ``scrape_interval``, as are the config's targets
(dnsd and etcd /metrics). All scrapes of one round run at once, each bounded by
``scrape_timeout``; a failed one marks its target and is logged once until it
recovers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from carousel.dashboard.config import Config
from carousel.dashboard.scrape import (
    DNS_FAMILIES,
    EDGE_FAMILIES,
    ETCD_FAMILIES,
    ScrapeError,
    agent_checks,
    dns_figures,
    edge_figures,
    etcd_figures,
    parse_metrics,
)
from carousel.dashboard.view import ClusterView
from carousel.etcd import Etcd, EtcdError
from carousel.mirror import PrefixMirror
from carousel.registry import BanRecord, Keys, MaintenanceFlag, ServiceRecord

log = structlog.get_logger("carousel.dashboard")


class Collector:
    """Feeds a ClusterView from etcd and the admin endpoints; ``changed`` is called after each change."""

    def __init__(self, config: Config, view: ClusterView, changed: Callable[[], None]) -> None:
        self.config = config
        self.view = view
        self.changed = changed
        self.etcd = Etcd(config.etcd)
        self.keys = Keys(config.etcd.prefix)
        d = config.dashboard
        view.targets = {t.name: (t.role, t.url) for t in d.target}
        self.services: PrefixMirror[ServiceRecord] = PrefixMirror(
            self.etcd, self.keys.services, lambda k, v: ServiceRecord.decode(v), self._services, name="svc"
        )
        self.flags: PrefixMirror[MaintenanceFlag] = PrefixMirror(
            self.etcd, self.keys.maintenance, lambda k, v: MaintenanceFlag.decode(v), self._flags, name="mt"
        )
        self.bans: PrefixMirror[BanRecord] = PrefixMirror(
            self.etcd, self.keys.bans, lambda k, v: BanRecord.decode(v), self._bans, name="bans"
        )
        self._failing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- registry ----------------------------------------------------------------------

    def _services(self, mirror: PrefixMirror[ServiceRecord]) -> None:
        self.view.set_records({(r.service, r.node): r for r in mirror.items.values()})
        self.changed()

    def _flags(self, mirror: PrefixMirror[MaintenanceFlag]) -> None:
        self.view.set_flags({f.node: f for f in mirror.items.values()})
        self.changed()

    def _bans(self, mirror: PrefixMirror[BanRecord]) -> None:
        self.view.set_bans({b.address: b for b in mirror.items.values()})
        self.changed()

    async def _lease_ttls(self) -> None:
        view = self.view
        try:
            snap = await self.etcd.get_prefix(self.keys.services)
            ttl_by_lease: dict[int, int] = {}
            ttls: dict[tuple[str, str], int] = {}
            for kv in snap.items:
                try:
                    service, node = self.keys.split_service(kv.key)
                except ValueError:
                    continue
                if kv.lease:
                    if kv.lease not in ttl_by_lease:
                        ttl_by_lease[kv.lease] = await self.etcd.time_to_live(kv.lease)
                    ttls[(service, node)] = ttl_by_lease[kv.lease]
            view.set_ttls(ttls)
            if not view.registry_ok:
                log.info("registry reachable", endpoints=self.config.etcd.endpoints)
            view.registry_ok, view.registry_error = True, ""
        except EtcdError as exc:
            if view.registry_ok or not view.registry_error:
                log.warning("registry unreachable; showing the last known state", error=str(exc))
            view.registry_ok, view.registry_error = False, str(exc)

    # --- scraping ----------------------------------------------------------------------

    def scrape_plan(self) -> list[tuple[str, str, str]]:
        """(key, kind, url) of every endpoint to scrape this round."""
        plan: list[tuple[str, str, str]] = []
        for name, (role, url) in sorted(self.view.targets.items()):
            plan.append((f"{role}:{name}", role, url.rstrip("/") + "/metrics"))
        nodes: dict[str, dict[str, str]] = {}
        for (service, node), known in sorted(self.view.known.items()):
            meta = known.record.meta
            if service == "edge" and meta.get("admin"):
                plan.append((f"edge:{node}", "edge", meta["admin"].rstrip("/") + "/metrics"))
            if meta.get("agent"):
                nodes[node] = meta
        for node, meta in nodes.items():
            plan.append((f"agent:{node}", "agent", meta["agent"].rstrip("/") + "/status"))
        return plan

    async def _scrape_one(self, session: aiohttp.ClientSession, key: str, kind: str, url: str) -> None:
        at = time.time()
        try:
            async with session.get(url) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status} from {url}")
            if kind == "agent":
                self.view.record_scrape(key, agent_checks(json.loads(body)), None, at)
            elif kind == "edge":
                fig = edge_figures(parse_metrics(body, EDGE_FAMILIES))
                self.view.record_scrape(key, fig, fig.counters(), at)
            elif kind == "dns":
                dfig = dns_figures(parse_metrics(body, DNS_FAMILIES))
                self.view.record_scrape(key, dfig, dfig.counters(), at)
            else:
                self.view.record_scrape(key, etcd_figures(parse_metrics(body, ETCD_FAMILIES)), None, at)
        except (aiohttp.ClientError, TimeoutError, ScrapeError, ValueError, UnicodeDecodeError) as exc:
            error = str(exc) or type(exc).__name__
            self.view.scrape_failed(key, error, at)
            if key not in self._failing:
                self._failing.add(key)
                log.warning("scrape failed", target=key, url=url, error=error)
            return
        if key in self._failing:
            self._failing.discard(key)
            log.info("scrape recovered", target=key, url=url)

    async def scrape_round(self, session: aiohttp.ClientSession) -> None:
        """Scrape every endpoint once, concurrently; then read lease TTLs."""
        await asyncio.gather(
            *(self._scrape_one(session, key, kind, url) for key, kind, url in self.scrape_plan()),
            self._lease_ttls(),
        )

    # --- lifecycle ---------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Mirror and scrape until cancelled."""
        d = self.config.dashboard
        headers = {"Authorization": f"Bearer {d.token}"} if d.token else {}
        timeout = aiohttp.ClientTimeout(total=d.scrape_timeout)
        session = aiohttp.ClientSession(
            timeout=timeout, headers=headers, connector=aiohttp.TCPConnector(limit=64, force_close=True)
        )
        for mirror in (self.services, self.flags, self.bans):
            self._spawn(mirror.run())
        try:
            while True:
                started = time.monotonic()
                await self.scrape_round(session)
                self.view.tick()
                self.changed()
                await asyncio.sleep(max(0.05, d.scrape_interval - (time.monotonic() - started)))
        finally:
            # Cancel the mirrors and give them a deadline: the etcd adapter ends a cancelled
            # watch within its grace (carousel/etcd.py, _bounded); the deadline keeps the
            # dashboard's exit bounded whatever a future client library does.
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=2.0)
            await session.close()
            await self.etcd.close()
