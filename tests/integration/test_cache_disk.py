"""The disk tier: survives restarts, shared by workers, holds large objects, bounded, purgeable."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from edge.features.cache import CacheFeature
from edge.front.server import Edge
from edge.testing import running_edge
from edge.testing.cache import ScriptedOrigin, edge_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def origin() -> AsyncIterator[ScriptedOrigin]:
    o = ScriptedOrigin()
    await o.start()
    yield o
    await o.stop()


def cache_of(edge: Edge) -> CacheFeature:
    return next(f for f in edge.features if isinstance(f, CacheFeature))


def disk_config(origin: ScriptedOrigin, disk: Path, **cache: object) -> dict:
    return edge_config(origin.port, {"disk_dir": str(disk), **cache})


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes in cache files, number of variants)."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sum(p.stat().st_size for p in files), sum(p.name.endswith(".meta") for p in files)


def corrupt_metas(root: Path) -> None:
    for meta in root.rglob("*.meta"):
        meta.write_bytes(b"{not json")


async def get(edge: Edge, path: str) -> tuple[bytes, str, str]:
    """(body, Cache-Status, Age)."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{edge.port}{path}") as r:
        return await r.read(), r.headers.get("Cache-Status", ""), r.headers.get("Age", "")


async def test_entries_survive_a_restart_with_their_age(origin: ScriptedOrigin, tmp_path: Path) -> None:
    origin.reply("/kept", "persisted", cache_control="max-age=300")
    async with running_edge(disk_config(origin, tmp_path)) as edge:
        await get(edge, "/kept")
    await asyncio.sleep(1.1)
    async with running_edge(disk_config(origin, tmp_path)) as edge:  # a new process state
        body, status, age = await get(edge, "/kept")
        assert body == b"persisted" and status.startswith("carousel; hit")
        assert int(age) >= 1  # age keeps counting across the restart
        _, status, _ = await get(edge, "/kept")
        assert status.startswith("carousel; hit")  # promoted to the memory tier
    assert len(origin.seen("/kept")) == 1


async def test_workers_share_the_disk_tier(origin: ScriptedOrigin, tmp_path: Path) -> None:
    origin.reply("/shared", "one fetch", cache_control="max-age=300")
    async with (
        running_edge(disk_config(origin, tmp_path)) as a,
        running_edge(disk_config(origin, tmp_path)) as b,
    ):
        await get(a, "/shared")
        disk = cache_of(a).disk
        assert disk is not None
        await disk.flush()
        body, status, _ = await get(b, "/shared")
        assert body == b"one fetch" and status.startswith("carousel; hit")
    assert len(origin.seen("/shared")) == 1


async def test_large_objects_live_on_disk_and_are_never_in_memory(
    origin: ScriptedOrigin, tmp_path: Path
) -> None:
    big = os.urandom(3 * 1024 * 1024)
    origin.reply("/big.bin", big, cache_control="max-age=300", content_type="application/octet-stream")
    config = disk_config(origin, tmp_path, max_object_size=256 * 1024, memory_size=8 * 1024 * 1024)
    config["edge"] = {"response_memory_limit": 256 * 1024}  # the edge spills it to a temp file
    async with running_edge(config) as edge:
        first, status, _ = await get(edge, "/big.bin")
        assert first == big and "stored" in status
        second, status, _ = await get(edge, "/big.bin")
        assert second == big and status.startswith("carousel; hit")
        store = cache_of(edge).store
        (entry,) = store.index["http://127.0.0.1/big.bin"]
        assert entry.body is None and entry.disk_path is not None
        assert store.bytes < 10_000  # memory holds the metadata only
    assert len(origin.seen("/big.bin")) == 1


async def test_without_a_disk_tier_large_objects_are_not_stored(origin: ScriptedOrigin) -> None:
    origin.reply("/big.bin", os.urandom(600 * 1024), cache_control="max-age=300")
    config = edge_config(origin.port, {"max_object_size": 256 * 1024, "memory_size": 8 * 1024 * 1024})
    async with running_edge(config) as edge:
        await get(edge, "/big.bin")
        await get(edge, "/big.bin")
    assert len(origin.seen("/big.bin")) == 2


async def test_purges_reach_the_disk_tier(origin: ScriptedOrigin, tmp_path: Path) -> None:
    for path in ("/p/1", "/p/2", "/q"):
        origin.reply(path, path, cache_control="max-age=300", surrogate_key="t-" + path[1])
    async with running_edge(disk_config(origin, tmp_path)) as edge:
        for path in ("/p/1", "/p/2", "/q"):
            await get(edge, path)
        cache = cache_of(edge)
        assert cache.disk is not None
        await cache.disk.flush()
        cache.purges.url("http://127.0.0.1/q")
        cache.purges.prefix("/p/")
        await cache.disk.flush()  # the ban's sweep has run
        assert not cache.disk.bans
    async with running_edge(disk_config(origin, tmp_path)) as edge:
        for path in ("/p/1", "/q"):
            _, status, _ = await get(edge, path)
            assert "fwd=uri-miss" in status, path
        cache = cache_of(edge)
        assert cache.disk is not None
        await cache.disk.flush()
        cache.purges.tag("t-p")
        # A ban hides matches at once, before its sweep has deleted them.
        assert cache.disk.lookup("http://127.0.0.1/p/1", "", {}) is None  # type: ignore[arg-type]


async def test_a_ban_whose_sweep_ends_during_a_lookup_still_hides_its_match(
    origin: ScriptedOrigin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweep runs in the writer thread while the loop looks up: here it is made to finish
    # (deleting the match and dropping its ban) between the lookup's read of the entry and
    # its check against the bans. Checked against the list as it was then, the purged entry
    # came back once (seen in CI).
    origin.reply("/p/1", "/p/1", cache_control="max-age=300", surrogate_key="t-p")
    async with running_edge(disk_config(origin, tmp_path)) as edge:
        await get(edge, "/p/1")
        disk = cache_of(edge).disk
        assert disk is not None
        await disk.flush()
        read_meta = disk._read_meta

        def read_then_let_the_sweep_finish(path: str, directory: str) -> object:
            entry = read_meta(path, directory)
            if threading.current_thread() is threading.main_thread():
                disk.executor.submit(lambda: None).result()  # one writer thread: after the sweep
            return entry

        monkeypatch.setattr(disk, "_read_meta", read_then_let_the_sweep_finish)
        cache_of(edge).purges.tag("t-p")
        assert disk.lookup("http://127.0.0.1/p/1", "", {}) is None  # type: ignore[arg-type]
        assert not disk.bans, "the sweep ran during the lookup"


async def test_the_disk_tier_stays_within_its_budget(origin: ScriptedOrigin, tmp_path: Path) -> None:
    payload = os.urandom(20_000)
    for i in range(30):
        origin.reply(f"/o{i}", payload, cache_control="max-age=300")
    async with running_edge(disk_config(origin, tmp_path, disk_size=200_000)) as edge:
        for i in range(30):
            await get(edge, f"/o{i}")
        cache = cache_of(edge)
        assert cache.disk is not None
        await cache.disk.flush()  # the sweeps started by the writes have run
        cache.disk.sweep()  # and one after the last write
    total, metas = disk_usage(tmp_path)
    assert total <= 200_000  # over the budget, a sweep cuts down to 90% of it
    assert 0 < metas < 30  # the least recently used went


async def test_a_corrupt_disk_entry_is_dropped_not_fatal(origin: ScriptedOrigin, tmp_path: Path) -> None:
    origin.reply("/c", "fine", cache_control="max-age=300")
    async with running_edge(disk_config(origin, tmp_path)) as edge:
        await get(edge, "/c")
        cache = cache_of(edge)
        assert cache.disk is not None
        await cache.disk.flush()
    corrupt_metas(tmp_path)
    async with running_edge(disk_config(origin, tmp_path)) as edge:
        body, status, _ = await get(edge, "/c")
        assert body == b"fine" and "fwd=uri-miss" in status
    assert len(origin.seen("/c")) == 2
