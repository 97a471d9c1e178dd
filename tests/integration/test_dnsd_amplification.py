"""A spoofed UDP query must not buy a large answer: measure the worst answer/query size ratio."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import dns.edns
import dns.message
import pytest

from carousel.config import EtcdConfig
from carousel.etcdserver import EtcdProcess
from tests.integration.test_dnsd_helpers import ZONE, Dnsd, Registry, dnsd_toml, edge, start_dnsd, sync
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(60)
EDGES = 30  # more edges than fit in an answer
MAX_RECORDS = 8  # dnsd's default max_answer_records
# What an answer may add to the query: MAX_RECORDS AAAA records (28 bytes each with a
# compressed owner) plus room for an SOA in authority and an OPT record.
ALLOWANCE = MAX_RECORDS * 28 + 100


@pytest.fixture(scope="module")
def dnsd(shared_etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsd]:
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/amp-{uuid.uuid4().hex[:8]}/")

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in range(1, EDGES + 1)])
        await reg.etcd.close()

    sync(register())
    procs = ProcessGroup(tmp_path_factory.mktemp("dnsd-amp"))
    try:
        yield start_dnsd(procs, "dnsd-amp", dnsd_toml(cfg))  # RRL off: measure the answers themselves
    finally:
        procs.stop_all()


def udp_exchange(port: int, query: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query, ("127.0.0.1", port))
        return s.recv(65535)


@pytest.mark.parametrize("edns", [None, 4096], ids=["plain", "edns-4096"])
def test_worst_answer_to_query_ratio_is_small(dnsd: Dnsd, edns: int | None) -> None:
    port = dnsd.port_for("127.0.0.1")
    worst = (0.0, "")
    for name in (f"www.{ZONE}", ZONE, f"nope.{ZONE}", "outside.invalid"):
        for rdtype in ("A", "AAAA", "ANY", "NS", "SOA", "TXT", "MX"):
            msg = dns.message.make_query(name, rdtype, use_edns=edns is not None, payload=edns or 512)
            wire = msg.to_wire()
            answer = udp_exchange(port, wire)
            # Bounded by the record cap, however many edges are registered and whatever
            # payload size the (possibly spoofed) client advertises.
            assert len(answer) - len(wire) <= ALLOWANCE, (name, rdtype, len(answer))
            records = sum(len(rrset) for rrset in dns.message.from_wire(answer).answer)
            assert records <= MAX_RECORDS, (name, rdtype, records)
            ratio = len(answer) / len(wire)
            if ratio > worst[0]:
                worst = (ratio, f"{name} {rdtype}: {len(wire)} -> {len(answer)} bytes")
            if rdtype == "ANY":
                # RFC 8482: a minimal answer, never every record of the name.
                assert records <= 1, name
    print(f"worst amplification ({'EDNS 4096' if edns else 'no EDNS'}): {worst[0]:.1f}x ({worst[1]})")
