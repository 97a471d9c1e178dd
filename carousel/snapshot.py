"""Last-known registry state on disk, so a daemon restarted during an etcd outage still serves.

Theory of operation
-------------------
A PrefixMirror keeps one etcd prefix in memory. With snapshots on, its owner
runs it through ``follow()``, which:

1. before the first etcd list, reads the snapshot file; if it is intact, of
   our prefix and young enough (``max_age``), the mirror is seeded with it
   and serves it at once, with one log line saying how old it is;
2. rewrites the file after every change (at most once per ``write_interval``)
   and every ``REFRESH`` seconds while etcd keeps proving the copy current,
   so the age read back after a crash is right within that interval;
3. while the seed is still all we have (etcd not answered yet), drops it
   when it passes ``max_age`` if ``past_max_age = "refuse"``.

The age of a snapshot is the time since etcd last proved its content
current (``verified_at``), not since the file was written.

File format (version 1)::

    carousel-registry-snapshot 1 sha256=<64 hex> length=<body bytes>\\n
    <body: JSON {"prefix", "revision", "verified_at", "saved_at", "items": {key: base64}}>

The header's digest covers the body, so a truncated, padded or bit-flipped
file is refused with one clear log line and never half-loaded. Values are
stored raw (as etcd held them) and go through the mirror's own parser again
when loaded, so a snapshot can never carry a record etcd would not.
Writes go to a temporary file in the same directory (mode 0600), are
fsynced, then renamed over the old file and the directory fsynced: a
crash leaves either the old snapshot or the new one (POSIX rename(2)).
Several processes (edge workers) may write the same file; each write is
whole, so the last one wins.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from carousel.config import non_negative, positive

if TYPE_CHECKING:
    from carousel.mirror import PrefixMirror

log = structlog.get_logger("carousel.snapshot")

MAGIC = b"carousel-registry-snapshot"
FORMAT_VERSION = 1
# A snapshot past this size is not ours (a registry of 10,000 instances is ~3 MB).
MAX_BYTES = 64 * 1024 * 1024
# While etcd proves the copy current and nothing changes, rewrite this often so the
# age read back after a crash is right within this many seconds.
REFRESH = 30.0
# A temporary file this old is a crashed writer's leftover, not a write in progress.
STALE_TEMP_SECONDS = 300.0
_HEADER = re.compile(rb"carousel-registry-snapshot (\d+) sha256=([0-9a-f]{64}) length=(\d+)\n")


@dataclass(frozen=True)
class SnapshotConfig:
    """Where and how the last-known registry state is kept on disk ("" = not kept)."""

    # Directory of the snapshot files (created 0700 if missing); "" turns snapshots off.
    directory: str = ""
    # The oldest snapshot (seconds since etcd last proved it current) served at start.
    max_age: float = field(default=86400.0, metadata={"check": positive})
    # Past max_age: "serve" it anyway (with a warning), or "refuse" it (dnsd answers
    # SERVFAIL for service names so resolvers ask another server; an edge pool has no
    # registry members) until etcd answers.
    past_max_age: Literal["serve", "refuse"] = "refuse"
    # Least seconds between two writes of a snapshot (a burst of changes costs one write).
    write_interval: float = field(default=1.0, metadata={"check": non_negative})


class SnapshotError(Exception):
    """A snapshot file is unreadable, corrupt, truncated or of another format."""


@dataclass(frozen=True)
class RegistrySnapshot:
    """The raw values under one etcd prefix at one revision, and when etcd last vouched for them."""

    prefix: str
    revision: int
    verified_at: float  # unix time etcd last proved this content current
    items: dict[str, bytes]
    saved_at: float = 0.0

    def age(self, now: float | None = None) -> float:
        """Seconds since etcd last proved this content current."""
        return max(0.0, (time.time() if now is None else now) - self.verified_at)

    def encode(self) -> bytes:
        """The file's bytes: header with digest, then the JSON body."""
        body = json.dumps(
            {
                "prefix": self.prefix,
                "revision": self.revision,
                "verified_at": self.verified_at,
                "saved_at": self.saved_at or time.time(),
                "items": {k: base64.b64encode(v).decode("ascii") for k, v in sorted(self.items.items())},
            },
            separators=(",", ":"),
        ).encode()
        digest = hashlib.sha256(body).hexdigest()
        return b"%s %d sha256=%s length=%d\n" % (MAGIC, FORMAT_VERSION, digest.encode(), len(body)) + body

    @classmethod
    def decode(cls, data: bytes) -> RegistrySnapshot:
        """Parse and verify a file's bytes; SnapshotError says what is wrong."""
        if not data:
            raise SnapshotError("empty file")
        end = data.find(b"\n", 0, 200)
        if not data.startswith(MAGIC) or end < 0:
            raise SnapshotError("not a carousel registry snapshot (bad header)")
        m = _HEADER.fullmatch(data[: end + 1])
        if m is None:
            raise SnapshotError("not a carousel registry snapshot (bad header)")
        version, digest, length = int(m[1]), m[2].decode(), int(m[3])
        if version != FORMAT_VERSION:
            raise SnapshotError(f"format version {version}, this build reads {FORMAT_VERSION}")
        body = data[end + 1 :]
        if len(body) != length:
            raise SnapshotError(f"truncated or padded: body is {len(body)} bytes, header says {length}")
        if hashlib.sha256(body).hexdigest() != digest:
            raise SnapshotError("checksum mismatch (corrupt file)")
        try:
            obj = json.loads(body)
            prefix, revision, verified_at = obj["prefix"], obj["revision"], obj["verified_at"]
            saved_at, raw_items = obj.get("saved_at", 0.0), obj["items"]
            ok = (
                isinstance(obj, dict)
                and isinstance(prefix, str)
                and isinstance(revision, int)
                and not isinstance(revision, bool)
                and revision >= 0
                and isinstance(verified_at, int | float)
                and isinstance(saved_at, int | float)
                and isinstance(raw_items, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in raw_items.items())
            )
            if not ok:
                raise SnapshotError("body has the wrong shape")
            items = {k: base64.b64decode(v, validate=True) for k, v in raw_items.items()}
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise SnapshotError(f"body is not a valid snapshot: {exc}") from None
        return cls(prefix, revision, float(verified_at), items, float(saved_at))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is only durable once the directory entry is on disk.
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_snapshot(path: Path) -> RegistrySnapshot | None:
    """The snapshot at ``path``; None when there is none; SnapshotError when it is unusable."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise SnapshotError(f"larger than {MAX_BYTES} bytes")
    return RegistrySnapshot.decode(data)


def file_name(name: str) -> str:
    """A file name for a mirror called ``name`` (e.g. 'pool:api' -> 'pool-api.snapshot')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".snapshot"


class SnapshotStore:
    """Seeds one PrefixMirror from its snapshot file and keeps that file current."""

    def __init__(self, config: SnapshotConfig, name: str, encode: Callable[[Any], bytes]) -> None:
        self.config = config
        self.path = Path(config.directory) / file_name(name)
        self.encode = encode
        self.writes = 0
        self.seeded: RegistrySnapshot | None = None
        self._dirty = asyncio.Event()

    @classmethod
    def from_config(
        cls, config: SnapshotConfig | None, name: str, encode: Callable[[Any], bytes]
    ) -> SnapshotStore | None:
        """A store when snapshots are on in ``config``, else None."""
        if config is None or not config.directory:
            return None
        return cls(config, name, encode)

    def load(self, prefix: str) -> RegistrySnapshot | None:
        """The snapshot to serve at start, or None (each refusal is one log line)."""
        self._remove_stale_temp_files()
        try:
            snap = read_snapshot(self.path)
        except SnapshotError as exc:
            log.error("registry snapshot refused", path=str(self.path), reason=str(exc))
            return None
        if snap is None:
            log.info("no registry snapshot yet", path=str(self.path))
            return None
        if snap.prefix != prefix:
            log.error(
                "registry snapshot refused",
                path=str(self.path),
                reason=f"it holds prefix {snap.prefix!r}, we follow {prefix!r}",
            )
            return None
        age = snap.age()
        if age > self.config.max_age and self.config.past_max_age == "refuse":
            log.error(
                "registry snapshot refused",
                path=str(self.path),
                reason=f"{age:.0f}s old, older than max_age {self.config.max_age:.0f}s",
                revision=snap.revision,
            )
            return None
        return snap

    def _remove_stale_temp_files(self) -> None:
        """Temporary files left by a crash mid-write (another worker's live one is younger)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def snapshot_of(self, mirror: PrefixMirror[Any]) -> RegistrySnapshot:
        """The mirror's current state as a snapshot."""
        items = {k: self.encode(v) for k, v in mirror.items.items()}
        verified = time.time() - mirror.seconds_since_sync
        return RegistrySnapshot(mirror.prefix, mirror.revision, verified, items, time.time())

    async def save(self, mirror: PrefixMirror[Any]) -> None:
        """Write the mirror's state; a failure is logged and retried on the next change."""
        data = self.snapshot_of(mirror).encode()  # on the loop: the copy cannot move under us
        try:
            await asyncio.to_thread(write_atomic, self.path, data)
        except OSError as exc:
            log.warning("cannot write registry snapshot", path=str(self.path), error=exc.strerror or str(exc))
            return
        self.writes += 1

    def changed(self) -> None:
        """The mirror moved: write a new snapshot soon."""
        self._dirty.set()

    async def keep(self, mirror: PrefixMirror[Any]) -> None:
        """Rewrite the file on change (debounced) and every REFRESH seconds while etcd answers."""
        while True:
            timeout = REFRESH
            if self.seeded is not None and not mirror.resyncs:
                # Only the seed is known: wake when it passes max_age.
                timeout = min(timeout, max(0.05, self.config.max_age - self.seeded.age()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            if not mirror.resyncs:
                self._dirty.clear()
                self._expire_seed(mirror)
                continue  # never rewrite before etcd has vouched for something
            if self._dirty.is_set() or mirror.seconds_since_sync < REFRESH:
                self._dirty.clear()
                await self.save(mirror)
            await asyncio.sleep(self.config.write_interval)

    def _expire_seed(self, mirror: PrefixMirror[Any]) -> None:
        seed = self.seeded
        if seed is None or seed.age() <= self.config.max_age:
            return
        self.seeded = None
        if self.config.past_max_age == "refuse":
            log.error(
                "registry snapshot passed max_age with etcd still unreachable; no longer serving it",
                path=str(self.path),
                age=round(seed.age()),
                max_age=self.config.max_age,
            )
            mirror.forget_seed()
        else:
            log.warning(
                "registry snapshot passed max_age; still serving it (past_max_age = serve)",
                path=str(self.path),
                age=round(seed.age()),
            )


async def follow(mirror: PrefixMirror[Any], store: SnapshotStore | None) -> None:
    """Run ``mirror`` (until cancelled), seeded from and saved to ``store`` when there is one."""
    if store is None:
        await mirror.run()
        return
    snap = store.load(mirror.prefix)
    if snap is not None:
        kept = mirror.seed(snap.items, snap.revision, snap.age())
        store.seeded = snap
        level = log.warning if snap.age() > store.config.max_age else log.info
        level(
            "serving the registry snapshot until etcd answers",
            mirror=mirror.name,
            path=str(store.path),
            age_seconds=round(snap.age(), 1),
            revision=snap.revision,
            records=kept,
        )
    inner = mirror.on_change

    def changed(m: PrefixMirror[Any]) -> None:
        store.changed()
        if inner is not None:
            inner(m)

    mirror.on_change = changed
    keeper = asyncio.create_task(store.keep(mirror), name=f"snapshot:{mirror.name}")
    try:
        await mirror.run()
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        mirror.on_change = inner
