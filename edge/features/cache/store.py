"""Stored responses (``Entry``) and the memory tier: a byte budget with S3-FIFO eviction.

S3-FIFO (Yang et al., SOSP 2023) keeps three FIFO queues: a small one (10% of
the budget) that new objects enter, a main one, and a ghost list of keys
recently evicted from the small queue. An object hit at least once while in the
small queue moves to the main queue when it reaches the end; one never hit is
evicted (its key goes to the ghost list, and a quick comeback enters the main
queue directly). The main queue is a CLOCK: an object with hits left goes round
again with one hit less. One-hit wonders (most of a web cache's misses) leave
fast, and a hit costs one integer update: no list moves on the hit path, unlike
LRU.

Entries removed before reaching the end of their queue (purge, replacement) are
marked and skipped when their turn comes; the queues are compacted when such
leftovers outnumber live entries.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator

from multidict import CIMultiDict

from edge.core.pipeline import BytesBody, Wire
from edge.features.cache.fields import Headers
from edge.features.cache.key import vary_values
from edge.http.http1 import field_lines

# Bytes an entry costs beyond its body and header text (objects, dict slots).
ENTRY_OVERHEAD = 600
_SMALL, _MAIN = 1, 2


_NO_TAGS: frozenset[str] = frozenset()
_ACCEPT_RANGES = ("Accept-Ranges", "bytes")


def stored_fields(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, ...], int]:
    """The fields an entry keeps, flat (name, value, name, value, ...), and their text size.

    Names and short values repeat across entries (Content-Type: text/html, ...):
    interning them keeps one copy per process. One flat tuple, not a tuple per field:
    a field's pair was 56 bytes of every cached object (6 fields: 336 of its 1.7 KiB).
    """
    intern = sys.intern
    flat: list[str] = []
    size = 0
    for k, v in pairs:
        k, v = str(k), str(v)
        flat += (intern(k), intern(v) if len(v) <= 40 else v)
        size += len(k) + len(v)
    return tuple(flat), size


class Entry:
    """One stored response (a variant of a primary key)."""

    __slots__ = (
        "_wire",
        "auth_ok",
        "body",
        "date",
        "disk_path",
        "etag",
        "extra",
        "flat_fields",
        "freq",
        "head_size",
        "hit_body",
        "initial_age",
        "key",
        "last_modified",
        "length",
        "lifetime",
        "no_cache",
        "no_stale",
        "omit",
        "reason",
        "refreshing",
        "response_time",
        "size",
        "stale_if_error",
        "stale_while_revalidate",
        "status",
        "stored_at",
        "tags",
        "transformed",
        "validator_etag",
        "vary",
        "vary_values",
        "where",
    )

    def __init__(self, key: str, extra: str, status: int, reason: str | None) -> None:
        self.key = key
        self.extra = extra
        self.status = status
        self.reason = reason
        self.vary: tuple[str, ...] = ()
        self.vary_values: tuple[str, ...] = ()
        # The stored fields; their wire form is built on the first hit, so entries
        # never reused (most of a big cache) do not pay for it.
        self.flat_fields: tuple[str, ...] = ()  # name, value, name, value, ... (stored_fields)
        self._wire: Wire | None = None
        self.head_size = 0
        # The body in memory, or None when it lives in a disk file (disk_path).
        self.body: bytes | None = None
        # The body as a plain hit's reply holds it, made on the first hit (a BytesBody is never
        # changed once made, as a static file's is shared): nothing built per hit.
        self.hit_body: BytesBody | None = None
        self.disk_path: str | None = None
        self.length = 0
        self.size = 0
        self.response_time = 0.0
        self.initial_age = 0.0
        self.lifetime = 0.0
        self.no_cache = False
        self.no_stale = False
        self.stale_while_revalidate = 0.0
        self.stale_if_error = 0.0
        self.auth_ok = False
        self.omit = _NO_TAGS
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.date = 0.0
        self.tags = _NO_TAGS
        # Compressed by the edge: the ETag was weakened; revalidate with the origin's.
        self.transformed = False
        self.validator_etag: str | None = None
        self.stored_at = 0.0
        self.freq = 0
        self.where = 0
        # A background refresh (stale-while-revalidate) is running for it.
        self.refreshing = False

    def age(self, now: float) -> float:
        """current_age (RFC 9111 4.2.3)."""
        return self.initial_age + (now - self.response_time)

    def matches(self, extra: str, headers: Headers) -> bool:
        """Would this stored response be selected for a request (RFC 9111 4.1)?"""
        if extra != self.extra:
            return False
        if not self.vary:
            return True
        return vary_values(self.vary, headers) == self.vary_values

    def set_headers(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Keep these fields (already filtered for storage)."""
        self.flat_fields, self.head_size = stored_fields(pairs)
        self._wire = None

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """The stored fields as (name, value) pairs, made for the caller (not on a hit's path).

        A stored 200 the edge did not compress answers Range requests itself (respond.py
        ``_ranged``), so it says ``Accept-Ranges: bytes`` (RFC 9110 14.3) in place of whatever
        the origin said: added here, not stored, so every reply made from it (and its wire
        form) carries it and a field merged back (a 304's, the disk tier's) is not doubled."""
        flat = self.flat_fields
        pairs = tuple(zip(flat[::2], flat[1::2], strict=True))
        if self.status == 200 and not self.transformed:
            pairs = (*(p for p in pairs if p[0].lower() != "accept-ranges"), _ACCEPT_RANGES)
        return pairs

    @property
    def wire(self) -> Wire:
        """The stored fields as they go out ("Name: value\\r\\n" each); ValueError for a CR or LF."""
        wire = self._wire
        if wire is None:
            fields = self.fields
            names = {name.lower() for name, _ in fields}
            data = field_lines(fields).encode("latin-1", "replace")
            wire = self._wire = Wire(data, "date" in names, "server" in names)
        return wire

    def reply_headers(self) -> CIMultiDict[str]:
        """A fresh multidict of the stored fields, for one reply."""
        return CIMultiDict(self.fields)

    @property
    def has_validator(self) -> bool:
        return self.validator_etag is not None or self.last_modified is not None

    def account(self) -> None:
        """Compute the bytes this entry holds in memory."""
        self.size = ENTRY_OVERHEAD + self.head_size + len(self.key) + len(self.extra) + len(self.body or b"")


class MemoryStore:
    """Entries by primary key, within a byte budget, evicted by S3-FIFO."""

    def __init__(self, budget: int, max_variants: int = 32) -> None:
        self.budget = budget
        self.small_budget = max(1, budget // 10)
        self.max_variants = max_variants
        self.index: dict[str, list[Entry]] = {}
        self.tags: dict[str, set[Entry]] = {}
        self._small: deque[Entry] = deque()
        self._main: deque[Entry] = deque()
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self.bytes = 0
        self.small_bytes = 0
        self.count = 0
        self._dead = 0  # removed entries still sitting in a queue
        self.evictions = 0
        self.on_evict: Callable[[Entry], None] | None = None

    def __len__(self) -> int:
        return self.count

    def variants(self, key: str) -> list[Entry] | None:
        """Stored variants of a primary key, newest first."""
        return self.index.get(key)

    def put(self, entry: Entry) -> bool:
        """Store an entry, replacing the variant it supersedes; False if it can never fit."""
        entry.account()
        if entry.size > self.small_budget:
            return False  # would be evicted on arrival: objects enter the 10% small queue
        variants = self.index.get(entry.key)
        if variants is None:
            # A list made with its one entry holds one slot; [] then insert() allocated four.
            variants = self.index[entry.key] = [entry]
        else:
            for old in list(variants):
                if old.extra == entry.extra and (
                    not entry.vary or (old.vary == entry.vary and old.vary_values == entry.vary_values)
                ):
                    self._unlink(old, variants)
            while len(variants) >= self.max_variants:
                self._unlink(variants[-1], variants)
            self.index[entry.key] = variants  # _unlink drops the key when the list empties
            variants.insert(0, entry)
        for tag in entry.tags:
            self.tags.setdefault(tag, set()).add(entry)
        self.count += 1
        self.bytes += entry.size
        if entry.key in self._ghost:
            del self._ghost[entry.key]
            entry.where = _MAIN
            self._main.append(entry)
        else:
            entry.where = _SMALL
            self._small.append(entry)
            self.small_bytes += entry.size
        while self.bytes > self.budget and (self._small or self._main):
            self._evict()
        return entry.where != 0

    def resize(self, entry: Entry) -> None:
        """Re-account an entry whose headers changed in place (after a 304)."""
        if entry.where == 0:
            return
        before = entry.size
        entry.account()
        self.bytes += entry.size - before
        if entry.where == _SMALL:
            self.small_bytes += entry.size - before
        while self.bytes > self.budget and (self._small or self._main):
            self._evict()

    def remove(self, entry: Entry) -> None:
        """Drop one entry (purge, invalidation, a failed revalidation)."""
        variants = self.index.get(entry.key)
        if variants is not None and entry in variants:
            self._unlink(entry, variants)

    def remove_key(self, key: str) -> int:
        """Drop every variant of a primary key; returns how many."""
        variants = self.index.get(key)
        if not variants:
            return 0
        n = len(variants)
        for entry in list(variants):
            self._unlink(entry, variants)
        return n

    def remove_where(self, match: Callable[[str], bool]) -> int:
        """Drop every entry whose primary key matches (prefix purges)."""
        return sum(self.remove_key(k) for k in [k for k in self.index if match(k)])

    def remove_tag(self, tag: str) -> int:
        """Drop every entry carrying a Surrogate-Key tag."""
        entries = self.tags.get(tag)
        if not entries:
            return 0
        n = 0
        for entry in list(entries):
            variants = self.index.get(entry.key)
            if variants is not None and entry in variants:
                self._unlink(entry, variants)
                n += 1
        return n

    def entries(self) -> Iterator[Entry]:
        for variants in self.index.values():
            yield from variants

    # --- internals ------------------------------------------------------------------------

    def _unlink(self, entry: Entry, variants: list[Entry]) -> None:
        variants.remove(entry)
        if not variants:
            del self.index[entry.key]
        for tag in entry.tags:
            tagged = self.tags.get(tag)
            if tagged is not None:
                tagged.discard(entry)
                if not tagged:
                    del self.tags[tag]
        if entry.where == _SMALL:
            self.small_bytes -= entry.size
        if entry.where:
            self._dead += 1
        entry.where = 0
        self.bytes -= entry.size
        self.count -= 1
        # Responses being written hold their own references; the shell in the queue
        # should not keep the body alive.
        entry.body = None
        if self._dead > 1024 and self._dead > self.count:
            self._compact()

    def _compact(self) -> None:
        self._small = deque(e for e in self._small if e.where == _SMALL)
        self._main = deque(e for e in self._main if e.where == _MAIN)
        self._dead = 0

    def _evict(self) -> None:
        """Free room for one entry, or move one from the small queue to the main one."""
        if (self.small_bytes > self.small_budget or not self._main) and self._evict_small():
            return
        self._evict_main()

    def _evict_small(self) -> bool:
        """Handle the oldest live small-queue entry; False if the queue has none."""
        small = self._small
        while small:
            entry = small.popleft()
            if entry.where != _SMALL:
                self._dead -= 1
                continue
            if entry.freq > 0:
                # Hit while on probation: it earns a place in the main queue.
                self.small_bytes -= entry.size
                entry.freq = 0
                entry.where = _MAIN
                self._main.append(entry)
                return True
            self._drop(entry)
            self._ghost[entry.key] = None
            if len(self._ghost) > max(1024, self.count):
                self._ghost.popitem(last=False)
            return True
        return False

    def _evict_main(self) -> None:
        main = self._main
        while main:
            entry = main.popleft()
            if entry.where != _MAIN:
                self._dead -= 1
                continue
            if entry.freq > 0:
                entry.freq -= 1  # CLOCK: another round, with one hit less
                main.append(entry)
                continue
            self._drop(entry)
            return
        if self._small:
            self._evict_small()

    def _drop(self, entry: Entry) -> None:
        variants = self.index.get(entry.key)
        if variants is not None and entry in variants:
            self._unlink(entry, variants)
            self._dead -= 1  # it was popped from its queue already
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(entry)
