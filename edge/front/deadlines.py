"""The deadline wheel: every client connection's idle or header deadline on one loop timer.

A timer per connection (uvloop's TimerHandle, its libuv timer and a bound method) was
0.55 KiB of each idle keep-alive connection's 1.7 KiB; here a connection costs two link
slots of its own (``_wheel_next``, ``_wheel_prev``) and the slot number it is filed in.
The wheel knows nothing of HTTP: what it files is anything with those two slots and a
``_deadline_reached()`` method (``Filed``), called when its slot's time has come.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol


class Filed(Protocol):
    """What the wheel files: a connection with two link slots and a callback."""

    _wheel_next: Slot | Filed | None
    _wheel_prev: Slot | Filed | None

    def _deadline_reached(self) -> None: ...


# Seconds: how late a connection's deadline may be noticed, at most. Short enough that
# connections opened together (500 slowloris clients) are not closed in bursts of hundreds
# in one callback, which cost other clients' latency (test_slowloris.py: p99 over 0.1 s
# with 0.1 s slots on a loaded machine); long enough that 10,000 idle connections opened
# within seconds share a few hundred slots.
DEADLINE_SLOT = 0.02


class Slot:
    """One slot of the deadline wheel: a ring of connections linked through their
    ``_wheel_next``/``_wheel_prev`` slots. A set per slot cost 40-70 bytes of each idle
    connection (tables sized for growth); the links cost 16 and unlink in O(1)."""

    __slots__ = ("_wheel_next", "_wheel_prev", "number")

    def __init__(self, number: int) -> None:
        # Every member keeps this int as its ``_slot``: one object, not one each (32 bytes).
        self.number = number
        self._wheel_next: Slot | Filed = self
        self._wheel_prev: Slot | Filed = self

    def link(self, conn: Filed) -> None:
        """Put ``conn`` at the end of this slot."""
        last = self._wheel_prev
        conn._wheel_prev = last
        conn._wheel_next = self
        last._wheel_next = conn
        self._wheel_prev = conn

    def members(self) -> list[Filed]:
        """The connections filed here, in order (left linked)."""
        found: list[Filed] = []
        node = self._wheel_next
        while node is not self:
            assert not isinstance(node, Slot) and node._wheel_next is not None
            found.append(node)
            node = node._wheel_next
        return found

    def take_all(self) -> list[Filed]:
        """Unlink every member and return them, in the order they were filed."""
        members: list[Filed] = []
        node = self._wheel_next
        while node is not self:
            assert not isinstance(node, Slot)
            members.append(node)
            after = node._wheel_next
            node._wheel_next = node._wheel_prev = None
            assert after is not None
            node = after
        self._wheel_next = self._wheel_prev = self
        return members


def unlink(conn: Filed) -> None:
    """Take ``conn`` out of the slot it is filed in, if any (O(1))."""
    after, before = conn._wheel_next, conn._wheel_prev
    if after is None or before is None:
        return
    before._wheel_next = after
    after._wheel_prev = before
    conn._wheel_next = conn._wheel_prev = None


class DeadlineWheel:
    """Every client connection's deadline on one loop timer, in DEADLINE_SLOT slots.

    A connection sits in the slot of its deadline (rounded up); when the slot's time
    comes, each connection in it checks its own deadline, which may have moved later
    meanwhile (a request came), and files itself again if so. The timer runs only
    while some slot is filled; the wheel forgets its loop when it empties.
    """

    __slots__ = ("heap", "loop", "slots", "timer", "timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, Slot] = {}
        self.heap: list[int] = []  # the filled slots' numbers
        self.timer: asyncio.TimerHandle | None = None
        self.timer_slot = 0

    def add(self, conn: Filed, due: float) -> int:
        """File ``conn`` for ``due`` (loop time); returns its slot."""
        slot = math.ceil(due / DEADLINE_SLOT)
        members = self.slots.get(slot)
        if members is None:
            members = self.slots[slot] = Slot(slot)
            heapq.heappush(self.heap, slot)
        unlink(conn)
        members.link(conn)
        if self.timer is None or slot < self.timer_slot:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(slot * DEADLINE_SLOT, self._tick)
            self.timer_slot = slot
        return members.number

    def _tick(self) -> None:
        self.timer = None
        now = self.loop.time()
        heap, slots = self.heap, self.slots
        due: list[Filed] = []
        while heap and heap[0] * DEADLINE_SLOT <= now:
            members = slots.pop(heapq.heappop(heap), None)
            if members is not None:
                due.extend(members.take_all())
        for conn in due:
            conn._deadline_reached()
        while heap and (heap[0] not in slots or slots[heap[0]]._wheel_next is slots[heap[0]]):
            slots.pop(heapq.heappop(heap), None)  # slots emptied by discard
        if heap:
            if self.timer is None or heap[0] < self.timer_slot:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.loop.call_at(heap[0] * DEADLINE_SLOT, self._tick)
                self.timer_slot = heap[0]
        elif self.timer is None and WHEELS.get(self.loop) is self:
            del WHEELS[self.loop]


WHEELS: dict[asyncio.AbstractEventLoop, DeadlineWheel] = {}


def wheel() -> DeadlineWheel:
    """The running loop's wheel (made on first use)."""
    loop = asyncio.get_running_loop()
    found = WHEELS.get(loop)
    if found is None:
        for old in [old for old in WHEELS if old.is_closed()]:
            del WHEELS[old]  # a loop closed with connections still filed (tests)
        found = WHEELS[loop] = DeadlineWheel(loop)
    return found
