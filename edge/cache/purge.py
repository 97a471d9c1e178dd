"""Cluster-wide purges: every edge follows `carousel purge` events in etcd and applies each once.

`carousel purge URL | --prefix P | --tag T` writes a PurgeEvent under
``{prefix}purge/`` with a 30 s lease (carousel/ops.py). Each edge worker keeps
a PrefixMirror on that prefix (snapshot, then a watch: an event reaches us in
milliseconds) and applies every event key it has not applied yet. Keys are
forgotten once their lease removes them from etcd, so the set stays small.

Events already in etcd when this worker first reads the prefix are older than
its memory tier, which they cannot concern; they still reach the disk tier,
which may hold entries from before a restart, as bans on entries stored before
the event was issued. An event published while etcd was unreachable is applied
when the watch comes back (the mirror re-lists).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from carousel.etcd import Etcd
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, PurgeEvent

if TYPE_CHECKING:
    from edge.cache.feature import CacheFeature
    from edge.config import Config

log = structlog.get_logger("carousel.edge.cache")


def _parse(key: str, value: bytes) -> PurgeEvent:
    return PurgeEvent.decode(value)


class PurgeWatcher:
    """Follows the purge prefix in etcd and applies new events to one cache."""

    def __init__(self, config: Config, cache: CacheFeature) -> None:
        self.etcd_config = config.etcd
        self.prefix = Keys(config.etcd.prefix).purges
        self.cache = cache
        self.applied: set[str] = set()
        self.applied_count = 0
        self.mirror: PrefixMirror[PurgeEvent] | None = None
        self._first = True
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Begin following the prefix (a task on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        etcd = Etcd(self.etcd_config)
        self.mirror = PrefixMirror(etcd, self.prefix, _parse, self._changed, name="purge")
        try:
            await self.mirror.run()
        finally:
            await etcd.close()

    def _changed(self, mirror: PrefixMirror[PurgeEvent]) -> None:
        items = mirror.items
        first, self._first = self._first, False
        for key, event in items.items():
            if key in self.applied:
                continue
            self.applied.add(key)
            if first and event.issued < self.cache.started:
                self.cache.purge_disk_before(event.kind, event.target, event.issued)
                continue
            purged = self.cache.purge(event.kind, event.target)
            self.applied_count += 1
            log.info("cluster purge applied", kind=event.kind, target=event.target, purged=purged)
        # Expired events are gone from etcd: forget them.
        self.applied.intersection_update(items)
