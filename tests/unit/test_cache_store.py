"""The memory tier (S3-FIFO within a byte budget), coalescing and hit-for-miss, without sockets."""

from __future__ import annotations

import asyncio
import random

from edge.features.cache.coalesce import Coalescer, HitForMiss
from edge.features.cache.store import ENTRY_OVERHEAD, Entry, MemoryStore


def entry(key: str, size: int = 1000, *, extra: str = "", tags: frozenset[str] = frozenset()) -> Entry:
    e = Entry(key, extra, 200, None)
    e.body = b"x" * size
    e.length = size
    e.tags = tags
    e.set_headers([("Content-Type", "text/plain")])
    return e


def test_budget_is_never_exceeded() -> None:
    store = MemoryStore(budget=100_000)
    for i in range(500):
        store.put(entry(f"k{i}", random.randint(100, 5000)))
        assert store.bytes <= store.budget
    assert store.count == len(list(store.entries())) == sum(len(v) for v in store.index.values())
    assert store.evictions > 0
    assert store.bytes == sum(e.size for e in store.entries())


def test_objects_too_big_for_the_small_queue_are_refused() -> None:
    store = MemoryStore(budget=100_000)
    assert not store.put(entry("big", 20_000))
    assert store.count == 0 and store.bytes == 0


def test_hit_objects_survive_a_scan_of_one_hit_wonders() -> None:
    """S3-FIFO's point: a burst of never-reused objects does not flush the popular ones."""
    size = 1000
    store = MemoryStore(budget=100 * (size + ENTRY_OVERHEAD + 10))
    hot = [f"hot{i}" for i in range(20)]
    for k in hot:
        store.put(entry(k, size))
    for _ in range(3):  # the hot set is used
        for k in hot:
            store.index[k][0].freq = min(store.index[k][0].freq + 1, 3)
    for i in range(1000):  # a scan of one-hit wonders
        store.put(entry(f"scan{i}", size))
    assert all(k in store.index for k in hot)


def test_lru_would_lose_them_but_fifo_ghosts_readmit_quickly() -> None:
    size = 1000
    store = MemoryStore(budget=50 * (size + ENTRY_OVERHEAD + 10))
    for i in range(200):
        store.put(entry(f"k{i}", size))
    evicted = next(f"k{i}" for i in range(200) if f"k{i}" not in store.index)
    store.put(entry(evicted, size))  # came back soon: straight into the main queue
    assert store.index[evicted][0].where == 2


def test_variants_replace_the_one_they_supersede() -> None:
    store = MemoryStore(budget=1_000_000, max_variants=3)
    a = entry("k")
    a.vary, a.vary_values = ("accept-encoding",), ("gzip",)
    b = entry("k")
    b.vary, b.vary_values = ("accept-encoding",), ("br",)
    store.put(a)
    store.put(b)
    assert store.index["k"] == [b, a]
    a2 = entry("k")
    a2.vary, a2.vary_values = ("accept-encoding",), ("gzip",)
    store.put(a2)
    assert store.index["k"] == [a2, b] and a.where == 0 and a.body is None
    for coding in ("x", "y", "z"):
        v = entry("k")
        v.vary, v.vary_values = ("accept-encoding",), (coding,)
        store.put(v)
    assert len(store.index["k"]) == 3  # max_variants
    plain = entry("k")
    store.put(plain)  # no Vary: it answers every request, the others are obsolete
    assert store.index["k"] == [plain]
    assert store.count == 1 and store.bytes == plain.size


def test_purges_by_key_prefix_and_tag() -> None:
    store = MemoryStore(budget=1_000_000)
    store.put(entry("http://a/x/1", tags=frozenset({"t1", "t2"})))
    store.put(entry("http://a/x/2", tags=frozenset({"t2"})))
    store.put(entry("http://a/y", tags=frozenset({"t1"})))
    store.put(entry("http://b/x/1"))
    assert store.remove_tag("t2") == 2
    assert set(store.index) == {"http://a/y", "http://b/x/1"}
    assert store.tags == {"t1": {store.index["http://a/y"][0]}}
    assert store.remove_where(lambda k: k.startswith("http://b/")) == 1
    assert store.remove_key("http://a/y") == 1
    assert store.count == 0 and store.bytes == 0 and not store.tags


def test_dead_queue_slots_are_compacted() -> None:
    store = MemoryStore(budget=100_000_000)
    for _ in range(5000):
        store.put(entry("same", 10))  # each replaces the last
    assert store.count == 1
    assert len(store._small) + len(store._main) < 2100


async def test_coalescer_wakes_waiters_when_the_leader_finishes() -> None:
    c = Coalescer()
    assert c.join("k") is None  # leader
    waits = [c.join("k") for _ in range(5)]
    assert all(w is waits[0] for w in waits) and waits[0] is not None
    woken = asyncio.gather(*[asyncio.wait_for(asyncio.shield(w), 1) for w in waits if w])
    await asyncio.sleep(0)
    c.finish("k")
    await woken
    assert not c.in_flight("k") and c.join("k") is None


def test_hit_for_miss_expires_and_is_bounded() -> None:
    hfm = HitForMiss(seconds=60, limit=3)
    for k in "abcd":
        hfm.mark(k)
    assert "a" not in hfm and "d" in hfm and len(hfm) == 3
    hfm.clear("d")
    assert "d" not in hfm
    gone = HitForMiss(seconds=-1)
    gone.mark("x")
    assert "x" not in gone
