"""The `cache` pipeline feature: lookup, hit, coalesced miss, revalidation, stale serving, storing.

Theory of operation
-------------------
Only GET and HEAD on routes with the cache on are looked up. The hit path
builds the primary key (one f-string), finds the newest matching variant in
the memory tier, computes its age (two float operations) and answers with the
stored fields, serialised once per entry (edge/pipeline.py ``Reply``), plus
Age and Cache-Status. Nothing is parsed unless the request carries
Cache-Control, Pragma, conditionals or Range. The hit path is synchronous
(``now``): the edge answers it from ``data_received``, with no task.

A miss (or a stale entry that must be revalidated) goes upstream once per key:
the first request leads (edge/cache/coalesce.py), the others wait for it and
look again. The leader strips the client's own validators (the cache answers
those itself from the full response) and, for a stale entry, sends the
entry's validators: a 304 freshens the stored response in place (RFC 9111 3.2
merge), a 200 replaces it. A stale entry within stale-while-revalidate is
served at once while a single background refresh runs; within stale-if-error
it stands in for an origin error (5xx or no member).

Unsafe methods with a non-error answer invalidate their URL and the
same-origin Location / Content-Location (RFC 9111 4.4). PURGE (from
``purge_from`` networks), the admin route and cluster events from etcd
(edge/cache/purge.py) remove entries by URL, prefix or Surrogate-Key tag.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from math import floor
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from multidict import istr

from edge.core.errors import error_reply
from edge.core.fields import ResponseCleaner, TrustedProxies
from edge.core.pipeline import BytesBody, EdgeContext, Exchange, Handler, NowHandler, Reply
from edge.features.cache.admit import WRITE_NOTE, Admission
from edge.features.cache.coalesce import Coalescer, HitForMiss
from edge.features.cache.disk import DiskStore
from edge.features.cache.fields import cache_status_name, surrogate_device
from edge.features.cache.key import DEFAULT_RULE, RouteRules, vary_values
from edge.features.cache.policy import (
    SAFE_METHODS,
    RequestRules,
    fresh_enough,
    parse_request,
)
from edge.features.cache.purge import Purges, PurgeWatcher
from edge.features.cache.respond import from_entry
from edge.features.cache.shared import FillLocks, NodeDirectory
from edge.features.cache.store import Entry, MemoryStore
from edge.features.cache.upstream import Upstream
from edge.http.http1 import (
    SEEN_AUTHORIZATION,
    SEEN_CACHE_CONTROL,
    SEEN_IF_MODIFIED_SINCE,
    SEEN_IF_NONE_MATCH,
    SEEN_PRAGMA,
    SEEN_RANGE,
    field_lines,
)

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.routing import Route

log = structlog.get_logger("carousel.edge.cache")


_OFF = object()
# The request fields a hit is checked for (absent from most requests): istr, which a
# case-insensitive lookup need not fold again (146 against 23 ns each, edge/http/http1.py).
_CACHE_CONTROL = istr("Cache-Control")
_PRAGMA = istr("Pragma")
_AUTHORIZATION = istr("Authorization")
_IF_NONE_MATCH = istr("If-None-Match")
_IF_MODIFIED_SINCE = istr("If-Modified-Since")
_RANGE = istr("Range")
_DIRECTIVES = SEEN_CACHE_CONTROL | SEEN_PRAGMA | SEEN_AUTHORIZATION
_CONDITIONS = SEEN_IF_NONE_MATCH | SEEN_IF_MODIFIED_SINCE | SEEN_RANGE


class CacheFeature(Upstream):
    """The cache, one per worker: a memory tier, an optional shared disk tier, coalescing, purges."""

    def __init__(self, config: Config, ctx: EdgeContext) -> None:
        c = config.cache
        self.config = config
        # Serialised once as an RFC 9211 list member name (a Token, or a String if not one).
        self.name = cache_status_name(c.name) if c.name else ""
        self.max_object = c.max_object_size
        self.disk = DiskStore(c.disk_dir, c.disk_size, c.disk_max_object_size) if c.disk_dir else None
        # Several workers make one cache (edge/features/cache/shared.py): a tier they share (the
        # disk tier, else tmpfs) behind small memory tiers of their own, within memory_size per node.
        self.node: NodeDirectory | None = None
        self.fills: FillLocks | None = None
        memory = c.memory_size
        workers = config.edge.workers
        # Workers of a node share its fixed port; port 0 is a single process (tests, tools).
        if workers > 1 and config.edge.port != 0:
            if self.disk is None:
                self.node = NodeDirectory(config.edge.port)
                self.disk = DiskStore(self.node.path, c.memory_size * 3 // 4, c.max_object_size)
                memory = c.memory_size // (4 * workers)
            else:
                memory = c.memory_size // workers
            self.fills = FillLocks(self.disk.root)
        self.store = MemoryStore(memory, c.max_variants)
        self.coalescer = Coalescer()
        self.hit_for_miss = HitForMiss(c.hit_for_miss)
        self.admission = Admission(config, self.store, self.disk)
        self.admission.shared = self.fills is not None
        self.purges = Purges(config, self.store, self.disk)
        self.purges.shared = self.fills is not None
        self.purgers = TrustedProxies(c.purge_from)
        self.clean = ResponseCleaner(config)
        self.honor_client = c.honor_client_cache_control
        self._rules: dict[int, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counts: dict[str, int] = {}
        self.hits = 0  # plain hits, kept apart from `counts` to save the hit path a dict update
        # b"Cache-Status: name; hit; ttl=": the name is an RFC 9211 Token or String (no CR
        # or LF; field_lines checks once, here), the ttl an integer appended per hit.
        status_line = field_lines([("Cache-Status", f"{self.name}; hit; ttl=")]) if self.name else "\r\n"
        self._hit_status_line = status_line.encode("latin-1")[:-2]
        self._hit_lines: dict[tuple[int, int], bytes] = {}
        # Edge Architecture 1.0: a surrogate that reads Surrogate-Control announces itself
        # upstream, so the origin can target directives at it.
        targeted = {n.lower() for n in c.targeted_fields}
        device = surrogate_device(c.name)
        self.capability = f'{device}="Surrogate/1.0"' if "surrogate-control" in targeted else ""
        self.started = time.time()
        self.purger = PurgeWatcher(config, self) if c.cluster_purge else None
        metrics = getattr(ctx, "metrics", None)
        if metrics is not None:
            from edge.features.cache.metrics import register

            register(metrics.registry, self)

    # --- lifecycle (Edge.start/stop call these) -----------------------------------------

    async def start(self) -> None:
        """Start background work: the cluster purge watch."""
        if self.purger is not None and not self.purger.running:
            self.purger.start()

    async def stop(self) -> None:
        """Stop background work: the purge watch, refreshes, disk writes."""
        if self.purger is not None:
            await self.purger.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.disk is not None:
            await self.disk.flush()
            self.disk.close()
        if self.node is not None:
            self.node.leave()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, what: str) -> None:
        self._counts[what] = self._counts.get(what, 0) + 1

    @property
    def counts(self) -> dict[str, int]:
        """Lookups by outcome (HIT, MISS, STORED, UPDATING, ...), read at scrape time."""
        counts = dict(self._counts)
        counts["HIT"] = counts.get("HIT", 0) + self.hits
        return counts

    # --- the pipeline step --------------------------------------------------------------

    def _compile(self, route: Route) -> Any:
        cfg = route.config
        on = cfg.cache if cfg.cache is not None else (route.kind == "pool" and cfg.buffering)
        rules = RouteRules(route) if on else _OFF
        self._rules[id(route)] = rules
        return rules

    def _fresh_hit(self, ex: Exchange, rules: Any) -> Reply | None:
        """The hit path: one key, one dict lookup, two float operations, the stored fields
        sent as serialised when stored; no parsing. None for anything else (then _lookup_or_fetch)."""
        head = ex.request.head
        h = head.headers
        seen = head.seen  # the parser's note of which fields may be there (http1.SEEN_*)
        if not rules.plain or (
            seen & _DIRECTIVES and (_CACHE_CONTROL in h or _PRAGMA in h or _AUTHORIZATION in h)
        ):
            return None
        variants = self.store.index.get(f"{ex.scheme}://{ex.host}{head.raw_path}")
        if variants is None:
            return None
        # Compressed variants, Vary: Accept-Language, ...: pick the one this request selects.
        entry = variants[0] if not variants[0].vary else _select(variants, h)
        if entry is None or entry.no_cache or entry.body is None:
            return None
        age = entry.initial_age + (time.time() - entry.response_time)
        ttl = entry.lifetime - age
        if ttl <= 0:
            return None
        if seen & _CONDITIONS and (_IF_NONE_MATCH in h or _IF_MODIFIED_SINCE in h or _RANGE in h):
            return self._answer(ex, entry, age, f"hit; ttl={int(ttl)}", "HIT")
        if entry.freq < 3:
            entry.freq += 1
        # Age and Cache-Status as the bytes they go out as: no field object for a hit
        # (Reply merges them into its headers if a feature reads them). Made once per pair of
        # whole seconds: formatting them per hit was 3.7 % of its instructions (callgrind).
        seconds = (int(age), int(ttl))
        added = self._hit_lines.get(seconds)
        if added is None:
            added = self._hit_lines_for(seconds)
        ex.cache_status = "HIT"
        self.hits += 1
        body = entry.hit_body
        if body is None or body.data is not entry.body:
            body = entry.hit_body = BytesBody(entry.body)
        # The stored fields go out pre-serialised unless an outer feature reads them.
        return Reply(entry.status, None, body, entry.reason, stored=entry, added=added)

    def _hit_lines_for(self, seconds: tuple[int, int]) -> bytes:
        """A plain hit's Age and Cache-Status lines for (age, ttl) in whole seconds, remembered."""
        age, ttl = seconds
        hit_status = self._hit_status_line
        added = b"Age: %d\r\n%b%d\r\n" % (age, hit_status, ttl) if hit_status else b"Age: %d\r\n" % age
        if len(self._hit_lines) >= 4096:  # bounded: one per (age, ttl) pair in use
            self._hit_lines.clear()
        self._hit_lines[seconds] = added
        return added

    def _rules_for(self, ex: Exchange) -> Any:
        rules = self._rules.get(id(ex.route))
        return self._compile(ex.route) if rules is None else rules

    def now(self, ex: Exchange, call_next: NowHandler) -> Reply | None:
        """Answer fresh hits and purges at once; everything that may go upstream waits (None)."""
        method = ex.request.head.method
        rules = self._rules.get(id(ex.route))  # _rules_for, inlined on the hit's path
        if rules is None:
            rules = self._compile(ex.route)
        if method == "GET" or method == "HEAD":
            return self._fresh_hit(ex, rules) if rules is not _OFF else call_next(ex)
        if method == "PURGE":
            return self._purge_request(ex, rules)
        reply = call_next(ex)
        if reply is not None:
            self._after_other(ex, reply, rules)
        return reply

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[Reply]:
        method = ex.request.head.method
        rules = self._rules_for(ex)
        if rules is _OFF and (method == "GET" or method == "HEAD"):
            return call_next(ex)  # a route the cache is off for: no coroutine of its own
        return self._call(ex, call_next, method, rules)

    async def _call(self, ex: Exchange, call_next: Handler, method: str, rules: Any) -> Reply:
        if method == "GET" or method == "HEAD":  # the cache is on for the route (__call__)
            reply = self._fresh_hit(ex, rules)
            if reply is not None:
                return reply
            return await self._lookup_or_fetch(ex, call_next, rules, method, None, "")
        if method == "PURGE":
            return self._purge_request(ex, rules)
        reply = await call_next(ex)
        self._after_other(ex, reply, rules)
        return reply

    def _after_other(self, ex: Exchange, reply: Reply, rules: Any) -> None:
        """Other methods: invalidate after a non-error answer to an unsafe one (RFC 9111 4.4)."""
        if ex.request.head.method not in SAFE_METHODS and reply.status < 400:
            self._invalidate(ex, reply, rules)
        if rules is not _OFF and self.name:
            reply.headers.add("Cache-Status", f"{self.name}; fwd=method; fwd-status={reply.status}")

    async def _lookup_or_fetch(
        self, ex: Exchange, call_next: Handler, rules: RouteRules, method: str, key: str | None, extra: str
    ) -> Reply:
        """Everything but the plainest hit: variants, request directives, misses, revalidation."""
        request = ex.request
        h = request.headers
        if key is None:
            if rules.plain:
                key = f"{ex.scheme}://{ex.host}{request.raw_path}"
            else:
                key = rules.key.primary(ex)
                extra = rules.key.extra(ex)
        rr = parse_request(h) if self.honor_client and ("Cache-Control" in h or "Pragma" in h) else None
        authorized = "Authorization" in h
        entry = self._find(key, extra, h)
        fwd = "uri-miss" if entry is None else "stale"
        if entry is not None:
            if authorized and not entry.auth_ok:
                fwd, entry = "request", None
            else:
                now = time.time()
                age = entry.age(now)
                ttl = entry.lifetime - age
                # max-stale never overrides must-revalidate & co (RFC 9111 5.2.2.2).
                if not entry.no_cache and (ttl > 0 or not entry.no_stale) and fresh_enough(rr, age, ttl):
                    reply = self._answer(
                        ex, entry, age, f"hit; ttl={floor(ttl)}", "HIT" if ttl > 0 else "STALE"
                    )
                    if reply is not None:
                        return reply
                    entry = None
                elif (
                    ttl <= 0
                    and not entry.no_stale
                    and -ttl <= entry.stale_while_revalidate
                    and (rr is None or not rr.no_cache)
                    and method == "GET"
                ):
                    reply = self._answer(
                        ex, entry, age, f'hit; ttl={floor(ttl)}; detail="stale-while-revalidate"', "UPDATING"
                    )
                    if reply is not None:
                        self._refresh_in_background(ex, call_next, key, extra, entry)
                        return reply
                    entry = None
                elif ttl > 0:
                    fwd = "request"
        elif key in self.store.index:
            fwd = "vary-miss"
        if rr is not None and rr.only_if_cached:
            ex.cache_status = "MISS"
            reply = error_reply(504)
            self._add_status(reply, "fwd=miss")
            return reply
        if "If-Match" in h or "If-Unmodified-Since" in h or "Upgrade" in h:
            # Preconditions only the origin can judge, or a protocol switch
            # (WebSocket): straight through, nothing stored. A HEAD or a Range
            # miss fetches the whole response with a GET, stores it and is answered
            # from it (a 206 cut from the stored 200), as nginx and Varnish do.
            ex.cache_status = "MISS"
            reply = await call_next(ex)
            self._add_status(reply, f"fwd={fwd}; fwd-status={reply.status}")
            return reply
        coalesce = (
            self.config.cache.coalesce
            and not authorized
            and (rr is None or not (rr.no_cache or rr.no_store or rr.max_age is not None))
            and key not in self.hit_for_miss
        )
        if not coalesce:
            return await self._fetch(ex, call_next, key, extra, entry, rr, rules, fwd)
        collapsed = False
        while True:
            wait = self.coalescer.join(key)
            if wait is None:
                try:
                    if self.fills is None:
                        return await self._fetch(ex, call_next, key, extra, entry, rr, rules, fwd, collapsed)
                    return await self._lead(ex, call_next, key, extra, entry, rr, rules, fwd, collapsed)
                finally:
                    self.coalescer.finish(key)
            collapsed = True
            done, _ = await asyncio.wait((wait,), timeout=self.config.cache.coalesce_timeout)
            entry = self._find(key, extra, h)
            if entry is not None:
                age = entry.age(time.time())
                ttl = entry.lifetime - age
                if not entry.no_cache and ttl > 0 and fresh_enough(rr, age, ttl):
                    reply = self._answer(ex, entry, age, f"hit; ttl={int(ttl)}; collapsed", "COLLAPSED")
                    if reply is not None:
                        return reply
                    entry = None
            if not done or key in self.hit_for_miss:
                return await self._fetch(ex, call_next, key, extra, entry, rr, rules, fwd)
            fwd = "vary-miss" if entry is None else "stale"

    async def _lead(
        self,
        ex: Exchange,
        call_next: Handler,
        key: str,
        extra: str,
        entry: Entry | None,
        rr: RequestRules | None,
        rules: RouteRules,
        fwd: str,
        collapsed: bool,
    ) -> Reply:
        """This worker's fetch for a key, once per node: under the node's fill lock for the key."""
        fills = self.fills
        assert fills is not None
        if fills.uncacheable(key):  # hit-for-miss on another worker: in parallel, no queue
            return await self._fetch(ex, call_next, key, extra, entry, rr, rules, fwd, collapsed)
        lock, waited = await fills.acquire(key, self.config.cache.coalesce_timeout)
        try:
            if waited:
                # Another worker was filling it: its answer is in the shared tier, or uncacheable.
                collapsed = True
                found = self._find(key, extra, ex.request.headers)
                if found is not None:
                    age = found.age(time.time())
                    ttl = found.lifetime - age
                    if not found.no_cache and ttl > 0 and fresh_enough(rr, age, ttl):
                        text = f"hit; ttl={int(ttl)}; collapsed"
                        reply = self._answer(ex, found, age, text, "COLLAPSED")
                        if reply is not None:
                            if lock is not None:
                                lock.release()
                            return reply
                    entry, fwd = found, "stale"
                elif fills.uncacheable(key) and lock is not None:
                    lock.release()
            reply = await self._fetch(ex, call_next, key, extra, entry, rr, rules, fwd, collapsed)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        written = ex.notes.pop(WRITE_NOTE, None)
        if lock is not None:
            if written is None or written.done():
                lock.release()
            else:
                held = lock
                written.add_done_callback(lambda _: held.release())
        return reply

    def _find(self, key: str, extra: str, headers: Any) -> Entry | None:
        """The newest stored variant for a request: memory tier, then disk tier."""
        variants = self.store.index.get(key)
        mine: Entry | None = None
        if variants is not None:
            for entry in variants:
                if entry.extra == extra and (not entry.vary or entry.matches(extra, headers)):
                    # Another worker may have refreshed a stale one in the shared tier.
                    if self.fills is None or entry.age(time.time()) < entry.lifetime:
                        return entry
                    mine = entry
                    break
        if self.disk is None:
            return None
        found = self.disk.lookup(key, extra, headers)
        if found is None or (mine is not None and found.response_time <= mine.response_time):
            return mine
        # Stored by an earlier run, maybe under other hide_headers: clean as the proxy does now.
        kept = self.clean.fields(found.fields)
        if kept is not None:
            found.set_headers(kept)
        if found.length <= self.max_object:
            data = self.disk.read_body(found)
            if data is None:
                return None
            found.body = data
        self.store.put(found)  # large ones stay on disk; memory keeps their metadata
        return found

    def _answer(self, ex: Exchange, entry: Entry, age: float, status: str, log_status: str) -> Reply | None:
        """A reply from a stored entry (None if its disk body vanished: treat as a miss)."""
        if entry.freq < 3:
            entry.freq += 1
        reply = from_entry(
            entry,
            ex.request.headers,
            ex.request.method,
            age,
            f"{self.name}; {status}" if self.name else None,
        )
        if reply is None:
            self.store.remove(entry)
            return None
        ex.cache_status = log_status
        self._count(log_status)
        return reply

    def _add_status(self, reply: Reply, text: str) -> None:
        if self.name:
            reply.headers.add("Cache-Status", f"{self.name}; {text}")

    # --- invalidation and purges --------------------------------------------------------

    def _invalidate(self, ex: Exchange, reply: Reply, rules: Any) -> None:
        self.purges.invalidate(ex, reply, rules.key if isinstance(rules, RouteRules) else DEFAULT_RULE)

    def _purge_request(self, ex: Exchange, rules: Any) -> Reply:
        if not self.purgers.is_trusted(ex.client_ip):
            return error_reply(403)
        return self.purges.from_request(ex, rules.key if isinstance(rules, RouteRules) else DEFAULT_RULE)

    def admin_routes(self) -> list[tuple[str, str, Any]]:
        """Routes for the edge's admin listener: POST /cache/purge, GET /cache."""

        async def show(request: web.Request) -> web.Response:
            return web.json_response(self.status())

        return [*self.purges.admin_routes(), ("GET", "/cache", show)]

    def status(self) -> dict[str, Any]:
        """Figures for /status and the admin route."""
        return {
            "objects": len(self.store),
            "bytes": self.store.bytes,
            "budget": self.store.budget,
            "evictions": self.store.evictions,
            "in_flight": len(self.coalescer),
            "hit_for_miss": len(self.hit_for_miss),
            "counts": self.counts,
            "purges": self.purges.count,
            "disk": self.disk.root if self.disk is not None else None,
            "shared": self.fills is not None,
        }


def _select(variants: list[Entry], headers: Any) -> Entry | None:
    """The newest variant a request selects on a plain route (no extra key parts)."""
    for entry in variants:
        if not entry.vary or vary_values(entry.vary, headers) == entry.vary_values:
            return entry
    return None


def feature(config: Config, ctx: EdgeContext) -> CacheFeature | None:
    """Factory for the pipeline: None unless [cache] enabled."""
    if not config.cache.enabled:
        return None
    return CacheFeature(config, ctx)


__all__ = ["CacheFeature", "feature"]
