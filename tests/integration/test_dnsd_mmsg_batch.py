"""The mmsg UDP engine (dnsd's default on Linux): every answer of a batch goes to its own sender.

One recvmmsg returns every queued datagram; datagrams that get no answer (a
response sent to us, answered with silence) leave gaps between the answers
of the batch, so send header k no longer serves datagram k.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket

import dns.message
import pytest

from carousel.config import EtcdConfig
from tests.integration.test_dnsd_helpers import (
    WWW,
    Registry,
    addr,
    dnsd_toml,
    edge,
    has_ipv6_loopback,
    start_dnsd,
)
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(60)

SENDERS = 24


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_answers_of_one_batch_reach_their_own_senders_around_silent_ones(
    etcd_cfg: EtcdConfig, procs: ProcessGroup, host: str
) -> None:
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    registry = Registry(etcd_cfg)  # its leases hold the records: closed at the end
    await registry.put_all([edge(1), edge(2), edge(3)])
    dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg, ipv6=host == "::1"))
    port = dnsd.port_for(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    senders = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(SENDERS)]
    try:
        for rnd in range(3):
            expected: dict[int, int] = {}
            # Sent back to back, so they queue up while dnsd answers: one or a few batches.
            for k, s in enumerate(senders):
                query = dns.message.make_query(WWW, "A")
                query.id = rnd * 1000 + k
                wire = bytearray(query.to_wire())
                if k % 3 == 1:
                    wire[2] |= 0x80  # QR set: a response, which dnsd must not answer
                else:
                    expected[k] = query.id
                s.sendto(bytes(wire), (host, port))
            for k, want in expected.items():
                senders[k].settimeout(3.0)
                msg = dns.message.from_wire(senders[k].recv(4096))
                assert msg.id == want, (rnd, k, msg.id)
                assert sorted(rr.address for rr in msg.answer[0]) == [addr(1), addr(2), addr(3)]
            await asyncio.sleep(0.2)
            for s in senders:
                s.setblocking(False)
                with pytest.raises(BlockingIOError):  # no second answer, none for the silent ones
                    s.recv(4096)
                s.setblocking(True)
    finally:
        for s in senders:
            s.close()
        await registry.close()


async def test_the_receive_loop_runs_compiled_when_built_and_in_python_when_asked(
    etcd_cfg: EtcdConfig, procs: ProcessGroup
) -> None:
    """The compiled loop (dnsd/_udploop.c) serves when it was built, unless CAROUSEL_PURE_PYTHON=1."""
    registry = Registry(etcd_cfg)
    await registry.put_all([edge(1), edge(2)])
    try:
        dnsd = start_dnsd(procs, "dnsd", dnsd_toml(etcd_cfg))
        built = importlib.util.find_spec("dnsd._udploop") is not None
        want = "compiled" if built and not os.environ.get("CAROUSEL_PURE_PYTHON") else "python"
        assert dnsd.status()["udp_loop"] == want
        port = dnsd.port_for("127.0.0.1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3.0)
            firsts = []
            for k in range(4):
                query = dns.message.make_query(WWW.upper(), "A")  # 0x20-style case: echoed as sent
                query.id = k
                s.sendto(query.to_wire(), ("127.0.0.1", port))
                msg = dns.message.from_wire(s.recv(4096))
                assert msg.id == k and msg.question[0].name.to_text() == WWW.upper() + "."
                firsts.append(msg.answer[0][0].address)
        assert firsts in ([addr(1), addr(2)] * 2, [addr(2), addr(1)] * 2)  # every query rotates
    finally:
        await registry.close()
