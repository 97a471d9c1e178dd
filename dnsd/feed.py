"""RegistryFeed: follows the service registry in etcd and publishes a fresh AnswerTable.

A PrefixMirror keeps the ``services/`` prefix in memory (snapshot + watch,
re-list after any break, last state kept while etcd is away) and calls us at
most once per ``[etcd] batch_interval`` (50 ms): a burst of events costs one
build, and answers lag the registry by at most that interval plus one build.
A snapshot is built in full; a batch of watch events is applied as a delta
(``TableBuilder.update``), which costs in proportion to what changed. The new
table is handed to ``publish`` (the DNS server, or the worker supervisor).
Nothing here is on the query path.
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

Change = tuple[ServiceRecord | None, ServiceRecord | None]
# (changes, registry revision, synced): a batch of watch events, before any table is built.
Forward = Callable[[list[Change], int, bool], None]


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
        self._whole = True  # the next build reads every record (start, or a failed update)
        # What the last build applied: None for a build from every record, else the
        # (before, after) changes (the worker supervisor forwards them, see workers.py).
        self.last_changes: list[Change] | None = None
        self._modes = {s: st.mode for s, st in self.table.services.items()}
        # The worker supervisor (workers.py) answers no query: it hands each batch of
        # changes to ``forward`` as it arrives and brings its own table (for /metrics and
        # /status) up to date at most once per ``catch_up_interval``.
        self.forward: Forward | None = None
        self.catch_up_interval = 1.0
        self._behind: list[Change] = []
        self._catch_up: asyncio.TimerHandle | None = None

    def _parse(self, key: str, raw: bytes) -> ServiceRecord:
        record = ServiceRecord.decode(raw)
        service, node = self.keys.split_service(key)
        if (record.service, record.node) != (service, node):
            raise SchemaError(f"record names {record.service}/{record.node}, key says {service}/{node}")
        return record

    def _changed(self, mirror: PrefixMirror[ServiceRecord]) -> None:
        self.rebuild()

    def rebuild(self) -> None:
        """Build and publish a table for the mirror's current state."""
        started = time.perf_counter()
        changes = self.mirror.take_changes()
        synced = self.mirror.synced.is_set()
        # A failed update loses its batch: the next build then starts from every
        # record, so an error costs one rebuild, never a stale answer.
        whole, self._whole = self._whole or changes is None, True
        if whole:  # a snapshot: build from every record
            self._behind.clear()
            table = self.builder.build(
                self.mirror.items.values(), self.mirror.revision, synced=synced, previous=self.table
            )
            self.last_changes = None
        else:
            assert changes is not None
            self.last_changes = list(changes.values())
            if self.forward is not None:
                self._behind += self.last_changes
                self.forward(self.last_changes, self.mirror.revision, synced)
                self._whole = False
                if self._catch_up is None:
                    loop = asyncio.get_running_loop()
                    self._catch_up = loop.call_later(self.catch_up_interval, self.catch_up)
                return
            table = self.builder.update(
                self.last_changes, self.mirror.revision, synced=synced, previous=self.table
            )
        self._whole = False
        self._install(table, started)

    def catch_up(self) -> None:
        """Apply the changes forwarded since the last build to our own table (see ``forward``)."""
        if self._catch_up is not None:
            self._catch_up.cancel()
            self._catch_up = None
        if not self._behind:
            return
        started = time.perf_counter()
        changes, self._behind = self._behind, []
        try:
            table = self.builder.update(
                changes, self.mirror.revision, synced=self.mirror.synced.is_set(), previous=self.table
            )
        except Exception:  # the workers have the changes already; our copy starts afresh
            log.exception("could not apply registry changes to the supervisor's table; rebuilding it")
            table = self.builder.build(
                self.mirror.items.values(), self.mirror.revision, synced=self.mirror.synced.is_set(),
                previous=self.table,
            )  # fmt: skip
        self._install(table, started)

    def _install(self, table: AnswerTable, started: float) -> None:
        """Make ``table`` the one served (and published), counted and timed from ``started``."""
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
        try:
            await follow(self.mirror, self.snapshot)
        finally:
            if self._catch_up is not None:
                self._catch_up.cancel()
                self._catch_up = None

    async def close(self) -> None:
        await self.etcd.close()
