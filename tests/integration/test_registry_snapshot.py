"""Last-known registry state on disk: dnsd and the edge restarted during an etcd outage still serve.

Real etcd (stopped mid-test), real dnsd processes, real edge and AP servers on loopback.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import dns.rcode
import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import EtcdProcess
from carousel.registry import Keys, ServiceRecord
from carousel.snapshot import RegistrySnapshot, file_name, read_snapshot, write_atomic
from edge.testing import running_edge
from sampleapp.main import start_app
from tests.integration.test_dnsd_helpers import addr, dnsd_toml, edge, start_dnsd
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(120)


def _snapshot_toml(directory: Path, **opts: object) -> str:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in opts.items())
    return f'\n[snapshot]\ndirectory = "{directory}"\nwrite_interval = 0.1\n{lines}\n'


def _events(text: str, event: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


async def _wait_file(path: Path, revision_at_least: int = 1, within: float = 10.0) -> RegistrySnapshot:
    deadline = time.monotonic() + within
    while True:
        snap = read_snapshot(path)
        if snap is not None and snap.revision >= revision_at_least and snap.items:
            return snap
        assert time.monotonic() < deadline, f"no snapshot written to {path}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_dnsd_restarted_during_an_etcd_outage_answers_from_its_snapshot(
    own_etcd: EtcdProcess, procs: ProcessGroup, tmp_path: Path, workers: int
) -> None:
    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix="/carousel/", timeout=1.0)
    keys = Keys(cfg.prefix)
    etcd = Etcd(cfg)  # no leases: the records must outlive this client
    for rec in (edge(1), edge(2), edge(3, state="draining")):
        await etcd.put(keys.service(rec.service, rec.node), rec.encode())
    await etcd.close()
    snapdir = tmp_path / "state"
    config = dnsd_toml(cfg, dns={"workers": workers}) + _snapshot_toml(snapdir)
    first = start_dnsd(procs, "dnsd-1", config)
    assert sorted(first.addresses()) == [addr(1), addr(2)]
    path = snapdir / file_name("dnsd-registry")
    snap = await _wait_file(path)
    assert len(snap.items) == 3
    assert path.stat().st_mode & 0o777 == 0o600

    first.daemon.signal(15)
    first.daemon.wait(10)
    own_etcd.stop()

    started = time.monotonic()
    second = start_dnsd(procs, "dnsd-2", config)  # waits for /healthz 200: answers from the snapshot
    ready_ms = (time.monotonic() - started) * 1000
    assert sorted(second.addresses()) == [addr(1), addr(2)]  # the healthy edges, not the draining one
    assert sorted(second.addresses(rdtype="AAAA")) == ["fd00::1", "fd00::2"]
    served = _events(second.daemon.output(), "serving the registry snapshot until etcd answers")
    assert len(served) == 1, second.daemon.output()
    assert 0 <= float(served[0]["age_seconds"]) < 60  # type: ignore[arg-type]
    assert served[0]["records"] == 3
    from datetime import datetime

    (listening,) = _events(second.daemon.output(), "dnsd listening")
    stamp = [datetime.fromisoformat(str(e["timestamp"])) for e in (listening, served[0])]
    seeded_ms = (stamp[1] - stamp[0]).total_seconds() * 1000
    print(f"dnsd (workers={workers}) restarted with etcd down: healthy answers {ready_ms:.0f} ms "
          f"after start, snapshot served {seeded_ms:.1f} ms after listening")  # fmt: skip

    # etcd back: the live registry replaces the snapshot (edge 2 left during the outage)
    second.daemon.signal(15)
    second.daemon.wait(10)
    own_etcd.start()
    etcd = Etcd(cfg)
    await etcd.delete(keys.service("edge", "edge2"))
    await etcd.close()
    third = start_dnsd(procs, "dnsd-3", config)
    deadline = time.monotonic() + 10
    while sorted(third.addresses()) != [addr(1)]:
        assert time.monotonic() < deadline, third.addresses()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty"])
async def test_a_damaged_snapshot_is_refused_with_one_line_and_dnsd_keeps_answering(
    procs: ProcessGroup, tmp_path: Path, damage: str
) -> None:
    snapdir = tmp_path / "state"
    path = snapdir / file_name("dnsd-registry")
    good = RegistrySnapshot(
        "/carousel/services/", 7, time.time(), {"/carousel/services/edge/edge1": edge(1).encode()}
    )
    data = good.encode()
    damaged = {
        "truncated": data[: len(data) - 9],
        "flipped": data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:],
        "garbage": b"\x00\xff" * 500,
        "empty": b"",
    }[damage]
    write_atomic(path, damaged)
    # etcd unreachable: a port nothing listens on
    cfg = EtcdConfig(endpoints=["127.0.0.1:9"], prefix="/carousel/", timeout=0.5)
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(cfg) + _snapshot_toml(snapdir), synced=False)
    deadline = time.monotonic() + 10
    while not _events(dnsd.daemon.output(), "registry snapshot refused"):
        assert time.monotonic() < deadline, dnsd.daemon.output()
        await asyncio.sleep(0.05)
    # past_max_age = "refuse" (the default): nothing servable, so SERVFAIL sends resolvers elsewhere
    assert dnsd.query().rcode() == dns.rcode.SERVFAIL
    assert dnsd.addresses("mail.example.test") == ["192.0.2.25"]  # static names still answer
    await asyncio.sleep(1.5)  # several etcd retries later
    assert dnsd.daemon.running()
    assert len(_events(dnsd.daemon.output(), "registry snapshot refused")) == 1
    assert dnsd.query().rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("policy", ["serve", "refuse"])
async def test_a_snapshot_past_max_age_follows_the_policy(
    procs: ProcessGroup, tmp_path: Path, policy: str
) -> None:
    snapdir = tmp_path / "state"
    key = "/carousel/services/edge/edge1"
    old = RegistrySnapshot("/carousel/services/", 7, time.time() - 7200, {key: edge(1).encode()})
    write_atomic(snapdir / file_name("dnsd-registry"), old.encode())
    cfg = EtcdConfig(endpoints=["127.0.0.1:9"], prefix="/carousel/", timeout=0.5)
    extra = _snapshot_toml(snapdir, max_age=3600.0, past_max_age=policy)
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(cfg) + extra, synced=policy == "serve")
    if policy == "serve":
        assert dnsd.addresses() == [addr(1)]
        (line,) = _events(dnsd.daemon.output(), "serving the registry snapshot until etcd answers")
        assert line["level"] == "warning" and 7100 < float(line["age_seconds"]) < 7300  # type: ignore[arg-type]
    else:
        deadline = time.monotonic() + 10
        while not _events(dnsd.daemon.output(), "registry snapshot refused"):
            assert time.monotonic() < deadline, dnsd.daemon.output()
            await asyncio.sleep(0.05)
        assert "older than max_age" in dnsd.daemon.output()
        assert dnsd.query().rcode() == dns.rcode.SERVFAIL


async def test_edge_restarted_during_an_etcd_outage_still_proxies_to_the_aps_it_knew(
    own_etcd: EtcdProcess, tmp_path: Path
) -> None:
    runners = [await start_app("127.0.0.1", 0, name) for name in ("r1", "r2")]
    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix="/carousel/", timeout=1.0)
    keys = Keys(cfg.prefix)
    snapdir = tmp_path / "edge-state"
    data = {
        "etcd": {"endpoints": cfg.endpoints, "prefix": cfg.prefix, "timeout": 1.0},
        "pool": {"app": {"service": "app"}},
        "route": [{"path": "/", "pool": "app"}],
        "snapshot": {"directory": str(snapdir), "write_interval": 0.1},
    }
    try:
        etcd = Etcd(cfg)
        for name, (_, port) in zip(("r1", "r2"), runners, strict=True):
            rec = ServiceRecord("app", name, port, ("127.0.0.1",))
            await etcd.put(keys.service("app", name), rec.encode())
        await etcd.close()

        async def served(port: int, n: int) -> set[str | None]:
            seen: set[str | None] = set()
            async with aiohttp.ClientSession() as s:
                for _ in range(n):
                    async with s.get(f"http://127.0.0.1:{port}/echo") as r:
                        seen.add((await r.json())["ap"] if r.status == 200 else None)
            return seen

        async with running_edge(data) as first:
            deadline = time.monotonic() + 10
            while await served(first.port, 4) != {"r1", "r2"}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await _wait_file(snapdir / file_name("pool:app"))
        own_etcd.stop()
        started = time.monotonic()
        async with running_edge(data) as second:
            deadline = time.monotonic() + 2
            while len(second.pools["app"].members) != 2:  # seeded from disk, not from etcd
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert await served(second.port, 6) == {"r1", "r2"}
            print(f"edge restarted with etcd down: proxied in {(time.monotonic() - started) * 1000:.0f} ms")
    finally:
        for runner, _ in runners:
            await runner.cleanup()


@pytest.mark.parametrize("policy", ["serve", "refuse"])
async def test_a_seed_that_ages_past_max_age_during_the_outage_follows_the_policy(
    tmp_path: Path, policy: str
) -> None:
    from carousel.mirror import PrefixMirror
    from carousel.snapshot import SnapshotConfig, SnapshotStore, follow

    prefix = "/carousel/services/"
    cfg = SnapshotConfig(str(tmp_path), max_age=10.0, past_max_age=policy)  # type: ignore[arg-type]
    store = SnapshotStore(cfg, "dnsd-registry", ServiceRecord.encode)
    young = RegistrySnapshot(prefix, 9, time.time() - 9.3, {f"{prefix}edge/edge1": edge(1).encode()})
    write_atomic(store.path, young.encode())
    etcd = Etcd(EtcdConfig(endpoints=["127.0.0.1:9"], prefix="/carousel/", timeout=0.3))
    mirror: PrefixMirror[ServiceRecord] = PrefixMirror(etcd, prefix, lambda k, v: ServiceRecord.decode(v))
    task = asyncio.create_task(follow(mirror, store))
    try:
        await asyncio.sleep(0.2)
        assert list(mirror.items) == [f"{prefix}edge/edge1"] and mirror.synced.is_set()
        await asyncio.sleep(1.2)  # the seed is now 10.7 s old, past max_age, etcd still away
        if policy == "refuse":
            assert not mirror.items and not mirror.synced.is_set()
        else:
            assert list(mirror.items) == [f"{prefix}edge/edge1"] and mirror.synced.is_set()
        assert store.writes == 0  # nothing etcd did not vouch for is ever written back
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await etcd.close()
