"""One node, one view: what a worker does so that N workers behave as one server.

``NodeWorker`` (with ``workers > 1``; the shared parts are edge/core/node.py):

* Events reach every worker over the node's bus: a purge (PURGE method, admin
  API), a ban made by any worker, an operator's unban, a reload. The worker that
  takes the event applies it and sends it on; the others apply it when their
  loop reads the datagram (sub-millisecond when idle). Cluster purges already
  reach every worker, each of which follows etcd itself.
* Node figures: each worker publishes its metrics and status into its slot
  (every second, on request, and when it stops); the admin listener (worker 0)
  asks every worker for a fresh one before answering /metrics or /status, then
  sums counters and histograms over all slots, sums gauges over the live
  workers (``PER_WORKER_GAUGES`` are labelled ``worker`` instead, since a sum
  means nothing for them), and lists each worker in /status. A restarted
  worker starts its counters from what its slot held, so totals neither drop
  nor count twice; what a worker killed outright (SIGKILL, a crash of the
  interpreter) counted after its last publish, at most ``PUBLISH_EVERY``, is lost.

``cut_banned`` (every edge): a ban also ends the client's open tunnels (CONNECT,
WebSocket) and passthrough streams, which carry no requests to refuse.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from edge.core.node import Node
from edge.features.dos import DosDetector

if TYPE_CHECKING:
    from edge.core.metrics import Metrics
    from edge.front.connection import ClientConnection
    from edge.front.links import ConnectionList
    from edge.front.passthrough import PassthroughListener


class Edge(Protocol):
    """What the node's part uses from the running edge (front/server.py)."""

    @property
    def features(self) -> list[Any]: ...

    @property
    def connections(self) -> ConnectionList[ClientConnection]: ...

    @property
    def passthrough(self) -> list[PassthroughListener]: ...

    @property
    def metrics(self) -> Metrics: ...

    def local_status(self) -> dict[str, Any]: ...

    def reload_certificates(self, reason: str = "SIGHUP") -> None: ...


log = structlog.get_logger("carousel.edge.node")

PUBLISH_EVERY = 1.0  # seconds between a worker's snapshots (what a SIGKILL can lose)
COLLECT_WAIT = 0.25  # how long the admin listener waits for the workers' fresh snapshots
# Gauges that are one worker's own state, where a node-wide sum means nothing.
PER_WORKER_GAUGES = frozenset({"carousel_edge_member_up", "carousel_edge_dos_bans"})
_SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
EVENTS = ("purge", "ban", "unban", "reload")
_NOT_ONE_CLIENT = "give address= (one IPv4 address or IPv6 network)"
MAX_BAN_SECONDS = 366 * 86400  # an operator's ban: a year at most (etcd leases are int64 seconds)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def families(registry: CollectorRegistry) -> list[tuple[str, str, str, Samples]]:
    """A registry's metrics as plain data: (name, type, help, {(sample, labels): value})."""
    out = []
    for metric in registry.collect():
        samples: Samples = {}
        for s in metric.samples:
            if s.name.endswith("_created"):
                continue  # a worker's start time: not a figure to sum
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        out.append((metric.name, metric.type, metric.documentation, samples))
    return out


def cut_banned(edge: Edge, dos: DosDetector) -> Callable[[str], None]:
    """The ban hook that ends a banned client's tunnels and passthrough streams."""

    def cut(key: str) -> None:
        keys = dos.keys
        for conn in list(edge.connections):
            if conn.tunnel is not None and conn.transport is not None and keys(conn.peer) == key:
                conn.transport.abort()  # connection_lost closes the member/origin side
        for listener in edge.passthrough:
            for stream in list(listener.connections):
                if keys(stream.peer[0]) == key:
                    stream.finish(abort=True)

    return cut


class NodeWorker:
    """This worker's part in the node: the bus, its snapshots, and the node's admin view."""

    def __init__(self, edge: Edge, node: Node) -> None:
        self.edge = edge
        self.node = node
        self.worker = node.worker
        self.bus = node.bus
        self.events = {kind: {"count": 0, "last_at": 0.0, "last_ms": 0.0, "max_ms": 0.0} for kind in EVENTS}
        self.dos = next((f for f in edge.features if isinstance(f, DosDetector)), None)
        self.cache = next(
            (f for f in edge.features if hasattr(f, "purges") and hasattr(f, "admin_routes")), None
        )
        # Counter totals of this worker's earlier lives (its slot survives a restart).
        self.base: dict[str, Samples] = {}
        self.restarts = 0
        previous = node.snapshots.read(self.worker)
        if previous is not None:
            self.restarts = int(previous.get("restarts", 0)) + 1
            for name, typ, _doc, samples in previous.get("families", []):
                if typ in _SUMMED:
                    self.base[name] = samples
        # The last collect request sent (worker 0): past every answer in the slots, so a restarted
        # worker 0 does not take an old answer of a worker now dead for a fresh one.
        self._asked = max(node.snapshots.answer(w) for w in range(node.workers))
        self._task: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(self))
        if self.dos is not None:
            self.dos.on_ban.append(self._ban_made)
        if self.cache is not None:
            self.cache.purges.observer = self._purged

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Read the inbox from now on (and what waited in it), publish every second."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.bus.inbox().fileno(), self._on_bus)
        self._on_bus()
        self._task = loop.create_task(self._publish_forever())

    async def stop(self) -> None:
        """Stop reading and publishing; the last snapshot keeps this life's totals."""
        try:
            asyncio.get_running_loop().remove_reader(self.bus.inbox().fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.publish()

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY)
            try:
                self.publish()
            except Exception:
                log.exception("node snapshot failed")

    def publish(self, answer: int | None = None) -> None:
        """Write this worker's metrics (plus its earlier lives' counters) and status to its slot."""
        own = families(self.edge.metrics.registry)
        for name, typ, _doc, samples in own:
            base = self.base.get(name)
            if base and typ in _SUMMED:
                for key, value in base.items():
                    samples[key] = samples.get(key, 0.0) + value
        names = {f[0] for f in own}
        for name, samples in self.base.items():
            if name not in names:  # a family this life has not produced yet
                own.append((name, "counter", "", dict(samples)))
        snapshot = {
            "worker": self.worker,
            "pid": os.getpid(),
            "at": time.time(),
            "restarts": self.restarts,
            "families": own,
            "status": {**self.edge.local_status(), "node_events": self.events, "restarts": self.restarts},
        }
        slots = self.node.snapshots
        if not slots.write(self.worker, snapshot, slots.answer(self.worker) if answer is None else answer):
            log.warning("node snapshot too large for its slot", worker=self.worker)

    # --- the bus ------------------------------------------------------------------------

    def send(self, event: str, **fields: Any) -> None:
        """Tell every other worker (``at``: wall-clock send time, for the propagation figure)."""
        self.bus.send_others({"t": event, "at": time.time(), "from": self.worker, **fields})

    def _on_bus(self) -> None:
        for message in self.bus.receive():
            try:
                self._apply(message)
            except Exception:
                log.exception("node message failed", kind=message.get("t"))

    def _apply(self, m: dict[str, Any]) -> None:
        kind = m.get("t")
        if kind == "collect":
            self.publish(answer=int(m["n"]))
            return
        if kind == "purge" and self.cache is not None:
            self.cache.purges.replay(str(m["kind"]), str(m["target"]))
        elif kind == "ban" and self.dos is not None:
            self.dos.apply_ban(m["key"], float(m["until"]))
        elif kind == "unban" and self.dos is not None:
            self.dos.unban(m["key"])
        elif kind == "reload":
            self.edge.reload_certificates("node")
        else:
            return
        self.noted(str(kind), float(m.get("at", 0.0)))

    def noted(self, kind: str, sent: float) -> None:
        """Record that an event reached this worker (and how long it took from ``sent``)."""
        now = time.time()
        e = self.events[kind]
        e["count"] += 1
        e["last_at"] = now
        if sent:
            ms = round((now - sent) * 1000, 3)
            e["last_ms"] = ms
            e["max_ms"] = max(e["max_ms"], ms)

    # --- fan-out hooks ------------------------------------------------------------------

    def _ban_made(self, key: str, until: float) -> None:
        self.send("ban", key=key, until=until)

    def _purged(self, kind: str, target: str) -> None:
        """The cache's purge observer: a removal made here (PURGE, invalidation, admin API)."""
        self.send("purge", kind=kind, target=target)

    # --- admin (worker 0) ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Before /metrics or /status: every live worker publishes a fresh snapshot."""
        self._asked += 1
        n = self._asked
        self.send("collect", n=n)
        self.publish(answer=n)
        slots = self.node.snapshots
        deadline = time.monotonic() + COLLECT_WAIT
        while time.monotonic() < deadline:
            if all(slots.answer(w) >= n for w in range(self.node.workers)):
                return
            await asyncio.sleep(0.002)

    def status(self) -> dict[str, Any]:
        """/status for the node: worker 0's view, node-wide sums, and every worker's own."""
        n = self._asked
        workers: list[dict[str, Any]] = []
        for w in range(self.node.workers):
            snap = self.node.snapshots.read(w)
            if snap is None:
                workers.append({"worker": w, "live": False})
                continue
            live = self.node.snapshots.answer(w) >= n
            workers.append({"live": live, "pid": snap["pid"], **snap["status"]})
        alive = [w for w in workers if w.get("live")]
        own = self.edge.local_status()
        return {
            **own,
            "worker": None,
            "workers": self.node.workers,
            "connections": sum(int(w.get("connections", 0)) for w in alive),
            "node": {
                "live_workers": len(alive),
                "bus_dropped": self.bus.dropped,
                "clients_untracked": self.node.clients.full,
            },
            "per_worker": workers,
        }

    def merged(self) -> Iterator[Metric]:
        """The node's metric families from every slot."""
        n = self._asked
        acc: dict[str, tuple[str, str, Samples]] = {}
        for w in range(self.node.workers):
            snap = self.node.snapshots.read(w)
            if snap is None:
                continue
            live = w == self.worker or self.node.snapshots.answer(w) >= n
            for name, typ, doc, samples in snap["families"]:
                summed = typ in _SUMMED
                if not summed and not live:
                    continue  # a dead worker's gauges describe nothing that exists
                entry = acc.get(name)
                if entry is None:
                    entry = acc[name] = (typ, doc, {})
                into = entry[2]
                per_worker = name in PER_WORKER_GAUGES
                for (sample, labels), value in samples.items():
                    key = (sample, (*labels, ("worker", str(w)))) if per_worker else (sample, labels)
                    into[key] = into.get(key, 0.0) + value
        for name, (typ, doc, samples) in acc.items():
            metric = Metric(name, doc, typ)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


class AdminActions:
    """Bans, unbans and reloads on the admin listener: this edge's, and with workers > 1 sent
    on to every worker (a ban through the detector's ban hook, the others here)."""

    def __init__(self, edge: Edge, node: NodeWorker | None) -> None:
        self.edge = edge
        self.node = node
        self.dos = next((f for f in edge.features if isinstance(f, DosDetector)), None)

    def routes(self) -> list[tuple[str, str, Any]]:
        """The admin routes: ``POST /dos/ban``, ``DELETE /dos/ban``, ``POST /reload``."""
        return [
            ("POST", "/dos/ban", self._ban),
            ("DELETE", "/dos/ban", self._unban),
            ("POST", "/reload", self._reload),
        ]

    async def _ban(self, request: web.Request) -> web.Response:
        if self.dos is None:
            return web.json_response({"error": "[dos] is not enabled"}, status=404)
        key = _client_key(self.dos, request.query.get("address", ""))
        if key is None:
            return web.json_response({"error": _NOT_ONE_CLIENT}, status=400)
        try:
            seconds = float(request.query.get("seconds", "0") or 0)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= MAX_BAN_SECONDS:  # NaN fails this too
            problem = f"seconds= must be a number from 1 to {MAX_BAN_SECONDS} (0: ban_seconds)"
            return web.json_response({"error": problem}, status=400)
        banned = self.dos.ban(key, "operator (admin API)", seconds)
        return web.json_response({"address": key, "banned": banned})

    async def _unban(self, request: web.Request) -> web.Response:
        if self.dos is None:
            return web.json_response({"error": "[dos] is not enabled"}, status=404)
        key = _client_key(self.dos, request.query.get("address", ""))
        if key is None:
            return web.json_response({"error": _NOT_ONE_CLIENT}, status=400)
        lifted = self.dos.unban(key)
        if self.node is not None:
            self.node.send("unban", key=key)
        await self.dos.unpublish(key)
        return web.json_response({"address": key, "lifted": lifted})

    async def _reload(self, request: web.Request) -> web.Response:
        self.edge.reload_certificates("admin API")
        workers = 1
        if self.node is not None:
            self.node.send("reload")
            workers = self.node.node.workers
        return web.json_response({"reloaded": True, "workers": workers})


class _NodeCollector(Collector):
    def __init__(self, node: NodeWorker) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        return self.node.merged()


def _client_key(dos: DosDetector, address: str) -> str | None:
    """What the detector bans an address or network under (None: not one client)."""
    address = address.strip()
    try:
        net = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return None
    if "/" not in address or (net.version == 4 and net.prefixlen == 32):
        key = dos.keys(str(net.network_address))
    else:
        key = str(net)
    return key if dos.keys.bannable(key) else None
