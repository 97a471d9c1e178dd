"""Fuzzing the answer function: >= 100,000 generated and mutated packets, no exception escapes.

Each hypothesis example builds one query (mostly well formed, aimed at names
we hold, with random header bits, types, classes, EDNS records and options),
then derives 99 mutants from it with a seeded RNG (byte flips, truncation,
insertion, count changes, splices). Every packet is answered over "UDP" and
"TCP" and the answer is checked:

* silence exactly when the header is unreadable or the message is a response;
* the ID and opcode are echoed, QR is set, RA is clear;
* the question, when echoed, is byte for byte the client's;
* UDP answers fit 512 bytes, or the client's EDNS size up to ours;
* error answers are never bigger than the query plus an OPT record (no amplification);
* dnspython can parse every answer.

A second table without rotating answers is used for a differential check:
the fast path must return exactly the bytes the careful slow path returns.
"""

from __future__ import annotations

import random
import struct

import dns.exception
import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carousel.registry import ServiceRecord
from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.config import NSConfig, RecordConfig, ZoneConfig
from dnsd.respond import Answerer
from dnsd.zone import compile_zones

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MUTANTS = 99
EXAMPLES = 1100  # x (1 + MUTANTS) packets >= 100,000 even if hypothesis stops a little early
MIN_PACKETS = 100_000

ZONES = compile_zones(
    [
        ZoneConfig(
            origin="example.test",
            ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
            services={"www": "edge", "@": "edge"},
            record=[
                RecordConfig("mail", "A", "192.0.2.25"),
                RecordConfig("@", "MX", "10 mail"),
                RecordConfig("alias", "CNAME", "www"),
                RecordConfig("big", "TXT", "y" * 700),
            ],
        )
    ]
)
# 40 edges with the cap at 40: www answers exceed 512 bytes without EDNS (A: 640 bytes,
# AAAA: 1,120), so truncation is exercised as often as the plain answers.
RECORDS = [
    ServiceRecord("edge", f"e{i}", 80, ipv4=(f"10.0.0.{i}",), ipv6=(f"fd00::{i}",)) for i in range(1, 41)
]
TABLE = TableBuilder(ZONES, max_answer_records=40).build(RECORDS, 99)
STATIC_TABLE = TableBuilder(ZONES).build([], 7)  # no rotating answers: order-free comparisons
NAMES = [b"www", b"WwW", b"example", b"ExAmPlE", b"test", b"TEST", b"mail", b"alias", b"big", b"nope", b"org"]
COMMON_TYPES = [1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 65, 251, 252, 253, 254, 255, 257]

labels = st.one_of(st.sampled_from(NAMES), st.binary(min_size=0, max_size=70))
names = st.lists(labels, min_size=0, max_size=6).map(
    lambda ls: b"".join(bytes((len(x) & 0xFF,)) + x for x in ls) + b"\x00"
)
tails = st.one_of(
    st.sampled_from([b"\x03www\x07example\x04test\x00", b"\x07example\x04test\x00",
                     b"\x03big\x07example\x04test\x00"]),
    names,
)  # fmt: skip
u16 = st.integers(0, 0xFFFF)


@st.composite
def opt_records(draw: st.DrawFn) -> bytes:
    options = draw(st.lists(st.tuples(u16, st.binary(max_size=20)), max_size=3))
    rdata = b"".join(struct.pack("!HH", c, len(d)) + d for c, d in options)
    if draw(st.booleans()):
        rdata = rdata[: draw(st.integers(0, len(rdata)))] + draw(st.binary(max_size=3))
    owner = draw(st.sampled_from([b"\x00", b"\x00", b"\x00", b"\x01a\x00", b"\xc0\x0c"]))
    version = draw(st.sampled_from([0, 0, 0, 1, 255]))
    ttl = (draw(st.integers(0, 255)) << 24) | (version << 16) | draw(u16)
    rdlen = len(rdata) if draw(st.integers(0, 9)) else draw(u16)
    payload = draw(st.one_of(st.sampled_from([0, 512, 600, 1232, 1400, 4096]), u16))
    return owner + struct.pack("!HHIH", 41, payload, ttl, rdlen) + rdata


REAL_NAMES = [b"\x03www\x07example\x04test\x00", b"\x07example\x04test\x00",
              b"\x03big\x07example\x04test\x00", b"\x04mail\x07example\x04test\x00",
              b"\x05alias\x07example\x04test\x00", b"\x04nope\x07example\x04test\x00",
              b"\x03www\x07example\x03org\x00"]  # fmt: skip


@st.composite
def realistic_queries(draw: st.DrawFn) -> bytes:
    """What resolvers and stubs send: valid, any case, EDNS or not."""
    name = bytearray(draw(st.sampled_from(REAL_NAMES)))
    mask = draw(st.integers(0, 2**32 - 1))
    for i, c in enumerate(name):
        if 0x61 <= c <= 0x7A and mask >> (i % 32) & 1:
            name[i] = c - 0x20  # 0x20 randomisation
    flags = draw(st.sampled_from([0x0100, 0x0000, 0x0120, 0x0110, 0x0130]))
    qtype = draw(st.sampled_from([1, 1, 28, 28, 16, 6, 2, 15, 255, 65, 5, 99]))
    opt = b""
    if draw(st.booleans()):
        payload = draw(st.sampled_from([0, 512, 600, 1232, 1400, 4096]))
        options = draw(st.lists(st.tuples(u16, st.binary(max_size=12)), max_size=2))
        rdata = b"".join(struct.pack("!HH", c, len(d)) + d for c, d in options)
        ttl = 0x8000 if draw(st.booleans()) else 0
        opt = b"\x00" + struct.pack("!HHIH", 41, payload, ttl, len(rdata)) + rdata
    header = struct.pack("!HHHHHH", draw(u16), flags, 1, 0, 0, 1 if opt else 0)
    return header + bytes(name) + struct.pack("!HH", qtype, 1) + opt


@st.composite
def wild_queries(draw: st.DrawFn) -> bytes:
    """Anything near a query: odd header bits and counts, random labels, broken OPT records."""
    flags = draw(st.sampled_from([0x0100, 0x0000, 0x0120, 0x0110])) if draw(st.integers(0, 4)) else draw(u16)
    opts = draw(st.lists(opt_records(), max_size=2)) if draw(st.booleans()) else []
    counts = (
        (1, 0, 0, len(opts))
        if draw(st.integers(0, 5))
        else tuple(draw(st.lists(st.integers(0, 3), min_size=4, max_size=4)))
    )
    qtype = draw(st.sampled_from(COMMON_TYPES)) if draw(st.integers(0, 3)) else draw(u16)
    qclass = 1 if draw(st.integers(0, 5)) else draw(u16)
    name = draw(tails) if draw(st.booleans()) else draw(names) + draw(tails)
    body = name + struct.pack("!HH", qtype, qclass) + b"".join(opts)
    if not draw(st.integers(0, 9)):
        body += draw(st.binary(min_size=1, max_size=8))
    return struct.pack("!HHHHHH", draw(u16), flags, *counts) + body  # fmt: skip


queries = st.one_of(realistic_queries(), wild_queries())


def mutate(packet: bytes, rng: random.Random) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            del data[rng.randrange(len(data) + 1) :]
        elif op == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 3 and len(data) >= 12:
            struct.pack_into("!H", data, rng.choice([4, 6, 8, 10]), rng.choice([0, 1, 2, 0xFFFF]))
        elif op == 4 and len(data) >= 4:
            data[2] = rng.randrange(256)
            data[3] = rng.randrange(256)
        elif op == 5 and data:
            at = rng.randrange(len(data))
            data[at:at] = data[at : at + rng.randint(1, 16)]
    return bytes(data)


def client_payload(packet: bytes) -> int:
    """The EDNS size the client advertised, read by dnspython (65535 if it cannot tell)."""
    try:
        msg = dns.message.from_wire(packet)
    except Exception:  # a packet dnspython rejects: only our own ceiling applies
        return 65535
    return msg.payload if msg.edns >= 0 else 512


def check(answerer: Answerer, packet: bytes) -> None:
    for udp in (True, False):
        response, key = answerer.respond(packet, TABLE, udp)
        assert isinstance(key, bytes)
        if len(packet) < 12 or packet[2] & 0x80:
            assert response is None
            continue
        assert response is not None and len(response) >= 12
        assert response[:2] == packet[:2]
        assert response[2] & wire.QR
        assert (response[2] >> 3) & 0x0F == (packet[2] >> 3) & 0x0F
        assert not response[3] & 0x80  # RA
        qdcount = struct.unpack_from("!H", response, 4)[0]
        assert qdcount in (0, 1)
        rcode = response[3] & 0x0F
        if qdcount:
            end = response.index(0, 12) + 5
            assert response[12:end] == packet[12:end]
        if udp:
            assert len(response) <= 1232
            has_opt = struct.unpack_from("!H", response, 10)[0] > 0 and response[-11:-8] == b"\x00\x00\x29"
            if not has_opt:
                assert len(response) <= 512
            else:
                assert len(response) <= max(512, min(client_payload(packet), 1232))
            if rcode not in (wire.NOERROR, wire.NXDOMAIN):
                assert len(response) <= len(packet) + 11
            if (packet[2] >> 3) & 0x0F != 5:  # dnspython reads UPDATE replies as updates
                try:
                    dns.message.from_wire(response)
                except dns.exception.DNSException as exc:
                    raise AssertionError(f"unparseable answer {response.hex()} to {packet.hex()}") from exc
    fast, _ = answerer.respond(packet, STATIC_TABLE, True)
    slow, _ = answerer._slow(packet, STATIC_TABLE, True)
    assert fast == slow, (packet.hex(), fast, slow)


def test_fuzzed_packets_never_raise_and_get_sane_answers() -> None:
    answerer = Answerer()
    seen = [0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(base=queries, seed=st.integers(0, 2**32 - 1))
    def run(base: bytes, seed: int) -> None:
        rng = random.Random(seed)
        check(answerer, base)
        for _ in range(MUTANTS):
            check(answerer, mutate(base, rng))
        seen[0] += 1 + MUTANTS

    run()
    print(f"fuzzed {seen[0]} packets")
    assert seen[0] >= MIN_PACKETS
