"""PrefixMirror: an in-memory copy of one etcd prefix that never misses an event.

Theory of operation: list the prefix (a snapshot at revision R), then watch
from R+1. Every event moves the copy and its revision forward. When the
watch breaks for any reason (etcd restarted, a member lost quorum, the
revision we need was compacted, etcd came back with an empty data dir) we do
not try to patch the stream: we list again and replace the whole copy, which
drops ghosts and adds what we missed, then watch from the new revision.

Changes are batched by a token bucket: ``on_change`` runs on the next loop
turn while tokens last (BURST of them: a lone change, a drain, or the few
writes of an operator are applied at once), and once they are spent at most
once per ``batch_interval`` (``[etcd] batch_interval``, 50 ms by default),
taking every event that arrived meanwhile. A watcher that rebuilds
something on change (dnsd's answer table, an edge's pool) thus rebuilds at
most 20 times a second under any churn, and lags the registry by at most
the interval plus one rebuild. ``take_changes``
tells the watcher which keys changed since it last asked, so it can update
in proportion to the change instead of re-reading everything.

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
# Change callbacks allowed back to back before batching starts (see above).
BURST = 3


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
        self.batch_interval = etcd.config.batch_interval
        self.notified = 0  # on_change calls so far
        # Since the last on_change: key -> its value before the first change, and
        # whether a snapshot replaced the whole copy (see take_changes).
        self._before: dict[str, V | None] = {}
        self._reloaded = True
        self._pending: asyncio.TimerHandle | asyncio.Handle | None = None
        self._tokens = float(BURST)
        self._tokens_at = 0.0  # loop time _tokens was last brought up to date

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
        self._reloaded = True
        self._before.clear()

    def take_changes(self) -> dict[str, tuple[V | None, V | None]] | None:
        """Inside on_change: key -> (value before, value now) for keys changed since the last call.

        None when the copy was replaced by a snapshot since then: read ``items``.
        """
        if self._reloaded:
            self._reloaded = False
            self._before.clear()
            return None
        changes = {}
        for key, before in self._before.items():
            now = self.items.get(key)
            if now is not before:
                changes[key] = (before, now)
        self._before.clear()
        return changes

    def apply(self, ev: WatchEvent) -> None:
        """Apply one watch event to the copy."""
        if self.on_change is not None and ev.key not in self._before:
            self._before[ev.key] = self.items.get(ev.key)
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

    def _refill(self, now: float) -> None:
        if self.batch_interval > 0:
            self._tokens = min(BURST, self._tokens + (now - self._tokens_at) / self.batch_interval)
        else:
            self._tokens = BURST
        self._tokens_at = now

    def _changed(self, now: bool = False) -> None:
        """Call on_change on the next turn while tokens last, else when the next token is due."""
        if self.on_change is None:
            return
        if now:
            if self._pending is not None:
                self._pending.cancel()
            self._pending = None
            self._notify(spend=False)  # a (re)load: at once, and it starts no batching
            return
        if self._pending is not None:
            return  # already due: this change rides along
        loop = asyncio.get_running_loop()
        self._refill(loop.time())
        if self._tokens >= 1:
            self._pending = loop.call_soon(self._notify)
        else:
            self._pending = loop.call_later((1 - self._tokens) * self.batch_interval, self._notify)

    def _notify(self, spend: bool = True) -> None:
        self._pending = None
        if spend:
            self._refill(asyncio.get_running_loop().time())
            self._tokens = max(0.0, self._tokens - 1)
        self.notified += 1
        try:
            self.on_change(self)  # type: ignore[misc]
        except Exception:
            log.exception("mirror change callback failed", mirror=self.name)
        # Changes are handed out during the callback only: a watcher that never asks
        # (the edge's pools read ``items``) must not make this grow.
        self._before.clear()
        self._reloaded = False

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
        self._changed(now=True)

    async def run(self) -> None:
        """Mirror forever; cancel the task to stop."""
        try:
            await self._run()
        finally:
            if self._pending is not None:
                self._pending.cancel()  # no change callback after the mirror stopped
                self._pending = None

    async def _run(self) -> None:
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
            # Compare with the revision we had when we asked: events that arrive while
            # the read is in flight move ours past its answer without any reset (seen
            # under churn: a false reset re-listed 10,000 records, a 1.9 s stall).
            known = self.revision
            rev = await self.etcd.revision()
            if rev < known:
                raise EtcdError(f"etcd revision went backwards ({rev} < {known}): reset")
            self.last_sync = time.monotonic()
