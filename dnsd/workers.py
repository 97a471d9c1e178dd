"""``workers = N``: N answering processes sharing the listen ports through SO_REUSEPORT.

Layout: one supervisor process follows the registry (one etcd watch, not
N) and runs the admin listener; N worker processes (multiprocessing
"spawn") each bind every listen address with SO_REUSEPORT, so the kernel
spreads clients over them, and answer from their own AnswerTable.

Messages over one pipe per worker (pickled):

* supervisor -> worker: ``("table", records, revision, synced, last_healthy, slots)``
  when a worker starts and after a build from every record (a snapshot), and
  ``("delta", changes, revision, synced, slots)`` for each batch of watch events,
  sent as the batch arrives, before the supervisor builds anything: only the
  (before, after) registrations that changed, which the worker applies with
  ``TableBuilder.update``, so a change costs in proportion to what changed, not
  to the number of edges (pickling 10,000 records for every worker on every
  50 ms batch was the largest cost of churn at 10,000 edges with several
  workers). Deltas a worker receives together are applied as one update. The
  supervisor answers no query, so its own table (for /metrics and /status)
  follows at most a second later (``RegistryFeed.catch_up``): building it on
  every batch, on the core the workers rebuild on, left its etcd watch seconds
  behind under churn. All workers answer alike; ``("stop",)`` to shut down;
* worker -> supervisor: ``("ready", addresses)`` once bound, ``("applied",
  revision, synced)`` after each table, ``("resync",)`` if a delta failed to
  apply (the supervisor answers with a whole table), and ``("stats",
  Snapshot)`` every second.

Rotation and RRL are per node (dnsd/shared.py): ``slots`` maps each rotating
answer to its counter in the node's shared memory (handed out at start from
the zones, ``TableBuilder.rotating_keys``), which every worker steps,
and the RRL accounts live there too. The exposure statistics of those answers
(first places and inclusions per address) are derived by the supervisor from
the shared counters when /metrics is read, so they are the node's (read
through the supervisor's table: under churn, up to a second behind the workers');
query counts still come from the workers' snapshots (at most a second old).

Metrics: prometheus_client's multiprocess mode would cost a locked mmap
write per counted query, which the answer path cannot afford. Instead each
worker derives its counters from its tables (see stats.py) and pushes a
snapshot every second; the supervisor's /metrics reports the sums, at most a
second behind. Counts of a worker that died are kept in the totals.

A worker that dies is restarted after a second; with port 0 in a listen
address the supervisor picks the port first and holds it (with
SO_REUSEPORT) until every worker has bound it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from carousel.admin import AdminServer
from carousel.logs import setup_logging
from carousel.registry import ServiceRecord
from carousel.tasks import stop_tasks
from dnsd.config import Config
from dnsd.cookies import Secrets
from dnsd.daemon import (
    check_credentials,
    cookie_keeper,
    create_feed,
    health,
    install_stop_handlers,
    make_builder,
    registry_view,
    run_loop,
    status,
)
from dnsd.dnssec.setup import renew_signatures
from dnsd.feed import RegistryFeed
from dnsd.server import DnsServer, Listener, bind_listener
from dnsd.shared import NodeShared, SharedSpec, rrl_buckets
from dnsd.stats import SHARED, Counters, DnsCollector, Snapshot
from dnsd.table import AnswerTable

log = structlog.get_logger("dnsd.workers")

STATS_INTERVAL = 1.0
RESTART_DELAY = 1.0
STOP_GRACE = 5.0


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

    def send(self, msg: tuple[Any, ...]) -> None:
        """Queue a message (dropped once the other end is gone: the exit watcher handles that)."""
        if not self.writer.is_closing():
            data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            self.writer.write(len(data).to_bytes(8, "big") + data)

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


def _receive(channel: Channel, handle: Callable[[Any], None]) -> asyncio.Task[None]:
    """Hand each message to ``handle`` as it arrives, then None when the channel closes."""

    async def run() -> None:
        while True:
            msg = await channel.recv()
            handle(msg)
            if msg is None:
                return

    return asyncio.create_task(run())


# --- worker process ----------------------------------------------------------------------


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

    receiver = _receive(conn, on_message)
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


# --- supervisor --------------------------------------------------------------------------


@dataclass
class Worker:
    """The supervisor's handle on one worker process."""

    index: int
    process: Any
    conn: Channel
    ready: bool = False
    synced: bool = False  # has applied a table built from a registry snapshot
    revision: int = 0
    started: float = field(default_factory=time.monotonic)
    stats: Snapshot = field(default_factory=Snapshot)


class Supervisor:
    """Starts, feeds, watches and stops the worker processes."""

    def __init__(self, config: Config, feed: RegistryFeed, listen: list[str], shared: NodeShared) -> None:
        self.config = config
        self.feed = feed
        self.listen = listen
        # The node's rotation counters and RRL accounts; the supervisor's builder hands out
        # the counter slots, and folds the exposure they count (stats.SHARED).
        self.shared = shared
        feed.builder.shared = shared
        # Every answer that can rotate gets its counter now, from the zones: deltas go to the
        # workers before the supervisor builds a table (RegistryFeed.forward), so a counter
        # handed out by that build would come too late for the workers' tables.
        for key in feed.builder.rotating_keys():
            shared.assign(key)
        feed.forward = self.forward
        self.counters = Counters(SHARED)
        self.table = feed.table
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, Worker] = {}
        self.retired = Snapshot()  # counts of workers that died or were restarted
        self.restarts = 0
        self.stopping = False

    def _message(self) -> tuple[Any, ...]:
        """The whole registry state, for a starting worker or one that asked for it."""
        self.feed.catch_up()  # the table and the last healthy sets must include every forwarded change
        table = self.feed.table
        slots = dict(self.shared.slots)
        records: list[ServiceRecord] = list(self.feed.mirror.items.values())
        last_healthy = dict(self.feed.builder.last_healthy)
        return ("table", records, table.revision, table.synced, last_healthy, slots)

    async def start_worker(self, index: int) -> None:
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(
            target=worker_main,
            args=(self.config, index, self.listen, child, self.shared.spec, self.shared.lock),
            name=f"dnsd-worker-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        worker = Worker(index, process, await Channel.open(parent))
        self.workers[index] = worker
        _receive(worker.conn, functools.partial(self._on_message, worker))
        self._send(worker, self._message())
        cookies = self.feed.builder.cookies
        if cookies is not None:
            self._send(worker, ("cookies", cookies.secrets))

    def publish_cookies(self, secrets: Secrets) -> None:
        """Send the cluster's DNS Cookie secret to every worker."""
        for worker in self.workers.values():
            self._send(worker, ("cookies", secrets))

    def _send(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        worker.conn.send(msg)  # a dead worker's is dropped; the exit watcher restarts it

    def forward(self, changes: list[Any], revision: int, synced: bool) -> None:
        """Send a batch of registry changes to every worker, before the supervisor builds anything.

        The supervisor answers no query: its own table (for /metrics and /status) follows
        at most a second later (RegistryFeed.catch_up). Building it on every batch, on
        the core the workers rebuild on, delayed the supervisor's etcd watch by seconds.
        """
        msg = ("delta", changes, revision, synced, dict(self.shared.slots))
        for worker in self.workers.values():
            self._send(worker, msg)

    def publish(self, table: AnswerTable) -> None:
        """A new supervisor table: the whole state goes to every worker after a snapshot."""
        old, self.table = self.table, table
        if old is not table:
            self.counters.retire(old)
        if self.feed.last_changes is None:  # built from every record: the workers do the same
            msg = self._message()
            for worker in self.workers.values():
                self._send(worker, msg)

    def _on_message(self, worker: Worker, msg: Any) -> None:
        if msg is None or self.workers.get(worker.index) is not worker:
            return  # its pipe closed (the exit watcher restarts it), or a replaced worker's last words
        if msg[0] == "ready":
            worker.ready = True
            log.info("worker ready", worker=worker.index, pid=worker.process.pid, listen=msg[1])
        elif msg[0] == "applied":
            worker.revision = msg[1]
            worker.synced = worker.synced or msg[2]
        elif msg[0] == "stats":
            worker.stats = msg[1]
        elif msg[0] == "resync":
            self._send(worker, self._message())

    async def watch(self) -> None:
        """Restart workers that exit while we are not stopping."""
        while not self.stopping:
            await asyncio.sleep(0.2)
            for index, worker in list(self.workers.items()):
                if worker.process.is_alive() or self.stopping:
                    continue
                log.error(
                    "worker exited; restarting",
                    worker=index,
                    exitcode=worker.process.exitcode,
                    restarts=self.restarts + 1,
                )
                self._forget(worker)
                await asyncio.sleep(RESTART_DELAY)
                if not self.stopping:
                    self.restarts += 1
                    await self.start_worker(index)

    def _forget(self, worker: Worker) -> None:
        self.retired.add(worker.stats)
        worker.conn.close()

    async def wait_ready(self, within: float) -> bool:
        """True once every worker has bound its sockets; False if one died or time ran out."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(w.ready for w in self.workers.values()):
                return True
            if any(not w.process.is_alive() for w in self.workers.values()):
                return False
            await asyncio.sleep(0.02)
        return False

    def all_synced(self) -> bool:
        """Every live worker answers from registry data (not from the empty startup table)."""
        live = [w for w in self.workers.values() if w.process.is_alive()]
        return bool(live) and all(w.synced for w in live)

    def snapshot(self) -> Snapshot:
        """The node's counters: every worker's (and retired ones'), plus node-rotated exposure."""
        total = self.counters.snapshot(self.table, ())
        total.add(self.retired)
        for worker in self.workers.values():
            total.add(worker.stats)
        return total

    async def stop(self) -> None:
        """Ask every worker to stop, wait with a deadline, then terminate the rest."""
        self.stopping = True
        for worker in self.workers.values():
            self._send(worker, ("stop",))
        deadline = time.monotonic() + STOP_GRACE
        for worker in self.workers.values():
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(worker.process.join, remaining)
            if worker.process.is_alive():
                worker.process.terminate()
                await asyncio.to_thread(worker.process.join, 2)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 2)
            self._forget(worker)


def _reserve(listen: list[str]) -> tuple[list[str], list[Listener]]:
    """Concrete addresses for every listen entry, held open until the workers bind."""
    concrete, held = [], []
    for address in listen:
        lst = bind_listener(address, reuse_port=True)
        held.append(lst)
        concrete.append(lst.address)
    return concrete, held


def run_supervisor(config: Config, config_path: str) -> int:
    """Run the supervisor and its workers until SIGTERM/SIGINT."""
    return run_loop(_supervise(config))


async def _supervise(config: Config) -> int:
    try:
        listen, held = _reserve(config.dns.listen)
    except OSError as exc:
        log.error("cannot start: a listen address is unavailable", error=exc.strerror or str(exc))
        return 1
    builder = make_builder(config)
    feed = create_feed(config, builder)
    if feed is None:
        for lst in held:
            lst.udp.close()
            lst.tcp.close()
        return 1
    shared = NodeShared.create(
        rrl_buckets(config.dns.rrl.max_accounts), multiprocessing.get_context("spawn").Lock()
    )
    supervisor = Supervisor(config, feed, listen, shared)
    feed.publish = supervisor.publish
    collector = DnsCollector(supervisor.snapshot, lambda: registry_view(feed))
    import prometheus_client  # here, not at import: the workers never need it

    prometheus_client.REGISTRY.register(collector)

    def worker_status() -> dict[str, Any]:
        return {
            "workers": len(supervisor.workers),
            "worker_restarts": supervisor.restarts,
            "worker_pids": [w.process.pid for w in supervisor.workers.values()],
            # answers per live worker, as of its last report (at most a second old)
            "worker_answers": [sum(w.stats.queries.values()) for w in supervisor.workers.values()],
            "worker_revisions": [w.revision for w in supervisor.workers.values()],
        }

    def worker_health() -> tuple[bool, str]:
        ok, detail = health(feed)
        if ok and not supervisor.all_synced():
            return False, "waiting for every worker to load the registry"
        return ok, detail

    admin = AdminServer(
        config.admin,
        status=lambda: status(config, feed, held, worker_status()),
        health=worker_health,
    )
    tasks: set[asyncio.Task[None]] = set()
    code = 0
    stop = asyncio.Event()
    # From here on, so a stop during start-up still runs the clean-up below (which removes
    # the shared memory file: a process killed by the default SIGTERM action leaves it behind).
    install_stop_handlers(stop)

    def credentials_refused() -> None:
        nonlocal code
        code = 1
        stop.set()

    try:
        admin_port = await admin.start()
        for index in range(config.dns.workers):
            await supervisor.start_worker(index)
        ready = await supervisor.wait_ready(within=30)
        for lst in held:  # the workers hold the ports now
            lst.udp.close()
            lst.tcp.close()
        if not ready:
            log.error("workers failed to start")
            return 1
        keeper = cookie_keeper(config, feed, builder)
        if keeper is not None:
            keeper.on_change = supervisor.publish_cookies
        for coro, name in (
            (feed.run(), "registry-feed"),
            (supervisor.watch(), "worker-watch"),
            (check_credentials(feed, credentials_refused), "etcd-credentials"),
            *(((keeper.run(), "cookie-secret"),) if keeper is not None else ()),
        ):
            task = asyncio.create_task(coro, name=name)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        log.info(
            "dnsd listening",
            listen=listen,
            admin=f"{config.admin.host}:{admin_port}",
            zones=[z.origin for z in config.zone],
            workers=config.dns.workers,
            udp_engine=config.dns.udp_engine,
            rrl=config.dns.rrl.enabled,
        )
        await stop.wait()
        log.info("dnsd stopping")
    except OSError as exc:
        log.error("cannot start the admin listener", error=exc.strerror or str(exc))
        code = 1
    finally:
        # Workers first (they answer), then the registry feed, etcd, the admin listener.
        await supervisor.stop()
        await stop_tasks(tasks, what="dnsd task")
        for lst in held:
            lst.udp.close()
            lst.tcp.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(feed.close(), 2.0)
        await admin.stop()
        prometheus_client.REGISTRY.unregister(collector)
        shared.unlink()
    log.info("dnsd stopped")
    return code
