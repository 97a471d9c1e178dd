"""The node's shared cache tier: fill locks across processes, hit-for-miss marks, its directory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from multidict import CIMultiDict

from edge.core.config import from_dict
from edge.features.cache.disk import DiskStore
from edge.features.cache.feature import CacheFeature
from edge.features.cache.shared import MARK_SWEEP_EVERY, FillLocks, NodeDirectory, slot

HOLDER = """
import os, sys, time
from edge.features.cache.disk import DiskStore
from edge.features.cache.shared import FillLocks
root, key = sys.argv[1], sys.argv[2]
lock = FillLocks(root).try_acquire(key)
assert lock is not None
# Half a body written under its temporary name, as a worker killed mid-write leaves it.
directory = DiskStore(root, 1 << 20, 1 << 20).directory(key)
os.makedirs(directory, exist_ok=True)
with open(os.path.join(directory, ".tmp-partial"), "wb") as f:
    f.write(b"half")
print("held", flush=True)
time.sleep(60)
"""


def test_a_slot_is_held_once_across_processes_and_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    root = str(tmp_path)
    locks = FillLocks(root)
    key = "http://a.example/x"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root, key], stdout=subprocess.PIPE, cwd=os.getcwd()
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        assert locks.try_acquire(key) is None  # another process fills it
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        lock = locks.try_acquire(key)
        assert lock is not None  # no stuck lock: the kernel dropped it with the process
        # No torn object: the half-written body is invisible to a lookup.
        assert DiskStore(root, 1 << 20, 1 << 20).lookup(key, "", CIMultiDict()) is None
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(5)


def test_a_lock_excludes_other_holders_in_the_same_process_until_released(tmp_path: Path) -> None:
    locks = FillLocks(str(tmp_path))
    first = locks.try_acquire("k")
    assert first is not None
    assert locks.try_acquire("k") is None  # open file description locks: per holder, not per process
    other = next(f"k{i}" for i in range(1000) if slot(f"k{i}") != slot("k"))
    held = locks.try_acquire(other)
    assert held is not None
    first.release()
    again = locks.try_acquire("k")
    assert again is not None
    again.release()
    held.release()


def test_acquire_waits_for_the_holder_and_says_so(tmp_path: Path) -> None:
    locks = FillLocks(str(tmp_path))

    async def scenario() -> tuple[bool, float]:
        lock = locks.try_acquire("k")
        assert lock is not None
        asyncio.get_running_loop().call_later(0.1, lock.release)
        started = time.monotonic()
        got, waited = await locks.acquire("k", 5.0)
        assert got is not None
        got.release()
        return waited, time.monotonic() - started

    waited, elapsed = asyncio.run(scenario())
    assert waited and 0.09 < elapsed < 1.0


def test_acquire_gives_up_after_its_wait(tmp_path: Path) -> None:
    locks = FillLocks(str(tmp_path))
    lock = locks.try_acquire("k")
    assert lock is not None
    got, waited = asyncio.run(locks.acquire("k", 0.05))
    assert got is None and waited
    lock.release()


def test_uncacheable_marks_expire(tmp_path: Path) -> None:
    locks = FillLocks(str(tmp_path))
    assert not locks.uncacheable("k")
    locks.mark_uncacheable("k", 60)
    assert locks.uncacheable("k") and FillLocks(str(tmp_path)).uncacheable("k")
    locks.clear_uncacheable("k")
    assert not locks.uncacheable("k")
    locks.mark_uncacheable("k", 0.01)
    time.sleep(0.05)
    assert not locks.uncacheable("k")
    # Expired marks do not pile up: each MARK_SWEEP_EVERY-th mark sweeps them.
    for i in range(MARK_SWEEP_EVERY - 3):  # two marks made above; "live" below is the sweeping one
        locks.mark_uncacheable(f"old{i}", 0.01)
    time.sleep(0.05)
    locks.mark_uncacheable("live", 60)
    assert os.listdir(locks.marks) == [os.path.basename(locks._mark_path("live"))]


def test_the_node_directory_goes_with_its_last_worker_or_its_dead_supervisor(tmp_path: Path) -> None:
    base = str(tmp_path)
    me = os.getpid()
    a = NodeDirectory(8080, base, supervisor=me)
    b = NodeDirectory(8080, base, supervisor=me)
    other = NodeDirectory(8081, base, supervisor=me)
    assert other.path != a.path  # another node (port) of the same supervisor: its own tier
    assert other.leave()
    assert a.path == b.path and os.path.isdir(a.path)
    assert not a.leave()  # b still uses it
    assert os.path.isdir(a.path)
    assert b.leave()
    assert not os.path.exists(b.path)
    # Left by a node killed outright: removed by the next node to start.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(5)
    stale = tmp_path / f"carousel-edge-cache-{os.getuid()}-{dead.pid}-8080"
    stale.mkdir()
    c = NodeDirectory(8080, base, supervisor=me)
    assert not stale.exists()
    c.leave()


def test_the_memory_budget_is_the_nodes_whatever_the_number_of_workers() -> None:
    memory = 64 << 20
    for workers in (1, 2, 4, 8):
        config = from_dict(
            {
                "edge": {"workers": workers},
                "cache": {"enabled": True, "cluster_purge": False, "memory_size": memory},
                "route": [{"path": "/", "respond": 200}],
            }
        )
        cache = CacheFeature(config, SimpleNamespace())  # type: ignore[arg-type]
        try:
            shared = cache.disk.budget if cache.disk is not None and workers > 1 else 0
            assert cache.store.budget * workers + shared <= memory
            if workers > 1:
                assert cache.fills is not None and cache.node is not None
                assert cache.disk is not None and cache.disk.root == cache.node.path
            else:
                assert cache.fills is None and cache.disk is None  # one worker: as before, memory only
        finally:
            if cache.disk is not None:
                cache.disk.close()
            if cache.node is not None:
                cache.node.leave()
