"""Corners a resolver operator's compliance checker probes (RFC 1035, 2181, 6891, 7766, 8906, 8945)."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest

from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.respond import Answerer
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE, edges

KEYRING = dns.tsigkeyring.from_text({"unknown-key.": "c2VjcmV0c2VjcmV0c2VjcmV0"})


@pytest.fixture
def table() -> AnswerTable:
    return TableBuilder(compile_zones([ZONE])).build(edges(3), revision=42)


def answer(table: AnswerTable, raw: bytes, udp: bool = True) -> bytes:
    response, _ = Answerer().respond(raw, table, udp)
    assert response is not None
    return response


def header(response: bytes) -> tuple[int, int, int, int, int, int]:
    """(flags byte 1, flags byte 2, qd, an, ns, ar)."""
    return (response[2], response[3], *struct.unpack_from("!HHHH", response, 4))


@pytest.mark.parametrize("opcode", [1, 2, 3, 4, 5, 6, 15])
@pytest.mark.parametrize("edns", [-1, 0])
def test_notimp_carries_only_id_qr_opcode_and_rcode(table: AnswerTable, opcode: int, edns: int) -> None:
    q = dns.message.make_query("www.example.test", "A", use_edns=edns, want_dnssec=edns == 0)
    q.flags |= dns.flags.RD | dns.flags.CD | dns.flags.AD
    raw = bytearray(q.to_wire())
    raw[2] = (raw[2] & 0x87) | (opcode << 3)
    response = answer(table, bytes(raw))
    assert response[:2] == raw[:2]
    # QR + opcode, rcode NOTIMP; no RD/CD/AD copied, no question, no OPT.
    assert header(response) == (wire.QR | (opcode << 3), wire.NOTIMP, 0, 0, 0, 0)
    assert len(response) == 12


def test_notify_and_update_get_notimp_whatever_their_sections(table: AnswerTable) -> None:
    notify = dns.message.make_query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    notify.flags |= dns.flags.AA
    update = dns.update.UpdateMessage("example.test")
    update.add("new", 300, "A", "192.0.2.9")
    update.delete("www")
    for msg in (notify, update):
        response = answer(table, msg.to_wire())
        assert header(response) == (wire.QR | (msg.opcode() << 3), wire.NOTIMP, 0, 0, 0, 0)


def _tsig_query(edns: int = 0) -> dns.message.QueryMessage:
    q = dns.message.make_query("www.example.test", "A", use_edns=edns)
    q.use_tsig(KEYRING, "unknown-key.", algorithm=dns.tsig.HMAC_SHA256)
    return q


@pytest.mark.parametrize("edns", [-1, 0])
def test_tsig_with_an_unknown_key_gets_notauth_badkey_unsigned(table: AnswerTable, edns: int) -> None:
    q = _tsig_query(edns)
    raw = q.to_wire()
    response = answer(table, raw)
    # dnspython checks the answer the way a TSIG client does: the peer did not know the key.
    with pytest.raises(dns.tsig.PeerBadKey):
        dns.message.from_wire(response, keyring=KEYRING, request_mac=q.mac)
    f1, f2, qd, an, ns, ar = header(response)
    assert f2 & 0x0F == dns.rcode.NOTAUTH and f1 & wire.QR
    assert (qd, an, ns, ar) == (1, 0, 0, 2 if edns == 0 else 1)
    # The TSIG record ends the message: key name, class ANY, TTL 0, our fields.
    tsig_at = response.index(b"\x0bunknown-key\x00", 12)
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", response, tsig_at + 13)
    assert (rtype, rclass, ttl) == (250, 255, 0)
    rdata = response[tsig_at + 23 :]
    assert len(rdata) == rdlen
    alg = b"\x0bhmac-sha256\x00"
    assert rdata.startswith(alg)
    sent = raw[raw.index(alg, 12) + len(alg) :]
    assert rdata[len(alg) : len(alg) + 8] == sent[:8]  # Time Signed and Fudge, as sent
    mac_size, orig_id, error, other = struct.unpack_from("!HHHH", rdata, len(alg) + 8)
    assert (mac_size, orig_id, error, other) == (0, q.id, 17, 0)  # empty MAC, BADKEY


def test_signed_update_with_an_unknown_key_gets_notauth_not_notimp(table: AnswerTable) -> None:
    update = dns.update.UpdateMessage("example.test")
    update.add("new", 300, "A", "192.0.2.9")
    update.use_tsig(KEYRING, "unknown-key.")
    response = answer(table, update.to_wire())
    assert response[3] & 0x0F == dns.rcode.NOTAUTH
    with pytest.raises(dns.tsig.PeerBadKey):
        dns.message.from_wire(response, keyring=KEYRING, request_mac=update.mac)


def test_tsig_that_is_not_the_last_record_is_formerr(table: AnswerTable) -> None:
    raw = bytearray(_tsig_query(edns=-1).to_wire())
    opt = wire.opt_record(1232)
    raw[10:12] = b"\x00\x02"
    response = answer(table, bytes(raw) + opt)
    assert response[3] & 0x0F == dns.rcode.FORMERR


def test_unknown_header_flags_are_ignored_and_not_echoed(table: AnswerTable) -> None:
    raw = bytearray(dns.message.make_query("www.example.test", "A").to_wire())
    raw[3] |= 0x40 | 0x20  # Z (RFC 1035: must be zero) and AD: neither is ours to echo
    raw[2] |= wire.AA | wire.TC  # meaningless in a query (RFC 1035 §4.1.1)
    response = answer(table, bytes(raw))
    f1, f2, _, an, _, _ = header(response)
    assert f2 == 0 and f1 == wire.QR | wire.AA | wire.RD and an == 3  # RD copied (make_query sets it)


def test_unknown_edns_flags_and_options_are_ignored(table: AnswerTable) -> None:
    q = dns.message.make_query(
        "www.example.test",
        "A",
        use_edns=0,
        ednsflags=0x4000 | dns.flags.DO,
        options=[dns.edns.GenericOption(65001, b"\x01\x02")],
    )
    r = dns.message.from_wire(answer(table, q.to_wire()))
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 3
    assert r.ednsflags == dns.flags.DO and r.options == ()  # RFC 6891 §6.1.4: Z bits zero


def test_badvers_answers_version_zero_whatever_the_options(table: AnswerTable) -> None:
    q = dns.message.make_query(
        "www.example.test", "A", use_edns=1, options=[dns.edns.GenericOption(65001, b"")]
    )
    r = dns.message.from_wire(answer(table, q.to_wire()))
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and not r.answer and r.options == ()


@pytest.mark.parametrize("count", [0, 2])
def test_qdcount_other_than_one_is_formerr_without_a_question(table: AnswerTable, count: int) -> None:
    raw = dns.message.make_query("www.example.test", "A").to_wire()
    body = raw[12:] * count
    response = answer(table, raw[:4] + struct.pack("!HHHH", count, 0, 0, 0) + body)
    assert header(response)[1] & 0x0F == dns.rcode.FORMERR
    assert header(response)[2:] == (0, 0, 0, 0)


def test_any_is_one_small_rfc8482_answer_over_udp_and_tcp(table: AnswerTable) -> None:
    for udp in (True, False):
        q = dns.message.make_query("www.example.test", "ANY")
        r = dns.message.from_wire(answer(table, q.to_wire(), udp))
        (rrset,) = r.answer
        assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482"


def test_truncation_sets_tc_keeps_the_question_and_tcp_gets_it_all(table: AnswerTable) -> None:
    q = dns.message.make_query("big.example.test", "TXT", use_edns=0, payload=512)
    r = dns.message.from_wire(answer(table, q.to_wire()))
    assert r.flags & dns.flags.TC and not r.answer and r.question and r.edns == 0
    r = dns.message.from_wire(answer(table, q.to_wire(), udp=False))
    assert not r.flags & dns.flags.TC and r.answer
