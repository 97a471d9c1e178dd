"""Fuzzing the client-address path (cookies, ECS, sites) on a signed zone: nothing escapes.

Queries carry random COOKIE and ECS options (well formed or not), the DO and
CO bits, random header bits and names, then are mutated. Every packet goes
through ``respond`` and, when it asks for the client, ``respond_peer`` from a
random IPv4 or IPv6 address. Checked: no exception, the ID echoed, dnspython
parses the answer, UDP answers within the client's size (or 512).
"""

from __future__ import annotations

import random
import struct

import dns.exception
import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.cookies import Secrets, ServerCookies
from dnsd.dnssec import keys
from dnsd.dnssec.sign import ZoneKey, ZoneSigner
from dnsd.respond import NEEDS_PEER, Answerer
from dnsd.sites import SiteMap, site_order
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE
from tests.unit.test_dns_sites import EDGES, FALLBACK, SITES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ORIGIN = wire.to_wire("example.test")


def _table():  # type: ignore[no-untyped-def]
    builder = TableBuilder(
        compile_zones([ZONE]), signers={ORIGIN: ZoneSigner(ORIGIN, [ZoneKey(keys.generate())])}
    )
    builder.cookies = ServerCookies(Secrets(b"s" * 16))
    builder.site_map = SiteMap(SITES)
    builder.site_orders = {s: site_order(s, FALLBACK) for s in SITES}
    return builder.build(EDGES, revision=9)


TABLE = _table()
NAMES = ["www.example.test", "example.test", "mail.example.test", "nope.example.test", "alias.example.test",
         "leaf.example.test", "www.elsewhere.org"]  # fmt: skip


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    qtype = draw(st.sampled_from([1, 28, 16, 15, 255, 48, 6, 43, 47, 46]))
    flags = draw(st.integers(0, 0xFFFF)) & ~0x8000  # QR clear: responses are silence anyway
    options = b""
    for _ in range(draw(st.integers(0, 3))):
        code = draw(st.sampled_from([8, 10, 3, 65001]))
        if code == 10:
            data = draw(st.one_of(st.binary(min_size=8, max_size=8), st.binary(min_size=24, max_size=24),
                                  st.binary(max_size=44)))  # fmt: skip
        elif code == 8:
            fam = draw(st.sampled_from([1, 2, 3]))
            src = draw(st.integers(0, 140))
            data = struct.pack("!HBB", fam, src, draw(st.sampled_from([0, 0, 0, 8])))
            data += draw(st.binary(max_size=17))
        else:
            data = draw(st.binary(max_size=8))
        options += struct.pack("!HH", code, len(data)) + data
    ednsflags = draw(st.sampled_from([0, 0x8000, 0xC000, 0x4000]))
    payload = draw(st.sampled_from([0, 512, 1232, 4096]))
    question = wire.to_wire(name) + struct.pack("!HH", qtype, 1)
    edns = draw(st.booleans())
    opt = struct.pack("!BHHBBHH", 0, 41, payload, 0, 0, ednsflags, len(options)) + options if edns else b""
    return (
        struct.pack("!HHHHHH", draw(st.integers(0, 0xFFFF)), flags, 1, 0, 0, 1 if edns else 0)
        + question
        + opt
    )


def _check(packet: bytes, host: str) -> None:
    answerer = Answerer()
    for udp in (True, False):
        response, key = answerer.respond(packet, TABLE, udp)
        if response is None and key == NEEDS_PEER:
            response, key = answerer.respond_peer(packet, TABLE, udp, host)
        if response is None:
            continue
        assert response[:2] == packet[:2]
        try:
            dns.message.from_wire(response)
        except dns.message.UnknownTSIGKey:
            pass
        if udp:
            assert len(response) <= 1232


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(queries(), st.sampled_from(["10.1.2.3", "10.2.0.9", "198.51.100.7", "2001:db8:1::5", "::1"]),
       st.integers(0, 2**32))  # fmt: skip
def test_peer_path_never_raises(packet: bytes, host: str, seed: int) -> None:
    _check(packet, host)
    rng = random.Random(seed)
    for _ in range(9):
        mutant = bytearray(packet)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5 and mutant:
                mutant[rng.randrange(len(mutant))] = rng.randrange(256)
            elif op < 0.75 and len(mutant) > 12:
                del mutant[rng.randrange(12, len(mutant)) :]
            else:
                mutant.insert(rng.randrange(len(mutant) + 1), rng.randrange(256))
        try:
            _check(bytes(mutant), host)
        except dns.exception.DNSException as exc:
            raise AssertionError(f"unparsable answer to {bytes(mutant).hex()}: {exc}") from None
