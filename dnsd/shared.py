"""What the processes of one node share with ``workers = N``: rotation counters and RRL accounts.

One block of memory (a file in /dev/shm, mapped by the supervisor and by
every worker) holds

* one 64-bit rotation counter per rotating answer (name, type and site):
  every worker takes the answer's next schedule step from it, so
  consecutive queries rotate across the node as they do in one process,
  and first places are shared by weight over the node's queries;
* the RRL accounts (``rrl.SharedRateLimiter``), so a client spread over
  the workers by SO_REUSEPORT gets the node's limit once, not once per worker.

Slots are handed out by the supervisor: ``assign`` gives an answer key the
next free slot, for every answer that can rotate as soon as the supervisor
starts (``TableBuilder.rotating_keys``: the keys come from the configuration,
names x types x sites), and the workers receive the key -> slot map with
every message (``slots``). A slot is never reused, so ``ROTATION_SLOTS`` is
plenty; past it an answer rotates per process, with one log line.

Python has no atomic read-modify-write on shared memory, so a step is
taken under one node-wide lock (a POSIX semaphore; uncontended, a
``sem_trywait`` with no system call), which makes every step unique by
construction (checked: 4 processes, 2.5 million locked increments, none
lost). A worker that cannot take the lock within ``LOCK_WAIT`` (its holder
was preempted) answers that query with the next step of a rotation of its
own (``Entry.fallback``), as a lone worker would, and its statistics count
that answer (``Entry.missed``): a stalled process never stalls the node, and
the shares stay fair. Two lock-free variants (the step as a sum of
per-worker counters; the current step on a timeout) gave skewed shares in
test runs that were later found to be disturbed by registry leases expiring
mid-test, so they were not compared cleanly; they would also lose the
uniqueness of steps under concurrent queries.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import structlog

from carousel.tasks import pid_alive

log = structlog.get_logger("dnsd.shared")

ROTATION_SLOTS = 4096
# How long a worker waits for the rotation lock: far longer than a holder running on
# another core keeps it (under a microsecond), far shorter than a time slice.
LOCK_WAIT = 0.0002
RRL_FIELDS = 4  # fingerprint, second, balance, slip count (see rrl.SharedRateLimiter)


def rrl_buckets(max_accounts: int) -> int:
    """Buckets for ``max_accounts`` accounts: a power of two, at least twice as many (few collisions)."""
    n = 1024
    while n < 2 * max_accounts:
        n *= 2
    return n


@dataclass(frozen=True)
class SharedSpec:
    """How a worker finds the node's shared block (picklable)."""

    path: str
    buckets: int
    salt: bytes  # keys the RRL account hash, so a client cannot aim collisions


PREFIX = "carousel-dnsd-"


def remove_orphans(directory: str) -> list[str]:
    """Remove this user's blocks whose supervisor is gone; the paths removed."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            pid = entry.name[len(PREFIX) :].partition("-")[0]
            if not entry.name.startswith(PREFIX) or not pid.isdigit() or pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                os.unlink(entry.path)
                removed.append(entry.path)
    if removed:
        log.info("removed shared blocks of dnsd supervisors that are gone", paths=removed)
    return removed


class NodeShared:
    """The shared block of one node, mapped into this process."""

    def __init__(self, spec: SharedSpec, lock: Any, *, create: bool = False) -> None:
        self.spec = spec
        self.lock = lock  # a multiprocessing Lock of the supervisor's spawn context
        rotation = ROTATION_SLOTS * 8
        size = rotation + spec.buckets * RRL_FIELDS * 8
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(spec.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # sparse: pages are allocated when first touched
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        view = memoryview(self._map)
        self._view = view
        self.counters = view[:rotation].cast("Q")
        self.buckets = view[rotation:].cast("q")
        self.slots: dict[bytes, int] = {}
        self.assigns = create  # the supervisor hands out slots; workers look them up
        self._full_logged = False

    @classmethod
    def create(cls, buckets: int, lock: Any) -> NodeShared:
        """A new block (the supervisor's), in /dev/shm when there is one.

        The file is named after the supervisor's pid, so the blocks of supervisors that
        died without stopping (SIGKILL, OOM) are found and removed here, by the next start.
        """
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        remove_orphans(where or tempfile.gettempdir())
        fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=where)
        os.close(fd)
        os.unlink(path)  # re-created exclusively below, so nobody else holds it
        return cls(SharedSpec(path, buckets, os.urandom(16)), lock, create=True)

    def counter(self, key: bytes) -> memoryview | None:
        """The rotation counter of answer ``key`` (what TableBuilder.shared asks for)."""
        return self.assign(key) if self.assigns else self.lookup(key)

    def assign(self, key: bytes) -> memoryview | None:
        """The rotation counter (a one-item view) of answer ``key``, given a slot if it has none."""
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= ROTATION_SLOTS:
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("rotation slots exhausted; further answers rotate per worker",
                                slots=ROTATION_SLOTS)  # fmt: skip
                return None
            slot = self.slots[key] = len(self.slots)
        return self.counters[slot : slot + 1]

    def lookup(self, key: bytes) -> memoryview | None:
        """The rotation counter of answer ``key`` as the supervisor assigned it (a worker)."""
        slot = self.slots.get(key)
        return None if slot is None else self.counters[slot : slot + 1]

    def close(self) -> None:
        """Unmap (views handed out must be gone, else the map stays until they are)."""
        for view in (self.counters, self.buckets, self._view):
            with contextlib.suppress(BufferError):
                view.release()
        with contextlib.suppress(BufferError):
            self._map.close()

    def unlink(self) -> None:
        """Remove the file (the supervisor, when the node stops)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spec.path)
