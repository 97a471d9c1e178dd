"""The DoS detector: the pipeline step, the node-wide counts, bans made, mirrored and lifted.

How it works is told in edge/features/dos/__init__.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog
from multidict import CIMultiDict

from carousel.etcd import EtcdError
from carousel.mirror import PrefixMirror
from carousel.registry import BanRecord, Keys
from edge.core.config import Config, DosConfig
from edge.core.fields import TrustedProxies
from edge.core.node import client_hash
from edge.core.pipeline import BytesBody, EdgeContext, Exchange, Handler, NowHandler, Reply
from edge.features.dos.bans import BanTable, ClientKeys
from edge.features.dos.metrics import ACTIONS, DosCollector

if TYPE_CHECKING:
    from carousel.etcd import Etcd
    from edge.core.limits import ConnectionGuard
    from edge.core.metrics import Metrics
    from edge.core.node import ClientTable
    from edge.http.request import Request


class IdleClosable(Protocol):
    """A client connection as the ban sees it."""

    @property
    def peer(self) -> str: ...

    def close_if_idle(self) -> None: ...


class DosContext(EdgeContext, Protocol):
    """What the DoS feature uses from the running edge (front/server.py): the connection
    guard it arms, the open connections it closes on a ban, etcd, metrics."""

    @property
    def guard(self) -> ConnectionGuard: ...

    @property
    def connections(self) -> Iterable[IdleClosable]: ...

    @property
    def etcd(self) -> Etcd | None: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def worker(self) -> int: ...


log = structlog.get_logger("carousel.edge.dos")

_FORBIDDEN = b"<html><body><h1>403 Forbidden</h1></body></html>\n"
_TOO_MANY = b"<html><body><h1>429 Too Many Requests</h1></body></html>\n"
# workers > 1: how often a client's node-wide figures are read from the shared table (seconds).
# Between reads the worker adds its own requests; the other workers' are at most this late,
# a few requests at the rates that matter, against windows of a second. Reading on every
# request cost 5.5 us against 0.9 us for the local count (loaded machine, 2 workers).
REREAD = 0.01


class _Verdict:
    """How a counted request goes on: tracked in flight (behind a trusted proxy), after a delay."""

    __slots__ = ("delay", "proxied")

    def __init__(self, proxied: _Client | None, delay: float) -> None:
        self.proxied = proxied
        self.delay = delay


_GO = _Verdict(None, 0.0)


class _Client:
    """One client's sliding-window counters."""

    __slots__ = (
        "cell",
        "conns",
        "current",
        "hash",
        "inflight",
        "noted",
        "previous",
        "rate",
        "read_at",
        "start",
    )

    def __init__(self, now: float, key_hash: int = 0) -> None:
        self.start = now
        self.current = 0
        self.previous = 0
        self.inflight = 0
        self.noted = False  # over the soft threshold already logged
        self.hash = key_hash  # the client's row in the node's table (workers > 1)
        self.cell = -1  # and this worker's cell there, once known
        # The node's figures as last read from the table, and when (monotonic).
        self.rate = 0.0
        self.conns = 0
        self.read_at = -1.0

    def hit(self, now: float, window: float) -> float:
        """Count one request; return the estimated requests per second."""
        elapsed = now - self.start
        if elapsed >= window:
            passed = int(elapsed // window)
            self.previous = self.current if passed == 1 else 0
            self.current = 0
            self.start += passed * window
            elapsed -= passed * window
        self.current += 1
        return (self.previous * (1.0 - elapsed / window) + self.current) / window


class DosDetector:
    """The `dos` feature."""

    def __init__(self, config: Config, edge: DosContext) -> None:
        d: DosConfig = config.dos
        self.config = d
        self.edge = edge
        self.window = d.window
        self.dry_run = d.dry_run
        # Read on every request: plain attributes, not config lookups.
        self.soft_rate, self.hard_rate = d.soft_rate, d.hard_rate
        self.soft_connections, self.hard_connections = d.soft_connections, d.hard_connections
        self.per_ip = edge.guard.per_ip  # open connections per peer address (mutated in place)
        self.trusted = TrustedProxies(config.edge.trusted_proxies)
        self.keys = ClientKeys(d.ipv6_prefix)
        self.bans = BanTable(self.keys)
        self.allow = tuple(ipaddress.ip_network(n, strict=False) for n in d.allowlist)
        self.allowed = lru_cache(maxsize=65536)(self._allowed)
        self.clients: dict[str, _Client] = {}
        self.counts = dict.fromkeys(ACTIONS, 0)
        self.would = dict.fromkeys(ACTIONS, 0)
        self.untracked = 0
        self._would_ban: dict[str, float] = {}  # dry run: who would be banned, until when
        self.retry_after = str(max(1, math.ceil(d.window)))
        self.etcd = edge.etcd if d.cluster else None
        self.registry_keys = Keys(config.etcd.prefix)
        self.node = f"{socket.gethostname()}/{edge.worker}"
        self.mirror: PrefixMirror[BanRecord] | None = None
        self._published: dict[str, float] = {}  # address -> until, as etcd held the bans last
        self._tasks: set[asyncio.Task[None]] = set()
        # With workers > 1: the node's shared client table (rates and connections per node).
        node = getattr(edge, "node", None)
        self.table: ClientTable | None = node.clients if node is not None else None
        # Called with (key, until) after a ban made here, and with key after a cut: the
        # node's bus (front/node.py) tells the other workers; the edge cuts tunnels and streams.
        self.on_ban: list[Any] = []
        self.on_cut: list[Any] = []
        guard = edge.guard
        if not self.dry_run:
            guard.banned = self.peer_banned
        guard.alarm_at = d.hard_connections
        guard.on_alarm = self._connection_flood
        edge.metrics.registry.register(DosCollector(self))

    # --- lifecycle (called by the edge) -------------------------------------------------

    async def start(self) -> None:
        """Follow the cluster's bans and sweep idle clients."""
        if self.etcd is not None:
            self.mirror = PrefixMirror(
                self.etcd,
                self.registry_keys.bans,
                lambda key, value: BanRecord.decode(value),
                self._remote_changed,
                name="bans",
            )
            self._spawn(self.mirror.run())
        self._spawn(self._sweep_forever())

    async def stop(self) -> None:
        """Stop following bans (the bans themselves live on under their leases)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the request path ---------------------------------------------------------------

    def _allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def peer_banned(self, peer: str) -> bool:
        """For the ConnectionGuard: is this peer banned (its new connections are closed)?"""
        bans = self.bans
        if not bans.exact and not bans.networks:
            return False
        return bans.until(self.keys(peer), peer) > 0 and not self.allowed(peer)

    def _assess(self, ex: Exchange) -> Reply | _Verdict:
        """Count this request for its client: a 403/429 to answer, or how to go on."""
        return self.assess(ex.request)

    def unrouted(self, request: Request) -> Reply | None:
        """A request that matches no route (the edge answers 404): counted like any other;
        a 403/429 to answer instead of the 404, or None. A delay verdict is not applied:
        the 404 costs less than holding the request."""
        verdict = self.assess(request)
        return verdict if isinstance(verdict, Reply) else None

    def assess(self, request: Request) -> Reply | _Verdict:
        """Count one request for its client: a 403/429 to answer, or how to go on."""
        peer = request.remote
        client = peer
        via_proxy = False
        if self.trusted.networks and self.trusted.is_trusted(peer):
            forwarded = request.headers.getall("X-Forwarded-For", ())
            if forwarded:
                client = self.trusted.client_of(peer, forwarded)
                via_proxy = client != peer
        key = client if ":" not in client else self.keys(client)
        bans = self.bans
        if (bans.exact or bans.networks) and bans.until(key, client) and not self.allowed(client):
            if not self.dry_run:
                self.counts["blocked"] += 1
                return _reply(403, _FORBIDDEN)
            self.would["blocked"] += 1
        if self.allow and self.allowed(client):
            return _GO
        now = time.monotonic()
        entry = self.clients.get(key)
        if entry is None:
            if len(self.clients) >= self.config.max_clients:
                self.untracked += 1
                return _GO
            entry = self.clients[key] = _Client(now, client_hash(key) if self.table is not None else 0)
        table = self.table
        if table is None:
            rate = entry.hit(now, self.window)
            busy = entry.inflight + 1 if via_proxy else self.per_ip.get(peer, 0)
        else:
            entry.start = now  # for the sweep: last seen
            cell = entry.cell = table.count(entry.hash, now, entry.cell)
            if cell < 0:
                rate, conns = 0.0, 0
            elif now - entry.read_at >= REREAD:
                rate, conns = entry.rate, entry.conns = table.read(entry.hash, now, cell)
                entry.read_at = now
                entry.current = 0  # requests here since the read
            else:
                # Between reads: the node's figure as read, plus this worker's requests since.
                entry.current += 1
                rate, conns = entry.rate + entry.current / self.window, entry.conns
            # Behind a trusted proxy, in flight on this worker (the proxy's connections
            # spread its clients' requests); otherwise the node's open connections of
            # the address (the key's, for IPv4; an IPv6 key is a whole network).
            if via_proxy:
                busy = entry.inflight + 1
            else:
                busy = conns if key == peer else table.connections(client_hash(peer))
        delay = 0.0
        if rate > self.hard_rate or busy >= self.hard_connections:
            reason = f"{rate:.0f} requests/s" if rate > self.hard_rate else f"{busy} concurrent"
            if self.ban(key, reason):
                return _reply(403, _FORBIDDEN)
        elif rate > self.soft_rate or busy > self.soft_connections:
            soft = self._soft(entry, key, rate, busy)
            if isinstance(soft, Reply):
                return soft
            delay = soft
        elif entry.noted:
            entry.noted = False
        if not via_proxy and not delay:
            return _GO
        return _Verdict(entry if via_proxy else None, delay)

    def now(self, ex: Exchange, call_next: NowHandler) -> Reply | None:
        verdict = self._assess(ex)
        if isinstance(verdict, Reply):
            return verdict
        if not verdict.delay:
            entry = verdict.proxied
            if entry is None:
                reply = call_next(ex)
            else:
                entry.inflight += 1
                try:
                    reply = call_next(ex)
                finally:
                    entry.inflight -= 1
            if reply is not None:
                return reply
        ex.notes["dos"] = verdict  # counted once: __call__ goes on from this verdict
        return None

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        verdict = ex.notes.pop("dos", None) or self._assess(ex)
        if isinstance(verdict, Reply):
            return verdict
        if verdict.delay:
            await asyncio.sleep(verdict.delay)
        entry = verdict.proxied
        if entry is None:
            return await call_next(ex)
        entry.inflight += 1
        try:
            return await call_next(ex)
        finally:
            entry.inflight -= 1

    def _soft(self, entry: _Client, key: str, rate: float, busy: int) -> Reply | float:
        """Over a soft threshold: a 429 to return, or the delay before going on (0: none)."""
        action = "rejected" if self.config.soft_action == "reject" else "delayed"
        if not entry.noted:
            entry.noted = True
            log.warning(
                "client over the soft limit",
                client=key,
                rate=round(rate, 1),
                concurrent=busy,
                action=action,
                dry_run=self.dry_run,
            )
        if self.dry_run:
            self.would[action] += 1
            return 0.0
        self.counts[action] += 1
        if action == "delayed":
            return float(self.config.delay)
        reply = _reply(429, _TOO_MANY)
        reply.headers["Retry-After"] = self.retry_after
        # Over the connection threshold: shed this connection too.
        reply.close_connection = busy > self.config.soft_connections
        return reply

    # --- bans ---------------------------------------------------------------------------

    def ban(self, key: str, reason: str, seconds: float = 0.0) -> bool:
        """Ban a client key here and cluster-wide; False in dry-run (nothing enforced)."""
        now = time.time()
        if not self.keys.bannable(key):
            # A request can ban one client, never a range (a 0.0.0.0/0 would refuse everyone
            # cluster-wide) nor a name: only what the feature counts clients by.
            log.warning("refusing to ban a key that is not one client", client=key[:64], reason=reason)
            return False
        if self.dry_run:
            if self._would_ban.get(key, 0.0) <= now:
                self._would_ban[key] = now + self.config.ban_seconds
                self.would["banned"] += 1
                log.warning("client would be banned (dry run)", client=key, reason=reason)
            return False
        if self.bans.exact.get(key, 0.0) > now:
            return True  # already banned (a request that was in flight)
        seconds = seconds or self.config.ban_seconds
        until = now + seconds
        self.bans.add_local(key, until)
        self.counts["banned"] += 1
        log.warning("client banned", client=key, reason=reason, seconds=seconds)
        for hook in self.on_ban:
            hook(key, until)
        self._close_idle(key)
        if self.etcd is not None:
            self._spawn(self._publish(BanRecord(key, reason, until, self.node), math.ceil(seconds)))
        return True

    def apply_ban(self, key: str, until: float) -> None:
        """A ban another worker of this node made: enforce it here too (it published it)."""
        if self.dry_run or until <= time.time() or not self.keys.bannable(key):
            return
        if self.bans.local.get(key, 0.0) >= until:
            return
        self.bans.add_local(key, until)
        self._close_idle(key)

    def unban(self, key: str) -> bool:
        """Lift this worker's own ban on ``key`` (an operator's unban); True if there was one."""
        had = key in self.bans.local
        self.bans.lift_local({key})
        return had

    async def unpublish(self, key: str) -> None:
        """Delete the cluster's ban record for ``key`` (every edge's mirror drops it)."""
        if self.etcd is None:
            return
        try:
            await self.etcd.delete(self.registry_keys.ban(key))
        except EtcdError as exc:
            log.warning("ban not lifted in etcd", client=key, error=str(exc))

    def _connection_flood(self, peer: str) -> None:
        """The guard saw ``hard_connections`` open connections from one address."""
        if not self.allowed(peer):
            self.ban(self.keys(peer), f"{self.edge.guard.connections(peer)} connections")

    def _close_idle(self, key: str) -> None:
        """Close the banned client's idle keep-alive connections (busy ones get 403 next);
        the edge's cut hooks end its tunnels and passthrough streams, which carry no
        more requests to refuse."""
        keys = self.keys
        for conn in list(self.edge.connections):
            if keys(conn.peer) == key:
                conn.close_if_idle()
        for cut in self.on_cut:
            cut(key)

    async def _publish(self, record: BanRecord, seconds: int = 0) -> None:
        assert self.etcd is not None
        try:
            lease = await self.etcd.grant(seconds or self.config.ban_seconds)
            await self.etcd.put(self.registry_keys.ban(record.address), record.encode(), lease=lease.id)
        except EtcdError as exc:
            log.warning(
                "ban not published; it holds on this edge only", client=record.address, error=str(exc)
            )

    def _remote_changed(self, mirror: PrefixMirror[BanRecord]) -> None:
        before = set(self.bans.exact)
        # A ban that left etcd before its lease ended was lifted (`carousel dashboard`, etcdctl del):
        # the edge that made it drops its own copy too, else it would hold here alone until it ends.
        now = time.time()
        published = {rec.address: rec.until for rec in mirror.items.values()}
        self.bans.lift_local(
            {a for a, until in self._published.items() if a not in published and until > now}
        )
        self._published = published
        self.bans.load_remote(list(mirror.items.values()))
        if self.dry_run:
            return
        for key in set(self.bans.exact) - before:
            self._close_idle(key)

    async def _sweep_forever(self) -> None:
        """Forget idle clients and ended bans, once per window (at least every second)."""
        interval = min(max(self.window, 0.1), 1.0)
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Drop clients idle for two windows and bans that ended."""
        stale = now - 2 * self.window
        clients = self.clients
        for key in [k for k, c in clients.items() if c.start < stale and not c.inflight]:
            del clients[key]
        wall = time.time()
        self.bans.prune(wall)
        if self._would_ban:
            self._would_ban = {k: u for k, u in self._would_ban.items() if u > wall}

    def status(self) -> dict[str, Any]:
        """Counts and the bans in force, for /status and tests."""
        return {
            "dry_run": self.dry_run,
            "tracked_clients": len(self.clients),
            "bans": {k: round(u - time.time(), 1) for k, u in self.bans.exact.items()},
            "actions": dict(self.counts),
            "would": dict(self.would),
        }


def _reply(status: int, page: bytes) -> Reply:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/html; charset=utf-8"})
    return Reply(status, headers, BytesBody(page), close_connection=status == 403)


def feature(config: Config, ctx: EdgeContext) -> DosDetector | None:
    """Factory for the pipeline (None when [dos] is off)."""
    if not config.dos.enabled:
        return None
    return DosDetector(config, cast(DosContext, ctx))
