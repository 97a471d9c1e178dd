"""The node's shared parts (edge/core/node.py) across real forked processes: client table, bus, slots."""

from __future__ import annotations

import os
import time

import pytest

from edge.core.node import ClientTable, Node, Snapshots, client_hash


def _in_child(fn) -> int:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a forked child; its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_clients_rate_is_the_sum_over_the_workers_columns() -> None:
    table = ClientTable(workers=4, buckets=1024)
    h = client_hash("192.0.2.7")
    now = 1000.25  # a quarter into window 1000 (window = 1 s)

    def worker(index: int, hits: int) -> None:
        table.worker = index
        for _ in range(hits):
            table.hit(h, now)

    for index in (1, 2, 3):
        assert _in_child(lambda i=index: worker(i, 10)) == 0  # type: ignore[misc]
    table.worker = 0
    assert table.hit(h, now)[0] == pytest.approx(31.0)  # 3 x 10 in other processes, + this one
    # Next window: the previous one weighs what still overlaps (three quarters at 1001.25).
    assert table.hit(h, now + 1.0)[0] == pytest.approx(31 * 0.75 + 1)
    # Two windows later nothing is left of it.
    assert table.hit(h, now + 3.0)[0] == pytest.approx(1.0)
    # Another client is another row.
    assert table.hit(client_hash("192.0.2.8"), now + 3.0)[0] == pytest.approx(1.0)


def test_open_connections_are_per_node_and_a_restarted_worker_drops_its_own() -> None:
    table = ClientTable(workers=2, buckets=1024)
    h = client_hash("198.51.100.1")

    def worker1() -> None:
        table.worker = 1
        for _ in range(3):
            table.connect(h, 1)

    assert _in_child(worker1) == 0
    table.worker = 0
    assert table.connect(h, 1) == 4
    assert table.connections(h) == 4
    assert table.hit(h, time.monotonic())[1] == 4  # a request sees the node's connections too
    table.enter(1)  # worker 1 restarted: its connections died with it
    assert table.connections(h) == 1
    table.worker = 0
    assert table.connect(h, -1) == 0
    assert table.connect(h, -1) == 0  # never negative


def test_a_full_neighbourhood_leaves_a_client_uncounted_not_wrong() -> None:
    table = ClientTable(workers=1, buckets=8)
    now = 50.0
    for n in range(8):
        table.hit(client_hash(f"10.0.0.{n}"), now)
    before = table.full
    rates = {table.hit(client_hash(f"10.0.1.{n}"), now)[0] for n in range(4)}
    assert table.full > before and rates == {0.0}
    # Two windows later the old rows are stale and get reused.
    assert table.hit(client_hash("10.0.1.0"), now + 3.0)[0] == pytest.approx(1.0)


def test_snapshots_survive_the_writer_and_are_read_whole() -> None:
    slots = Snapshots(workers=2, slot_bytes=1 << 16)
    assert slots.read(1) is None

    def worker1() -> None:
        slots.write(1, {"pid": os.getpid(), "n": list(range(100))}, answer=7)

    assert _in_child(worker1) == 0
    snap = slots.read(1)
    assert snap is not None and snap["n"] == list(range(100)) and snap["pid"] != os.getpid()
    assert slots.answer(1) == 7
    assert not slots.write(0, {"big": b"x" * (1 << 17)}, answer=0)  # too large: refused, not torn
    assert slots.read(0) is None


def test_the_bus_reaches_every_other_worker_and_waits_for_a_restarted_one() -> None:
    node = Node(workers=3, max_clients=16)
    node.enter(0)
    assert node.bus.send_others({"t": "ban", "key": "192.0.2.1"}) == 2
    seen = []

    def worker(index: int) -> None:
        node.enter(index)
        deadline = time.monotonic() + 2
        got: list[dict[str, object]] = []
        while not got and time.monotonic() < deadline:
            got = node.bus.receive()
        assert got == [{"t": "ban", "key": "192.0.2.1"}], got

    for index in (1, 2):
        seen.append(_in_child(lambda i=index: worker(i)))  # type: ignore[misc]
    assert seen == [0, 0]
    node.enter(0)
    assert node.bus.receive() == []  # a sender never gets its own message
    node.bus.inboxes[0][1].send(b"not a pickle")  # into worker 0's inbox
    assert node.bus.receive() == []  # dropped, not raised
    with pytest.raises(ValueError):
        node.bus.send_others({"t": "x", "blob": b"x" * (1 << 17)})
