"""The open client connections of an edge, as a list linked through the connections.

A set of 10,000 connections is a 64 Ki-slot hash table: about 105 bytes per idle
connection, measured (tracemalloc, bench/proxy_bench.py --memory), a sixteenth of
its whole cost. Linked through two slots of the connection itself (as nginx links
its connections and timers through ``ngx_queue_t``), the same membership costs 16
bytes and never resizes. Adding, removing and the membership test are O(1); walking
it (shutdown, a ban closing a client's connections) copies it to a list first, so
its members may close while it is walked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar, cast


class Linked:
    """What a ConnectionList member carries: its two links (None while not a member)."""

    __slots__ = ("_link_next", "_link_prev")

    def __init__(self) -> None:
        self._link_next: Linked | None = None
        self._link_prev: Linked | None = None


T = TypeVar("T", bound=Linked)


class ConnectionList(Generic[T]):
    """Connections linked through themselves: add, discard, ``in``, ``len`` and a walk."""

    __slots__ = ("_end", "_len")

    def __init__(self) -> None:
        # A ring through a sentinel: every member has both links, so none is a special case.
        end = Linked()
        end._link_next = end._link_prev = end
        self._end = end
        self._len = 0

    def add(self, conn: T) -> None:
        """Link ``conn`` in at the end (nothing happens if it is a member already)."""
        if conn._link_next is not None:
            return
        end = self._end
        last = end._link_prev
        assert last is not None
        conn._link_prev = last
        conn._link_next = end
        last._link_next = conn
        end._link_prev = conn
        self._len += 1

    def discard(self, conn: T) -> None:
        """Unlink ``conn`` if it is a member."""
        after = conn._link_next
        if after is None:
            return
        before = conn._link_prev
        assert before is not None
        before._link_next = after
        after._link_prev = before
        conn._link_next = conn._link_prev = None
        self._len -= 1

    def __contains__(self, conn: object) -> bool:
        # A connection belongs to one edge's list only, so being linked is being a member.
        return isinstance(conn, Linked) and conn._link_next is not None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        members: list[T] = []
        end = self._end
        node = end._link_next
        while node is not end and node is not None:
            members.append(cast(T, node))
            node = node._link_next
        return iter(members)
