"""What enters the cache: storing decisions on a fetched response, entries, and 304 merges.

``Admission.admit`` runs once per response that came back for a GET: it asks
the RFC rules (edge/cache/policy.py) whether the response may be stored,
builds the ``Entry`` (stored fields only, Date added when the origin sent
none, tags, Vary values of this request), and puts the body where it fits:
memory up to ``max_object_size``; beyond that the disk tier, copied there from
the edge's spool file by the kernel (never a second copy in memory). A body
streamed by a feature (compression of a file) is spooled first so that the
client and the cache read the same finished body.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import structlog
from multidict import CIMultiDict

from edge.core.pipeline import Body, BytesBody, Exchange, FileBody, Reply
from edge.core.spool import SpoolBuffer
from edge.features.cache.disk import DiskStore
from edge.features.cache.fields import surrogate_device
from edge.features.cache.key import vary_values
from edge.features.cache.policy import (
    COOKIE_FIELDS,
    HeuristicRule,
    RequestRules,
    ResponsePolicy,
    analyze_response,
    merge_not_modified,
    storable_fields,
)
from edge.features.cache.respond import http_date
from edge.features.cache.store import Entry, MemoryStore

if TYPE_CHECKING:
    from edge.core.config import Config

log = structlog.get_logger("carousel.edge.cache")

# Where admit() leaves the future of a shared-tier write, for the fill lock's holder.
WRITE_NOTE = "cache.write"


class Admission:
    """Stores responses in the memory and disk tiers, and merges 304s into them."""

    def __init__(self, config: Config, store: MemoryStore, disk: DiskStore | None) -> None:
        c = config.cache
        self.store = store
        self.disk = disk
        self.max_object = c.max_object_size
        self.temp_dir = config.edge.temp_dir
        self.targeted = tuple(n.lower() for n in c.targeted_fields)
        self.device = surrogate_device(c.name)
        self.heuristic = HeuristicRule(c.heuristic_fraction, c.heuristic_max) if c.heuristic else None
        self.tag_headers = tuple(c.tag_headers)
        self.hidden_tags = frozenset(n.lower() for n in c.tag_headers) if c.strip_tag_headers else frozenset()
        # The disk tier is the node's shared tier (several workers): it stores what memory cannot.
        self.shared = False

    async def admit(
        self,
        ex: Exchange,
        reply: Reply,
        key: str,
        extra: str,
        rr: RequestRules | None,
        set_cookie: bool | str,
        request_time: float,
        response_time: float,
    ) -> Entry | None:
        """Store a response if RFC 9111 and the route allow; the reply keeps a body it can send."""
        headers = reply.headers
        cookies = "Set-Cookie" in headers or "Set-Cookie2" in headers
        if cookies and set_cookie is False:
            return None
        policy = analyze_response(
            reply.status,
            headers,
            request_time=request_time,
            response_time=response_time,
            authorized="Authorization" in ex.request.headers,
            request_no_store=rr is not None and rr.no_store,
            targeted=self.targeted,
            heuristic=self.heuristic,
            device=self.device,
        )
        if not policy.storable:
            return None
        if set_cookie != "store":  # kept out of the entry, and out of any 304's update
            policy.omit = policy.omit | COOKIE_FIELDS
        body = reply.body
        limit = self.disk.max_object if self.disk is not None else self.max_object
        if body.length is not None and body.length > limit:
            return None
        if type(body) is not BytesBody and not isinstance(body, FileBody):
            body = reply.body = await self._spool(body)
            if body.length is None or body.length > limit:
                return None
        entry = self._entry(ex, reply, key, extra, policy, response_time)
        if isinstance(body, BytesBody):
            data: bytes | None = body.data
            entry.length = len(body.data)
        else:
            assert isinstance(body, FileBody)
            entry.length = body.length or 0
            data = os.pread(body.fd, entry.length, body.offset) if entry.length <= self.max_object else None
        if data is not None and entry.length <= self.max_object:
            entry.body = data
        elif self.disk is not None:
            # Too big for memory: the disk tier holds the body, memory its metadata.
            try:
                if data is not None:
                    entry.disk_path = await self.disk.store_now(entry, data)
                else:
                    assert isinstance(body, FileBody)
                    entry.disk_path = await self.disk.store_file(entry, body.fd, body.offset, entry.length)
            except OSError as exc:
                log.warning("cache disk write failed", error=str(exc))
            if entry.disk_path is None:
                return None
        else:
            return None
        data = entry.body
        kept = self.store.put(entry)
        if not kept and not self.shared:
            return None
        if self.disk is not None:
            if data is not None:
                written = self.disk.store_bytes(entry, data)
                if written is not None:
                    # The node's fill lock is held until the shared tier has it (feature.py).
                    ex.notes[WRITE_NOTE] = written
            self.disk.maybe_sweep()
        if not kept:
            # Too big for this worker's memory tier: the node's shared tier holds it, and
            # this answer is made from the bytes in hand.
            if data is None and entry.disk_path is None:
                return None
            entry.body = data
        return entry

    def _entry(
        self, ex: Exchange, reply: Reply, key: str, extra: str, policy: ResponsePolicy, response_time: float
    ) -> Entry:
        headers = reply.headers
        entry = Entry(key, extra, reply.status, reply.reason)
        stored = storable_fields(headers, policy.omit, self.hidden_tags)
        if "Date" not in headers:
            stored.append(("Date", http_date(response_time)))
        entry.set_headers(stored)
        entry.vary = policy.vary
        if policy.vary:
            entry.vary_values = vary_values(policy.vary, ex.request.headers)
        apply_policy(entry, policy, response_time)
        # Compressed by the edge: its ETag was weakened; revalidate with the origin's own.
        entry.transformed = bool(ex.notes.get("compressed"))
        entry.validator_etag = ex.notes.get("origin_etag", policy.etag) if entry.transformed else policy.etag
        tags: set[str] = set()
        for name in self.tag_headers:
            for value in headers.getall(name, ()):
                tags.update(value.split())
        entry.tags = shared_names(frozenset(tags))
        entry.stored_at = time.time()
        return entry

    async def _spool(self, body: Body) -> Body:
        """Read a streamed body whole: memory, then a temp file (what the client gets too)."""
        spool = SpoolBuffer(self.max_object, self.temp_dir)
        try:
            async for chunk in body.chunks():
                spool.add(chunk)
            return spool.body()
        except BaseException:
            spool.discard()
            raise
        finally:
            body.close()

    def freshen(
        self, ex: Exchange, entry: Entry, reply: Reply, request_time: float, response_time: float
    ) -> Entry | None:
        """Merge a 304 into a stored response (RFC 9111 3.2, 4.3.4); None if it is not a match."""
        etag = reply.headers.get("ETag")
        if etag is not None and entry.validator_etag is not None:
            if etag.removeprefix("W/") != entry.validator_etag.removeprefix("W/"):
                return None
        merged = merge_not_modified(list(entry.fields), reply.headers, entry.omit)
        if "Date" not in reply.headers:
            merged = [(k, v) for k, v in merged if k.lower() != "date"]
            merged.append(("Date", http_date(response_time)))
        if entry.transformed:
            merged = [(k, _weak(v) if k.lower() == "etag" else v) for k, v in merged]
        view = CIMultiDict(merged)
        for age in reply.headers.getall("Age", ()):
            view.add("Age", age)
        policy = analyze_response(
            entry.status,
            view,
            request_time=request_time,
            response_time=response_time,
            targeted=self.targeted,
            heuristic=self.heuristic,
            device=self.device,
        )
        if not policy.storable:
            self.drop(entry)
            return entry  # it still answers this request
        cookies_left_out = entry.omit & COOKIE_FIELDS
        entry.set_headers(merged)
        apply_policy(entry, policy, response_time)
        entry.omit = shared_names(entry.omit | cookies_left_out)
        if not entry.transformed:
            entry.validator_etag = policy.etag
        self.store.resize(entry)
        if self.disk is not None:
            # The disk copy of a memory entry is rewritten whole: its body file is not this one's.
            if entry.disk_path is None and entry.body is not None:
                written = self.disk.store_bytes(entry, entry.body)
            else:
                written = self.disk.update_meta(entry)
            if written is not None:
                ex.notes[WRITE_NOTE] = written
        return entry

    def drop(self, entry: Entry) -> None:
        """Remove one stored variant from both tiers."""
        self.store.remove(entry)
        if self.disk is not None:
            self.disk.remove_entry(entry)


# Distinct sets of field names kept on entries (omitted fields, tags): nearly every entry has
# an empty one or the cookie fields, and a frozenset of its own is 216 bytes (tracemalloc),
# 0.4 KiB of each cached object for the two; bounded, since a member's tags are many.
_NAME_SETS: dict[frozenset[str], frozenset[str]] = {}


def shared_names(names: frozenset[str]) -> frozenset[str]:
    """One copy per process of a set of field names or tags that entries keep."""
    found = _NAME_SETS.get(names)
    if found is None:
        if len(_NAME_SETS) >= 1024:
            return names
        found = _NAME_SETS[names] = names
    return found


def apply_policy(entry: Entry, policy: ResponsePolicy, response_time: float) -> None:
    """Copy a response's freshness and reuse rules onto its entry."""
    entry.response_time = response_time
    entry.initial_age = policy.initial_age
    entry.lifetime = policy.lifetime
    entry.no_cache = policy.no_cache
    entry.no_stale = policy.no_stale
    entry.stale_while_revalidate = policy.stale_while_revalidate
    entry.stale_if_error = policy.stale_if_error
    entry.auth_ok = policy.auth_ok
    entry.omit = shared_names(policy.omit)
    entry.etag = policy.etag
    entry.last_modified = policy.last_modified
    entry.date = policy.date


def _weak(etag: str) -> str:
    return etag if etag.startswith("W/") else "W/" + etag
