"""PrefixMirror without etcd: its freshness probe and the batching of change callbacks."""

from __future__ import annotations

import asyncio

import pytest

from carousel import mirror as mirror_mod
from carousel.config import EtcdConfig
from carousel.etcd import WatchEvent
from carousel.mirror import PrefixMirror


class FakeEtcd:
    """Just enough of carousel.etcd.Etcd for the probe."""

    def __init__(self, batch_interval: float = 0.05) -> None:
        self.config = EtcdConfig(batch_interval=batch_interval)
        self.mirror: PrefixMirror[bytes] | None = None

    async def revision(self) -> int:
        assert self.mirror is not None
        seen = self.mirror.revision
        self.mirror.revision = seen + 2  # two events arrive while the read is in flight
        return seen + 1  # etcd answered with the revision of the first


async def test_probe_is_not_fooled_by_events_during_its_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_mod, "PROBE_INTERVAL", 0.01)
    etcd = FakeEtcd()
    m: PrefixMirror[bytes] = PrefixMirror(etcd, "/p/", lambda k, v: v)  # type: ignore[arg-type]
    etcd.mirror = m
    m.revision = 10
    probe = asyncio.create_task(m._probe())
    await asyncio.sleep(0.2)
    assert not probe.done(), probe.exception()  # no false "etcd was reset", no re-list
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)


async def test_callbacks_are_batched_and_changes_handed_out() -> None:
    calls: list[dict[str, tuple[bytes | None, bytes | None]] | None] = []
    m: PrefixMirror[bytes] = PrefixMirror(
        FakeEtcd(batch_interval=0.05),  # type: ignore[arg-type]
        "/p/",
        lambda k, v: v,
        lambda mirror: calls.append(mirror.take_changes()),
    )
    m._reloaded = False
    loop = asyncio.get_running_loop()
    started = loop.time()
    rev = 0
    for _ in range(20):  # 10 events every 10 ms for 200 ms: 200 events
        for i in range(10):
            rev += 1
            m.apply(WatchEvent("put", f"/p/k{i}", f"v{rev}".encode(), rev))
            m._changed()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    elapsed = loop.time() - started
    # A burst of 3 at once, then at most one per 50 ms: not one per event.
    assert 3 <= len(calls) <= mirror_mod.BURST + elapsed / 0.05 + 1, len(calls)
    # Every call saw what changed since the one before; the last one ends at the last value.
    assert all(c for c in calls)
    last = calls[-1]
    assert last is not None and last["/p/k9"][1] == f"v{rev}".encode()
    assert m.items["/p/k9"] == f"v{rev}".encode()
