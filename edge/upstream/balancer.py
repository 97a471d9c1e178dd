"""Balancing algorithms: smooth weighted round robin, least connections, consistent hashing.

A balancer is rebuilt when the pool's membership changes (a registry event, a
config load), never per request. ``pick(ok, key)`` returns a member for which
``ok(member)`` holds, or None; the pool decides what ``ok`` means (eligible,
not tried yet, and for non-hash balancers also below max_conns).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class Weighted(Protocol):
    """What balancers need from a member."""

    name: str
    weight: int
    active: int
    rr_current: int


M = TypeVar("M", bound=Weighted)
Ok = Callable[[M], bool]


class Balancer(Protocol[M]):
    """Chooses a member."""

    def rebuild(self, members: Sequence[M]) -> None: ...

    def pick(self, ok: Callable[[M], bool], key: str | None) -> M | None: ...


class SmoothRoundRobin:
    """nginx's smooth weighted round robin: even spread, no bursts to heavy members."""

    def __init__(self) -> None:
        self.members: Sequence[Weighted] = ()

    def rebuild(self, members: Sequence[Weighted]) -> None:
        self.members = members
        for m in members:
            m.rr_current = 0

    def pick(self, ok: Callable[[Weighted], bool], key: str | None) -> Weighted | None:
        best = None
        total = 0
        for m in self.members:
            if not ok(m):
                continue
            m.rr_current += m.weight
            total += m.weight
            if best is None or m.rr_current > best.rr_current:
                best = m
        if best is not None:
            best.rr_current -= total
        return best


class LeastConnections:
    """Fewest active requests per unit of weight; ties rotate so idle pools still spread."""

    def __init__(self) -> None:
        self.members: Sequence[Weighted] = ()
        self._start = 0

    def rebuild(self, members: Sequence[Weighted]) -> None:
        self.members = members
        self._start = 0

    def pick(self, ok: Callable[[Weighted], bool], key: str | None) -> Weighted | None:
        members = self.members
        n = len(members)
        if not n:
            return None
        self._start = (self._start + 1) % n
        best = None
        best_load = 0.0
        for i in range(n):
            m = members[(self._start + i) % n]
            if not ok(m):
                continue
            load = m.active / m.weight
            if best is None or load < best_load:
                best, best_load = m, load
        return best


def _hash(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    """A hash ring (100 points per unit of weight): a key keeps its member while it lives.

    Only keys of a removed member move, and they spread over the others.
    Without a key (no header, no cookie) it falls back to round robin.
    """

    POINTS = 100

    def __init__(self) -> None:
        self._ring: list[int] = []
        self._owners: list[Weighted] = []
        self._fallback = SmoothRoundRobin()
        self._distinct = 0

    def rebuild(self, members: Sequence[Weighted]) -> None:
        points = sorted(
            (_hash(f"{m.name}#{i}"), j) for j, m in enumerate(members) for i in range(self.POINTS * m.weight)
        )
        self._ring = [p for p, _ in points]
        self._owners = [members[j] for _, j in points]
        self._distinct = len(members)
        self._fallback.rebuild(members)

    def pick(self, ok: Callable[[Weighted], bool], key: str | None) -> Weighted | None:
        if key is None:
            return self._fallback.pick(ok, None)
        ring = self._ring
        if not ring:
            return None
        i = bisect.bisect(ring, _hash(key))
        seen: set[int] = set()
        n = len(ring)
        for step in range(n):
            m = self._owners[(i + step) % n]
            if id(m) in seen:
                continue
            if ok(m):
                return m
            seen.add(id(m))
            if len(seen) >= self._distinct:
                break
        return None


def make_balancer(kind: str) -> SmoothRoundRobin | LeastConnections | ConsistentHash:
    """The balancer for a pool's `balance` option."""
    if kind == "least_conn":
        return LeastConnections()
    if kind == "hash":
        return ConsistentHash()
    return SmoothRoundRobin()
