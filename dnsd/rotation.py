"""Rotating answers: the address sets a name rotates through, their weighted order, their bytes.

Theory of operation
-------------------
An ``AddressSet`` is what one service offers for one type (A or AAAA): its
addresses sorted by their packed bytes (the fixed cyclic order answers
rotate through), each with a weight. It is immutable and carries a
``version`` that is unique in the process; a change makes a new set with
``derive``, which records the version it came from and the addresses added,
removed or re-weighted, so whatever was rendered from the old set can be
patched instead of redone.

A ``RotatingAnswer`` is one entry's rendering of a set: the bytes before the
rotating records (a CNAME chain), one record per address, and the bytes
after them. ``bodies[s]`` is the answer that lists address s first and the
``shown - 1`` addresses after it (``shown = min(cap, n)``). A change of one
address rewrites only the ``shown`` bodies whose window covers it; the rest
of the list is copied as references (a memmove, not Python work per item),
which keeps one change at 10,000 addresses well under a millisecond.

Order of first places: ``weighted_order`` gives each address ``weight``
starts per period, spread out by virtual time (the j-th start of an address
of weight w sits at (j + 1/2) / w of the period, as in stride scheduling),
and addresses of equal weight follow the cyclic order. With equal weights
the order is 0, 1, ..., n-1: every query starts one position later and every
address is shown in exactly ``shown`` of every n answers. It costs O(n +
total weight), against O(n x total weight) for nginx's smooth weighted round
robin, which we used before and measured at 1.9 s for 5,000 edges (see the
README, "Scale").

Identity for signing and sharing: every served RRset is named by
``RotatingAnswer.rrset(slot)``, whose ``key`` is a digest of its owner,
type, TTL and sorted addresses. Equal content gives an equal key in any
build and any process, so a signature cache keyed by it is re-used while a
set is unchanged and misses exactly when it changes.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, chain
from typing import TypeVar

MAX_SCHEDULE = 1 << 16
_T = TypeVar("_T")
_versions = itertools.count(1)


def weight_classes(weights: Sequence[int]) -> tuple[dict[int, list[int]], list[int]] | None:
    """Item indexes by (reduced) weight, and the classes in first-place order; None if all equal.

    Concatenating ``classes[w] for w in events`` gives one period. Every step
    over the n items is a C loop (sort, map, slicing), so 10,000 edges cost
    about a millisecond; only the events (one per class and round) are Python.
    """
    if not weights or weights.count(weights[0]) == len(weights):
        # Equal weights, the common case, told in one C pass over identical small ints:
        # gcd and max over 10,000 weights took 0.18 ms of every update (timeit).
        return None
    g = math.gcd(*weights)
    if max(weights) == g:
        return None
    scaled: Sequence[int] = weights if g == 1 else [w // g for w in weights]
    total = sum(scaled)
    if total > MAX_SCHEDULE:  # keep memory bounded; proportions stay within 1/MAX_SCHEDULE
        scaled = [max(1, round(w * MAX_SCHEDULE / total)) for w in scaled]
        g = math.gcd(*scaled)
        scaled = [w // g for w in scaled]
    by_weight = sorted(range(len(scaled)), key=scaled.__getitem__)  # stable: cyclic order kept
    sorted_weights = list(map(scaled.__getitem__, by_weight))
    classes = {}
    for w in set(sorted_weights):
        classes[w] = by_weight[bisect_left(sorted_weights, w) : bisect_right(sorted_weights, w)]
    return classes, _events(classes)


def weighted_order(weights: Sequence[int]) -> Sequence[int]:
    """One period of item indexes, each index ``weight`` times (reduced by gcd), spread out."""
    found = weight_classes(weights)
    if found is None:
        return range(len(weights))
    classes, events = found
    return _concat(classes, events)


def _concat(classes: Mapping[int, list[_T]], events: Iterable[int]) -> list[_T]:
    """One period: each class's items at each of its turns (list extends: C copies)."""
    out: list[_T] = []
    for w in events:
        out += classes[w]
    return out


def _events(weights: Iterable[int]) -> list[int]:
    """One event per (class, round j) at virtual time (j + 1/2) / w; heavier classes first on ties."""
    return [-negw for _, negw in sorted(((2 * j + 1) / (2 * w), -w) for w in weights for j in range(w))]


class WeightClasses:
    """The addresses of a weighted set grouped by weight, kept across derived sets.

    ``keys[w]`` lists the packed addresses of weight ``w`` in cyclic order and
    ``events`` the classes' turns (raw weights) in one period, as
    ``weight_classes`` orders them. A derived set moves only the changed
    addresses between classes, so a change costs O(changes x log n) plus
    copying the classes it touches, instead of sorting n addresses by weight
    again (measured at 10,000 edges with weights 1-10: the sort and the
    per-address maps were about 3 ms of a 5.3 ms change).
    """

    __slots__ = ("events", "keys", "total")

    def __init__(self, keys: dict[int, list[bytes]], events: list[int], total: int) -> None:
        self.keys = keys
        self.events = events
        self.total = total

    @classmethod
    def of(cls, aset: AddressSet, found: tuple[dict[int, list[int]], list[int]]) -> WeightClasses | None:
        """The classes of ``aset`` from its ``weight_classes``; None when the period would be capped."""
        total = sum(aset.weights)
        if total > MAX_SCHEDULE:
            return None
        classes, _ = found
        keys = aset.keys
        by_raw = {}
        for idx in classes.values():
            first = idx[0]
            by_raw[aset.weights[first]] = list(map(keys.__getitem__, idx))
        return cls(by_raw, cls._order(by_raw), total)

    @staticmethod
    def _order(keys: Mapping[int, list[bytes]]) -> list[int]:
        g = math.gcd(*keys)
        scaled = _events(w // g for w in keys)
        return [w * g for w in scaled]

    def derive(
        self, old: AddressSet, new: AddressSet
    ) -> tuple[WeightClasses, list[tuple[int, int, bool]]] | None:
        """The classes of ``new`` (derived from ``old``) and the edits: (weight, position, inserted)."""
        keys = dict(self.keys)
        copied: set[int] = set()
        edits: list[tuple[int, int, bool]] = []
        total = self.total
        for key in sorted(new.changed):
            p, present = _find(old.keys, key)
            if present:
                w = old.weights[p]
                if w not in copied:
                    keys[w] = list(keys[w])
                    copied.add(w)
                at = bisect_left(keys[w], key)
                del keys[w][at]
                edits.append((w, at, False))
                total -= w
                if not keys[w]:
                    del keys[w]
            p, present = _find(new.keys, key)
            if present:
                w = new.weights[p]
                if w not in copied:
                    keys[w] = list(keys.get(w, ()))
                    copied.add(w)
                at = bisect_left(keys[w], key)
                keys[w].insert(at, key)
                edits.append((w, at, True))
                total += w
        if len(keys) < 2 or total > MAX_SCHEDULE:
            return None  # equal weights, or a capped period: the caller starts afresh
        events = self.events if keys.keys() == self.keys.keys() else self._order(keys)
        return WeightClasses(keys, events, total), edits

    def spread(self, aset: AddressSet, per_address: Sequence[bytes]) -> dict[int, list[bytes]]:
        """``per_address`` (parallel to ``aset.keys``) grouped like the classes."""
        index = dict(zip(aset.keys, per_address, strict=True))
        return {w: list(map(index.__getitem__, ks)) for w, ks in self.keys.items()}

    def patch(
        self,
        previous: dict[int, list[bytes]],
        edits: list[tuple[int, int, bool]],
        aset: AddressSet,
        per_address: Sequence[bytes],
        dirty: Iterable[int],
    ) -> dict[int, list[bytes]]:
        """``previous`` grouped items after ``edits``, with the items at ``dirty`` addresses renewed."""
        items = dict(previous)
        copied: set[int] = set()

        def own(w: int) -> list[bytes]:
            if w not in copied:
                items[w] = list(items.get(w, ()))
                copied.add(w)
            return items[w]

        for w, at, inserted in edits:
            lst = own(w)
            if inserted:
                lst.insert(at, b"")
            else:
                del lst[at]
                if not lst:
                    del items[w]
                    copied.discard(w)
        for s in dirty:
            key, w = aset.keys[s], aset.weights[s]
            own(w)[bisect_left(self.keys[w], key)] = per_address[s]
        return items

    def schedule(self, items: Mapping[int, list[bytes]]) -> list[bytes]:
        """One period of ``items`` grouped like the classes."""
        return _concat(items, self.events)

    def order(self, aset: AddressSet) -> list[int]:
        """One period of address indexes (``Rotation.slot_start``), computed when first asked."""
        index = {k: i for i, k in enumerate(aset.keys)}
        return _concat({w: list(map(index.__getitem__, ks)) for w, ks in self.keys.items()}, self.events)


def _find(keys: Sequence[bytes], key: bytes) -> tuple[int, bool]:
    """Where ``key`` is, or would go, in the sorted ``keys``, and whether it is there."""
    p = bisect_left(keys, key)
    return p, p < len(keys) and keys[p] == key


def _contains(keys: Sequence[bytes], key: bytes) -> bool:
    return _find(keys, key)[1]


class Members(Sequence[tuple[int, ...]]):
    """Per schedule slot, the address indexes its answer contains (computed on demand)."""

    def __init__(self, slot_start: Sequence[int], n: int, shown: int) -> None:
        self.slot_start = slot_start
        self.n = n
        self.shown = shown

    def __len__(self) -> int:
        return len(self.slot_start)

    def __getitem__(self, slot: int) -> tuple[int, ...]:  # type: ignore[override]
        s = self.slot_start[slot]
        return tuple((s + j) % self.n for j in range(self.shown))

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for slot in range(len(self)):
            yield self[slot]


class Rotation:
    """Who is in which slot of a rotating answer, for exposure statistics."""

    def __init__(
        self,
        name: str,
        addresses: Sequence[str],
        slot_start: Sequence[int] | Callable[[], Sequence[int]],
        shown: int,
    ) -> None:
        self.name = name
        self.addresses = addresses
        self._slot_start = slot_start
        self.shown = shown
        self._per_period: list[int] | None = None

    @property
    def slot_start(self) -> Sequence[int]:
        """Per schedule slot, the address index listed first (computed when first asked)."""
        if callable(self._slot_start):
            self._slot_start = self._slot_start()
        return self._slot_start

    @property
    def members(self) -> Members:
        """Per schedule slot, the address indexes its answer contains."""
        return Members(self.slot_start, len(self.addresses), self.shown)

    def _firsts(self, slots: Iterable[int], times: int = 1) -> list[int]:
        first = [0] * len(self.addresses)
        for i, c in Counter(slots).items():
            first[i] += c * times
        return first

    def counts_between(self, start: int, end: int) -> tuple[list[int], list[int]]:
        """(times included, times first) per address for queries number start..end-1."""
        n = len(self.addresses)
        if end <= start or not n:
            return [0] * n, [0] * n
        seq = self.slot_start
        period = len(seq)
        full, rest = divmod(end - start, period)
        if full:
            if self._per_period is None:
                self._per_period = self._firsts(seq)
            first = [full * c for c in self._per_period]
        else:
            first = [0] * n
        if rest:
            a = start % period
            b = a + rest
            part: Iterable[int] = seq[a:b] if b <= period else chain(seq[a:], seq[: b - period])
            first = list(map(operator.add, first, self._firsts(part)))
        return self._included(first), first

    def counts_of(self, steps: Mapping[int, int]) -> tuple[list[int], list[int]]:
        """(times included, times first) per address for schedule step -> times answered."""
        seq = self.slot_start
        first = [0] * len(self.addresses)
        for step, times in list(steps.items()):
            first[seq[step]] += times
        return self._included(first), first

    def _included(self, first: list[int]) -> list[int]:
        """Address i is shown by the answers that start at i and the shown-1 before it."""
        n = len(first)
        k = self.shown
        ext = first[n - (k - 1) :] + first if k > 1 else first
        sums = list(accumulate(ext, initial=0))
        return list(map(operator.sub, sums[k:], sums[: len(sums) - k]))


@dataclass(frozen=True, eq=False)
class AddressSet:
    """Addresses of one type in cyclic (packed byte) order, with weights; immutable."""

    keys: Sequence[bytes]  # packed addresses, sorted
    texts: Sequence[str]
    weights: Sequence[int]
    version: int
    base: int = 0  # the version this set was derived from (0: built from scratch)
    changed: frozenset[bytes] = frozenset()  # keys added, removed or re-weighted since ``base``
    reweighted_only: bool = False

    @classmethod
    def of(cls, items: Mapping[bytes, tuple[str, int]]) -> AddressSet:
        """A set from packed address -> (text, weight)."""
        keys = sorted(items)
        texts = [items[k][0] for k in keys]
        weights = [items[k][1] for k in keys]
        return cls(keys, texts, weights, next(_versions))

    def items(self) -> dict[bytes, tuple[str, int]]:
        return dict(zip(self.keys, zip(self.texts, self.weights, strict=True), strict=True))

    def derive(self, changes: Mapping[bytes, tuple[str, int] | None]) -> AddressSet:
        """The set after ``changes`` (packed -> (text, weight), or None to remove); self if none apply."""
        if len(changes) * 8 > len(self.keys):  # many: sorting afresh beats inserting one by one
            items = self.items()
            changed = set()
            for key, new in changes.items():
                if items.get(key) != new:
                    changed.add(key)
                    if new is None:
                        del items[key]
                    else:
                        items[key] = new
            if not changed:
                return self
            fresh = AddressSet.of(items)
            k, t, w, v = fresh.keys, fresh.texts, fresh.weights, fresh.version
            return AddressSet(k, t, w, v, self.version, frozenset(changed))
        keys, texts, weights = list(self.keys), list(self.texts), list(self.weights)
        changed = set()
        moved = False
        for key, new in changes.items():
            p, present = _find(keys, key)
            if new is None:
                if present:
                    del keys[p], texts[p], weights[p]
                    changed.add(key)
                    moved = True
            elif present:
                if (texts[p], weights[p]) != new:
                    texts[p], weights[p] = new
                    changed.add(key)
            else:
                keys.insert(p, key)
                texts.insert(p, new[0])
                weights.insert(p, new[1])
                changed.add(key)
                moved = True
        if not changed:
            return self
        return AddressSet(keys, texts, weights, next(_versions), self.version, frozenset(changed), not moved)

    def diff(self, items: Mapping[bytes, tuple[str, int]]) -> AddressSet:
        """The set equal to ``items``, derived from this one (self when equal)."""
        if not self.keys or not items:
            if not self.keys and not items:
                return self
            fresh = AddressSet.of(items)
            changed = frozenset(self.keys).union(items)
            return AddressSet(fresh.keys, fresh.texts, fresh.weights, fresh.version, self.version, changed)
        mine = self.items()
        if mine == items:
            return self
        changes: dict[bytes, tuple[str, int] | None] = dict.fromkeys(mine.keys() - items.keys())
        changes.update((k, v) for k, v in items.items() if mine.get(k) != v)
        return self.derive(changes)


@dataclass(frozen=True)
class RRsetRef:
    """One distinct RRset dnsd serves: what a signer signs and caches by ``key``."""

    owner: bytes
    rtype: int
    ttl: int
    rdatas: tuple[bytes, ...]  # packed addresses in canonical (sorted) order
    key: bytes  # digest of all the above: equal content, equal key, in any build or process


class RotatingAnswer:
    """The bodies of one entry whose answer rotates through an AddressSet."""

    __slots__ = (
        "bodies",
        "body_len",
        "class_bodies",
        "classes",
        "dirty",
        "head",
        "owner",
        "rotation",
        "rr_prefix",
        "rtype",
        "schedule",
        "set",
        "shown",
        "signed",
        "tail",
        "ttl",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        aset: AddressSet,
        shown: int,
        parts: tuple[bytes, bytes, bytes],
        rr: tuple[bytes, int, int],
        previous: RotatingAnswer | None = None,
    ) -> None:
        self.set = aset
        self.shown = shown
        self.head, self.rr_prefix, self.tail = parts
        self.owner, self.rtype, self.ttl = rr
        # A signed zone's windows with their RRSIGs (dnsd.dnssec.answers), kept for the next build.
        self.signed: object | None = None
        n = len(aset.keys)
        self.body_len = len(self.head) + shown * (len(self.rr_prefix) + len(aset.keys[0])) + len(self.tail)
        self.rotation: Rotation
        self.schedule: Sequence[bytes]
        # None: every body was rendered afresh; else the addresses whose bodies were.
        self.dirty: set[int] | None = None
        if (
            previous is not None
            and previous.shown == shown
            and (previous.head, previous.rr_prefix, previous.tail) == parts
            and aset.base == previous.set.version
            and len(aset.changed) * shown < n
        ):
            self.bodies: Sequence[bytes] = self._patched(previous)
        else:
            self.bodies = self._rendered()
        self.classes: WeightClasses | None = None
        self.class_bodies: dict[int, list[bytes]] = {}
        derived = None
        if self.dirty is not None and previous is not None and previous.classes is not None:
            derived = previous.classes.derive(previous.set, aset)
        if derived is not None and previous is not None:
            # The weighted path in proportion to the change: move the changed addresses
            # between classes, renew the touched bodies, and lay the period out again
            # with list extends (a C copy of one reference per unit of weight).
            self.classes, edits = derived
            # Renewed: the re-rendered windows, and every changed address still here (a
            # re-weighted one moved class with an unchanged body).
            dirty = set(self.dirty or ())
            for key in aset.changed:
                p, present = _find(aset.keys, key)
                if present:
                    dirty.add(p)
            self.class_bodies = self.classes.patch(previous.class_bodies, edits, aset, self.bodies, dirty)
            self.schedule = self.classes.schedule(self.class_bodies)
            self.rotation = Rotation(name, aset.texts, partial(self.classes.order, aset), shown)
            return
        found = weight_classes(aset.weights)
        self.classes = None if found is None else WeightClasses.of(aset, found)
        if self.classes is not None:
            self.class_bodies = self.classes.spread(aset, self.bodies)
            self.schedule = self.classes.schedule(self.class_bodies)
            self.rotation = Rotation(name, aset.texts, partial(self.classes.order, aset), shown)
            return
        if found is None:
            self.schedule = self.bodies
            self.rotation = Rotation(name, aset.texts, range(n), shown)
        else:  # a period over MAX_SCHEDULE: the weights are scaled down, classes may merge
            classes, events = found
            bodies = self.bodies
            class_bodies = {w: list(map(bodies.__getitem__, idx)) for w, idx in classes.items()}
            self.schedule = _concat(class_bodies, events)
            order = partial(_concat, classes, events)
            self.rotation = Rotation(name, aset.texts, order, shown)

    def _body(self, keys: Sequence[bytes], s: int) -> bytes:
        n = len(keys)
        end = s + self.shown
        window = keys[s:end] if end <= n else [*keys[s:], *keys[: end - n]]
        rrp = self.rr_prefix
        return b"".join((self.head, *[rrp + k for k in window], self.tail))

    def _rendered(self) -> list[bytes]:
        keys = self.set.keys
        rrs = [self.rr_prefix + k for k in keys]
        n, shown, head, tail = len(rrs), self.shown, self.head, self.tail
        if shown < n:
            rrs += rrs[: shown - 1]  # windows that wrap around
            return [b"".join((head, *rrs[s : s + shown], tail)) for s in range(n)]
        return [b"".join((head, *rrs[s:], *rrs[:s], tail)) for s in range(n)]

    def _patched(self, previous: RotatingAnswer) -> Sequence[bytes]:
        """Bodies from ``previous``: only windows that cover a changed address are rendered."""
        if self.set.reweighted_only:
            self.dirty = set()
            return previous.bodies  # the same windows; only the order of first places moves
        keys = list(previous.set.keys)
        bodies = list(previous.bodies)
        changed = self.set.changed
        final = {k for k in changed if _contains(self.set.keys, k)}
        for key in sorted(changed):
            p, present = _find(keys, key)
            if present and key not in final:
                del keys[p], bodies[p]
            elif not present and key in final:
                keys.insert(p, key)
                bodies.insert(p, b"")
        n = len(keys)
        dirty: set[int] = set()
        for key in changed:
            p = bisect_left(keys, key)
            dirty.update((p - j) % n for j in range(self.shown))
        for s in dirty:
            bodies[s] = self._body(keys, s)
        self.dirty = dirty
        return bodies

    def rrset(self, slot: int) -> RRsetRef:
        """The RRset served by ``schedule[slot]`` (all addresses when they fit the cap)."""
        keys = self.set.keys
        n = len(keys)
        if self.shown >= n:
            rdatas = tuple(keys)
        else:
            s = self.rotation.slot_start[slot]
            rdatas = tuple(sorted(keys[(s + j) % n] for j in range(self.shown)))
        h = hashlib.blake2b(digest_size=16)
        h.update(self.owner + self.rtype.to_bytes(2, "big") + self.ttl.to_bytes(4, "big"))
        for rd in rdatas:
            h.update(rd)
        return RRsetRef(self.owner, self.rtype, self.ttl, rdatas, h.digest())

    def rrsets(self) -> Iterator[RRsetRef]:
        """Every distinct RRset this answer serves: one, or one per window when capped."""
        n = len(self.set.keys)
        if self.shown >= n:
            yield self.rrset(0)
            return
        first_slot: dict[int, int] = {}
        for slot, s in enumerate(self.rotation.slot_start):
            first_slot.setdefault(s, slot)
            if len(first_slot) == n:
                break
        for slot in first_slot.values():
            yield self.rrset(slot)
