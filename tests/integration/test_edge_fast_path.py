"""Answering at once: hits, bans and fixed responses need no task; what that must not change.

The edge tries each feature's synchronous ``now`` first (edge/pipeline.py) and
sends a hit's stored fields as serialised when stored (``Reply``). These tests
pin what a user can observe: which requests take no task, that a user feature
still sees and changes every field of a hit, that member identity and hidden
fields never reach a client from the cache (memory or disk), and that the
lazily moved keep-alive timer still closes idle connections on time.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from edge.core.pipeline import Exchange, Handler, NowHandler, Reply
from edge.front.deadlines import DEADLINE_SLOT, WHEELS
from edge.front.server import Edge
from edge.testing import raw_request, read_response, running_edge
from edge.testing.cache import ScriptedOrigin, edge_config, origin_and_edge

pytestmark = pytest.mark.timeout(60)


def count_tasks(edge: Edge) -> list[int]:
    """Count the tasks the edge starts for requests from now on."""
    spawned = [0]
    spawn = edge.spawn

    def counting(coro: Any) -> None:
        spawned[0] += 1
        spawn(coro)

    edge.spawn = counting  # type: ignore[method-assign]
    return spawned


async def keep_alive_gets(port: int, path: str, count: int) -> list[tuple[int, dict[str, str]]]:
    """`count` GETs on one connection: (status, headers) each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for _ in range(count):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: fast.test\r\n\r\n".encode())
            resp = await asyncio.wait_for(read_response(reader), 5)
            out.append((resp.status, dict(resp.headers)))
    finally:
        writer.close()
    return out


async def test_hits_and_fixed_responses_take_no_task_misses_do() -> None:
    extra = {"route": [{"path": "/fixed", "respond": 200, "body": "fixed"}]}
    async with origin_and_edge() as (origin, edge):
        origin.reply("/hit", "cached", cache_control="max-age=60")
        spawned = count_tasks(edge)
        (first,) = await keep_alive_gets(edge.port, "/hit", 1)
        assert "fwd=uri-miss" in first[1]["cache-status"]
        assert spawned[0] == 1  # the miss waited for the origin in a task
        hits = await keep_alive_gets(edge.port, "/hit", 50)
        assert all(s == 200 and h["cache-status"].startswith("carousel; hit") for s, h in hits)
        assert spawned[0] == 1  # fifty hits, not one more task
        assert len(origin.seen("/hit")) == 1
    async with running_edge(extra) as edge:
        spawned = count_tasks(edge)
        answers = await keep_alive_gets(edge.port, "/fixed", 20)
        assert [s for s, _ in answers] == [200] * 20 and spawned[0] == 0


class FieldsFeature:
    """A user feature that reads a stored field and removes another, with or without `now`."""

    def __init__(self, synchronous: bool) -> None:
        if synchronous:
            self.now = self._now

    def _touch(self, reply: Reply) -> Reply:
        reply.headers["X-Seen-ETag"] = reply.headers.get("ETag", "none")
        reply.headers.popall("X-Drop", None)
        return reply

    def _now(self, ex: Exchange, call_next: NowHandler) -> Reply | None:
        reply = call_next(ex)
        return None if reply is None else self._touch(reply)

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        return self._touch(await call_next(ex))


def async_fields(config: object, ctx: object) -> FieldsFeature:
    return FieldsFeature(synchronous=False)


def sync_fields(config: object, ctx: object) -> FieldsFeature:
    return FieldsFeature(synchronous=True)


@pytest.mark.parametrize("factory", ["async_fields", "sync_fields"])
async def test_a_user_feature_sees_and_changes_every_stored_field_of_a_hit(factory: str) -> None:
    extra = {"edge": {"features": [f"tests.integration.test_edge_fast_path:{factory}"]}}
    async with origin_and_edge(extra=extra) as (origin, edge):
        origin.reply("/f", "body", cache_control="max-age=60", etag='"v1"', x_drop="gone", x_keep="kept")
        for status, headers in await keep_alive_gets(edge.port, "/f", 3):
            assert status == 200
            assert headers["x-seen-etag"] == '"v1"' and headers["x-keep"] == "kept"
            assert "x-drop" not in headers
        assert headers["cache-status"].startswith("carousel; hit")  # the last two were hits
        assert len(origin.seen("/f")) == 1


async def test_member_identity_and_hidden_fields_never_reach_a_client_from_the_cache() -> None:
    extra = {"edge": {"hide_headers": ["X-Secret"], "server_header": "edge-under-test"}}
    async with origin_and_edge(extra=extra) as (origin, edge):
        origin.reply(
            "/id", "x", cache_control="max-age=60", server="origin/1.0", x_powered_by="php", x_secret="s3"
        )
        answers = await keep_alive_gets(edge.port, "/id", 3)
        for _, headers in answers:
            assert headers["server"] == "edge-under-test"
            assert "x-powered-by" not in headers and "x-secret" not in headers
        assert answers[-1][1]["cache-status"].startswith("carousel; hit")
        raw = await raw_request(edge.port, b"GET /id HTTP/1.1\r\nHost: fast.test\r\n\r\n")
        assert raw is not None and [v for k, v in raw.headers if k == "server"] == ["edge-under-test"]


async def test_disk_entries_stored_under_other_hidden_fields_are_cleaned_on_load(tmp_path: Path) -> None:
    origin = ScriptedOrigin()
    await origin.start()
    try:
        origin.reply("/old", "kept on disk", cache_control="max-age=300", x_secret="s3", x_other="o")
        before = edge_config(origin.port, {"disk_dir": str(tmp_path)})
        async with running_edge(before) as edge:
            [(_, headers)] = await keep_alive_gets(edge.port, "/old", 1)
            assert headers["x-secret"] == "s3"  # nothing hid it then
        after = {**before, "edge": {"hide_headers": ["X-Secret"]}}
        async with running_edge(after) as edge:
            answers = await keep_alive_gets(edge.port, "/old", 2)
        for _, headers in answers:
            assert headers["cache-status"].startswith("carousel; hit")
            assert "x-secret" not in headers and headers["x-other"] == "o"
        assert len(origin.seen("/old")) == 1
    finally:
        await origin.stop()


async def test_a_busy_keep_alive_connection_stays_open_and_closes_on_time_once_idle() -> None:
    cfg = {"route": [{"path": "/", "respond": 200, "body": "ok"}], "edge": {"keepalive_timeout": 1.0}}
    async with running_edge(cfg) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        # Two seconds of requests 0.3 s apart: twice the idle timeout, never idle that long.
        for _ in range(7):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(read_response(reader), 3)).status == 200
            await asyncio.sleep(0.3)
        last = time.monotonic() - 0.3
        assert await asyncio.wait_for(reader.read(1), 3) == b""  # closed by the edge
        assert 0.9 < time.monotonic() - last < 1.6
        writer.close()


async def test_a_hit_whose_stored_field_would_smuggle_a_line_is_refused() -> None:
    """A stored value that would smuggle a line (set by a feature before storing) is a 502."""
    async with origin_and_edge() as (origin, edge):
        origin.reply("/bad", "x", cache_control="max-age=60")
        await keep_alive_gets(edge.port, "/bad", 1)
        cache = next(f for f in edge.features if hasattr(f, "store"))
        (entry,) = cache.store.index["http://fast.test/bad"]
        entry.set_headers([*entry.fields, ("X-Evil", "a\r\nSet-Cookie: stolen=1")])
        [(status, headers)] = await keep_alive_gets(edge.port, "/bad", 1)
        assert status == 502 and "set-cookie" not in headers and "x-evil" not in headers


async def test_a_client_that_does_not_read_is_not_answered_into_an_unbounded_buffer() -> None:
    body = "x" * (1 << 20)
    cfg = {"route": [{"path": "/", "respond": 200, "body": body}]}
    async with running_edge(cfg) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        buffered = []
        for _ in range(40):  # one request at a time, each after the edge had time to answer
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.02)
            (conn,) = edge.connections
            assert conn.transport is not None
            buffered.append(conn.transport.get_write_buffer_size())
        # 40 MiB asked for; held back once the kernel and one response's worth are full.
        assert max(buffered) < 3 * len(body)
        # And every answer still arrives once the client reads.
        for _ in range(40):
            resp = await asyncio.wait_for(read_response(reader), 10)
            assert resp.status == 200 and len(resp.body) == len(body)
        writer.close()


async def exchange(port: int, requests: list[tuple[str, str, dict[str, str]]]) -> list[Any]:
    """(method, path, extra fields) requests on one keep-alive connection: the responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for method, path, fields in requests:
            extra = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: files.test\r\n{extra}\r\n".encode())
            out.append(await asyncio.wait_for(read_response(reader, head=method == "HEAD"), 5))
    finally:
        writer.close()
    return out


async def test_static_files_from_memory_take_no_task_and_follow_the_file_on_disk(tmp_path: Path) -> None:
    small = tmp_path / "a.css"
    small.write_bytes(b"body { color: red }\n")
    big = os.urandom(200 * 1024)  # past the in-memory limit: opened when written, sendfile
    (tmp_path / "big.bin").write_bytes(big)
    cfg = {"route": [{"path": "/s/", "static": str(tmp_path)}]}
    async with running_edge(cfg) as edge:
        spawned = count_tasks(edge)
        first, second, head = await exchange(
            edge.port, [("GET", "/s/a.css", {}), ("GET", "/s/a.css", {}), ("HEAD", "/s/a.css", {})]
        )
        for resp in (first, second, head):
            assert resp.status == 200
            assert resp.header("content-type") == "text/css; charset=utf-8"
            assert resp.header("content-length") == "20" and resp.header("accept-ranges") == "bytes"
            assert resp.header("etag") and resp.header("last-modified") and resp.header("date")
            assert [k for k, _ in resp.headers].count("content-type") == 1
        assert first.body == second.body == b"body { color: red }\n" and head.body == b""
        etag, modified = first.header("etag"), first.header("last-modified")
        assert etag is not None and modified is not None
        not_modified, since, part, beyond = await exchange(
            edge.port,
            [
                ("GET", "/s/a.css", {"If-None-Match": etag}),
                ("GET", "/s/a.css", {"If-Modified-Since": modified}),
                ("GET", "/s/a.css", {"Range": "bytes=0-3"}),
                ("GET", "/s/a.css", {"Range": "bytes=50-"}),
            ],
        )
        assert (not_modified.status, since.status, not_modified.body) == (304, 304, b"")
        assert (part.status, part.body, part.header("content-range")) == (206, b"body", "bytes 0-3/20")
        assert (beyond.status, beyond.header("content-range")) == (416, "bytes */20")
        assert spawned[0] == 0  # every answer above came from memory inside data_received
        # The file changes on disk (same size, a later mtime): the next answer is the new file.
        small.write_bytes(b"body { color: blue}\n")
        later = os.stat(small).st_mtime_ns + 2_000_000_000
        os.utime(small, ns=(later, later))
        changed, stale = await exchange(
            edge.port, [("GET", "/s/a.css", {}), ("GET", "/s/a.css", {"If-None-Match": etag})]
        )
        assert changed.body == b"body { color: blue}\n" and changed.header("etag") != etag
        assert stale.status == 200 and stale.body == changed.body
        # A big file goes out from the disk, whole and in part; a removed file is 404.
        whole, tail = await exchange(
            edge.port, [("GET", "/s/big.bin", {}), ("GET", "/s/big.bin", {"Range": "bytes=1000-"})]
        )
        assert whole.body == big and (tail.status, tail.body) == (206, big[1000:])
        # Sent from a descriptor, from data_received too: the head and sendfile(2) for what the
        # socket takes at once; a task only for a rest that waits for the client (at most one
        # per answer; none when the socket took the file whole, the usual case on loopback).
        assert spawned[0] <= 2
        small.unlink()
        (gone,) = await exchange(edge.port, [("GET", "/s/a.css", {})])
        assert gone.status == 404


@pytest.mark.parametrize("factory", ["async_fields", "sync_fields"])
async def test_a_user_feature_sees_the_fields_of_a_static_file_and_a_fixed_answer(
    factory: str, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("text")
    cfg = {
        "edge": {"features": [f"tests.integration.test_edge_fast_path:{factory}"]},
        "route": [
            {"path": "/s/", "static": str(tmp_path)},
            {"path": "/fixed", "respond": 200, "body": "fixed", "content_type": "text/x-fixed"},
        ],
    }
    async with running_edge(cfg) as edge:
        for _ in range(2):
            static, fixed = await exchange(edge.port, [("GET", "/s/a.txt", {}), ("GET", "/fixed", {})])
            assert static.header("x-seen-etag") == static.header("etag") != "none"
            assert (static.body, fixed.body) == (b"text", b"fixed")
            assert fixed.header("content-type") == "text/x-fixed" and fixed.header("x-seen-etag") == "none"


async def test_idle_connections_share_one_deadline_timer_and_leave_it_when_closed() -> None:
    cfg = {"route": [{"path": "/", "respond": 200, "body": "ok"}], "edge": {"keepalive_timeout": 0.6}}
    async with running_edge(cfg) as edge:
        clients = []
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(read_response(reader), 3)).status == 200
            clients.append((reader, writer))
        served = time.monotonic()
        wheel = WHEELS[asyncio.get_running_loop()]
        filed = [conn for slot in wheel.slots.values() for conn in slot.members()]
        assert set(filed) == set(edge.connections) and len(filed) == 60  # each filed once, no timers
        # Ten clients leave first: their connections leave the wheel at once (nothing held).
        for _, writer in clients[:10]:
            writer.close()
        await asyncio.sleep(0.1)
        filed = [conn for slot in wheel.slots.values() for conn in slot.members()]
        assert len(filed) == len(edge.connections) == 50
        # The other fifty are closed by the edge at the idle timeout, 0.6 s plus one slot at most.
        for reader, _ in clients[10:]:
            assert await asyncio.wait_for(reader.read(1), 3) == b""
        assert 0.55 < time.monotonic() - served < 0.6 + DEADLINE_SLOT + 0.4
        for _, writer in clients[10:]:
            writer.close()
        await asyncio.sleep(0.3)
        assert not edge.connections and not any(slot.members() for slot in wheel.slots.values())
