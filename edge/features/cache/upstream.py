"""Going upstream for the cache: a miss fetched (or a stale entry revalidated), stored, answered.

``Upstream`` is the part of ``CacheFeature`` (feature.py) that talks to the member: it
strips the client's validators and Range (the cache answers those from the whole
response), sends the stale entry's own, merges a 304 into the entry (RFC 9111 3.2),
serves stale on error (RFC 5861 4), refreshes in the background
(stale-while-revalidate), and cuts HEAD and Range answers from what it just stored.
"""

from __future__ import annotations

import time
from math import floor
from typing import TYPE_CHECKING, Any

import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from edge.core.pipeline import Exchange, Handler, Reply
from edge.features.cache.key import RouteRules
from edge.features.cache.policy import RequestRules, not_modified
from edge.features.cache.respond import HeadOnly, from_entry, not_modified_from
from edge.features.cache.store import Entry
from edge.http.http1 import Head
from edge.http.request import Request

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.features.cache.admit import Admission
    from edge.features.cache.coalesce import Coalescer, HitForMiss
    from edge.features.cache.shared import FillLocks

log = structlog.get_logger("carousel.edge.cache")

# Errors a stale response may stand in for (RFC 5861 section 4).
STALE_ERRORS = frozenset({500, 502, 503, 504})
_CLIENT_VALIDATORS = ("If-None-Match", "If-Modified-Since")


class Upstream:
    """The cache's way to the member (a base of CacheFeature, which sets what is declared here)."""

    config: Config
    capability: str
    admission: Admission
    hit_for_miss: HitForMiss
    fills: FillLocks | None
    coalescer: Coalescer
    _rules: dict[int, Any]

    def _answer(self, ex: Exchange, entry: Entry, age: float, status: str, log_status: str) -> Reply | None:
        raise NotImplementedError

    def _add_status(self, reply: Reply, text: str) -> None:
        raise NotImplementedError

    def _count(self, what: str) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    async def _fetch(
        self,
        ex: Exchange,
        call_next: Handler,
        key: str,
        extra: str,
        stale: Entry | None,
        rr: RequestRules | None,
        rules: RouteRules,
        fwd: str,
        collapsed: bool = False,
        background: bool = False,
    ) -> Reply:
        """Fetch (or revalidate) from upstream, store what may be stored, answer the client."""
        request = ex.request
        up = ex.upstream_headers
        if up is None:
            up = ex.upstream_headers = CIMultiDict(request.headers)
        if self.capability:
            up.add("Surrogate-Capability", self.capability)
        conditional = False
        for name in _CLIENT_VALIDATORS:
            if name in up:
                conditional = True
                up.popall(name)
        # The cache stores whole responses and cuts ranges from them (RFC 9110 14.2
        # lets it ignore Range upstream): the member is asked for the whole thing.
        ranged = "Range" in up
        if ranged:
            up.popall("Range")
        up.popall("If-Range", None)
        head = request.method == "HEAD"
        validating = stale is not None and stale.has_validator
        if validating:
            assert stale is not None
            if stale.validator_etag is not None:
                up["If-None-Match"] = stale.validator_etag
            if stale.last_modified is not None:
                up["If-Modified-Since"] = stale.last_modified
        request_time = time.time()
        if ex.route.kind == "pool" and not head:
            reply = await call_next(ex)
        else:
            # Static files (and other terminals) read the request itself, not the
            # upstream headers: show them the request as the cache means it. A HEAD
            # miss is fetched as a GET, so that its answer can be stored.
            ex.request = _with_headers(request, up, "GET")
            try:
                reply = await call_next(ex)
            finally:
                ex.request = request
        response_time = time.time()
        status = reply.status
        if status == 304 and validating:
            assert stale is not None
            reply.body.close()
            fresh = self.admission.freshen(ex, stale, reply, request_time, response_time)
            if fresh is not None:
                age = fresh.age(time.time())
                text = f"fwd=stale; fwd-status=304; ttl={floor(fresh.lifetime - age)}"
                answered = self._answer(ex, fresh, age, text, "REVALIDATED")
                if answered is not None:
                    return answered
            # The 304 names another representation: fetch it whole.
            self.admission.drop(stale)
            up.popall("If-None-Match", None)
            up.popall("If-Modified-Since", None)
            return await self._fetch(
                ex, call_next, key, extra, None, rr, rules, "stale", collapsed, background
            )
        if status in STALE_ERRORS and stale is not None:
            served = self._stale_on_error(ex, stale, rr, status)
            if served is not None:
                reply.body.close()
                return served
        # A GET, or a HEAD fetched as one.
        entry = await self.admission.admit(
            ex, reply, key, extra, rr, rules.set_cookie, request_time, response_time
        )
        if entry is None:
            self.hit_for_miss.mark(key)
            if self.fills is not None:
                self.fills.mark_uncacheable(key, self.hit_for_miss.seconds)
            ex.cache_status = ex.cache_status or "MISS"
            self._count("MISS")
        else:
            self.hit_for_miss.clear(key)
            if self.fills is not None:
                self.fills.clear_uncacheable(key)
            if entry.lifetime <= 0 or entry.no_cache:
                # Every use needs validation: concurrent requests should not queue for it.
                self.hit_for_miss.mark(key)
            ex.cache_status = "MISS" if stale is None else "EXPIRED"
            self._count("STORED")
        if self.admission.hidden_tags:
            for name in self.admission.tag_headers:
                reply.headers.popall(name, None)
        parts = [f"fwd={fwd}", f"fwd-status={status}"]
        if entry is not None:
            parts.append("stored")
        if collapsed:
            parts.append("collapsed")
        self._add_status(reply, "; ".join(parts))
        if conditional and 200 <= status < 300 and not background:
            etag = entry.etag if entry is not None else reply.headers.get("ETag")
            last_modified = entry.last_modified if entry is not None else reply.headers.get("Last-Modified")
            if (etag or last_modified) and not_modified(
                request.headers, etag, last_modified, 0.0, response_time
            ):
                reply.body.close()
                return not_modified_from(reply)
        if (head or ranged) and not background:
            return self._cut(ex, reply, entry, head)
        return reply

    def _cut(self, ex: Exchange, reply: Reply, entry: Entry | None, head: bool) -> Reply:
        """A HEAD or Range miss: answered from what was just stored (no body, or a 206),
        else the fetched response itself (its body dropped for a HEAD; whole for a Range)."""
        if entry is not None and 200 <= entry.status < 300:
            cut = from_entry(entry, ex.request.headers, ex.request.method, entry.age(time.time()), None)
            if cut is not None:
                for value in reply.headers.getall("Cache-Status", ()):
                    cut.headers.add("Cache-Status", value)
                reply.body.close()
                return cut
        if head:
            length = reply.body.length
            reply.body.close()
            reply.body = HeadOnly(length)
        return reply

    def _stale_on_error(
        self, ex: Exchange, stale: Entry, rr: RequestRules | None, status: int
    ) -> Reply | None:
        """Serve a stale entry in place of an origin error, when RFC 5861 or config allows."""
        if stale.no_stale:
            return None
        allowed = max(stale.stale_if_error, self.config.cache.stale_if_error)
        if rr is not None and rr.stale_if_error:
            allowed = max(allowed, rr.stale_if_error)
        age = stale.age(time.time())
        staleness = age - stale.lifetime
        if staleness > allowed:
            return None
        text = f'fwd=stale; fwd-status={status}; ttl={floor(-staleness)}; detail="stale-if-error"'
        return self._answer(ex, stale, age, text, "STALE")

    def _refresh_in_background(
        self, ex: Exchange, call_next: Handler, key: str, extra: str, entry: Entry
    ) -> None:
        """stale-while-revalidate: one refresh per entry, whatever the number of stale hits."""
        if entry.refreshing or self.coalescer.in_flight(key):
            return
        entry.refreshing = True
        clone = Exchange(ex.request, ex.route, ex.host, ex.client_ip, ex.scheme)
        if ex.upstream_headers is not None:
            clone.upstream_headers = CIMultiDict(ex.upstream_headers)
        self._spawn(self._refresh(clone, call_next, key, extra, entry))

    async def _refresh(self, ex: Exchange, call_next: Handler, key: str, extra: str, entry: Entry) -> None:
        if self.coalescer.join(key) is not None:
            entry.refreshing = False
            return
        lock = self.fills.try_acquire(key) if self.fills is not None else None
        if self.fills is not None and lock is None:  # another worker is refreshing it
            entry.refreshing = False
            self.coalescer.finish(key)
            return
        try:
            rules = self._rules.get(id(ex.route))
            assert isinstance(rules, RouteRules)
            reply = await self._fetch(ex, call_next, key, extra, entry, None, rules, "stale", background=True)
            reply.body.close()
            self._count("REFRESHED")
        except Exception:
            log.exception("background refresh failed", key=key)
        finally:
            entry.refreshing = False
            self.coalescer.finish(key)
            if lock is not None:
                lock.release()


def _with_headers(request: Request, headers: CIMultiDict[str], method: str | None = None) -> Request:
    """The same request with other header fields (a revalidation through a static route),
    and maybe another method (a HEAD miss fetched as a GET)."""
    h = request.head
    head = Head(
        method or h.method,
        h.raw_path,
        h.version,
        CIMultiDictProxy(headers),
        h.body_length,
        h.chunked,
        h.keep_alive,
        h.expect_continue,
        h.scheme,
    )
    return Request(head, request.conn, request.body)
