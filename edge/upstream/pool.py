"""UpstreamPool: members, their state, and AP protection (max_conns + a FIFO queue).

Theory of operation
-------------------
A member may take a request when it is *eligible* and has a free *slot*:

* eligible = still a member (static, or present in the registry), registry
  state ``up`` (a ``draining`` member gets no new requests), active health
  checks passing, and not passively ejected;
* a slot = fewer than ``max_conns`` requests in flight on it (0: no limit).

``acquire()`` asks the balancer for an eligible member with a free slot. When
every eligible member is full the request waits in one FIFO queue per pool
(HAProxy's maxconn + queue). ``release()`` hands the freed slot straight to
the first waiter that can use it: no polling, no thundering herd. A waiter
gives up after ``queue_timeout`` (the caller answers 503 + Retry-After); a
full queue (``max_queue``) refuses at once.

Membership changes (registry events, health transitions, ejection expiry)
rebuild the balancer and offer free slots to waiters; nothing is recomputed
per request beyond the balancer's O(members) pick.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import structlog

from carousel.etcd import Etcd
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, ServiceRecord
from carousel.snapshot import SnapshotConfig, SnapshotStore, follow
from edge.core.config import PoolConfig
from edge.upstream.balancer import ConsistentHash, make_balancer
from edge.upstream.client import MemberConnections

log = structlog.get_logger("carousel.edge.pool")

# Health checks of one pool running at once: bounds the sockets and CPU a big
# pool's checks can take (HAProxy bounds them globally with max-spread-checks).
MAX_CHECKS_IN_FLIGHT = 32
# Checks started but waiting for a slot; past this a due check is skipped (a
# member whose checks keep timing out must not pile up work).
MAX_CHECKS_QUEUED = 4 * MAX_CHECKS_IN_FLIGHT


class NoMember(Exception):
    """No eligible member is left to try."""


class QueueFull(Exception):
    """The pool's queue is at max_queue."""


class QueueTimeout(Exception):
    """A request waited queue_timeout without getting a slot."""


class Member:
    """One AP server in a pool."""

    __slots__ = (
        "active",
        "authority",
        "conns",
        "ejected_until",
        "fail_streak",
        "failures",
        "healthy",
        "host",
        "name",
        "ok_streak",
        "port",
        "removed",
        "requests",
        "rr_current",
        "source",
        "state",
        "url",
        "weight",
    )

    def __init__(self, name: str, host: str, port: int, weight: int, source: str) -> None:
        self.name = name
        self.source = source  # "static" or "registry"
        self.weight = weight
        self.state = "up"
        self.active = 0
        self.rr_current = 0
        self.healthy = True
        self.ok_streak = 0
        self.fail_streak = 0
        self.failures: deque[float] = deque()
        self.ejected_until = 0.0
        self.removed = False
        self.requests = 0
        self.host = ""
        self.port = 0
        self.url = ""
        self.conns = MemberConnections(host, port, False, 0.0)
        self.set_address(host, port)

    def set_address(self, host: str, port: int, keepalive: bool = False, idle: float = 0) -> None:
        """Point the member at an address; idle connections to the old one are closed."""
        self.host, self.port = host, port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self.authority = f"{host}:{port}"  # the Host sent upstream unless preserve_host
        self.conns.close()
        self.conns = MemberConnections(host, port, keepalive, idle)

    def status(self, now: float) -> dict[str, Any]:
        """This member's state for /status."""
        return {
            "name": self.name,
            "address": f"{self.host}:{self.port}",
            "source": self.source,
            "weight": self.weight,
            "state": self.state,
            "healthy": self.healthy,
            "ejected_for": max(0.0, round(self.ejected_until - now, 2)),
            "active": self.active,
            "requests": self.requests,
        }


class _Waiter:
    __slots__ = ("fut", "tried", "want")

    def __init__(self, fut: asyncio.Future[Member], want: Member | None, tried: set[Member]) -> None:
        self.fut = fut
        self.want = want
        self.tried = tried


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class UpstreamPool:
    """A named group of members with balancing, health and admission control."""

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        etcd: Etcd | None,
        keys: Keys,
        snapshot: SnapshotConfig | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.etcd = etcd
        self.keys = keys
        self.members: dict[str, Member] = {}
        self.balancer = make_balancer(config.balance)
        self.is_hash = isinstance(self.balancer, ConsistentHash)
        # The balancer's pick as ``_pick`` types it, cast once here: ``acquire_now`` (once per
        # proxied request) calls it without ``_pick``'s call and its two run-time ``cast`` calls.
        self._pick_now: Callable[[Callable[[Member], bool], str | None], Member | None] = cast(
            Any, self.balancer.pick
        )
        self.queue: deque[_Waiter] = deque()
        self.queue_timeouts = 0
        self.mirror: PrefixMirror[ServiceRecord] | None = None
        # The members last known from the registry, kept on disk for a restart during an etcd outage.
        self.snapshot = SnapshotStore.from_config(snapshot, f"pool:{name}", ServiceRecord.encode)
        self._tasks: set[asyncio.Task[None]] = set()
        self._max = config.max_conns
        for m in config.members:
            host, port = _split_address(m.address)
            self.members[m.address] = self._member(m.address, host, port, m.weight, "static")
        self._rebuild()

    def _member(self, name: str, host: str, port: int, weight: int, source: str) -> Member:
        m = Member(name, host, port, weight, source)
        m.set_address(host, port, self.config.keepalive == "pool", self.config.keepalive_idle)
        return m

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start discovery and health checks (requests themselves use edge.upstream)."""
        c = self.config
        if c.service and self.etcd is not None:
            self.mirror = PrefixMirror(
                self.etcd,
                self.keys.service_prefix(c.service),
                lambda key, value: ServiceRecord.decode(value),
                self.sync_registry,
                name=f"pool:{self.name}",
            )
            self._spawn(follow(self.mirror, self.snapshot))
        if c.health.enabled:
            self._spawn(self._health_loop())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop background tasks and close upstream connections."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self.queue:
            if not w.fut.done():
                w.fut.set_exception(NoMember())
        self.queue.clear()
        for m in self.members.values():
            m.conns.close()

    # --- membership ---------------------------------------------------------------------

    def _rebuild(self) -> None:
        self.balancer.rebuild(list(self.members.values()))
        self._offer_all()

    def _pick(self, ok: Callable[[Member], bool], key: str | None) -> Member | None:
        # Balancers only see Members, typed by the Weighted protocol they need.
        return cast(Member | None, self.balancer.pick(cast(Any, ok), key))

    def sync_registry(self, mirror: PrefixMirror[ServiceRecord]) -> None:
        """Make the registry-sourced members equal to the mirror (called on every change)."""
        seen: set[str] = set()
        changed = False
        for rec in mirror.items.values():
            if not rec.addresses:
                continue
            seen.add(rec.node)
            host = rec.ipv4[0] if rec.ipv4 else rec.ipv6[0]
            m = self.members.get(rec.node)
            if m is None or m.source != "registry":
                m = self._member(rec.node, host, rec.port, rec.weight, "registry")
                self.members[rec.node] = m
                changed = True
                log.info("member added", pool=self.name, member=rec.node, state=rec.state)
            elif (m.host, m.port, m.weight) != (host, rec.port, rec.weight):
                pooled = self.config.keepalive == "pool"
                m.set_address(host, rec.port, pooled, self.config.keepalive_idle)
                m.weight = rec.weight
                changed = True
            if m.state != rec.state:
                log.info("member state", pool=self.name, member=rec.node, state=rec.state)
                m.state = rec.state
                changed = True
        for name, m in list(self.members.items()):
            if m.source == "registry" and name not in seen:
                m.removed = True
                m.conns.close()
                del self.members[name]
                changed = True
                log.info("member removed", pool=self.name, member=name)
        if changed:
            self._rebuild()

    def eligible(self, m: Member, now: float) -> bool:
        """May this member take new requests (ignoring its slots)?"""
        return not m.removed and m.state == "up" and m.healthy and m.ejected_until <= now

    # --- admission ----------------------------------------------------------------------

    def acquire_now(self, key: str | None, tried: set[Member]) -> Member | None:
        """A member with a slot taken for the caller, or None when all are full (then
        ``acquire`` queues); NoMember when nobody is eligible. No waiting."""
        now = time.monotonic()
        cap = self._max
        if self.is_hash:
            m = self._pick(lambda m: m not in tried and self.eligible(m, now), key)
            if m is None:
                raise NoMember()
            if cap and m.active >= cap:
                return None
        else:
            m = self._pick_now(
                lambda m: (not cap or m.active < cap) and m not in tried and self.eligible(m, now),
                key,
            )
            if m is None:
                if not any(m not in tried and self.eligible(m, now) for m in self.members.values()):
                    raise NoMember()
                return None
        m.active += 1
        m.requests += 1
        return m

    async def acquire(self, key: str | None, tried: set[Member]) -> Member:
        """A member with a slot taken for the caller; waits in the queue when all are full."""
        m = self.acquire_now(key, tried)
        if m is not None:
            return m
        want: Member | None = None
        if self.is_hash:
            want = self._pick(lambda m: m not in tried and self.eligible(m, time.monotonic()), key)
        c = self.config
        if len(self.queue) >= c.max_queue or c.queue_timeout <= 0:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Member] = loop.create_future()
        waiter = _Waiter(fut, want, tried)
        self.queue.append(waiter)
        timer = loop.call_later(c.queue_timeout, self._expire, waiter)
        try:
            return await fut
        except asyncio.CancelledError:
            # The client left while queued; a slot handed over meanwhile goes back.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            raise
        finally:
            timer.cancel()
            if not fut.done() or fut.cancelled():
                self._forget(waiter)

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self.queue.remove(waiter)
        except ValueError:
            pass

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.fut.done():
            self.queue_timeouts += 1
            self._forget(waiter)
            waiter.fut.set_exception(QueueTimeout())

    def release(self, m: Member) -> None:
        """Give a slot back; the first waiter that can use it gets it at once."""
        m.active -= 1
        if self.queue:
            self._offer(m, time.monotonic())

    def _offer(self, m: Member, now: float) -> None:
        if not self.eligible(m, now):
            return
        cap = self._max
        queue = self.queue
        while queue and (not cap or m.active < cap):
            for w in queue:
                if (w.want is None or w.want is m) and m not in w.tried and not w.fut.done():
                    queue.remove(w)
                    m.active += 1
                    m.requests += 1
                    w.fut.set_result(m)
                    break
            else:
                return

    def _offer_all(self) -> None:
        if self.queue:
            now = time.monotonic()
            for m in list(self.members.values()):
                self._offer(m, now)

    # --- passive ejection ---------------------------------------------------------------

    def report_failure(self, m: Member) -> None:
        """A request to ``m`` failed (connect error, timeout, reset); maybe eject it."""
        e = self.config.eject
        now = time.monotonic()
        failures = m.failures
        failures.append(now)
        while failures and failures[0] < now - e.window:
            failures.popleft()
        if len(failures) >= e.failures and m.ejected_until <= now:
            m.ejected_until = now + e.cooldown
            failures.clear()
            log.warning("member ejected", pool=self.name, member=m.name, cooldown=e.cooldown)
            asyncio.get_running_loop().call_later(e.cooldown, self._offer_all)

    # --- active health checks -----------------------------------------------------------

    async def _health_loop(self) -> None:
        """Check every member once per interval, spread out, with at most MAX_CHECKS_IN_FLIGHT at once.

        Each member gets a random phase in the interval and each check a jitter
        of +-10 % (as HAProxy's ``spread-checks``), so 500 members cost a steady
        250 checks a second at a 2 s interval, not a burst of 500 every 2 s.
        """
        h = self.config.health
        timeout = aiohttp.ClientTimeout(total=h.timeout)
        loop = asyncio.get_running_loop()
        rng = random.Random()
        slots = asyncio.Semaphore(MAX_CHECKS_IN_FLIGHT)
        due: list[tuple[float, int, Member]] = []  # heap of (loop time, tie-break, member)
        scheduled: set[Member] = set()
        running: set[asyncio.Task[None]] = set()
        order = itertools.count()

        async def check(session: aiohttp.ClientSession, m: Member) -> None:
            async with slots:
                try:
                    ok = await self._check(session, m)
                except Exception:  # a check that breaks counts as failed, never ends the loop
                    ok = False
            if not m.removed:
                self._record_check(m, ok)

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            try:
                next_scan = 0.0
                while True:
                    now = loop.time()
                    if now >= next_scan:  # new members join with a phase of their own
                        for m in self.members.values():
                            if m not in scheduled:
                                scheduled.add(m)
                                heapq.heappush(due, (now + rng.random() * h.interval, next(order), m))
                        next_scan = now + h.interval
                    while due and due[0][0] <= now:
                        at, _, m = heapq.heappop(due)
                        if m.removed or self.members.get(m.name) is not m:
                            scheduled.discard(m)
                            continue
                        if len(running) < MAX_CHECKS_QUEUED:
                            task = asyncio.create_task(check(session, m))
                            running.add(task)
                            task.add_done_callback(running.discard)
                        # The next check one interval later (+-10 %), or one from now if late.
                        nxt = max(at + h.interval * rng.uniform(0.9, 1.1), now + h.interval * 0.5)
                        heapq.heappush(due, (nxt, next(order), m))
                    wake = min(due[0][0] if due else next_scan, next_scan)
                    await asyncio.sleep(max(0.001, wake - loop.time()))
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    async def _check(self, session: aiohttp.ClientSession, m: Member) -> bool:
        h = self.config.health
        if h.type == "tcp":
            return await self._check_tcp(m)
        try:
            async with session.get(m.url + h.path, allow_redirects=False) as resp:
                await resp.read()
                return resp.status in h.expect_status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _check_tcp(self, m: Member) -> bool:
        """A connection that opens within the timeout is healthy; nothing is sent."""
        try:
            async with asyncio.timeout(self.config.health.timeout):
                _, writer = await asyncio.open_connection(m.host, m.port)
        except (TimeoutError, OSError):
            return False
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True

    def _record_check(self, m: Member, ok: bool) -> None:
        h = self.config.health
        if ok:
            m.fail_streak = 0
            m.ok_streak += 1
            if not m.healthy and m.ok_streak >= h.rise:
                m.healthy = True
                log.info("member healthy", pool=self.name, member=m.name)
                self._offer_all()
        else:
            m.ok_streak = 0
            m.fail_streak += 1
            if m.healthy and m.fail_streak >= h.fall:
                m.healthy = False
                log.warning("member failed health checks", pool=self.name, member=m.name)

    # --- reporting ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The pool's state for /status."""
        now = time.monotonic()
        return {
            "balance": self.config.balance,
            "max_conns": self.config.max_conns,
            "queue": len(self.queue),
            "queue_timeouts": self.queue_timeouts,
            "registry_synced_ago": (
                None if self.mirror is None else round(self.mirror.seconds_since_sync, 2)
            ),
            "members": [m.status(now) for m in self.members.values()],
        }

    def member_states(self) -> list[tuple[str, bool, int]]:
        """(name, eligible, active) for every member, for the metrics collector."""
        now = time.monotonic()
        return [(m.name, self.eligible(m, now), m.active) for m in self.members.values()]
