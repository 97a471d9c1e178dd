"""An edge host cut off from etcd while its agent lives: the record expires with its lease (test 5)."""

from __future__ import annotations

import time

from tests.e2e.clients import DnsWatch, describe, edge_serves, exactly, without
from tests.e2e.report import FailoverReport
from tests.lab import Lab

TRIALS = 5


def test_partitioned_edge_expires_at_lease_ttl(
    healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport
) -> None:
    lab = healthy_lab
    ttl = lab.settings.lease_ttl
    etcds = lab.roles("etcd")
    everyone = {lab.address(r) for r in lab.roles("edge")}
    took: list[float] = []
    rejoined: list[float] = []
    for trial in range(TRIALS):
        role = lab.roles("edge")[trial % len(lab.roles("edge"))]
        addr = lab.address(role)
        start = time.monotonic()
        lab.cut(role, etcds)
        took.append(dns_watch.wait(without(addr), timeout=ttl + 4, what=f"{addr} expired") - start)
        # The agent could not delete anything: only the lease's expiry removed the record.
        assert lab.processes[f"{role}-agent"].running()
        # Cut from etcd, not from its clients: the edge still serves from its last known pool.
        assert lab.client().run(edge_serves(addr), timeout=10)
        healed = time.monotonic()
        lab.heal(role, etcds)
        rejoined.append(dns_watch.wait(exactly(everyone), timeout=10, what=f"{addr} back") - healed)
    failover_report.add(
        "edge host cut off from etcd, agent alive: A record gone from both dnsd",
        f"lease TTL + 1 s = {ttl + 1.0:.1f} s",
        TRIALS,
        f"{describe(took)}; re-registered {describe(rejoined)} after the partition healed",
    )
    assert max(took) <= ttl + 1.0, f"expired after {[round(t, 2) for t in took]} s, lease TTL {ttl} s"
