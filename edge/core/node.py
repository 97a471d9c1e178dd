"""What the workers of one edge node share: a message bus, node-wide client counts, worker snapshots.

With ``workers = N`` the supervisor (edge/main.py) builds one ``Node`` before it
forks, so every worker, and every worker restarted later, inherits the same
sockets and shared memory:

* ``Bus``: one AF_UNIX datagram socket pair per worker (its inbox). A worker
  sends a message (a purge, a ban, an unban, a reload, a request for a
  snapshot) to every other inbox; each datagram arrives whole, within
  microseconds, and the event loop reads it like any socket. The supervisor
  keeps every inbox open, so messages sent while a worker is being restarted
  wait in its inbox and the new worker applies them first.
* ``ClientTable``: per-client request counts and open connections in an
  anonymous shared mapping, one column per worker. A worker writes only its
  own column (no lock), and reads all N to get the node's figure, so a client
  spread over N connections (and N workers) is counted once per node.
* ``Snapshots``: one slot per worker where it publishes its metrics and
  status (pickled, under a sequence lock). The admin listener (worker 0) reads
  every slot for the node's /metrics and /status; a restarted worker starts
  its counters from its slot, so its totals survive the restart and are
  counted once.

Shared memory here is plain ``mmap(-1, n)`` (MAP_SHARED | MAP_ANONYMOUS on
Linux): it exists only in the processes forked from the supervisor.
"""

from __future__ import annotations

import mmap
import os
import pickle
import socket
import struct
import time
from typing import Any

# A worker's snapshot slot: [sequence, length, answer, pid] then the pickled snapshot.
_SLOT_HEAD = struct.Struct("<qqqq")
SLOT_BYTES = 4 << 20  # pages are only touched when written: 4 MiB of address space per worker
# Bus datagrams: a purge target or a ban is far below this.
MAX_MESSAGE = 64 << 10
_INBOX_BYTES = 1 << 20

# ClientTable cell fields (int64 each).
_HASH, _WINDOW, _CURRENT, _PREVIOUS, _CONNS = range(5)
_FIELDS = 5
_PROBES = 8
_MASK = (1 << 63) - 1


def client_hash(key: str) -> int:
    """A non-zero 63-bit hash of a client key. Python's str hash is seeded per process, but
    workers are forked from the supervisor (same seed), restarted ones too."""
    return (hash(key) & _MASK) | 1


class ClientTable:
    """Per-client sliding-window request counts and open connections, per node."""

    def __init__(self, workers: int, buckets: int, window: float = 1.0) -> None:
        self.workers = workers
        self.buckets = buckets
        self.window = window  # the DoS detector's window: cells older than two are reusable
        self.worker = 0
        self._mem = mmap.mmap(-1, buckets * workers * _FIELDS * 8)
        self.cells = memoryview(self._mem).cast("q")
        self.full = 0  # requests not counted: every probed cell held another live client

    def enter(self, worker: int) -> None:
        """In a (re)started worker: its predecessor's connections died with it."""
        self.worker = worker
        cells = self.cells
        stride = self.workers * _FIELDS
        base = worker * _FIELDS + _CONNS
        for b in range(self.buckets):
            i = b * stride + base
            if cells[i]:
                cells[i] = 0

    def _own(self, h: int, window: int) -> int:
        """This worker's cell for hash ``h`` (claiming a free or stale one); -1 when none."""
        cells = self.cells
        stride = self.workers * _FIELDS
        col = self.worker * _FIELDS
        free = -1
        b = h % self.buckets
        for _ in range(_PROBES):
            i = b * stride + col
            held = cells[i]
            if held == h:
                return i
            if free < 0 and (held == 0 or (cells[i + _WINDOW] < window - 1 and not cells[i + _CONNS])):
                free = i
                if held == 0:
                    break  # never used: nothing further along was placed past it
            b = b + 1 if b + 1 < self.buckets else 0
        if free >= 0:
            cells[free + _WINDOW] = window
            cells[free + _CURRENT] = 0
            cells[free + _PREVIOUS] = 0
            cells[free + _CONNS] = 0
            cells[free] = h
        return free

    def _find(self, h: int, worker: int) -> int:
        cells = self.cells
        stride = self.workers * _FIELDS
        col = worker * _FIELDS
        b = h % self.buckets
        for _ in range(_PROBES):
            i = b * stride + col
            held = cells[i]
            if held == h:
                return i
            if held == 0:
                return -1
            b = b + 1 if b + 1 < self.buckets else 0
        return -1

    def hit(self, h: int, now: float, window: float) -> float:
        """Count one request of client ``h``; return the node's requests per second for it.

        Windows are aligned on the system-wide monotonic clock, so every worker's
        current window is the same one; the estimate is the previous window weighted
        by how much of it still overlaps, plus the current one (as a single worker does).
        """
        w = int(now // window)
        frac = now / window - w
        cells = self.cells
        i = self._own(h, w)
        if i < 0:
            self.full += 1
            return 0.0
        seen = cells[i + _WINDOW]
        if seen != w:
            cells[i + _PREVIOUS] = cells[i + _CURRENT] if seen == w - 1 else 0
            cells[i + _CURRENT] = 0
            cells[i + _WINDOW] = w
        cells[i + _CURRENT] += 1
        total = 0.0
        keep = 1.0 - frac
        for worker in range(self.workers):
            j = i if worker == self.worker else self._find(h, worker)
            if j < 0:
                continue
            seen = cells[j + _WINDOW]
            if seen == w:
                total += cells[j + _PREVIOUS] * keep + cells[j + _CURRENT]
            elif seen == w - 1:
                total += cells[j + _CURRENT] * keep
        return total / window

    def connect(self, h: int, delta: int) -> int:
        """Add ``delta`` to this worker's open connections of client ``h``; return the node's."""
        i = self._own(h, int(time.monotonic() // self.window))
        if i < 0:
            self.full += 1
            return 0
        cells = self.cells
        cells[i + _CONNS] = max(0, cells[i + _CONNS] + delta)
        return self.connections(h)

    def connections(self, h: int) -> int:
        """The node's open connections from client ``h``."""
        cells = self.cells
        total = 0
        for worker in range(self.workers):
            j = self._find(h, worker)
            if j >= 0:
                total += cells[j + _CONNS]
        return total


class Snapshots:
    """One slot per worker for its published metrics and status, read by the admin listener."""

    def __init__(self, workers: int, slot_bytes: int = SLOT_BYTES) -> None:
        self.workers = workers
        self.slot_bytes = slot_bytes
        self._mem = mmap.mmap(-1, workers * slot_bytes)

    def write(self, worker: int, snapshot: dict[str, Any], answer: int) -> bool:
        """Publish a worker's snapshot (sequence lock: odd while writing); False if too big."""
        data = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.slot_bytes - _SLOT_HEAD.size:
            return False
        mem, base = self._mem, worker * self.slot_bytes
        seq = _SLOT_HEAD.unpack_from(mem, base)[0]
        _SLOT_HEAD.pack_into(mem, base, seq + 1, 0, 0, 0)
        mem[base + _SLOT_HEAD.size : base + _SLOT_HEAD.size + len(data)] = data
        _SLOT_HEAD.pack_into(mem, base, seq + 2, len(data), answer, os.getpid())
        return True

    def answer(self, worker: int) -> int:
        """The last collect request this worker answered."""
        return int(_SLOT_HEAD.unpack_from(self._mem, worker * self.slot_bytes)[2])

    def read(self, worker: int) -> dict[str, Any] | None:
        """A worker's last snapshot (None: never written)."""
        mem, base = self._mem, worker * self.slot_bytes
        for _ in range(100):
            seq, length, _answer, _pid = _SLOT_HEAD.unpack_from(mem, base)
            if seq == 0:
                return None
            if seq % 2:
                time.sleep(0.0005)
                continue
            data = bytes(mem[base + _SLOT_HEAD.size : base + _SLOT_HEAD.size + length])
            if _SLOT_HEAD.unpack_from(mem, base)[0] == seq:
                snapshot: dict[str, Any] = pickle.loads(data)
                return snapshot
        return None


class Bus:
    """Datagram inboxes, one per worker: send to all the others, read one's own."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.worker = 0
        self.inboxes: list[tuple[socket.socket, socket.socket]] = []
        for _ in range(workers):
            inbox, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for s in (inbox, sender):
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _INBOX_BYTES)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _INBOX_BYTES)
            self.inboxes.append((inbox, sender))
        self.dropped = 0

    def inbox(self) -> socket.socket:
        """This worker's receiving socket."""
        return self.inboxes[self.worker][0]

    def send_others(self, message: dict[str, Any]) -> int:
        """Send to every other worker's inbox; returns how many took it (a full inbox drops it)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"node message of {len(data)} bytes is over {MAX_MESSAGE}")
        sent = 0
        for index, (_inbox, sender) in enumerate(self.inboxes):
            if index == self.worker:
                continue
            try:
                sender.send(data)
                sent += 1
            except (BlockingIOError, OSError):
                self.dropped += 1
        return sent

    def receive(self) -> list[dict[str, Any]]:
        """Every message waiting in this worker's inbox."""
        out: list[dict[str, Any]] = []
        inbox = self.inbox()
        while True:
            try:
                data = inbox.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return out
            try:
                message = pickle.loads(data)
            except Exception:  # only our own processes hold these sockets; never crash on one
                continue
            if isinstance(message, dict):
                out.append(message)


class Node:
    """The shared parts of an edge node with ``workers`` processes (built before the fork)."""

    def __init__(self, workers: int, max_clients: int = 65_536, window: float = 1.0) -> None:
        self.workers = workers
        self.worker = 0
        self.bus = Bus(workers)
        # Twice the tracked clients, so probes stay short; at least 1024 buckets.
        self.clients = ClientTable(workers, max(1024, 2 * max_clients), window)
        self.snapshots = Snapshots(workers)
        self.started = time.time()

    def enter(self, worker: int) -> None:
        """Called in a worker right after the fork: which column, slot and inbox are its own."""
        self.worker = worker
        self.bus.worker = worker
        self.clients.enter(worker)
