"""The compiled UDP loop's fast path (dnsd/_udploop.c) answers exactly as Answerer.respond does.

Two tables built alike from the same records: one is asked through the C fast
path (and, where it declines, through Answerer.respond, as the loop does), the
other through Answerer.respond alone. Every response and every rotation
counter must stay identical, query after query.
"""

from __future__ import annotations

import importlib.util
import random
import struct

import dns.edns
import dns.flags
import dns.message
import pytest

from dnsd.build import TableBuilder
from dnsd.respond import Answerer
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE, edges

if importlib.util.find_spec("dnsd._udploop") is None:
    pytest.skip("dnsd._udploop is not built (no C compiler at install, or CAROUSEL_PURE_PYTHON=1)",
                allow_module_level=True)  # fmt: skip

from dnsd import _udploop  # type: ignore[attr-defined]


def twin_tables(n: int = 12) -> tuple[AnswerTable, AnswerTable]:
    """Two equal tables (built by two builders from the same records, max 8 answers each)."""
    builders = [TableBuilder(compile_zones([ZONE]), max_answer_records=8) for _ in range(2)]
    return builders[0].build(edges(n), revision=7), builders[1].build(edges(n), revision=7)


def wire(name: str, rdtype: str = "A", *, edns: int = -1, do: bool = False, payload: int = 1232,
         rd: bool = True, cd: bool = False, qid: int = 0x1234) -> bytes:  # fmt: skip
    q = dns.message.make_query(name, rdtype, use_edns=edns, want_dnssec=do, payload=payload)
    q.id = qid
    q.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
    return q.to_wire()


def served(table: AnswerTable) -> list[int]:
    return [e.served for e in table.entries()]


def through_loop(table: AnswerTable, answerer: Answerer, query: bytes) -> tuple[bytes | None, bool]:
    """What the compiled loop sends for ``query`` (its fast path, else the Python path), and which."""
    fast = _udploop.answer(query, table)
    if fast is not None:
        return fast[0], True
    return answerer.respond(query, table, True)[0], False


def test_plain_and_edns_queries_are_answered_in_c_as_in_python() -> None:
    ours, ref = twin_tables()
    a, b = Answerer(), Answerer()
    cases = [
        wire("www.example.test"),
        wire("www.example.test", "AAAA"),
        wire("WwW.ExAmPlE.tEsT"),  # 0x20: the question is echoed as sent
        wire("www.example.test", edns=0),
        wire("www.example.test", edns=0, do=True),
        wire("wWw.example.TEST", "AAAA", edns=0, do=True, cd=True),
        wire("www.example.test", rd=False, cd=True),
        wire("mail.example.test"),
        wire("example.test", "SOA", edns=0),
        wire("example.test", "NS"),
        wire("www.example.test", "HTTPS"),  # 65 = 'A': its type bytes are not lowercased
        wire("WWW.example.test", "HTTPS", edns=0, do=True),
    ]
    for rnd in range(30):  # past the 12-step rotation twice
        for query in cases:
            got, fast = through_loop(ours, a, query)
            want, _ = b.respond(query, ref, True)
            assert got == want, (rnd, query)
            assert fast, f"the fast path declined a plain query: {query!r}"
        assert served(ours) == served(ref)


def test_every_other_query_is_left_to_the_python_path() -> None:
    ours, _ = twin_tables()
    before = served(ours)
    declined = [
        wire("nothere.example.test"),  # NXDOMAIN: not in the question index
        wire("www.example.test", "TXT"),
        wire("www.example.test", edns=1),  # EDNS version 1: BADVERS
        wire("www.example.test", edns=0, payload=512)[:-11] + b"",  # counts say one OPT, none there
        wire("big.example.test", "TXT"),  # over 512 bytes without EDNS: truncated by Python
        wire("big.example.test", "TXT", edns=0, payload=600),
        b"\x12\x34\x81\x00" + wire("www.example.test")[4:],  # QR set: a response
        b"\x12\x34\x29\x00" + wire("www.example.test")[4:],  # opcode UPDATE
        wire("www.example.test") + b"\x00",  # trailing garbage
        b"\x00\x01",
        b"\x00" * 11,
    ]
    option = dns.edns.GenericOption(65001, b"x")
    q = dns.message.make_query("www.example.test", "A", use_edns=0, options=[option])
    declined.append(q.to_wire())  # an option: the Python path checks it (cookies, ECS)
    for query in declined:
        assert _udploop.answer(query, ours) is None, query
    assert served(ours) == before  # declining moves no rotation


@pytest.mark.parametrize("n", [20, 100])  # 100: past MAX_FULL_PERIOD, header + question + body
def test_random_queries_match_the_python_path(n: int) -> None:
    rng = random.Random(1)
    ours, ref = twin_tables(n)
    a, b = Answerer(), Answerer()
    names = ["www", "WWW", "wWw", "mail", "alias", "v6", "@", "nothere", "big", "deep.leaf", "deep"]
    types = ["A", "AAAA", "TXT", "SOA", "NS", "MX", "ANY", "CNAME", "HTTPS", "SPF", "TYPE67"]
    for _ in range(3000):
        name = rng.choice(names)
        fqdn = "example.test" if name == "@" else f"{name}.example.test"
        query = bytearray(wire(
            fqdn, rng.choice(types),
            edns=rng.choice([-1, 0, 0, 1]), do=rng.random() < 0.5,
            payload=rng.choice([100, 512, 700, 1232, 4096]), rd=rng.random() < 0.5,
            cd=rng.random() < 0.3, qid=rng.randrange(65536),
        ))  # fmt: skip
        if rng.random() < 0.05:
            query[rng.randrange(len(query))] = rng.randrange(256)  # one corrupt byte
        if rng.random() < 0.03:
            del query[rng.randrange(12, len(query)) :]
        got, _ = through_loop(ours, a, bytes(query))
        want, _ = b.respond(bytes(query), ref, True)
        assert got == want, bytes(query)
    assert served(ours) == served(ref)


def test_rotation_counters_are_shared_with_the_python_path() -> None:
    """The fast path steps the same ``served`` counter the Python path reads: one rotation."""
    table, _ = twin_tables(5)
    python = Answerer()
    firsts = []
    for k in range(10):
        query = wire("www.example.test", qid=k)
        response = _udploop.answer(query, table)[0] if k % 2 else python.respond(query, table, True)[0]
        firsts.append(dns.message.from_wire(response).answer[0][0].address)
    assert firsts == [f"10.0.0.{i}" for i in (1, 2, 3, 4, 5)] * 2


def test_the_rrl_key_is_the_entrys() -> None:
    table, _ = twin_tables()
    response, key = _udploop.answer(wire("www.example.test"), table)
    assert key == table.questions[b"\x03www\x07example\x04test\x00" + struct.pack("!HH", 1, 1)].rrl_key
    assert response[:2] == b"\x12\x34"
