"""PrefixMirror on a real etcd: corrupt values, compaction, outages."""

from __future__ import annotations

import asyncio
import io
import json
import time

import structlog

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import EtcdProcess
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, ServiceRecord


def rec(node: str, addr: str) -> ServiceRecord:
    return ServiceRecord("edge", node, 80, ipv4=(addr,))


async def wait_until(pred, limit: float) -> float:
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < limit, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_corrupt_value_is_skipped_with_one_warning(etcd_cfg: EtcdConfig):
    keys = Keys(etcd_cfg.prefix)
    etcd = Etcd(etcd_cfg)
    buf = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=buf),
        cache_logger_on_first_use=False,
    )
    try:
        await etcd.put(keys.service("edge", "good1"), rec("good1", "10.0.0.1").encode())
        await etcd.put(keys.service("edge", "bad"), b'{"v": 1, "service": "edge", "node": ')
        mirror = PrefixMirror(etcd, keys.services, lambda k, v: ServiceRecord.decode(v), name="t")
        task = asyncio.create_task(mirror.run())
        await asyncio.wait_for(mirror.synced.wait(), 5)
        await etcd.put(keys.service("edge", "good2"), rec("good2", "10.0.0.2").encode())
        await wait_until(lambda: len(mirror.items) == 2, 2)
        assert {r.node for r in mirror.items.values()} == {"good1", "good2"}
        # A resync must not warn again about the same stored value.
        await mirror.sync_once()
        await asyncio.sleep(0.2)
        warnings = [json.loads(line) for line in buf.getvalue().splitlines() if "skipped" in line]
        assert len(warnings) == 1, warnings
        assert warnings[0]["key"] == keys.service("edge", "bad")
        # Fixing the value brings it in.
        await etcd.put(keys.service("edge", "bad"), rec("bad", "10.0.0.3").encode())
        await wait_until(lambda: len(mirror.items) == 3, 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        structlog.reset_defaults()
        await etcd.close()


async def test_compaction_while_disconnected_resyncs(own_etcd: EtcdProcess):
    cfg = EtcdConfig(endpoints=[own_etcd.endpoint], prefix="/c/", timeout=1.0)
    keys = Keys(cfg.prefix)
    reader_etcd, writer = Etcd(cfg), Etcd(cfg)
    mirror = PrefixMirror(reader_etcd, keys.services, lambda k, v: ServiceRecord.decode(v), name="t")
    task = asyncio.create_task(mirror.run())
    try:
        await writer.put(keys.service("edge", "a"), rec("a", "10.0.0.1").encode())
        await asyncio.wait_for(mirror.synced.wait(), 5)
        await wait_until(lambda: len(mirror.items) == 1, 2)
        # Take the reader offline (cancel it), change a lot and compact the history away.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        old_revision = mirror.revision
        await writer.delete(keys.service("edge", "a"))
        for i in range(20):
            await writer.put(keys.service("edge", "b"), rec("b", f"10.0.1.{i}").encode())
        rev = await writer.revision()
        client = await writer._current()
        await client.compact(rev)
        # Resuming from the old revision hits compaction; the mirror must re-list.
        task = asyncio.create_task(mirror.run())
        took = await wait_until(lambda: set(mirror.items) == {keys.service("edge", "b")}, 2)
        assert mirror.revision > old_revision
        assert mirror.items[keys.service("edge", "b")].ipv4 == ("10.0.1.19",)
        print(f"re-listed after compaction in {took:.3f}s")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader_etcd.close()
        await writer.close()
