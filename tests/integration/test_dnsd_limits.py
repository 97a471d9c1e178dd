"""dnsd defences, live: RRL with slip, TCP limits and timeouts, fuzzed packets, clean shutdown."""

from __future__ import annotations

import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import pytest

from carousel.config import EtcdConfig
from tests.integration.test_dnsd_helpers import WWW, Dnsd, Registry, addr, dnsd_toml, edge, start_dnsd
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(90)

FLOODER = "127.0.0.1"  # 127.0.0.0/24
BYSTANDER = "127.0.1.1"  # 127.0.1.0/24: loopback answers the whole 127/8 on Linux


@pytest.fixture
async def three_edges(etcd_cfg: EtcdConfig):  # type: ignore[no-untyped-def]
    reg = Registry(etcd_cfg)
    await reg.put_all([edge(1), edge(2), edge(3)])
    yield reg
    await reg.close()


def udp_socket(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    return s


def flood(dnsd: Dnsd, count: int, seconds: float) -> Counter[str]:
    """Send ``count`` queries from FLOODER spread over ``seconds``; classify what comes back."""
    query = dns.message.make_query(WWW, "A").to_wire()
    got: Counter[str] = Counter()
    done = threading.Event()

    def receive(s: socket.socket) -> None:
        # Read while sending, or the client's own buffer would drop answers.
        s.settimeout(0.5)
        while True:
            try:
                data, _ = s.recvfrom(4096)
            except TimeoutError:
                if done.is_set():
                    return
                continue
            msg = dns.message.from_wire(data)
            got["truncated" if msg.flags & dns.flags.TC else "answered"] += 1

    with udp_socket(FLOODER) as s:
        receiver = threading.Thread(target=receive, args=(s,))
        receiver.start()
        for i in range(count):
            s.sendto(query, ("127.0.0.1", dnsd.port))
            if i % 10 == 9:
                time.sleep(seconds / count * 10)
        done.set()
        receiver.join(10)
    got["silent"] = count - got["answered"] - got["truncated"]
    return got


def bystander(dnsd: Dnsd, count: int, per_second: float, results: list[str]) -> None:
    """A normal client in another /24, well within its allowance: one query at a time."""
    with udp_socket(BYSTANDER) as s:
        s.settimeout(1.0)
        for _ in range(count):
            query = dns.message.make_query(WWW, "A")
            s.sendto(query.to_wire(), ("127.0.0.1", dnsd.port))
            try:
                r = dns.message.from_wire(s.recvfrom(4096)[0])
                ok = r.id == query.id and not r.flags & dns.flags.TC and len(r.answer[0]) == 3
                results.append("ok" if ok else "truncated")
            except TimeoutError:
                results.append("timeout")
            time.sleep(1 / per_second)


def test_rrl_limits_a_flooding_prefix_with_slip_while_others_keep_full_service(
    etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup
) -> None:
    rrl = {"enabled": True, "responses_per_second": 50, "window": 2, "slip": 2}
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg, rrl=rrl))
    results: list[str] = []
    other = threading.Thread(target=bystander, args=(dnsd, 40, 20, results))
    other.start()
    got = flood(dnsd, 2000, 2.0)  # ~1000 qps for 2 s against a limit of 50/s
    other.join(30)
    print(f"flood from {FLOODER}: {dict(got)}; bystander: {dict(Counter(results))}")
    # The flooder got its initial credit and then nothing but limited answers ...
    assert got["answered"] <= 50 + 50 * 3
    limited = got["truncated"] + got["silent"]
    assert limited >= 1750
    # ... about half of which slipped out truncated (TC=1), the rest dropped.
    assert 0.4 <= got["truncated"] / limited <= 0.6
    # The other /24 saw no difference at all.
    assert results == ["ok"] * 40
    assert dnsd.metric("dnsd_rrl_dropped_total") >= 700
    assert dnsd.metric("dnsd_rrl_slipped_total") >= 700
    # The limited prefix still gets full answers over TCP (where a slip sends it).
    r = dnsd.query(WWW, "A", tcp=True)
    assert sorted(rr.address for rr in r.answer[0]) == [addr(1), addr(2), addr(3)]


def _connect(dnsd: Dnsd, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(3)
    s.connect(("127.0.0.1", dnsd.port))
    return s


def _closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _ask(s: socket.socket) -> dns.message.Message:
    raw = dns.message.make_query(WWW, "A").to_wire()
    s.sendall(struct.pack("!H", len(raw)) + raw)
    size = struct.unpack("!H", s.recv(2))[0]
    data = b""
    while len(data) < size:
        data += s.recv(size - len(data))
    return dns.message.from_wire(data)


def test_tcp_idle_timeout(etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup) -> None:
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg, dns={"tcp_idle_timeout": 0.5}))
    silent = _connect(dnsd, "127.0.0.1")
    start = time.monotonic()
    assert _closed_by_server(silent, 3)
    assert 0.4 <= time.monotonic() - start <= 1.5
    talker = _connect(dnsd, "127.0.0.1")
    for _ in range(4):  # activity keeps it open past the timeout
        assert len(_ask(talker).answer[0]) == 3
        time.sleep(0.3)
    assert _closed_by_server(talker, 3)
    assert dnsd.metric("dnsd_tcp_idle_closed_total") == 2


def test_tcp_connection_limits_per_client_and_in_total(
    etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup
) -> None:
    dns_cfg = {"tcp_max_connections": 5, "tcp_max_connections_per_client": 3}
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg, dns=dns_cfg))
    mine = [_connect(dnsd, "127.0.0.1") for _ in range(3)]
    for s in mine:
        assert len(_ask(s).answer[0]) == 3
    fourth = _connect(dnsd, "127.0.0.1")
    assert _closed_by_server(fourth, 2)  # per-client limit
    others = [_connect(dnsd, "127.0.2.1") for _ in range(2)]
    for s in others:
        assert len(_ask(s).answer[0]) == 3
    sixth = _connect(dnsd, "127.0.3.1")
    assert _closed_by_server(sixth, 2)  # total limit
    mine.pop().close()
    time.sleep(0.2)
    again = _connect(dnsd, "127.0.3.1")  # room again
    assert len(_ask(again).answer[0]) == 3
    assert dnsd.metric("dnsd_tcp_rejected_total") == 2
    for s in [*mine, *others, fourth, sixth, again]:
        s.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_tcp_client_that_never_reads_is_paused_not_buffered(
    etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup
) -> None:
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg, dns={"tcp_max_pending_bytes": 65536}))
    before = _rss_kib(dnsd.daemon.pid)
    raw = dns.message.make_query(WWW, "A").to_wire()
    frame = struct.pack("!H", len(raw)) + raw
    s = _connect(dnsd, "127.0.0.1")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(2)
    sent = 0
    # The server stops reading once 64 KiB of answers wait for this client, so the
    # kernel buffers fill and our send blocks: backpressure reaches the client.
    with pytest.raises(TimeoutError):
        for _ in range(200_000):  # up to 700 MB of queries: far beyond any kernel buffer
            s.sendall(frame * 100)
            sent += 100
    grown = _rss_kib(dnsd.daemon.pid) - before
    print(f"client stalled after {sent} queries; dnsd RSS grew {grown} KiB")
    assert grown < 20_000  # the answers to all those queries were not piled up in memory
    assert sorted(dnsd.addresses()) == [addr(1), addr(2), addr(3)]  # others unaffected
    s.close()


def test_live_server_survives_fuzzed_packets(
    etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup
) -> None:
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg))
    rng = random.Random(20240611)
    seeds = [dns.message.make_query(n, t, use_edns=e).to_wire() for n, t, e in
             [(WWW, "A", -1), ("ExAmPle.TEST", "SOA", 0), ("nope.example.test", "AAAA", 0)]]  # fmt: skip
    packets = []
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3) if data else 2
            if op == 0:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                del data[rng.randrange(len(data)) :]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        packets.append(bytes(data))
    packets += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 600))) for _ in range(1000)]
    with udp_socket("127.0.0.1") as s:
        for i, p in enumerate(packets):
            s.sendto(p, ("127.0.0.1", dnsd.port))
            if i % 200 == 0:
                time.sleep(0.01)
    for p in packets[:200]:  # the same over TCP, one connection each
        with socket.create_connection(("127.0.0.1", dnsd.port), timeout=2) as c:
            c.sendall(struct.pack("!H", len(p)) + p)
    assert sorted(dnsd.addresses()) == [addr(1), addr(2), addr(3)]
    assert len(dnsd.query(WWW, "A", tcp=True).answer[0]) == 3
    assert dnsd.daemon.running()
    assert "query failed" not in dnsd.daemon.output()


def test_sigterm_stops_cleanly_with_clients_connected(
    etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup
) -> None:
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg))
    client = _connect(dnsd, "127.0.0.1")
    assert len(_ask(client).answer[0]) == 3
    dnsd.daemon.signal(signal.SIGTERM)
    assert dnsd.daemon.wait(10) == 0
    assert _closed_by_server(client, 2)
    out = dnsd.daemon.output()
    assert '"dnsd stopping"' in out and '"dnsd stopped"' in out
    assert "Traceback" not in out


@pytest.mark.parametrize("engine", ["thread", "asyncio"])  # "mmsg", the default, runs everywhere else
def test_other_udp_engines_answer_rotate_and_limit(
    etcd_cfg: EtcdConfig, three_edges: Registry, procs: ProcessGroup, engine: str
) -> None:
    rrl = {"enabled": True, "responses_per_second": 50, "window": 2, "slip": 2}
    config = dnsd_toml(etcd_cfg, dns={"udp_engine": engine, "max_answer_records": 3}, rrl=rrl)
    dnsd = start_dnsd(procs, "dnsd", config)
    firsts = [dnsd.addresses()[0] for _ in range(3)]
    assert sorted(firsts) == [addr(1), addr(2), addr(3)]
    got = flood(dnsd, 1000, 1.0)
    print(f"{engine} engine, flood: {dict(got)}")
    assert got["answered"] <= 50 + 50 * 2  # minus the 3 rotation queries' credit
    assert got["truncated"] > 300 and got["silent"] > 300
