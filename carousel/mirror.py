"""PrefixMirror: an in-memory copy of one etcd prefix that never misses an event.

Theory of operation: list the prefix (a snapshot at revision R), then watch
from R+1. Every event moves the copy and its revision forward. When the
watch breaks for any reason (etcd restarted, a member lost quorum, the
revision we need was compacted, etcd came back with an empty data dir) we do
not try to patch the stream: we list again and replace the whole copy, which
drops ghosts and adds what we missed, then watch from the new revision.

While etcd is away the copy is kept as it was: daemons serve from memory and
report staleness (``seconds_since_sync``) instead of failing.

Values are parsed once, when they change. A value that fails to parse is left
out and logged once per (key, revision), so a corrupt key cannot crash or
flood anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

from carousel.etcd import Etcd, EtcdAuthError, EtcdCompacted, EtcdError, KeyValue, WatchEvent

log = structlog.get_logger("carousel.mirror")
V = TypeVar("V")

# How often to prove the cluster still answers while the watch is quiet, so
# staleness is measured even when nothing changes.
PROBE_INTERVAL = 1.0


class PrefixMirror(Generic[V]):
    """Keeps ``items`` equal to the parsed values under ``prefix`` in etcd."""

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        parse: Callable[[str, bytes], V],
        on_change: Callable[[PrefixMirror[V]], None] | None = None,
        *,
        name: str = "mirror",
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.parse = parse
        self.on_change = on_change
        self.name = name
        self.items: dict[str, V] = {}
        self.revision = 0
        self.synced = asyncio.Event()  # set once the first snapshot is loaded
        self.last_sync = 0.0  # monotonic time etcd last proved our copy current
        self.resyncs = 0
        self._rejected: dict[str, int] = {}  # key -> mod_revision already warned about
        self._connected: bool | None = None  # None: not tried yet

    @property
    def seconds_since_sync(self) -> float:
        """How old our proof of freshness is; inf before the first snapshot."""
        return time.monotonic() - self.last_sync if self.last_sync else float("inf")

    @property
    def connected(self) -> bool:
        return bool(self._connected)

    def _parse(self, key: str, value: bytes, revision: int) -> V | None:
        try:
            parsed = self.parse(key, value)
        except Exception as exc:  # any bad value is skipped, never fatal
            if self._rejected.get(key) != revision:
                self._rejected[key] = revision
                log.warning(
                    "registry value skipped",
                    mirror=self.name,
                    key=key,
                    revision=revision,
                    error=str(exc),
                )
            return None
        self._rejected.pop(key, None)
        return parsed

    def _load(self, items: list[KeyValue], revision: int) -> None:
        fresh: dict[str, V] = {}
        for kv in items:
            parsed = self._parse(kv.key, kv.value, kv.mod_revision)
            if parsed is not None:
                fresh[kv.key] = parsed
        live = {kv.key for kv in items}
        for key in list(self._rejected):
            if key not in live:
                del self._rejected[key]
        self.items = fresh
        self.revision = revision

    def apply(self, ev: WatchEvent) -> None:
        """Apply one watch event to the copy."""
        if ev.kind == "put":
            parsed = self._parse(ev.key, ev.value, ev.revision)
            if parsed is None:
                self.items.pop(ev.key, None)
            else:
                self.items[ev.key] = parsed
        else:
            self.items.pop(ev.key, None)
            self._rejected.pop(ev.key, None)
        self.revision = max(self.revision, ev.revision)

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("mirror change callback failed", mirror=self.name)

    def seed(self, values: dict[str, bytes], revision: int, age: float) -> int:
        """Serve a saved copy (see carousel/snapshot.py) until etcd answers; returns records kept.

        Values go through ``parse`` like etcd's, and ``seconds_since_sync``
        reports the copy's real age. The first etcd list replaces all of it.
        """
        self._load([KeyValue(k, v, revision, 0) for k, v in values.items()], revision)
        self.last_sync = time.monotonic() - age
        self.synced.set()
        self._changed()
        return len(self.items)

    def forget_seed(self) -> None:
        """Stop serving a seeded copy that grew too old (only while etcd has not answered)."""
        if self.resyncs:
            return
        self.items = {}
        self.revision = 0
        self.last_sync = 0.0
        self.synced.clear()
        self._changed()

    async def sync_once(self) -> None:
        """Replace the copy with a fresh snapshot."""
        snap = await self.etcd.get_prefix(self.prefix)
        self._load(snap.items, snap.revision)
        self.last_sync = time.monotonic()
        self.synced.set()
        self._changed()

    async def run(self) -> None:
        """Mirror forever; cancel the task to stop."""
        backoff = 0.1
        while True:
            try:
                await self.sync_once()
                if self._connected is False:
                    log.info("registry reachable again", mirror=self.name, revision=self.revision)
                self._connected = True
                self.resyncs += 1
                backoff = 0.1
                await self._watch()
            except asyncio.CancelledError:
                raise
            except EtcdCompacted as exc:
                log.info("watch revision compacted; re-listing", mirror=self.name, error=str(exc))
            except EtcdError as exc:
                # Logged once per outage (and at once on start-up), not per retry.
                if self._connected is not False:
                    if isinstance(exc, EtcdAuthError):
                        log.error("etcd refused our credentials", mirror=self.name, error=str(exc))
                    else:
                        log.warning(
                            "registry unreachable; serving the last known state",
                            mirror=self.name,
                            error=str(exc),
                            revision=self.revision,
                        )
                    self._connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:
                log.exception("mirror failed unexpectedly; re-listing", mirror=self.name)
                await asyncio.sleep(1.0)

    async def _watch(self) -> None:
        """Follow the watch until it breaks or the probe finds the cluster gone or reset."""
        consume = asyncio.create_task(self._consume())
        probe = asyncio.create_task(self._probe())
        try:
            done, _ = await asyncio.wait({consume, probe}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (consume, probe):
                t.cancel()
            await asyncio.gather(consume, probe, return_exceptions=True)
        for t in done:
            t.result()  # re-raise the EtcdError that ended it
        raise EtcdError("watch ended")

    async def _consume(self) -> None:
        async for ev in self.etcd.watch_prefix(self.prefix, self.revision + 1):
            self.apply(ev)
            self.last_sync = time.monotonic()
            self._changed()

    async def _probe(self) -> None:
        """Refresh ``last_sync`` while the cluster answers; return an error when not.

        A quorum read that returns a revision below ours means etcd was reset
        (empty data dir): the watch from our revision would wait forever.
        """
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            rev = await self.etcd.revision()
            if rev < self.revision:
                raise EtcdError(f"etcd revision went backwards ({rev} < {self.revision}): reset")
            self.last_sync = time.monotonic()
