"""Purges: by URL, prefix or Surrogate-Key tag, on one edge (PURGE, admin route) or the cluster.

``Purges`` applies a purge to both tiers. A URL purge removes both schemes
and normalises the URL's key the way its route would. A prefix is an absolute
URL prefix (``http://host/static/``) or a path prefix on every host
(``/static/``). Memory entries go at once; the disk tier gets a ban (see
edge/cache/disk.py).

Cluster-wide: every edge follows `carousel purge` events in etcd and applies each once.

`carousel purge URL | --prefix P | --tag T` writes a PurgeEvent under
``{prefix}purge/`` with a 30 s lease (carousel/ops.py). Each edge worker keeps
a PrefixMirror on that prefix (snapshot, then a watch: an event reaches us in
milliseconds) and applies every event key it has not applied yet. Keys are
forgotten once their lease removes them from etcd, so the set stays small.

Events already in etcd when this worker first reads the prefix are older than
its memory tier, which they cannot concern; they still reach the disk tier,
which may hold entries from before a restart, as bans on entries stored before
the event was issued. An event published while etcd was unreachable is applied
when the watch comes back (the mirror re-lists).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urljoin

import structlog
from aiohttp import web
from multidict import CIMultiDict

from carousel.etcd import Etcd
from carousel.mirror import PrefixMirror
from carousel.registry import Keys, PurgeEvent
from edge.core.pipeline import BytesBody, Exchange, Reply
from edge.core.routing import RouteTable
from edge.features.cache.disk import DiskStore
from edge.features.cache.key import KeyRule, url_key
from edge.features.cache.store import MemoryStore

if TYPE_CHECKING:
    from edge.core.config import Config

AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("carousel.edge.cache")


class Purges:
    """Removes entries by key, URL, prefix or tag from the memory and disk tiers.

    ``observer``, when set, is called with (kind, target) for every removal made for
    a local request (PURGE, an unsafe method's invalidation) or an admin call, kind
    being ``key``, ``url``, ``prefix`` or ``tag``: the node sends each to its other
    workers, which ``replay`` it. Cluster events are not observed: every worker
    follows etcd itself.
    """

    def __init__(self, config: Config, store: MemoryStore, disk: DiskStore | None) -> None:
        self.store = store
        self.disk = disk
        self.routes = RouteTable(config.route)  # a URL's route decides how its key is normalised
        self.count = 0
        self.observer: Callable[[str, str], None] | None = None
        # True when the disk tier is the node's shared tier: a replayed removal then
        # leaves it alone (the worker that made it did it, and a later fill must stay).
        self.shared = False

    def _observed(self, kind: str, target: str) -> None:
        if self.observer is not None:
            self.observer(kind, target)

    def key(self, key: str, disk: bool = True) -> int:
        """Every variant of one primary key."""
        n = self.store.remove_key(key)
        if disk and self.disk is not None:
            self.disk.remove_key(key)
        return n

    def url(self, url: str, disk: bool = True) -> int:
        """A URL, over http and https alike (with its port too when it names one: forward keys)."""
        parsed = url_key(url)
        if parsed is None:
            return 0
        host, target = parsed
        route = self.routes.find(host, target.partition("?")[0], "GET")
        if route is not None:
            target = url_key(url, KeyRule(route.config))[1]  # type: ignore[index]
        hosts = url_hosts(url, host)
        return sum(self.key(f"{scheme}://{h}{target}", disk) for scheme in ("http", "https") for h in hosts)

    def prefix(self, prefix: str, before: float | None = None, disk: bool = True) -> int:
        """Every URL starting with ``prefix``; with ``before``, only disk entries stored earlier."""
        match = prefix_matcher(prefix)
        if match is None:
            return 0
        n = 0 if before is not None else self.store.remove_where(match)
        if disk and self.disk is not None:
            self.disk.ban(lambda key, tags: match(key), before or time.time())
        return n

    def tag(self, tag: str, before: float | None = None, disk: bool = True) -> int:
        """Every entry tagged ``tag``; with ``before``, only disk entries stored earlier."""
        n = 0 if before is not None else self.store.remove_tag(tag)
        if disk and self.disk is not None:
            self.disk.ban(lambda key, tags: tag in tags, before or time.time())
        return n

    def apply(self, kind: str, target: str, disk: bool = True) -> int:
        """One purge (url, prefix or tag); returns the memory entries removed."""
        self.count += 1
        if kind == "url":
            return self.url(target, disk)
        if kind == "prefix":
            return self.prefix(target, disk=disk)
        return self.tag(target, disk=disk)

    def replay(self, kind: str, target: str) -> int:
        """A removal another worker of the node made (what its observer was told)."""
        disk = not self.shared
        if kind == "key":
            return self.key(target, disk)
        if kind in ("url", "prefix", "tag"):
            return self.apply(kind, target, disk)
        return 0

    def disk_before(self, kind: str, target: str, before: float) -> None:
        """An event older than this worker: only disk entries stored before it can concern it."""
        if self.disk is None:
            return
        if kind == "url":
            parsed = url_key(target)
            if parsed is not None:
                host, path = parsed
                wanted = {h + path for h in url_hosts(target, host)}
                self.disk.ban(lambda key, tags: key.partition("://")[2] in wanted, before)
        elif kind == "prefix":
            self.prefix(target, before)
        else:
            self.tag(target, before)

    def invalidate(self, ex: Exchange, reply: Reply, rule: KeyRule) -> None:
        """After an unsafe method succeeded: its URL and same-origin Location/Content-Location."""
        keys = [f"{ex.scheme}://{ex.host}{rule.target(ex.request.raw_path)}"]
        # The host the edge routed and keyed by (normalised), never the raw Host field.
        request_url = f"{ex.scheme}://{ex.host}{ex.request.raw_path}"
        for name in ("Location", "Content-Location"):
            value = reply.headers.get(name)
            if not value:
                continue
            target = url_key(urljoin(request_url, value.strip()))
            scheme = value.partition("://")[0].lower() if "://" in value else ex.scheme
            if target is not None and target[0] == ex.host and scheme == ex.scheme:
                keys.append(f"{scheme}://{target[0]}{target[1]}")
        for key in keys:
            self.key(key)
            self._observed("key", key)

    def from_request(self, ex: Exchange, rule: KeyRule) -> Reply:
        """PURGE /path (one URL), PURGE /path* (a prefix) or PURGE with Surrogate-Key: tags."""
        raw = ex.request.raw_path
        tags = ex.request.headers.get("Surrogate-Key", "").split()
        path = raw.partition("?")[0]
        if tags:
            purged = 0
            for t in tags:
                purged += self.apply("tag", t)
                self._observed("tag", t)
        elif path.endswith("*"):
            prefix = f"{ex.scheme}://{ex.host}{path[:-1]}"
            purged = self.apply("prefix", prefix)
            self._observed("prefix", prefix)
        else:
            self.count += 1
            target = rule.target(raw)
            purged = 0
            for scheme in ("http", "https"):
                key = f"{scheme}://{ex.host}{target}"
                purged += self.key(key)
                self._observed("key", key)
        body = json.dumps({"purged": purged}).encode() + b"\n"
        return Reply(200, CIMultiDict({"Content-Type": "application/json"}), BytesBody(body))

    def admin_routes(self) -> list[tuple[str, str, AdminHandler]]:
        """``POST /cache/purge?url=U | prefix=P | tag=T`` for the admin listener."""

        async def purge(request: web.Request) -> web.Response:
            q = request.query
            for kind in ("url", "prefix", "tag"):
                if kind in q:
                    purged = self.apply(kind, q[kind])
                    self._observed(kind, q[kind])
                    return web.json_response({"kind": kind, "target": q[kind], "purged": purged})
            return web.json_response({"error": "give url=, prefix= or tag="}, status=400)

        return [("POST", "/cache/purge", purge)]


def url_hosts(url: str, host: str) -> tuple[str, ...]:
    """The key hosts a purge URL names: ``host`` as the reverse side keys it (no port), plus
    ``host:port`` when the URL gives a port other than its scheme's default, as the forward
    proxy keys origins (edge/front/forward/policy.py format_authority)."""
    authority = url.partition("://")[2]
    for end in "/?#":
        authority = authority.partition(end)[0]
    authority = authority.rpartition("@")[2]
    port = authority.rpartition("]")[2] if authority.startswith("[") else authority
    _, sep, digits = port.rpartition(":")
    if not sep or not digits.isdigit():
        return (host,)
    default = 443 if url[:6].lower() == "https:" else 80
    number = int(digits)
    return (host,) if number == default else (host, f"{host}:{number}")


def prefix_matcher(prefix: str) -> Callable[[str], bool] | None:
    """A predicate on primary keys for a purge prefix; None if the prefix is unusable."""
    if prefix.startswith("/"):

        def on_any_host(key: str) -> bool:
            rest = key.partition("://")[2]
            slash = rest.find("/")
            return slash >= 0 and rest[slash:].startswith(prefix)

        return on_any_host
    parsed = url_key(prefix)
    if parsed is None:
        return None
    host, path = parsed
    if "/" not in prefix.partition("://")[2]:
        path = ""  # "http://host" alone: everything on the host
    hosts = url_hosts(prefix, host)

    def on_host(key: str) -> bool:
        rest = key.partition("://")[2]
        slash = rest.find("/")
        if slash < 0:
            return False
        return rest[:slash] in hosts and rest[slash:].startswith(path)

    return on_host


def _parse(key: str, value: bytes) -> PurgeEvent:
    return PurgeEvent.decode(value)


class PurgedCache(Protocol):
    """What the watcher needs from the cache feature (feature.py): its purge list and start time."""

    @property
    def purges(self) -> Purges: ...

    @property
    def started(self) -> float: ...


class PurgeWatcher:
    """Follows the purge prefix in etcd and applies new events to one cache."""

    def __init__(self, config: Config, cache: PurgedCache) -> None:
        self.etcd_config = config.etcd
        self.prefix = Keys(config.etcd.prefix).purges
        self.cache = cache
        self.applied: set[str] = set()
        self.applied_count = 0
        self.mirror: PrefixMirror[PurgeEvent] | None = None
        self._first = True
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Begin following the prefix (a task on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        etcd = Etcd(self.etcd_config)
        self.mirror = PrefixMirror(etcd, self.prefix, _parse, self._changed, name="purge")
        try:
            await self.mirror.run()
        finally:
            await etcd.close()

    def _changed(self, mirror: PrefixMirror[PurgeEvent]) -> None:
        items = mirror.items
        first, self._first = self._first, False
        for key, event in items.items():
            if key in self.applied:
                continue
            self.applied.add(key)
            if first and event.issued < self.cache.started:
                self.cache.purges.disk_before(event.kind, event.target, event.issued)
                continue
            purged = self.cache.purges.apply(event.kind, event.target)
            self.applied_count += 1
            log.info("cluster purge applied", kind=event.kind, target=event.target, purged=purged)
        # Expired events are gone from etcd: forget them.
        self.applied.intersection_update(items)
