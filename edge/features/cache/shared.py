"""One cache per node: the shared tier's place, cross-process fill locks, shared hit-for-miss marks.

With ``workers = N > 1`` each worker keeps a small memory tier of its own (the
hit path stays one dict lookup, no syscall) in front of a tier every worker of
the node reads and writes: the disk tier when ``disk_dir`` is set, else the
same file layout (edge/features/cache/disk.py) on tmpfs (``/dev/shm``), so it
is memory, not disk, and dies with the node. What one worker fetched, the
others find there; a miss fills it once per node:

* ``FillLocks``: one byte of a lock file per key slot (a hash of the key),
  locked with an open-file-description lock (``F_OFD_SETLK``). The kernel drops
  the lock when its descriptor is closed, and a process's descriptors are closed
  when it dies, however it dies: a worker killed mid-fill leaves no stuck lock.
  A worker that finds the slot taken polls it (1 ms, doubling to 20 ms) and,
  once it holds it, looks in the shared tier before fetching. Objects are
  written under a temporary name and renamed (disk.py), so a worker killed while
  writing leaves a temporary file, never a torn object.
* Hit-for-miss marks: a key whose response could not be stored gets an empty
  file whose mtime is the mark's deadline, so the other workers skip the lock
  and go upstream in parallel instead of queueing behind each other.

The tmpfs directory is named after the supervisor's pid and the node's port. Every worker holds a
shared ``flock`` on it while it runs; the last one to stop (an exclusive lock
is then free) removes it, and a node starting up removes directories left by a
supervisor that no longer exists (a node killed outright).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import struct
import time

import structlog

from carousel.tasks import pid_alive

log = structlog.get_logger("carousel.edge.cache")

SLOTS = 1 << 16
POLL_FIRST = 0.001
POLL_MAX = 0.02
# Expired hit-for-miss marks are swept after this many new ones (by the worker that made them).
MARK_SWEEP_EVERY = 1024
_SHM = "/dev/shm"
_PREFIX = "carousel-edge-cache-"
# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padding.
_FLOCK = "hhqqi4x"
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_BUSY = (errno.EAGAIN, errno.EACCES)


def slot(key: str) -> int:
    """The lock slot of a key (keys sharing a slot only wait for each other)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=4).digest()
    return int.from_bytes(digest) % SLOTS


class FillLock:
    """A held fill lock; ``release`` (or the holder's death) frees it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        """Close the descriptor, which drops the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FillLocks:
    """Per-key fill locks shared by the processes that open the same directory."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, ".fill.lock")
        self.marks = os.path.join(directory, ".uncacheable")
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.marks, 0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._marked = 0

    def try_acquire(self, key: str) -> FillLock | None:
        """The lock for ``key`` if no process (this one included) holds its slot, else None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, _OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, slot(key), 1, 0))
        except OSError as exc:
            os.close(fd)
            if exc.errno in _BUSY:
                return None
            raise
        return FillLock(fd)

    async def acquire(self, key: str, wait: float) -> tuple[FillLock | None, bool]:
        """(the lock or None after ``wait`` seconds, whether another process held it meanwhile)."""
        lock = self.try_acquire(key)
        if lock is not None:
            return lock, False
        deadline = time.monotonic() + wait
        delay = POLL_FIRST
        while True:
            await asyncio.sleep(delay)
            lock = self.try_acquire(key)
            if lock is not None or time.monotonic() >= deadline:
                return lock, True
            delay = min(delay * 2, POLL_MAX)

    # --- shared hit-for-miss ----------------------------------------------------------------

    def _mark_path(self, key: str) -> str:
        return os.path.join(self.marks, hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest())

    def mark_uncacheable(self, key: str, seconds: float) -> None:
        """Tell the node's workers that ``key`` cannot be stored, until ``seconds`` from now."""
        if seconds <= 0:
            return
        path = self._mark_path(key)
        now = time.time()
        until = now + seconds
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.utime(path, (until, until))
        except OSError as exc:
            log.warning("cache mark failed", error=str(exc))
        self._marked += 1
        if self._marked >= MARK_SWEEP_EVERY:
            # Marks of keys never stored again would pile up in tmpfs: drop the expired ones.
            self._marked = 0
            self.sweep_marks(now)

    def sweep_marks(self, now: float) -> int:
        """Delete expired hit-for-miss marks; returns how many."""
        removed = 0
        for name in _listdir(self.marks):
            path = os.path.join(self.marks, name)
            with contextlib.suppress(OSError):
                if os.stat(path).st_mtime <= now:
                    os.unlink(path)
                    removed += 1
        return removed

    def clear_uncacheable(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._mark_path(key))

    def uncacheable(self, key: str) -> bool:
        """Is ``key`` marked hit-for-miss by some worker?"""
        try:
            return os.stat(self._mark_path(key)).st_mtime > time.time()
        except OSError:
            return False


# --- the tmpfs tier's directory ---------------------------------------------------------------


def shm_base() -> str:
    """Where node tiers live: tmpfs when the system has it."""
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else "/tmp"


class NodeDirectory:
    """The tmpfs directory of one node's shared tier, held (shared flock) while a worker runs."""

    def __init__(self, port: int, base: str | None = None, supervisor: int | None = None) -> None:
        base = base or shm_base()
        owner = supervisor if supervisor is not None else os.getppid()
        stem = f"{_PREFIX}{os.getuid()}-"
        for name in _listdir(base):
            # Left by a node killed outright (its supervisor is gone): memory nobody frees otherwise.
            pid = name[len(stem) :].partition("-")[0] if name.startswith(stem) else ""
            if pid.isdigit() and int(pid) != owner and not pid_alive(int(pid)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        # The supervisor's pid and the node's port: two nodes never share a tier.
        self.path = os.path.join(base, f"{stem}{owner}-{port}")
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._fd = os.open(os.path.join(self.path, ".users"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def leave(self) -> bool:
        """Drop this worker's hold; the last worker out removes the directory (True)."""
        if self._fd < 0:
            return False
        fd, self._fd = self._fd, -1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(fd)
        return True


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
