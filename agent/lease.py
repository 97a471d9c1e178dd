"""LeaseKeeper: one etcd lease per agent, kept alive at TTL/3 and replaced when lost.

Every key the agent writes hangs on this lease, so a crashed agent's keys
vanish after TTL seconds without anyone cleaning up. The lease is lost when
etcd forgets it (restart with an empty data dir, or a partition longer than
the TTL): keepalive then answers TTL <= 0, and we grant a new lease and tell
the agent to write its keys again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from prometheus_client import Counter

from carousel.etcd import Etcd, EtcdAuthError, EtcdError

log = structlog.get_logger("agent.lease")

RENEWALS = Counter("carousel_agent_lease_renewals_total", "Successful lease keepalives")
LOST = Counter("carousel_agent_lease_lost_total", "Leases found expired and replaced")
FAILURES = Counter("carousel_agent_lease_keepalive_failures_total", "Keepalives that got no answer")

# While etcd is away, try again this often, so that we are back within one
# keepalive period of its return.
RETRY = 0.25


class LeaseTooShort(Exception):
    """etcd granted a longer TTL than asked: the configured TTL is below its minimum."""


class LeaseKeeper:
    """Grants a lease, keeps it alive, and reports when it had to be replaced."""

    def __init__(self, etcd: Etcd, ttl: int, on_new_lease: Callable[[int], None]) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.lease_id: int | None = None
        self.ready = asyncio.Event()
        self._healthy = True

    @property
    def period(self) -> float:
        return self.ttl / 3

    async def _grant(self) -> None:
        lease = await self.etcd.grant(self.ttl)
        if lease.ttl > self.ttl:
            raise LeaseTooShort(
                f"etcd granted a {lease.ttl}s lease for the {self.ttl}s asked: agent.ttl is below "
                "etcd's minimum (1.5 x its election timeout); raise agent.ttl"
            )
        self.lease_id = lease.id
        self.ready.set()
        log.info("lease granted", lease=f"{lease.id:x}", ttl=lease.ttl)
        self.on_new_lease(lease.id)

    async def run(self) -> None:
        """Keep the lease alive forever (cancel to stop). Raises LeaseTooShort."""
        while True:
            try:
                if self.lease_id is None:
                    await self._grant()
                else:
                    ttl = await self.etcd.keepalive(self.lease_id, budget=self.period)
                    if ttl <= 0:
                        LOST.inc()
                        log.warning("lease expired in etcd; granting a new one", lease=f"{self.lease_id:x}")
                        self.lease_id = None
                        self.ready.clear()
                        continue
                    RENEWALS.inc()
                if not self._healthy:
                    log.info("etcd answers keepalives again", lease=f"{self.lease_id:x}")
                    self._healthy = True
                await asyncio.sleep(self.period)
            except EtcdAuthError:
                raise
            except EtcdError as exc:
                FAILURES.inc()
                if self._healthy:
                    log.warning("lease keepalive failed; retrying", error=str(exc))
                    self._healthy = False
                await asyncio.sleep(RETRY)

    async def adopt(self, lease_id: int) -> bool:
        """Take over the lease a previous agent of this node left its keys on, if still alive.

        One keepalive right away gives the keys a full TTL from now, instead of whatever was
        left since the old agent's last keepalive, so a restart (or a crash, whose last
        keepalive was up to TTL/3 ago) never lets them expire while this agent starts. A
        lease of another TTL than the configured one is not taken: a new one is granted.
        """
        if self.lease_id is not None:
            return False
        try:
            ttl = await self.etcd.keepalive(lease_id, budget=self.period)
        except EtcdError as exc:
            log.warning("could not keep the previous agent's lease alive", error=str(exc))
            return False
        if ttl != self.ttl:
            return False
        self.lease_id = lease_id
        self.ready.set()
        RENEWALS.inc()
        log.info("adopted the previous agent's lease", lease=f"{lease_id:x}", ttl=ttl)
        return True

    async def refresh(self) -> None:
        """Keep the lease alive once more now; errors are logged, not raised.

        A handover calls it last, so the keys live a full TTL from the old agent's exit
        rather than from its last periodic keepalive (up to TTL/3 earlier, plus the exit).
        """
        if self.lease_id is None:
            return
        try:
            ttl = await self.etcd.keepalive(self.lease_id, budget=self.period)
        except EtcdError as exc:
            log.warning("final keepalive failed; the lease runs out on its last one", error=str(exc))
            return
        if ttl > 0:
            log.info("lease refreshed for the successor", lease=f"{self.lease_id:x}", ttl=ttl)

    async def revoke(self) -> None:
        """Revoke the lease (deleting every key on it); errors are logged, not raised."""
        if self.lease_id is None:
            return
        try:
            await self.etcd.revoke(self.lease_id)
        except EtcdError as exc:
            log.warning("lease revoke failed; it will expire by itself", error=str(exc))
        self.lease_id = None
