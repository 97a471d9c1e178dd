"""An edge host cut off from etcd while its agent lives: the record expires with its lease (test 5)."""

from __future__ import annotations

import time

from tests.e2e.clients import DnsWatch, edge_serves, exactly, without
from tests.e2e.report import FailoverReport
from tests.lab import Lab


def test_partitioned_edge_expires_at_lease_ttl(
    healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport
) -> None:
    lab = healthy_lab
    ttl = lab.settings.lease_ttl
    role = lab.roles("edge")[1]
    addr = lab.address(role)
    etcds = lab.roles("etcd")
    start = time.monotonic()
    lab.cut(role, etcds)
    gone = dns_watch.wait(without(addr), timeout=ttl + 4, what=f"{addr} expired") - start
    # The agent could not delete anything: only the lease's expiry removed the record.
    assert lab.processes[f"{role}-agent"].running()
    assert lab.processes[role].running()
    # Cut from etcd, not from its clients: the edge still serves from its last known pool.
    assert lab.client().run(edge_serves(addr), timeout=10)
    healed = time.monotonic()
    lab.heal(role, etcds)
    everyone = {lab.address(r) for r in lab.roles("edge")}
    back = dns_watch.wait(exactly(everyone), timeout=10, what=f"{addr} back after the heal") - healed
    failover_report.add(
        "edge host cut off from etcd, agent alive: A record gone from both dnsd",
        f"lease TTL + 1 s = {ttl + 1.0:.1f} s",
        1,
        f"{gone:.2f} s; re-registered {back:.2f} s after the partition healed",
    )
    assert gone <= ttl + 1.0, f"expired after {gone:.2f} s, lease TTL {ttl} s"
