"""Losing etcd members: answers unchanged, then last known state, then convergence (issue 6, test 4)."""

from __future__ import annotations

import asyncio
import time

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, ServiceRecord
from tests.e2e.clients import DnsWatch, exactly, load
from tests.e2e.report import FailoverReport
from tests.lab import Lab, NetnsThread


class MirrorObserver:
    """A registry reader (the one dnsd and the edges use) running on the client host."""

    def __init__(self, thread: NetnsThread, endpoints: list[str]) -> None:
        self.thread = thread
        # Built on the client host's loop: the gRPC channel binds to the loop it is made on.
        self.etcd, self.mirror = thread.run(self._build(endpoints), timeout=15)
        self.task = thread.submit(self.mirror.run())
        thread.run(asyncio.wait_for(self.mirror.synced.wait(), 10), timeout=15)

    @staticmethod
    async def _build(endpoints: list[str]) -> tuple[Etcd, PrefixMirror[ServiceRecord]]:
        etcd = Etcd(EtcdConfig(endpoints=endpoints, prefix="/carousel/", timeout=1.0))
        mirror: PrefixMirror[ServiceRecord] = PrefixMirror(
            etcd, Keys().services, lambda key, raw: ServiceRecord.decode(raw), name="e2e-observer"
        )
        return etcd, mirror

    def nodes(self) -> set[tuple[str, str]]:
        """(service, node) of every up record the reader holds."""

        async def snapshot() -> set[tuple[str, str]]:
            return {(r.service, r.node) for r in self.mirror.items.values() if r.state == "up"}

        return self.thread.run(snapshot(), timeout=5)

    def wait(self, want: set[tuple[str, str]], timeout: float) -> float:
        """Seconds until the reader holds exactly ``want``."""
        start = time.monotonic()
        while (held := self.nodes()) != want:
            assert time.monotonic() - start < timeout, f"reader holds {sorted(held)}, want {sorted(want)}"
            time.sleep(0.05)
        return time.monotonic() - start

    def close(self) -> None:
        self.task.cancel()
        self.thread.run(self.etcd.close(), timeout=10)


def _unchanged(watch: DnsWatch, since: float, want: set[str]) -> int:
    """Assert every answer of both dnsd since ``since`` was exactly ``want``; return how many."""
    answers = watch.answers_since(since)
    wrong = [(round(t - since, 2), server, a) for t, server, a in answers if a != frozenset(want)]
    assert not wrong, f"answers changed: {wrong[:5]}"
    return len(answers)


def test_etcd_member_loss(healthy_lab: Lab, dns_watch: DnsWatch, failover_report: FailoverReport) -> None:
    lab = healthy_lab
    ttl = lab.settings.lease_ttl
    edges = {lab.address(r) for r in lab.roles("edge")}
    everything = lab.expected_registry()
    observer = MirrorObserver(lab.client(), lab.etcd_endpoints)
    try:
        observer.wait(everything, timeout=5)
        with load(lab) as client:
            time.sleep(1.0)
            # 1 of 3, and the leader at that: the cluster elects another and keeps quorum.
            first = lab.etcd_leader()
            assert first is not None, "no etcd leader"
            one_down = time.monotonic()
            lab.processes[first].stop()
            time.sleep(ttl + 1.5)  # longer than a lease: a lost keepalive would show now
            n_one = _unchanged(dns_watch, one_down, edges)
            assert observer.nodes() == everything
            assert {k for k, r in lab.registry().items() if r.state == "up"} == everything

            # 2 of 3: no quorum. dnsd and the edges live on the last known state.
            second = next(r for r in lab.roles("etcd") if lab.processes[r].running())
            two_down = time.monotonic()
            lab.processes[second].stop()
            time.sleep(2 * ttl + 1)
            n_two = _unchanged(dns_watch, two_down, edges)
            assert observer.nodes() == everything, "the reader must keep the last known state"
            failed_without_quorum = client.stats.failed
            served = client.stats.ok
        assert failed_without_quorum == 0, client.stats.failures[:5]
        no_quorum_for = time.monotonic() - two_down

        # While etcd is away an edge host dies: the restored cluster must drop it.
        victim = lab.roles("edge")[-1]
        lab.processes[f"{victim}-agent"].kill()
        lab.processes[victim].kill()
        restart = time.monotonic()
        lab.processes[first].start()
        lab.processes[second].start()
        lab.wait_etcd(timeout=30)
        quorum_back = time.monotonic() - restart
        # The new leader extends every lease by one election timeout before it can expire.
        bound = quorum_back + ttl + 1.0 + 1.0
        live = edges - {lab.address(victim)}
        converged = dns_watch.wait(exactly(live), timeout=bound + 5, what="the live edges") - restart
        live_registry = everything - {("edge", victim)}
        reader = observer.wait(live_registry, timeout=5) + (time.monotonic() - restart)
    finally:
        observer.close()
    failover_report.add(
        "etcd: 1 of 3 members stopped (the leader)",
        "DNS answers unchanged",
        1,
        f"{n_one} answers from both dnsd over {ttl + 1.5:.1f} s, all unchanged",
    )
    failover_report.add(
        "etcd: 2 of 3 members stopped (quorum lost)",
        "dnsd answers the last known state; edges serve",
        1,
        f"{n_two} answers over {no_quorum_for:.1f} s, all unchanged; {served} requests, 0 failed",
    )
    failover_report.add(
        "etcd: quorum restored, an edge died meanwhile",
        f"quorum + lease TTL + election timeout + 1 s = {bound:.1f} s",
        1,
        f"quorum back {quorum_back:.1f} s after restart; both dnsd live at {converged:.2f} s, "
        f"registry reader exact by {reader:.2f} s",
    )
    assert converged <= bound, f"converged after {converged:.2f} s, bound {bound:.2f} s"
