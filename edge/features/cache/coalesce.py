"""Request coalescing: concurrent misses on one key wait for a single upstream fetch.

The first request for a key that is not in the cache becomes the leader and
fetches; the others await the leader's future, which is resolved the moment
the fetch is stored (or found uncacheable): nobody polls. The waiters then
look the key up again: a hit for most, and for a request whose Vary values
differ, another round (one of them leads the next fetch).

A key whose response could not be stored is marked hit-for-miss for a while:
its requests then skip coalescing and go upstream in parallel, instead of
queueing behind each other for answers they could never share. The mark only
changes coalescing: a later cacheable response is stored as usual.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict


class Coalescer:
    """In-flight fetches by cache key."""

    __slots__ = ("_inflight",)

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def join(self, key: str) -> asyncio.Future[None] | None:
        """The fetch to wait for, or None when the caller is now the leader for ``key``."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def in_flight(self, key: str) -> bool:
        return key in self._inflight

    def finish(self, key: str) -> None:
        """The leader is done (stored, uncacheable or failed): wake every waiter now."""
        fut = self._inflight.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)


class HitForMiss:
    """Keys whose last response was uncacheable, each until a deadline; bounded in size."""

    __slots__ = ("_keys", "limit", "seconds")

    def __init__(self, seconds: float, limit: int = 100_000) -> None:
        self.seconds = seconds
        self.limit = limit
        self._keys: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def mark(self, key: str) -> None:
        if self.seconds <= 0:
            return
        self._keys[key] = time.monotonic() + self.seconds
        self._keys.move_to_end(key)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def clear(self, key: str) -> None:
        self._keys.pop(key, None)

    def __contains__(self, key: str) -> bool:
        until = self._keys.get(key)
        if until is None:
            return False
        if until < time.monotonic():
            del self._keys[key]
            return False
        return True
