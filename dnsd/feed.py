"""RegistryFeed: follows the service registry in etcd and publishes a fresh AnswerTable.

A PrefixMirror keeps the ``services/`` prefix in memory (snapshot + watch,
re-list after any break, last state kept while etcd is away). Every change
schedules one rebuild on the next event-loop turn, so a burst of events
costs one build; the new table is handed to ``publish`` (the DNS server, or
the worker supervisor). Nothing here is on the query path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, SchemaError, ServiceRecord
from carousel.snapshot import SnapshotConfig, SnapshotStore, follow
from dnsd.build import TableBuilder
from dnsd.table import AnswerTable

log = structlog.get_logger("dnsd.feed")


class RegistryFeed:
    """Mirror of the registry's services, rebuilt into answer tables on change."""

    def __init__(
        self,
        etcd_config: EtcdConfig,
        builder: TableBuilder,
        publish: Callable[[AnswerTable], None] | None = None,
        snapshot: SnapshotConfig | None = None,
    ) -> None:
        self.keys = Keys(etcd_config.prefix)
        self.etcd = Etcd(etcd_config)
        self.builder = builder
        self.publish = publish
        self.mirror: PrefixMirror[ServiceRecord] = PrefixMirror(
            self.etcd, self.keys.services, self._parse, self._changed, name="dnsd"
        )
        self.snapshot = SnapshotStore.from_config(snapshot, "dnsd-registry", ServiceRecord.encode)
        self.table = builder.build([], 0, synced=False)
        self.builds = 0
        self.last_build_seconds = 0.0
        self._pending = False
        self._modes = {s: st.mode for s, st in self.table.services.items()}

    def _parse(self, key: str, raw: bytes) -> ServiceRecord:
        record = ServiceRecord.decode(raw)
        service, node = self.keys.split_service(key)
        if (record.service, record.node) != (service, node):
            raise SchemaError(f"record names {record.service}/{record.node}, key says {service}/{node}")
        return record

    def _changed(self, mirror: PrefixMirror[ServiceRecord]) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.rebuild)

    def rebuild(self) -> None:
        """Build and publish a table for the mirror's current state."""
        self._pending = False
        started = time.perf_counter()
        table = self.builder.build(
            self.mirror.items.values(),
            self.mirror.revision,
            synced=self.mirror.synced.is_set(),
            previous=self.table,
        )
        self.table = table
        self.builds += 1
        self.last_build_seconds = time.perf_counter() - started
        if self.publish is not None:
            self.publish(table)
        self._log_modes(table)

    def _log_modes(self, table: AnswerTable) -> None:
        """One line when a service changes how it is answered (healthy, last-known, ...)."""
        for service, state in table.services.items():
            if self._modes.get(service) != state.mode:
                self._modes[service] = state.mode
                level = log.info if state.mode == "healthy" else log.warning
                level(
                    "service answer mode changed",
                    service=service,
                    mode=state.mode,
                    addresses=state.addresses,
                    revision=table.revision,
                )

    async def run(self) -> None:
        """Follow the registry until cancelled."""
        await follow(self.mirror, self.snapshot)

    async def close(self) -> None:
        await self.etcd.close()
