"""Fuzz dnsd's query parser and responder: any datagram in, a well-formed answer or silence out.

The target is ``Answerer.respond(query, table, udp)``, the pure function
behind every UDP and TCP listener (dnsd/respond.py), over a table with
rotating answers, static records, a CNAME and an answer too big for 512
bytes, and over a table that knows nothing yet (service names answer
SERVFAIL, as after a refused registry snapshot). Checked for every input,
over "UDP" and "TCP":

* no exception of any kind escapes;
* an answer echoes the query's ID and is a response (QR=1), RA clear;
* a UDP answer fits our advertised EDNS payload size (1232 bytes);
* an error answer without answer records (no CNAME chain) is never bigger
  than the query plus an OPT record (no amplification).
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports(include=["dnsd"]):
    from dnsd.build import TableBuilder
    from dnsd.config import NSConfig, RecordConfig, ZoneConfig
    from dnsd.respond import Answerer
    from dnsd.table import AnswerTable
    from dnsd.zone import compile_zones

from carousel.registry import ServiceRecord
from fuzz.common import run

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
RECORDS = [ServiceRecord("edge", f"e{i}", 80, (f"10.0.0.{i}",), (f"fd00::{i}",)) for i in range(1, 41)]
TABLE = TableBuilder(ZONES, max_answer_records=40).build(RECORDS, 99)
# Nothing servable known and a refused snapshot: service names answer SERVFAIL.
UNKNOWN_TABLE = TableBuilder(ZONES, unknown_rcode=2).build([], 0, synced=False)
ANSWERER = Answerer()
PAYLOAD = 1232
OPT_RR = 11  # an OPT record with no options


class Violation(AssertionError):
    """An answer broke a rule; the fuzzer reports it as a crash with this message."""


def check(query: bytes, udp: bool, table: AnswerTable = TABLE) -> None:
    """Answer ``query`` and check the answer's invariants."""
    reply, _ = ANSWERER.respond(query, table, udp)
    if reply is None:
        return
    if len(query) < 12:
        raise Violation(f"answered a {len(query)}-byte query that has no full header")
    if reply[:2] != query[:2]:
        raise Violation("answer does not echo the query ID")
    flags = struct.unpack_from("!H", reply, 2)[0]
    if not flags & 0x8000 or flags & 0x0080:
        raise Violation(f"answer flags {flags:#06x}: QR clear or RA set")
    if udp and len(reply) > PAYLOAD:
        raise Violation(f"UDP answer of {len(reply)} bytes > {PAYLOAD}")
    rcode = flags & 0xF
    ancount = struct.unpack_from("!H", reply, 6)[0]
    # A SERVFAIL reached through a CNAME carries the chain (RFC 6604 3), as NXDOMAIN does.
    if rcode not in (0, 3) and not ancount and len(reply) > len(query) + OPT_RR:
        raise Violation(f"error answer (rcode {rcode}) of {len(reply)} bytes for a {len(query)}-byte query")


def test_one_input(data: bytes) -> None:
    """One fuzz input: the same bytes as a UDP and as a TCP query, and to a dnsd that knows nothing."""
    check(data, True)
    check(data, False)
    check(data, True, UNKNOWN_TABLE)


def _q(name: bytes, qtype: int, flags: int = 0x0100, opt: bytes = b"") -> bytes:
    header = struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, 1 if opt else 0)
    return header + name + struct.pack("!HH", qtype, 1) + opt


_OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0)
_COOKIE = b"\x00" + struct.pack("!HHIHHH", 41, 4096, 0, 12, 10, 8) + b"abcdefgh"
_NAMES = [b"\x03www\x07example\x04test\x00", b"\x07example\x04test\x00", b"\x04mail\x07example\x04test\x00",
          b"\x05alias\x07example\x04test\x00", b"\x03big\x07example\x04test\x00",
          b"\x04nope\x07example\x04test\x00", b"\x03WwW\x07ExAmPlE\x04TeSt\x00", b"\x03org\x00",
          b"\x03www\xc0\x0c"]  # fmt: skip
SEEDS = [
    _q(n, t, f, o)
    for n in _NAMES
    for t in (1, 28, 6, 2, 15, 16, 255, 252, 65)
    for f, o in ((0x0100, b""), (0x0100, _OPT), (0x0000, _COOKIE), (0x2800, b""))
]

if __name__ == "__main__":
    run("dns", test_one_input, SEEDS)
    sys.exit(0)
