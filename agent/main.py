"""`carousel agent`: health-check local services and keep their registry records true.

Theory of operation (anti-entropy, as Consul's agent does it): the agent
computes the record each service *should* have in etcd from what it knows
(check verdicts, the node's maintenance flag, whether it is stopping), and a
single reconcile loop makes etcd match, retrying while etcd is away. Events
only mark the state dirty; nothing else writes to etcd, so ordering races
between a check flip, a lease replacement and a drain cannot happen.

    check verdict --+
    maintenance ----+--> desired records --> reconcile --> etcd (under the lease)
    SIGTERM drain --+                           ^
    lease replaced -----------------------------+ (everything is re-written)

Signals: SIGTERM/SIGINT drain gracefully (``draining`` at once, keep serving
for drain_delay, delete, exit 0). SIGUSR2 hands over: exit at once leaving the
keys on the lease, so a new agent started within the TTL adopts them without
the node ever leaving DNS.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from agent.checks import CheckResult, HealthCheck, RiseFall
from agent.config import Config, ServiceConfig, load
from agent.lease import LeaseKeeper, LeaseTooShort
from carousel.admin import AdminServer
from carousel.etcd import Etcd, EtcdAuthError, EtcdError
from carousel.logs import setup_logging
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, MaintenanceFlag, SchemaError, ServiceRecord
from carousel.tasks import run_loop, stop_tasks

log = structlog.get_logger("agent")

CHECKS = Counter("carousel_agent_checks_total", "Health check results", ["service", "result"])
HEALTHY = Gauge("carousel_agent_service_healthy", "1 if the service passes its checks", ["service"])
PUBLISHED = Gauge("carousel_agent_service_published", "1 up, 0.5 draining, 0 absent in etcd", ["service"])
ETCD_ERRORS = Counter("carousel_agent_etcd_errors_total", "Failed etcd writes (retried)")

RETRY = 0.25


class ServiceState:
    """What the agent knows about one service."""

    def __init__(self, cfg: ServiceConfig, verdict: RiseFall) -> None:
        self.cfg = cfg
        self.verdict = verdict
        self.last: CheckResult | None = None
        self.record: ServiceRecord | None = None  # the record we want in etcd, if any
        self.published: tuple[ServiceRecord, int] | None = None  # (record, lease) in etcd


class Agent:
    """One node's agent: checks, desired state, reconcile loop, lease."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = config.agent.node
        self.site = config.agent.site
        self.keys = Keys(config.etcd.prefix)
        self.etcd = Etcd(config.etcd)
        self.lease = LeaseKeeper(self.etcd, config.agent.ttl, self._lease_replaced)
        self.services: dict[str, ServiceState] = {}
        self.maintenance = False
        self.stopping = False
        self.drain_started: float | None = None  # monotonic; set while draining
        self.drain_done = False
        self._dirty = asyncio.Event()
        self._settled = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.maintenance_view: PrefixMirror[MaintenanceFlag] = PrefixMirror(
            self.etcd,
            self.keys.maintenance_flag(self.node),
            lambda key, raw: MaintenanceFlag.decode(raw),
            self._maintenance_changed,
            name="maintenance",
        )

    # --- desired state ---------------------------------------------------------------------

    def _draining(self) -> bool:
        return self.stopping or self.maintenance

    def _record(self, st: ServiceState, state: str) -> ServiceRecord:
        if st.record is not None and st.record.state == state:
            return st.record
        return ServiceRecord(
            service=st.cfg.name,
            node=self.node,
            port=st.cfg.port,
            ipv4=tuple(st.cfg.ipv4),
            ipv6=tuple(st.cfg.ipv6),
            weight=st.cfg.weight,
            state="up",
            meta=dict(st.cfg.meta),
            site=self.site,
        ).with_state(state)  # type: ignore[arg-type]

    def recompute(self) -> None:
        """Derive every service's desired record and wake the reconcile loop."""
        for st in self.services.values():
            if not st.verdict.healthy or (self._draining() and self.drain_done):
                st.record = None
            elif self._draining():
                # Only a published (or publishable) service drains; a service that
                # never came up has nothing to drain.
                st.record = self._record(st, "draining") if st.record is not None else None
            else:
                st.record = self._record(st, "up")
        self._settled.clear()
        self._dirty.set()

    def _lease_replaced(self, lease_id: int) -> None:
        for st in self.services.values():
            st.published = None  # whatever was there hung on the old lease
        self.recompute()

    def _maintenance_changed(self, view: PrefixMirror[MaintenanceFlag]) -> None:
        flagged = self.keys.maintenance_flag(self.node) in view.items
        if flagged == self.maintenance:
            return
        self.maintenance = flagged
        log.info(
            "maintenance flag " + ("set: draining" if flagged else "cleared: serving"),
            node=self.node,
        )
        if flagged:
            self._start_drain_timer()
        else:
            self.drain_done = False
            self.drain_started = None
        self.recompute()

    def _start_drain_timer(self) -> None:
        self.drain_done = False
        self.drain_started = time.monotonic()
        self._spawn(self._drain_timer(self.drain_started))

    async def _drain_timer(self, started: float) -> None:
        await asyncio.sleep(self.config.agent.drain_delay)
        if self.drain_started == started and self._draining():
            self.drain_done = True
            self.recompute()

    # --- reconcile -------------------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        """Make etcd match the desired records; retry while etcd is away."""
        failing = False
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._reconcile_once()
                if not self._dirty.is_set():
                    self._settled.set()
            except EtcdAuthError:
                raise
            except EtcdError as exc:
                ETCD_ERRORS.inc()
                if not failing:
                    log.warning("registry write failed; retrying until etcd answers", error=str(exc))
                    failing = True
                await asyncio.sleep(RETRY)
                self._dirty.set()
                continue
            except Exception:
                ETCD_ERRORS.inc()
                log.exception("registry write failed unexpectedly; retrying")
                await asyncio.sleep(RETRY)
                self._dirty.set()
                continue
            if failing:
                log.info("registry writes succeed again")
                failing = False

    async def _reconcile_once(self) -> None:
        lease = self.lease.lease_id
        for name, st in self.services.items():
            want = st.record
            key = self.keys.service(name, self.node)
            if want is None:
                if st.published is not None:
                    await self.etcd.delete(key)
                    log.info("deregistered", service=name)
                    st.published = None
            elif lease is not None and st.published != (want, lease):
                await self.etcd.put(key, want.encode(), lease=lease)
                log.info("registered", service=name, state=want.state, lease=f"{lease:x}")
                st.published = (want, lease)
            pub = st.published
            PUBLISHED.labels(name).set(0 if pub is None else 1 if pub[0].state == "up" else 0.5)

    # --- checks ----------------------------------------------------------------------------

    async def _adopt(self, st: ServiceState) -> None:
        """Start healthy if a previous agent left this service registered and up.

        A restarted agent then does not pull a healthy node out of DNS while it
        re-earns `rise` passes; its first failing checks still count toward `fall`.
        """
        try:
            kv = await self.etcd.get(self.keys.service(st.cfg.name, self.node))
        except EtcdError:
            return
        if kv is None:
            return
        try:
            prev = ServiceRecord.decode(kv.value)
        except SchemaError:
            return
        if prev.state == "up":
            st.verdict.healthy = True
            log.info("adopting registration left by a previous agent", service=st.cfg.name)
            if kv.lease:
                await self.lease.adopt(kv.lease)

    async def check_forever(self, st: ServiceState, check: HealthCheck) -> None:
        """Probe at the configured interval and feed the rise/fall verdict."""
        interval = st.cfg.check.interval
        while True:
            started = time.monotonic()
            result = await check.probe()
            st.last = result
            CHECKS.labels(st.cfg.name, "pass" if result.ok else "fail").inc()
            if st.verdict.observe(result.ok):
                HEALTHY.labels(st.cfg.name).set(1 if st.verdict.healthy else 0)
                log.info(
                    "service healthy" if st.verdict.healthy else "service unhealthy",
                    service=st.cfg.name,
                    detail=result.detail,
                )
                self.recompute()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    # --- lifecycle -------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def status(self) -> dict[str, Any]:
        """The /status document."""
        return {
            "node": self.node,
            "lease": None if self.lease.lease_id is None else f"{self.lease.lease_id:x}",
            "maintenance": self.maintenance,
            "stopping": self.stopping,
            "services": {
                name: {
                    "healthy": st.verdict.healthy,
                    "last_check": None if st.last is None else st.last.detail,
                    "published": None if st.published is None else st.published[0].state,
                }
                for name, st in self.services.items()
            },
        }

    async def run(self) -> int:
        """Run until a signal; returns the exit status."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handoff = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR2, handoff.set)

        # Registry first: a restarted agent keeps its predecessor's lease alive before it
        # loads aiohttp or binds the admin port (under load, that start-up took longer than
        # a short TTL and the node left DNS for a moment).
        for svc in self.config.service:
            st = ServiceState(svc, RiseFall(svc.check.rise, svc.check.fall))
            self.services[svc.name] = st
            await self._adopt(st)
        lease_task = self._spawn(self.lease.run())
        import aiohttp

        admin = AdminServer(self.config.admin, status=self.status)
        timeout = aiohttp.ClientTimeout(total=None)
        session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
        try:
            await admin.start()
            reconcile_task = self._spawn(self.reconcile_forever())
            self._spawn(self.maintenance_view.run())
            for st in self.services.values():
                self._spawn(self.check_forever(st, HealthCheck(st.cfg, session)))
            self.recompute()
            log.info("agent started", node=self.node, services=list(self.services), admin_port=admin.port)

            waiters = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(handoff.wait()),
                lease_task,
                reconcile_task,
            }
            done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                if w not in (lease_task, reconcile_task):
                    w.cancel()
            for t in (lease_task, reconcile_task):
                if t in done:
                    t.result()  # LeaseTooShort / EtcdAuthError end the agent
            if handoff.is_set():
                log.info("handing over: exiting with the registration left on the lease")
                return 0
            await self._drain_and_exit()
            return 0
        except LeaseTooShort as exc:
            log.error("invalid lease TTL", error=str(exc))
            return 2
        except EtcdAuthError as exc:
            log.error("etcd refused the agent's credentials", error=str(exc))
            return 1
        finally:
            await stop_tasks(self._tasks, what="agent task")
            await session.close()
            await admin.stop()
            if handoff.is_set():
                # Last, after everything else has stopped: the successor gets the full TTL
                # from this moment to start and adopt the keys, not whatever was left of it
                # since the last periodic keepalive.
                await self.lease.refresh()
            await self.etcd.close()

    async def _drain_and_exit(self) -> None:
        """Graceful drain: draining at once, serve for drain_delay, then delete."""
        log.info("draining", node=self.node, delay=self.config.agent.drain_delay)
        self.stopping = True
        if self.drain_started is None or self.drain_done:
            self.drain_started = time.monotonic()
        self.drain_done = False
        self.recompute()
        await self._wait_settled(5.0)
        remaining = self.config.agent.drain_delay - (time.monotonic() - self.drain_started)
        await asyncio.sleep(max(0.0, remaining))
        self.drain_done = True
        self.recompute()
        await self._wait_settled(5.0)
        await self.lease.revoke()
        log.info("drained; exiting", node=self.node)

    async def _wait_settled(self, limit: float) -> None:
        try:
            await asyncio.wait_for(self._settled.wait(), limit)
        except TimeoutError:
            log.warning("registry not updated in time; the lease will expire the keys", limit=limit)


def load_config(path: str) -> Config:
    """Read and check an agent config file (a ConfigError names the file and key)."""
    return load(path)


def run(config: Config, config_path: str | None = None) -> int:
    """Entry point for `carousel agent --config FILE`."""
    setup_logging(config.log, daemon="agent")
    return int(run_loop(Agent(config).run()))
