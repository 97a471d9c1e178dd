"""The disk tier: stored responses as files that survive restarts and are shared by a node's workers.

Layout under ``disk_dir``::

    {h[:2]}/{h[2:]}/             one directory per primary key (h = sha1 of the key)
        {vid}.meta               JSON: the key, Vary values, status, headers, times, tags
        {vid}-{token}.body       the body, exactly ``length`` bytes

``vid`` names a variant (route extras + Vary values). Every file is written
under a temporary name and renamed into place, so a reader (another worker)
sees a whole meta file or none; the meta names its body file, so a body is
never read against the wrong meta. Replacing a variant writes a new body, then
the meta, then unlinks the old body (open readers keep their descriptor).

Bounded size: a sweep (one worker at a time, under a lock file) totals the
files and deletes the least recently used variants (meta mtime, touched on
hits at most once a minute) down to 90% of ``disk_size``, along with leftover
temporary and orphaned body files.

Purges by URL remove the key's directory at once. Purges by prefix or tag
become "bans" (Varnish's word): a lookup ignores and deletes an entry stored
before a matching ban, while a background sweep deletes every match; the ban
is dropped when that sweep is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from edge.features.cache.fields import Headers
from edge.features.cache.key import vary_values
from edge.features.cache.store import Entry

log = structlog.get_logger("carousel.edge.cache")

META_VERSION = 1
TOUCH_INTERVAL = 60.0
SWEEP_INTERVAL = 30.0
LEFTOVER_AGE = 120.0


@dataclass(slots=True)
class Ban:
    """Entries stored before ``before`` (Unix time) and matching are purged."""

    match: Callable[[str, frozenset[str]], bool]
    before: float


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def variant_id(entry: Entry) -> str:
    """The file name stem of one variant."""
    return _hash("\x01".join((entry.extra, "\x02".join(entry.vary), "\x02".join(entry.vary_values))))[:20]


def to_meta(entry: Entry, body_name: str) -> dict[str, Any]:
    return {
        "v": META_VERSION,
        "key": entry.key,
        "extra": entry.extra,
        "vary": list(entry.vary),
        "vary_values": list(entry.vary_values),
        "status": entry.status,
        "reason": entry.reason,
        "headers": entry.fields,
        "length": entry.length,
        "response_time": entry.response_time,
        "initial_age": entry.initial_age,
        "lifetime": entry.lifetime,
        "no_cache": entry.no_cache,
        "no_stale": entry.no_stale,
        "swr": entry.stale_while_revalidate,
        "sie": entry.stale_if_error,
        "auth_ok": entry.auth_ok,
        "omit": sorted(entry.omit),
        "etag": entry.etag,
        "last_modified": entry.last_modified,
        "date": entry.date,
        "tags": sorted(entry.tags),
        "transformed": entry.transformed,
        "validator_etag": entry.validator_etag,
        "stored_at": entry.stored_at,
        "body": body_name,
    }


def from_meta(meta: dict[str, Any], directory: str) -> Entry:
    """An Entry (body on disk) from a meta mapping; KeyError/TypeError/ValueError if corrupt."""
    if meta["v"] != META_VERSION:
        raise ValueError("meta version")
    entry = Entry(str(meta["key"]), str(meta["extra"]), int(meta["status"]), meta["reason"])
    entry.vary = tuple(meta["vary"])
    entry.vary_values = tuple(meta["vary_values"])
    entry.set_headers((str(k), str(v)) for k, v in meta["headers"])
    entry.length = int(meta["length"])
    entry.response_time = float(meta["response_time"])
    entry.initial_age = float(meta["initial_age"])
    entry.lifetime = float(meta["lifetime"])
    entry.no_cache = bool(meta["no_cache"])
    entry.no_stale = bool(meta["no_stale"])
    entry.stale_while_revalidate = float(meta["swr"])
    entry.stale_if_error = float(meta["sie"])
    entry.auth_ok = bool(meta["auth_ok"])
    entry.omit = frozenset(meta["omit"])
    entry.etag = meta["etag"]
    entry.last_modified = meta["last_modified"]
    entry.date = float(meta["date"])
    entry.tags = frozenset(meta["tags"])
    entry.transformed = bool(meta["transformed"])
    entry.validator_etag = meta["validator_etag"]
    entry.stored_at = float(meta["stored_at"])
    name = str(meta["body"])
    if "/" in name or not name.endswith(".body"):
        raise ValueError("body name")
    entry.disk_path = os.path.join(directory, name)
    return entry


# Cached bodies hold what members answered (pages built for one client's cookies included, when
# a route stores them): readable by the edge's user only, whatever the umask.
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _make_private_dirs(directory: str) -> None:
    """root/ab/cdef...: both levels 0700 (os.makedirs gives intermediate levels the umask's mode)."""
    for path in (os.path.dirname(directory), directory):
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            pass


class DiskStore:
    """Variants on disk under one directory; blocking calls are small, big copies run in a thread."""

    def __init__(self, root: str, budget: int, max_object: int) -> None:
        self.root = root
        self.budget = budget
        self.max_object = max_object
        os.makedirs(root, mode=0o700, exist_ok=True)
        # One writer thread: writes never block the loop and never race each other here.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")
        self.bans: list[Ban] = []
        self.written_since_sweep = 0
        self.last_sweep = time.monotonic()
        self._sweeping = False
        self._pending: set[asyncio.Future[Any]] = set()
        self._touched: dict[str, float] = {}

    def directory(self, key: str) -> str:
        h = _hash(key)
        return os.path.join(self.root, h[:2], h[2:])

    # --- reading ----------------------------------------------------------------------------

    def lookup(self, key: str, extra: str, headers: Headers) -> Entry | None:
        """The newest stored variant matching the request, or None (a few small reads)."""
        # The bans as they stand before the directory is read: a sweep (in the writer thread)
        # deletes its matches before it drops its ban, so an entry read here is either
        # already gone or still covered by this copy of the list.
        bans = tuple(self.bans)
        directory = self.directory(key)
        try:
            names = os.listdir(directory)
        except OSError:
            return None
        best: Entry | None = None
        for name in names:
            if not name.endswith(".meta"):
                continue
            entry = self._read_meta(os.path.join(directory, name), directory)
            if entry is None or entry.key != key or entry.extra != extra:
                continue
            if entry.vary and vary_values(entry.vary, headers) != entry.vary_values:
                continue
            if bans and _banned(entry, bans):
                self.remove_entry(entry)
                continue
            if best is None or entry.stored_at > best.stored_at:
                best = entry
        if best is not None:
            self._touch(os.path.join(directory, variant_id(best) + ".meta"))
        return best

    def _read_meta(self, path: str, directory: str) -> Entry | None:
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
            return from_meta(meta, directory)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("corrupt cache file removed", path=path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None

    def read_body(self, entry: Entry) -> bytes | None:
        """A disk entry's body, for promotion to the memory tier."""
        assert entry.disk_path is not None
        try:
            with open(entry.disk_path, "rb") as f:
                data = f.read(entry.length + 1)
        except OSError:
            return None
        return data if len(data) == entry.length else None

    def _touch(self, meta_path: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(meta_path, 0.0) < TOUCH_INTERVAL:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[meta_path] = now
        with contextlib.suppress(OSError):
            os.utime(meta_path)

    # --- writing ----------------------------------------------------------------------------

    def store_bytes(self, entry: Entry, data: bytes) -> asyncio.Future[Any] | None:
        """Write a memory entry's copy in the background; the write's future (None if none)."""
        if len(data) > self.max_object:
            return None
        return self._submit(self._write, entry.key, variant_id(entry), to_meta(entry, ""), data, None)

    async def store_now(self, entry: Entry, data: bytes) -> str | None:
        """Write a large in-memory body and wait for it; the body path or None."""
        if len(data) > self.max_object:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._write, entry.key, variant_id(entry), to_meta(entry, ""), data, None
        )

    async def store_file(self, entry: Entry, fd: int, offset: int, length: int) -> str | None:
        """Copy a spooled body into the tier (kernel-side copy in a thread); the body path or None."""
        if length > self.max_object:
            return None
        dup = os.dup(fd)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.executor,
                self._write,
                entry.key,
                variant_id(entry),
                to_meta(entry, ""),
                None,
                (dup, offset, length),
            )
        finally:
            os.close(dup)

    def update_meta(self, entry: Entry) -> asyncio.Future[Any] | None:
        """Rewrite a variant's meta after a 304 freshened it (the body stays); the write's future."""
        if entry.disk_path is None:
            return None
        return self._submit(
            self._write_meta_only, entry.key, variant_id(entry), to_meta(entry, ""), entry.disk_path
        )

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            fn(*args)
            return None
        fut = loop.run_in_executor(self.executor, fn, *args)
        self._pending.add(fut)
        fut.add_done_callback(self._written)
        return fut

    def _written(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("cache disk write failed", error=str(fut.exception()))

    async def flush(self) -> None:
        """Wait for background writes (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _write(
        self,
        key: str,
        vid: str,
        meta: dict[str, Any],
        data: bytes | None,
        source: tuple[int, int, int] | None,
    ) -> str | None:
        directory = self.directory(key)
        _make_private_dirs(directory)
        token = secrets.token_hex(6)
        body_name = f"{vid}-{token}.body"
        body_path = os.path.join(directory, body_name)
        tmp = os.path.join(directory, f".tmp-{token}")
        try:
            fd = os.open(tmp, _CREATE, _FILE_MODE)
            try:
                if data is not None:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                else:
                    assert source is not None
                    _copy(source[0], source[1], source[2], fd)
            finally:
                os.close(fd)
            os.rename(tmp, body_path)
            meta["body"] = body_name
            self._replace_meta(directory, vid, meta)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.written_since_sweep += meta["length"]
        return body_path

    def _write_meta_only(self, key: str, vid: str, meta: dict[str, Any], body_path: str) -> None:
        directory = self.directory(key)
        if not os.path.exists(body_path):
            return
        meta["body"] = os.path.basename(body_path)
        self._replace_meta(directory, vid, meta)

    def _replace_meta(self, directory: str, vid: str, meta: dict[str, Any]) -> None:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}")
        with os.fdopen(os.open(tmp, _CREATE, _FILE_MODE), "w", encoding="utf-8") as f:
            json.dump(meta, f, separators=(",", ":"))
        os.rename(tmp, os.path.join(directory, vid + ".meta"))
        # Older bodies of this variant are garbage now (readers keep their descriptors).
        for name in os.listdir(directory):
            if name.startswith(vid + "-") and name.endswith(".body") and name != meta["body"]:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))

    # --- removing ---------------------------------------------------------------------------

    def remove_key(self, key: str) -> None:
        """Delete every variant of a primary key now."""
        shutil.rmtree(self.directory(key), ignore_errors=True)

    def remove_entry(self, entry: Entry) -> None:
        """Delete one variant (a ban matched it, or its revalidation failed)."""
        directory = self.directory(entry.key)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, variant_id(entry) + ".meta"))
        if entry.disk_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(entry.disk_path)

    def ban(self, match: Callable[[str, frozenset[str]], bool], before: float) -> None:
        """Purge every stored entry that matches (key, tags) and was stored before ``before``."""
        ban = Ban(match, before)
        self.bans.append(ban)
        self._submit(self._apply_ban, ban)

    def _apply_ban(self, ban: Ban) -> None:
        for directory, meta_name in self._walk():
            entry = self._read_meta(os.path.join(directory, meta_name), directory)
            if entry is not None and entry.stored_at < ban.before and ban.match(entry.key, entry.tags):
                self.remove_entry(entry)
        with contextlib.suppress(ValueError):
            self.bans.remove(ban)

    def _walk(self) -> list[tuple[str, str]]:
        out = []
        for top in _listdir(self.root):
            top_path = os.path.join(self.root, top)
            if len(top) != 2 or not os.path.isdir(top_path):
                continue
            for sub in _listdir(top_path):
                directory = os.path.join(top_path, sub)
                out += [(directory, n) for n in _listdir(directory) if n.endswith(".meta")]
        return out

    # --- size -------------------------------------------------------------------------------

    def maybe_sweep(self) -> None:
        """Start a size sweep if enough was written or enough time passed."""
        due = (
            time.monotonic() - self.last_sweep > SWEEP_INTERVAL
            or self.written_since_sweep > self.budget // 20
        )
        if due and not self._sweeping:
            self._sweeping = True
            self.last_sweep = time.monotonic()
            self.written_since_sweep = 0
            self._submit(self.sweep)

    def sweep(self) -> int:
        """Delete least recently used variants down to 90% of the budget; returns bytes freed."""
        try:
            lock_fd = os.open(os.path.join(self.root, ".sweep.lock"), os.O_WRONLY | os.O_CREAT, _FILE_MODE)
            with os.fdopen(lock_fd, "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return 0  # another worker is sweeping
                return self._sweep_locked()
        finally:
            self._sweeping = False

    def _sweep_locked(self) -> int:
        now = time.time()
        variants: list[tuple[float, int, str, str]] = []  # (mtime, bytes, meta path, body path)
        total = 0
        for top in _listdir(self.root):
            top_path = os.path.join(self.root, top)
            if len(top) != 2 or not os.path.isdir(top_path):
                continue
            for sub in _listdir(top_path):
                directory = os.path.join(top_path, sub)
                names = _listdir(directory)
                if not names:
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)
                    continue
                referenced = set()
                for name in names:
                    if not name.endswith(".meta"):
                        continue
                    meta_path = os.path.join(directory, name)
                    try:
                        with open(meta_path, "rb") as f:
                            body_name = json.loads(f.read())["body"]
                        st = os.stat(meta_path)
                        body_size = os.stat(os.path.join(directory, body_name)).st_size
                    except (OSError, ValueError, KeyError, TypeError):
                        with contextlib.suppress(OSError):
                            os.unlink(meta_path)
                        continue
                    referenced.add(body_name)
                    size = st.st_size + body_size
                    total += size
                    variants.append((st.st_mtime, size, meta_path, os.path.join(directory, body_name)))
                for name in names:
                    if name.endswith(".meta") or name in referenced:
                        continue
                    path = os.path.join(directory, name)
                    with contextlib.suppress(OSError):
                        if now - os.stat(path).st_mtime > LEFTOVER_AGE:
                            os.unlink(path)
        freed = 0
        if total > self.budget:
            variants.sort()
            target = total - int(self.budget * 0.9)
            for _, size, meta_path, body_path in variants:
                if freed >= target:
                    break
                for path in (meta_path, body_path):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                freed += size
        return freed

    def close(self) -> None:
        """Stop the writer thread (after flush(): nothing is pending)."""
        self.executor.shutdown(wait=True)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _copy(src: int, offset: int, length: int, dst: int) -> None:
    """Copy a byte range between files without passing it through Python objects where possible."""
    left = length
    pos = offset
    while left > 0:
        try:
            n = os.copy_file_range(src, dst, min(left, 1 << 30), pos)
        except OSError:
            n = 0
        if n <= 0:
            chunk = os.pread(src, min(left, 1 << 20), pos)
            if not chunk:
                raise OSError("source file shrank")
            n = os.write(dst, chunk)
        pos += n
        left -= n


def _banned(entry: Entry, bans: tuple[Ban, ...]) -> bool:
    return any(entry.stored_at < b.before and b.match(entry.key, entry.tags) for b in bans)
