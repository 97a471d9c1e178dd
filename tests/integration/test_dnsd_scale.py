"""dnsd under registry churn at 1,000 edges: answers keep up with etcd.

A rolling restart of a large fleet (or a flapping health check) changes many
registrations a second. dnsd must apply them in batches, at a cost that
follows what changed, so that its answers (whose SOA serial is the registry
revision) reach the registry's last revision within a second of the last
change, and never serve an edge that is draining once they have.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.registry import Keys, ServiceRecord
from tests.integration.test_dnsd_helpers import ZONE, Dnsd, dnsd_toml, start_dnsd
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(120)

EDGES = 1000
CHANGES_PER_TICK = 10
TICK = 0.1
CHURN_SECONDS = 3.0


def edge(i: int, state: str = "up") -> ServiceRecord:
    return ServiceRecord("edge", f"e{i:04d}", 80, ipv4=(f"10.1.{i // 250}.{i % 250 + 1}",), state=state)  # type: ignore[arg-type]


def serial(dnsd: Dnsd) -> int:
    return int(dnsd.query(ZONE, "SOA").answer[0][0].serial)


async def serial_at_least(dnsd: Dnsd, revision: int, within: float) -> float:
    """Seconds until dnsd answers with a serial >= revision (AssertionError after ``within``)."""
    start = time.monotonic()
    while True:
        got = await asyncio.to_thread(serial, dnsd)
        if got >= revision:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"serial {got} still below revision {revision} after {within}s")
        await asyncio.sleep(0.005)


Put = Callable[[ServiceRecord], Awaitable[int]]


async def register_all(put: Put) -> int:
    """Register the EDGES edges, 100 writes at a time; returns the last revision."""
    revision = 0
    for start in range(0, EDGES, 100):
        revs = await asyncio.gather(*(put(edge(i)) for i in range(start, start + 100)))
        revision = max(revision, *revs)
    return revision


async def churn(put: Put, states: list[str], seed: int) -> tuple[int, float, float]:
    """CHANGES_PER_TICK edges flip state every TICK for CHURN_SECONDS (``states`` follows).

    Returns the last revision written, when the churn started and when its last change was made.
    """
    rng = random.Random(seed)
    last_revision = 0
    started = time.monotonic()
    for tick in range(round(CHURN_SECONDS / TICK)):
        batch = rng.sample(range(EDGES), CHANGES_PER_TICK)
        for i in batch:
            states[i] = "draining" if states[i] == "up" else "up"
        revs = await asyncio.gather(*(put(edge(i, states[i])) for i in batch))
        last_revision = max(last_revision, *revs)
        await asyncio.sleep(max(0.0, started + (tick + 1) * TICK - time.monotonic()))
    return last_revision, started, time.monotonic()


async def test_answers_reach_the_last_revision_within_a_second_of_churn(
    etcd_cfg: EtcdConfig, procs: ProcessGroup
) -> None:
    etcd = Etcd(dataclasses.replace(etcd_cfg, timeout=5.0))  # the writer may be slow on a busy machine
    keys = Keys(etcd_cfg.prefix)
    lease = (await etcd.grant(60)).id  # one lease for all: revoked at the end, the keys go with it
    try:

        async def put(record: ServiceRecord) -> int:
            return await etcd.put(keys.service("edge", record.node), record.encode(), lease=lease)

        revision = await register_all(put)
        dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg))
        await serial_at_least(dnsd, revision, within=10.0)
        builds_before = dnsd.status()["table_builds"]

        # 10 edges change state every 100 ms for 3 s: 300 changes, ~100 a second.
        states = ["up"] * EDGES
        last_revision, started, last_change = await churn(put, states, seed=24)

        await serial_at_least(dnsd, last_revision, within=30.0)
        lag = time.monotonic() - last_change
        print(f"answers reached revision {last_revision} {lag * 1000:.0f} ms after the last change")
        assert lag < 1.0, f"answers lagged the registry by {lag:.2f} s after the churn"
        # Batched: at most one build per 50 ms batch interval (plus the burst allowance),
        # where one build per watch event would be about 300.
        builds = dnsd.status()["table_builds"] - builds_before
        print(f"{builds} table builds for {round(CHURN_SECONDS / TICK) * CHANGES_PER_TICK} changes")
        assert builds <= (time.monotonic() - started) / 0.05 + 5

        # And they are right: only up edges, capped at 8, every query rotating.
        up = {edge(i).ipv4[0] for i in range(EDGES) if states[i] == "up"}
        answers = [await asyncio.to_thread(dnsd.addresses) for _ in range(20)]
        assert all(len(a) == 8 and set(a) <= up for a in answers), answers
        assert len({a[0] for a in answers}) == 20
    finally:
        await etcd.revoke(lease)
        await etcd.close()
