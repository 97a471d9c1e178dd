"""``workers = N``: N answering processes sharing the listen ports through SO_REUSEPORT.

Layout: one supervisor process follows the registry (one etcd watch, not
N) and runs the admin listener; N worker processes (worker.py) each bind
every listen address with SO_REUSEPORT, so the kernel spreads clients over
them, and answer from their own AnswerTable.

The first workers are forked before the supervisor starts its event loop or
the etcd client (so before any thread exists): they start with the imports
already done. Started with multiprocessing "spawn", each worker paid a fresh
interpreter and its imports, about 0.4 s of CPU, on the core the supervisor
was reading the registry on: 1.6 s from start to the first full answer at
10,000 edges with two workers. A worker restarted later is spawned (the
supervisor has threads by then: gRPC's, the event loop's helpers).

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
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from carousel.admin import AdminServer
from carousel.registry import ServiceRecord
from carousel.tasks import stop_tasks
from dnsd.builder import make_builder
from dnsd.config import Config
from dnsd.cookies import Secrets
from dnsd.daemon import (
    check_credentials,
    cookie_keeper,
    create_feed,
    health,
    install_stop_handlers,
    registry_view,
    run_loop,
    status,
)
from dnsd.feed import RegistryFeed
from dnsd.server import Listener, bind_listener
from dnsd.shared import NodeShared, rrl_buckets
from dnsd.stats import SHARED, Counters, DnsCollector, Snapshot
from dnsd.table import AnswerTable
from dnsd.worker import Channel, dispatch, worker_main

log = structlog.get_logger("dnsd.workers")

RESTART_DELAY = 1.0
ADMIN_WAIT = 1.0  # seconds the admin listener waits for the workers to load the registry
STOP_GRACE = 5.0


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
        self.loaded = asyncio.Event()  # set once every worker has applied a registry snapshot

    def _message(self) -> tuple[Any, ...]:
        """The whole registry state, for a starting worker or one that asked for it."""
        self.feed.catch_up()  # the table and the last healthy sets must include every forwarded change
        table = self.feed.table
        slots = dict(self.shared.slots)
        records: list[ServiceRecord] = list(self.feed.mirror.items.values())
        last_healthy = dict(self.feed.builder.last_healthy)
        return ("table", records, table.revision, table.synced, last_healthy, slots)

    async def start_worker(self, index: int) -> None:
        """Spawn worker ``index`` (a restart: the supervisor runs threads, so no fork)."""
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(
            target=worker_main,
            args=(self.config, index, self.listen, child, self.shared.spec, self.shared.lock),
            name=f"dnsd-worker-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        await self.adopt(index, process, parent)

    async def adopt(self, index: int, process: Any, parent: Any) -> None:
        """Take a started worker process (and our end of its pipe) into service: send it the state."""
        worker = Worker(index, process, await Channel.open(parent))
        self.workers[index] = worker
        dispatch(worker.conn, functools.partial(self._on_message, worker))
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
        self._broadcast(("delta", changes, revision, synced, dict(self.shared.slots)))

    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        """Send one message to every worker, pickled once (the whole registry: ~2 MB at 10,000 edges)."""
        if self.workers:
            data = Channel.encode(msg)
            for worker in self.workers.values():
                worker.conn.send_encoded(data)

    def publish(self, table: AnswerTable) -> None:
        """A new supervisor table: the whole state goes to every worker after a snapshot."""
        old, self.table = self.table, table
        if old is not table:
            self.counters.retire(old)
        if self.feed.last_changes is None:  # built from every record: the workers do the same
            self._broadcast(self._message())

    def _on_message(self, worker: Worker, msg: Any) -> None:
        if msg is None or self.workers.get(worker.index) is not worker:
            return  # its pipe closed (the exit watcher restarts it), or a replaced worker's last words
        if msg[0] == "ready":
            worker.ready = True
            log.info("worker ready", worker=worker.index, pid=worker.process.pid, listen=msg[1])
        elif msg[0] == "applied":
            worker.revision = msg[1]
            worker.synced = worker.synced or msg[2]
            if worker.synced and not self.loaded.is_set() and self.all_synced():
                self.loaded.set()
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


async def _serve_admin(admin: AdminServer, supervisor: Supervisor, collector: DnsCollector) -> None:
    """Serve the admin listener (bound already) once every worker has the registry, or after ADMIN_WAIT.

    A health check that connects meanwhile waits in the listen backlog.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(supervisor.loaded.wait(), ADMIN_WAIT)
    import prometheus_client  # here, not at import: the workers never need it

    prometheus_client.REGISTRY.register(collector)
    try:
        await admin.start()
    except OSError as exc:
        log.error("cannot start the admin listener", error=exc.strerror or str(exc))


def _reserve(listen: list[str]) -> tuple[list[str], list[Listener]]:
    """Concrete addresses for every listen entry, held open until the workers bind."""
    concrete, held = [], []
    for address in listen:
        lst = bind_listener(address, reuse_port=True)
        held.append(lst)
        concrete.append(lst.address)
    return concrete, held


Forked = list[tuple[Any, Any]]  # (process, our end of its pipe) per worker


def _fork_workers(config: Config, listen: list[str], held: list[Listener], shared: NodeShared) -> Forked:
    """Fork the workers (see the module's docstring); [] where fork is unsafe or unavailable."""
    if threading.active_count() > 1 or "fork" not in multiprocessing.get_all_start_methods():
        return []  # a thread's lock held at the fork would stay held in the child
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(config.dns.workers)]
    # A child inherits every descriptor: the held listen sockets (the kernel would hand
    # them queries nobody reads) and the other ends of every pipe (a worker would not see
    # the supervisor go). It closes them first thing.
    inherited: list[Any] = [s for lst in held for s in (lst.udp, lst.tcp)] + [p for p, _ in pipes]
    forked: Forked = []
    for index, (parent, child) in enumerate(pipes):
        others = inherited + [c for _, c in pipes if c is not child]
        process = ctx.Process(
            target=_forked_worker,
            args=(others, config, index, listen, child, shared.spec, shared.lock),
            name=f"dnsd-worker-{index}",
            daemon=True,
        )
        process.start()
        forked.append((process, parent))
    for _, child in pipes:
        child.close()
    return forked


def _forked_worker(inherited: list[Any], *args: Any) -> None:
    """A forked worker: close what it inherited and does not own, then run as a spawned one would."""
    for obj in inherited:
        obj.close()
    worker_main(*args)


def run_supervisor(config: Config, config_path: str) -> int:
    """Run the supervisor and its workers until SIGTERM/SIGINT."""
    try:
        listen, held = _reserve(config.dns.listen)
    except OSError as exc:
        log.error("cannot start: a listen address is unavailable", error=exc.strerror or str(exc))
        return 1
    shared = NodeShared.create(
        rrl_buckets(config.dns.rrl.max_accounts), multiprocessing.get_context("spawn").Lock()
    )
    try:
        forked = _fork_workers(config, listen, held, shared)
    except BaseException:
        shared.unlink()
        raise
    return run_loop(_supervise(config, listen, held, shared, forked))


async def _supervise(
    config: Config, listen: list[str], held: list[Listener], shared: NodeShared, forked: Forked
) -> int:
    builder = make_builder(config)
    feed = create_feed(config, builder)
    if feed is None:
        for lst in held:
            lst.udp.close()
            lst.tcp.close()
        for process, parent in forked:
            parent.close()
            process.terminate()
            process.join(5)
        shared.unlink()
        return 1
    supervisor = Supervisor(config, feed, listen, shared)
    feed.publish = supervisor.publish
    collector = DnsCollector(supervisor.snapshot, lambda: registry_view(feed))

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

    def track(coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        # The registry is read while the workers start: its snapshot waits on etcd, theirs
        # on their imports, and whichever comes second finds the other done (a worker that
        # starts after the snapshot gets it with its first message). Read after the workers
        # were ready, it added the etcd round trips and decoding to the start-up.
        track(feed.run(), "registry-feed")
        # Bound now, served once the workers answer from the registry (_serve_admin):
        # importing aiohttp and prometheus_client and setting the app up cost ~0.3 s of CPU,
        # which had come before the workers were even sent the registry.
        admin_port = admin.bind()
        for index, (process, parent) in enumerate(forked):
            await supervisor.adopt(index, process, parent)
        for index in range(len(forked), config.dns.workers):
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
            (_serve_admin(admin, supervisor, collector), "admin-listener"),
            (supervisor.watch(), "worker-watch"),
            (check_credentials(feed, credentials_refused), "etcd-credentials"),
            *(((keeper.run(), "cookie-secret"),) if keeper is not None else ()),
        ):
            track(coro, name)
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
        import prometheus_client

        with contextlib.suppress(KeyError):  # registered when the admin listener started
            prometheus_client.REGISTRY.unregister(collector)
        shared.unlink()
    log.info("dnsd stopped")
    return code
