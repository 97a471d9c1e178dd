"""Failover when an edge host dies, and when only its edge process dies (issue 6, tests 1 and 2)."""

from __future__ import annotations

import time

import pytest

from tests.e2e.clients import DnsWatch, describe, exactly, without
from tests.e2e.report import FailoverReport
from tests.lab import Lab

TRIALS = 5


def _all_edges(lab: Lab) -> set[str]:
    return {lab.address(r) for r in lab.roles("edge")}


def _rejoin(lab: Lab, watch: DnsWatch, role: str) -> float:
    """Wait until the edge is back on both dnsd; seconds from now."""
    start = time.monotonic()
    return watch.wait(exactly(_all_edges(lab)), timeout=20, what=f"{role} back") - start


@pytest.mark.parametrize("fault", ["sigkill", "link-down"])
def test_dead_edge_leaves_dns_within_lease_ttl(
    healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport, fault: str
) -> None:
    lab = healthy_lab
    ttl = lab.settings.lease_ttl
    bound = ttl + 1.0
    took: list[float] = []
    rejoined: list[float] = []
    for trial in range(TRIALS):
        role = lab.roles("edge")[trial % len(lab.roles("edge"))]
        addr = lab.address(role)
        start = time.monotonic()
        if fault == "sigkill":
            lab.processes[f"{role}-agent"].kill()
            lab.processes[role].kill()
        else:
            lab.set_link(role, False)
        gone = dns_watch.wait(without(addr), timeout=bound + 3, what=f"{addr} gone")
        took.append(gone - start)
        if fault == "sigkill":
            lab.processes[role].start()
            lab.processes[f"{role}-agent"].start()
        else:
            lab.set_link(role, True)
        rejoined.append(_rejoin(lab, dns_watch, role))
    what = "edge and agent SIGKILLed" if fault == "sigkill" else "edge host's link down"
    after = "their restart" if fault == "sigkill" else "link up"
    failover_report.add(
        f"{what}: A record gone from both dnsd",
        f"lease TTL + 1 s = {bound:.1f} s",
        TRIALS,
        f"{describe(took)}; back in DNS {describe(rejoined)} after {after}",
    )
    assert max(took) <= bound, f"removal took {[round(t, 2) for t in took]} s, bound {bound} s"


def test_unhealthy_edge_is_removed_by_its_agent(
    healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport
) -> None:
    lab = healthy_lab
    s = lab.settings
    bound = s.fall * s.check_interval + s.check_timeout + 0.5
    took: list[float] = []
    rejoined: list[float] = []
    for trial in range(TRIALS):
        role = lab.roles("edge")[trial % len(lab.roles("edge"))]
        start = time.monotonic()
        lab.processes[role].kill()
        gone = dns_watch.wait(without(lab.address(role)), timeout=bound + 3, what=f"{role} gone")
        took.append(gone - start)
        assert lab.processes[f"{role}-agent"].running(), "the agent must stay up"
        lab.processes[role].start()
        rejoined.append(_rejoin(lab, dns_watch, role))
    failover_report.add(
        "edge process killed, agent alive: A record gone from both dnsd",
        f"fall x interval + timeout + 0.5 s = {bound:.1f} s",
        TRIALS,
        f"{describe(took)}; back in DNS {describe(rejoined)} after the edge restart (start-up + rise)",
    )
    assert max(took) <= bound, f"removal took {[round(t, 2) for t in took]} s, bound {bound} s"
