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
    """Per-client sliding-window request counts and open connections, per node.

    A bucket is one row: a cell of five int64 (hash, window, current, previous,
    connections) per worker, side by side, so the node's figure for a client is
    one ``unpack_from`` of its row. A worker claims the first bucket along the
    probe sequence whose own cell is free, stale or already the client's; the
    table has twice ``max_clients`` buckets, so that is nearly always the first,
    the same for every worker. When two workers placed one client in different
    buckets (a collision in one worker's column only) each sees part of the
    client's count: an undercount, never a false positive.
    """

    def __init__(self, workers: int, buckets: int, window: float = 1.0) -> None:
        self.workers = workers
        self.buckets = buckets
        self.window = window  # the DoS detector's window: cells older than two are reusable
        self.worker = 0
        self._stride = workers * _FIELDS
        self._row = struct.Struct(f"<{self._stride}q")
        self._mem = mmap.mmap(-1, buckets * self._stride * 8)
        self.cells = memoryview(self._mem).cast("q")
        self.full = 0  # requests not counted: every probed cell held another live client

    def enter(self, worker: int) -> None:
        """In a (re)started worker: its predecessor's connections died with it."""
        self.worker = worker
        cells = self.cells
        for i in range(worker * _FIELDS + _CONNS, len(cells), self._stride):
            if cells[i]:
                cells[i] = 0

    def _own(self, h: int, window: int) -> int:
        """This worker's cell for hash ``h`` (claiming a free or stale one); -1 when none."""
        cells = self.cells
        stride = self._stride
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

    def count(self, h: int, now: float, hint: int = -1) -> int:
        """Count one request of client ``h`` in this worker's cell; returns the cell (pass it
        as ``hint`` next time), -1 when the table had no room for the client."""
        w = int(now // self.window)
        cells = self.cells
        i = hint if hint >= 0 and cells[hint] == h else self._own(h, w)
        if i < 0:
            self.full += 1
            return -1
        if cells[i + _WINDOW] != w:
            cells[i + _PREVIOUS] = cells[i + _CURRENT] if cells[i + _WINDOW] == w - 1 else 0
            cells[i + _CURRENT] = 0
            cells[i + _WINDOW] = w
        cells[i + _CURRENT] += 1
        return i

    def read(self, h: int, now: float, cell: int) -> tuple[float, int]:
        """The node's requests per second and open connections of client ``h``, from the row
        of this worker's ``cell``.

        Windows are aligned on the system-wide monotonic clock, so every worker's
        current window is the same one; the estimate is the previous window weighted
        by how much of it still overlaps, plus the current one (as one worker does).
        """
        window = self.window
        w = int(now // window)
        row = self._row.unpack_from(self._mem, (cell - cell % self._stride) * 8)
        keep = 1.0 - (now / window - w)
        total = 0.0
        conns = 0
        for k in range(0, self._stride, _FIELDS):
            if row[k] != h:
                continue
            seen = row[k + _WINDOW]
            if seen == w:
                total += row[k + _PREVIOUS] * keep + row[k + _CURRENT]
            elif seen == w - 1:
                total += row[k + _CURRENT] * keep
            conns += row[k + _CONNS]
        return total / window, conns

    def hit(self, h: int, now: float, hint: int = -1) -> tuple[float, int, int]:
        """``count`` then ``read``: (requests per second, open connections, cell)."""
        i = self.count(h, now, hint)
        if i < 0:
            return 0.0, 0, -1
        rate, conns = self.read(h, now, i)
        return rate, conns, i

    def connect(self, h: int, delta: int) -> int:
        """Add ``delta`` to this worker's open connections of client ``h``; return the node's."""
        i = self._own(h, int(time.monotonic() // self.window))
        if i < 0:
            self.full += 1
            return 0
        cells = self.cells
        cells[i + _CONNS] = max(0, cells[i + _CONNS] + delta)
        return self._row_conns(h, i - i % self._stride)

    def connections(self, h: int) -> int:
        """The node's open connections from client ``h``."""
        cells = self.cells
        stride = self._stride
        b = h % self.buckets
        for _ in range(_PROBES):
            start = b * stride
            if any(cells[start + k] == h for k in range(0, stride, _FIELDS)):
                return self._row_conns(h, start)
            b = b + 1 if b + 1 < self.buckets else 0
        return 0

    def _row_conns(self, h: int, start: int) -> int:
        row = self._row.unpack_from(self._mem, start * 8)
        return sum(row[k + _CONNS] for k in range(0, self._stride, _FIELDS) if row[k] == h)


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
