"""One worker process of ``workers = N``: answers from its own table, fed by the supervisor.

The supervisor (workers.py) starts it with multiprocessing "spawn", so the
child imports this module afresh: it imports only what answering needs
(the table builder, the server, the node's shared memory), not the etcd
client or the admin listener, which cost each worker about 0.1 s of CPU at
start-up on the core its peers were starting on (see workers.py for the
messages it exchanges with the supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
from collections.abc import Callable
from typing import Any

import structlog

from carousel.logs import setup_logging
from carousel.tasks import run_loop, stop_tasks
from dnsd.builder import make_builder
from dnsd.config import Config
from dnsd.dnssec.setup import renew_signatures
from dnsd.server import DnsServer, bind_listener
from dnsd.shared import NodeShared, SharedSpec

log = structlog.get_logger("dnsd.workers")

STATS_INTERVAL = 1.0


class Channel:
    """Pickled messages over one end of the supervisor <-> worker socket pair, on the event loop.

    Each message is an 8-byte length and a pickle. ``send`` never blocks (the
    transport buffers), and ``recv`` waits for a whole message however large.
    Before, the pipe was read with ``Connection.recv`` from ``add_reader``:
    uvloop makes a watched descriptor non-blocking, so a message bigger than
    the 64 KiB socket buffer (the whole registry, about 2 MB at 10,000 edges)
    raised EAGAIN half-way, and the worker took that for a closed pipe and
    exited, over and over. Reading in a thread instead (measured) left the
    reader waiting for the GIL behind a saturated UDP thread, and the
    supervisor blocked in ``send``: answers fell seconds behind under load.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, conn: Any) -> Channel:
        """Take over a multiprocessing Connection's socket (closing the Connection)."""
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        conn.close()
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    @staticmethod
    def encode(msg: tuple[Any, ...]) -> bytes:
        """A message as sent: its length and its pickle (one encoding for every worker)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        return len(data).to_bytes(8, "big") + data

    def send(self, msg: tuple[Any, ...]) -> None:
        """Queue a message (dropped once the other end is gone: the exit watcher handles that)."""
        self.send_encoded(self.encode(msg))

    def send_encoded(self, data: bytes) -> None:
        """Queue a message made by ``encode``."""
        if not self.writer.is_closing():
            self.writer.write(data)

    async def recv(self) -> Any:
        """The next message; None once the other end is gone."""
        try:
            head = await self.reader.readexactly(8)
            return pickle.loads(await self.reader.readexactly(int.from_bytes(head, "big")))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return None

    async def flush(self, within: float) -> None:
        """Wait (a while) until queued messages are written."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.drain(), within)

    def close(self) -> None:
        self.writer.close()


def dispatch(channel: Channel, handle: Callable[[Any], None]) -> asyncio.Task[None]:
    """Hand each message to ``handle`` as it arrives, then None when the channel closes."""

    async def run() -> None:
        while True:
            msg = await channel.recv()
            handle(msg)
            if msg is None:
                return

    return asyncio.create_task(run())


def worker_main(
    config: Config, index: int, listen: list[str], conn: Any, spec: SharedSpec, lock: Any
) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    setup_logging(config.log, daemon=f"dnsd-worker-{index}")
    run_loop(_worker(config, index, listen, conn, NodeShared(spec, lock)))


async def _worker(config: Config, index: int, listen: list[str], pipe: Any, shared: NodeShared) -> int:
    loop = asyncio.get_running_loop()
    conn = await Channel.open(pipe)
    builder = make_builder(config)
    builder.shared = shared
    try:
        listeners = [bind_listener(a, reuse_port=True) for a in listen]
    except OSError as exc:
        log.error("worker cannot listen", worker=index, error=exc.strerror or str(exc))
        return 1
    server = DnsServer(config.dns, builder.build([], 0, synced=False), shared)
    await server.start(listeners)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def rebuild() -> None:  # the DNSSEC renewal: the same registry state, fresh signatures
        table = server.table
        server.set_table(builder.update([], table.revision, synced=table.synced, previous=table))

    def applied(revision: int, synced: bool) -> None:
        conn.send(("applied", revision, synced))

    # Deltas that arrived together are applied as one update: a worker that got less CPU
    # than the registry's pace (its core shared with busier processes) catches up with
    # one build, not one per batch it missed.
    pending: list[tuple[Any, int, bool]] = []

    def apply_pending() -> None:
        if not pending:
            return
        changes = [c for batch, _, _ in pending for c in batch]
        _, revision, synced = pending[-1]
        pending.clear()
        try:
            table = builder.update(changes, revision, synced=synced, previous=server.table)
        except Exception:  # keep answering from the last table; ask for the whole state
            log.exception("worker could not apply a registry change; asking for a whole table")
            conn.send(("resync",))
            return
        server.set_table(table)
        applied(revision, synced)

    def on_message(msg: Any) -> None:
        if msg is None:
            stop.set()  # the supervisor is gone
            return
        if msg[0] == "table":
            _, records, revision, synced, last_healthy, slots = msg
            pending.clear()  # the whole state includes every delta sent before it
            shared.slots = slots
            builder.last_healthy = last_healthy
            server.set_table(builder.build(records, revision, synced=synced, previous=server.table))
            applied(revision, synced)
        elif msg[0] == "delta":
            _, changes, revision, synced, slots = msg
            shared.slots = slots
            if not pending:
                loop.call_soon(apply_pending)  # after every message already received
            pending.append((changes, revision, synced))
        elif msg[0] == "cookies" and builder.cookies is not None:
            builder.cookies.secrets = msg[1]  # the cluster's DNS Cookie secret, from the supervisor
        elif msg[0] == "stop":
            stop.set()

    receiver = dispatch(conn, on_message)
    conn.send(("ready", [lst.address for lst in listeners]))

    async def push_stats() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            conn.send(("stats", server.snapshot()))

    pusher = asyncio.create_task(push_stats())
    renewer = asyncio.create_task(renew_signatures(builder.next_refresh, rebuild))
    await stop.wait()
    await stop_tasks((pusher, renewer), what="dnsd worker task")
    await server.stop()
    conn.send(("stats", server.snapshot()))
    await conn.flush(2.0)
    await stop_tasks((receiver,), what="dnsd worker task")
    conn.close()
    return 0
