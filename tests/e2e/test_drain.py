"""Graceful drain and rolling restart under continuous load: 0 failed requests (issue 6, test 3)."""

from __future__ import annotations

import signal
import time

from tests.e2e.clients import DnsWatch, LoadStats, exactly, load, without
from tests.e2e.report import FailoverReport
from tests.lab import Lab


def drain_and_stop(lab: Lab, role: str, watch: DnsWatch) -> tuple[float, float]:
    """SIGTERM the edge's agent, let it drain and exit, then stop the edge, as an operator would.

    Returns (seconds until both dnsd dropped the edge, seconds until the agent exited).
    """
    agent = lab.processes[f"{role}-agent"]
    start = time.monotonic()
    agent.signal(signal.SIGTERM)
    out_of_dns = watch.wait(without(lab.address(role)), timeout=2, what=f"{role} draining") - start
    assert agent.wait(lab.settings.drain_delay + 5) == 0, agent.tail()
    agent_done = time.monotonic() - start
    edge = lab.processes[role]
    edge.signal(signal.SIGTERM)
    assert edge.wait(10) == 0, edge.tail()
    return out_of_dns, agent_done


def _failures(stats: LoadStats) -> str:
    return "\n".join(f"{t:.2f} {addr} {err}" for t, addr, err in stats.failures[:10])


def test_sigterm_of_an_agent_drains_without_failed_requests(
    healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport
) -> None:
    lab = healthy_lab
    role = lab.roles("edge")[0]
    addr = lab.address(role)
    with load(lab) as client:
        time.sleep(1.5)
        assert client.stats.by_address[addr] > 0, "the edge to drain got no traffic before the drain"
        out_of_dns, agent_done = drain_and_stop(lab, role, dns_watch)
        time.sleep(1.0)  # keep sending after the edge is gone
    stats = client.stats
    failover_report.add(
        "agent SIGTERM under load (drain, then the edge stops)",
        "0 failed requests",
        1,
        f"{stats.failed} failed of {stats.ok + stats.failed} ({stats.rate:.0f} req/s); "
        f"out of DNS {out_of_dns * 1000:.0f} ms after SIGTERM, agent exited after {agent_done:.1f} s",
    )
    print(stats.summary())
    assert stats.failed == 0, _failures(stats)
    assert stats.ok > 100, stats.summary()


def test_rolling_restart_of_every_edge_without_failed_requests(
    healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport
) -> None:
    lab = healthy_lab
    everyone = {lab.address(r) for r in lab.roles("edge")}
    per_edge: list[float] = []
    with load(lab) as client:
        time.sleep(1.0)
        for role in lab.roles("edge"):
            start = time.monotonic()
            drain_and_stop(lab, role, dns_watch)
            lab.processes[role].start()
            lab.processes[f"{role}-agent"].start()
            dns_watch.wait(exactly(everyone), timeout=20, what=f"{role} back after its restart")
            per_edge.append(time.monotonic() - start)
        time.sleep(1.0)
    stats = client.stats
    failover_report.add(
        "rolling restart of all edges under load",
        "0 failed requests",
        1,
        f"{stats.failed} failed of {stats.ok + stats.failed} ({stats.rate:.0f} req/s); "
        f"{sum(per_edge):.1f} s for {len(per_edge)} edges",
    )
    print(stats.summary())
    assert stats.failed == 0, _failures(stats)
    assert all(stats.by_address[a] > 0 for a in everyone), stats.summary()
