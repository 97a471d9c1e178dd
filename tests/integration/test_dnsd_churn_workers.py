"""workers = 2 under registry churn at 1,000 edges: every worker keeps up with etcd.

The supervisor answers no query: it hands each batch of watch events to the
workers as it arrives and builds its own table (for /metrics and /status)
at most once a second. Building one per batch, on the core the workers
rebuild on, left its etcd watch seconds behind (README, "Scale").
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.registry import Keys, ServiceRecord
from tests.integration.test_dnsd_helpers import dnsd_toml, poll, start_dnsd
from tests.integration.test_dnsd_scale import EDGES, churn, edge, register_all, serial_at_least
from tests.integration.test_dnsd_workers import spread_queries
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(120)


async def test_every_worker_reaches_the_last_revision_and_the_supervisor_builds_at_most_once_a_second(
    etcd_cfg: EtcdConfig, procs: ProcessGroup
) -> None:
    etcd = Etcd(dataclasses.replace(etcd_cfg, timeout=5.0))
    keys = Keys(etcd_cfg.prefix)
    lease = (await etcd.grant(60)).id
    try:

        async def put(record: ServiceRecord) -> int:
            return await etcd.put(keys.service("edge", record.node), record.encode(), lease=lease)

        revision = await register_all(put)
        dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg, dns={"workers": 2}))
        await serial_at_least(dnsd, revision, within=20.0)
        await poll(lambda: min(dnsd.status()["worker_revisions"]) >= revision, within=10)
        builds_before = dnsd.status()["table_builds"]

        states = ["up"] * EDGES
        last_revision, started, last_change = await churn(put, states, seed=25)

        # Every worker (each reports the revision it applied) within a second of the last change.
        await poll(lambda: min(dnsd.status()["worker_revisions"]) >= last_revision, within=30, interval=0.02)
        lag = time.monotonic() - last_change
        print(f"every worker at revision {last_revision} {lag * 1000:.0f} ms after the last change")
        assert lag < 1.0, f"the workers lagged the registry by {lag:.2f} s after the churn"
        # The supervisor's own table: caught up within a second or so, not rebuilt per batch.
        await poll(lambda: dnsd.status()["revision"] >= last_revision, within=5)
        builds = dnsd.status()["table_builds"] - builds_before
        elapsed = time.monotonic() - started
        print(f"supervisor: {builds} table builds in {elapsed:.1f} s of churn")
        assert builds <= elapsed / 1.0 + 2

        # Both workers answer right: only up edges, capped at 8.
        up = {edge(i).ipv4[0] for i in range(EDGES) if states[i] == "up"}
        answers = spread_queries(dnsd, 30, tries=3)
        assert all(len(a) == 8 and set(a) <= up for a in answers), answers
    finally:
        await etcd.revoke(lease)
        await etcd.close()
