"""The pure answer function: standards points, checked by decoding with dnspython."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from carousel.registry import ServiceRecord
from dnsd import wire
from dnsd.build import TableBuilder, _alias_free
from dnsd.config import NSConfig, RecordConfig, SOAConfig, ZoneConfig
from dnsd.respond import Answerer, parse_query
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones

ZONE = ZoneConfig(
    origin="example.test",
    soa=SOAConfig(ttl=3600, minimum=60),
    ns=[NSConfig("ns1", ipv4=["192.0.2.53"], ipv6=["2001:db8::53"])],
    services={"www": "edge", "@": "edge", "v6": "v6only"},
    record=[
        RecordConfig("mail", "A", "192.0.2.25"),
        RecordConfig("@", "MX", "10 mail"),
        RecordConfig("alias", "CNAME", "www"),
        RecordConfig("dangling", "CNAME", "missing"),
        RecordConfig("away", "CNAME", "www.elsewhere.org."),
        RecordConfig("loop1", "CNAME", "loop2"),
        RecordConfig("loop2", "CNAME", "loop1"),
        RecordConfig("big", "TXT", "x" * 1000),
        RecordConfig("deep.leaf", "TXT", "under an empty non-terminal"),
    ],
)


def edges(n: int, state: str = "up", service: str = "edge") -> list[ServiceRecord]:
    return [
        ServiceRecord(
            service,
            f"edge{i}",
            80,
            ipv4=(f"10.0.0.{i}",),
            ipv6=(f"fd00::{i}",),
            state=state,  # type: ignore[arg-type]
        )
        for i in range(1, n + 1)
    ]


@pytest.fixture
def table() -> AnswerTable:
    builder = TableBuilder(compile_zones([ZONE]))
    return builder.build(edges(3), revision=42)


def ask(
    table: AnswerTable, msg: dns.message.Message | bytes, udp: bool = True, answerer=None
) -> dns.message.Message:
    raw = msg if isinstance(msg, bytes) else msg.to_wire()
    response, _ = (answerer or Answerer()).respond(raw, table, udp)
    assert response is not None
    return dns.message.from_wire(response)


def query(name: str, rdtype: str = "A", **kw) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype, **kw)


def test_authoritative_answer_sets_aa_copies_rd_and_clears_ra(table: AnswerTable) -> None:
    q = query("www.example.test")
    q.flags |= dns.flags.RD | dns.flags.CD
    r = ask(table, q)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    assert r.flags & dns.flags.RD and r.flags & dns.flags.CD
    assert not r.flags & dns.flags.RA
    assert r.id == q.id
    q.flags &= ~(dns.flags.RD | dns.flags.CD)
    r = ask(table, q)
    assert not r.flags & dns.flags.RD and not r.flags & dns.flags.CD


def test_nxdomain_carries_soa_with_negative_ttl(table: AnswerTable) -> None:
    r = ask(table, query("nope.example.test"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.flags & dns.flags.AA
    assert not r.answer
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "example.test."
    assert soa.ttl == 60  # min(SOA TTL 3600, minimum 60)


def test_nodata_carries_soa(table: AnswerTable) -> None:
    r = ask(table, query("mail.example.test", "TXT"))
    assert r.rcode() == dns.rcode.NOERROR
    assert not r.answer
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 60


def test_empty_non_terminal_is_nodata_not_nxdomain(table: AnswerTable) -> None:
    r = ask(table, query("leaf.example.test", "A"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority


def test_outside_our_zones_is_refused_without_aa(table: AnswerTable) -> None:
    for name in ("www.example.org", "test", "."):
        r = ask(table, query(name))
        assert r.rcode() == dns.rcode.REFUSED
        assert not r.flags & dns.flags.AA
        assert not r.answer and not r.authority


@pytest.mark.parametrize(
    "opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE, 7]
)
def test_other_opcodes_get_notimp(table: AnswerTable, opcode: int) -> None:
    q = query("www.example.test")
    raw = bytearray(q.to_wire())
    raw[2] = (raw[2] & 0x87) | (opcode << 3)
    response, _ = Answerer().respond(bytes(raw), table)
    assert response is not None
    # read the header by hand: dnspython would parse an UPDATE reply as an update
    assert response[:2] == raw[:2]
    assert response[2] & wire.QR and (response[2] >> 3) & 0x0F == opcode
    assert response[3] & 0x0F == dns.rcode.NOTIMP


def test_edns_version_above_zero_gets_badvers(table: AnswerTable) -> None:
    r = ask(table, query("www.example.test", use_edns=1))
    assert r.rcode() == dns.rcode.BADVERS
    assert r.edns == 0  # we answer with the version we speak
    assert not r.answer


def test_no_opt_without_edns_and_opt_with_it(table: AnswerTable) -> None:
    r = ask(table, query("www.example.test"))
    assert r.edns == -1 and not r.additional
    r = ask(table, query("www.example.test", use_edns=0, payload=4096))
    assert r.edns == 0
    assert r.payload == 1232  # ours, not the client's


def test_do_bit_is_echoed(table: AnswerTable) -> None:
    r = ask(table, query("www.example.test", use_edns=0, want_dnssec=True))
    assert r.ednsflags & dns.flags.DO
    r = ask(table, query("www.example.test", use_edns=0, want_dnssec=False))
    assert not r.ednsflags & dns.flags.DO


def test_unknown_and_cookie_options_are_not_echoed(table: AnswerTable) -> None:
    options = [
        dns.edns.GenericOption(65001, b"private"),
        dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8),
        dns.edns.GenericOption(dns.edns.NSID, b""),
    ]
    r = ask(table, query("www.example.test", use_edns=0, options=options))
    assert r.edns == 0 and r.options == ()
    assert len(r.answer[0]) == 3


def test_question_is_echoed_byte_for_byte(table: AnswerTable) -> None:
    q = query("wWw.ExAmPlE.tEsT")
    raw = q.to_wire()
    response, _ = Answerer().respond(raw, table)
    assert response is not None
    end = 12 + len(b"\x03wWw\x07ExAmPlE\x04tEsT\x00") + 4
    assert response[12:end] == raw[12:end]
    assert response[12:end] != raw[12:end].lower()
    # the answer owner points into the question, so it carries the same spelling
    r = dns.message.from_wire(response)
    assert r.answer[0].name.to_text() == "wWw.ExAmPlE.tEsT."


def test_soa_serial_follows_registry_revision() -> None:
    builder = TableBuilder(compile_zones([ZONE]))
    serials = []
    for revision in (7, 8, 31):
        t = builder.build(edges(2), revision=revision)
        r = ask(t, query("example.test", "SOA"))
        serials.append(r.answer[0][0].serial)
    assert serials == [7, 8, 31]


def test_ns_answer_carries_glue(table: AnswerTable) -> None:
    r = ask(table, query("example.test", "NS"))
    assert [rr.to_text() for rr in r.answer[0]] == ["ns1.example.test."]
    glue = {(rrset.rdtype, rr.to_text()) for rrset in r.additional for rr in rrset}
    assert glue == {(dns.rdatatype.A, "192.0.2.53"), (dns.rdatatype.AAAA, "2001:db8::53")}


def test_any_gets_a_minimal_rfc8482_answer(table: AnswerTable) -> None:
    r = ask(table, query("www.example.test", "ANY"))
    (rrset,) = r.answer
    assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482"


def test_aaaa_comes_from_ipv6_registrations(table: AnswerTable) -> None:
    r = ask(table, query("www.example.test", "AAAA"))
    assert sorted(rr.address for rr in r.answer[0]) == ["fd00::1", "fd00::2", "fd00::3"]
    assert r.answer[0].ttl == 5


def test_cname_is_followed_inside_the_zone(table: AnswerTable) -> None:
    r = ask(table, query("alias.example.test", "A"))
    cname, a = r.answer
    assert cname.rdtype == dns.rdatatype.CNAME and a.rdtype == dns.rdatatype.A
    assert a.name.to_text() == "www.example.test." and len(a) == 3
    r = ask(table, query("alias.example.test", "CNAME"))
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.CNAME]


def test_cname_to_missing_name_is_nxdomain_with_the_chain(table: AnswerTable) -> None:
    r = ask(table, query("dangling.example.test", "A"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.answer[0].rdtype == dns.rdatatype.CNAME and r.authority


def test_cname_out_of_zone_and_loops_stop(table: AnswerTable) -> None:
    r = ask(table, query("away.example.test", "A"))
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer) == 1
    r = ask(table, query("loop1.example.test", "A"))
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer) == 2


def test_other_classes_are_refused(table: AnswerTable) -> None:
    r = ask(table, query("version.bind", "TXT", rdclass=dns.rdataclass.CH))
    assert r.rcode() == dns.rcode.REFUSED
    r = ask(table, query("www.example.test", "A", rdclass=dns.rdataclass.CH))
    assert r.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize(
    ("rdtype", "rcode"),
    [("AXFR", dns.rcode.REFUSED), ("IXFR", dns.rcode.REFUSED), ("MAILA", dns.rcode.NOTIMP)],
)
def test_transfer_and_mail_meta_types(table: AnswerTable, rdtype: str, rcode: int) -> None:
    assert ask(table, query("example.test", rdtype)).rcode() == rcode
    assert ask(table, query("nope.example.test", rdtype)).rcode() == rcode


def test_opt_as_question_type_is_formerr(table: AnswerTable) -> None:
    assert ask(table, query("example.test", "OPT")).rcode() == dns.rcode.FORMERR


def test_truncation_without_edns_and_tcp_gets_everything(table: AnswerTable) -> None:
    q = query("big.example.test", "TXT")
    r = ask(table, q)
    assert r.flags & dns.flags.TC and not r.answer
    assert r.question[0].name.to_text() == "big.example.test."
    r = ask(table, q, udp=False)
    assert not r.flags & dns.flags.TC
    assert len(b"".join(r.answer[0][0].strings)) == 1000


def test_truncation_respects_advertised_and_own_payload_size(table: AnswerTable) -> None:
    # 1000 bytes of TXT: over a 512-byte advertisement, under our 1232
    assert ask(table, query("big.example.test", "TXT", use_edns=0, payload=512)).flags & dns.flags.TC
    r = ask(table, query("big.example.test", "TXT", use_edns=0, payload=4096))
    assert not r.flags & dns.flags.TC and r.edns == 0
    small = TableBuilder(compile_zones([ZONE]), payload_size=600).build(edges(3), revision=42)
    r = ask(small, query("big.example.test", "TXT", use_edns=0, payload=4096))
    assert r.flags & dns.flags.TC and r.edns == 0 and r.payload == 600


def _formerr_cases() -> dict[str, bytes]:
    good = query("www.example.test").to_wire()
    qid = good[:2]
    two_opts = bytearray(query("www.example.test", use_edns=0).to_wire())
    opt = bytes(two_opts[-11:])
    two_opts[11] = 2
    bad_owner_opt = bytearray(query("www.example.test", use_edns=0).to_wire())
    bad_owner_opt[-11:-10] = b"\x01a\x00"
    bad_tiling = bytearray(query("www.example.test", use_edns=0).to_wire())
    bad_tiling[-2:] = b"\x00\x03"
    bad_tiling += b"\x00\x0a\x00"
    return {
        "no question": qid + b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        "two questions": qid + b"\x01\x00\x00\x02" + good[6:] + good[12:],
        "question cut short": good[:-3],
        "compression pointer in question": qid + good[2:12] + b"\xc0\x0c\x00\x01\x00\x01",
        "label type 0x40": qid + good[2:12] + b"\x41a\x00\x00\x01\x00\x01",
        "name over 255 bytes": qid + good[2:12] + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63
        + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01",
        "answer section in a query": qid + b"\x01\x00\x00\x01\x00\x01\x00\x00\x00\x00" + good[12:],
        "trailing bytes": good + b"\x00",
        "two OPT records": bytes(two_opts) + opt,
        "OPT owner not root": bytes(bad_owner_opt),
        "options do not tile RDATA": bytes(bad_tiling),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_formerr_cases()))
def test_malformed_queries_get_formerr(table: AnswerTable, case: str) -> None:
    raw = _formerr_cases()[case]
    response, _ = Answerer().respond(raw, table)
    assert response is not None
    assert response[:2] == raw[:2]
    flags1, flags2 = response[2], response[3]
    assert flags1 & wire.QR and flags2 & 0x0F == dns.rcode.FORMERR
    assert struct.unpack_from("!H", response, 10)[0] == 0  # never an OPT with FORMERR


@pytest.mark.parametrize("raw", [b"", b"\x12", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00"])
def test_unreadable_header_gets_silence(table: AnswerTable, raw: bytes) -> None:
    answerer = Answerer()
    assert answerer.respond(raw, table) == (None, b"error")
    assert answerer.ignored == 1


def test_responses_are_never_answered(table: AnswerTable) -> None:
    raw = bytearray(query("www.example.test").to_wire())
    raw[2] |= 0x80
    assert Answerer().respond(bytes(raw), table)[0] is None


def test_fast_and_slow_path_give_the_same_bytes(table: AnswerTable) -> None:
    answerer = Answerer()
    for name, rdtype, edns in [
        ("example.test", "SOA", -1),
        ("example.test", "NS", 0),
        ("mail.example.test", "A", 0),
        ("mail.example.test", "MX", -1),
        ("alias.example.test", "CNAME", 0),
    ]:
        raw = query(name, rdtype, use_edns=edns).to_wire()
        fast, _ = answerer.respond(raw, table)
        slow, _ = answerer._slow(raw, table, True)
        assert fast == slow, (name, rdtype)


def test_parse_query_reads_edns_fields() -> None:
    raw = query("a.example.test", "AAAA", use_edns=0, payload=4000, want_dnssec=True).to_wire()
    q = parse_query(raw)
    assert q is not None and q.error == 0
    assert q.qname == wire.to_wire("a.example.test") and q.qtype == 28
    assert q.edns is not None and q.edns.payload == 4000 and q.edns.do and q.edns.version == 0


def test_nested_zones_each_answer_their_own_names() -> None:
    zones = compile_zones(
        [
            ZoneConfig(origin="example.test", ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
                       record=[RecordConfig("a", "A", "192.0.2.1")]),
            ZoneConfig(origin="sub.example.test", ns=[NSConfig("ns1", ipv4=["192.0.2.54"])],
                       soa=SOAConfig(minimum=30), record=[RecordConfig("b", "A", "192.0.2.2")]),
        ]
    )  # fmt: skip
    table = TableBuilder(zones).build([], 1)
    assert ask(table, query("a.example.test")).answer[0][0].address == "192.0.2.1"
    assert ask(table, query("b.sub.example.test")).answer[0][0].address == "192.0.2.2"
    soa = ask(table, query("sub.example.test", "SOA")).answer[0]
    assert soa.name.to_text() == "sub.example.test." and soa[0].minimum == 30
    nx = ask(table, query("nope.sub.example.test"))
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].name.to_text() == "sub.example.test."


def test_a_parent_zone_may_not_define_names_inside_a_child_zone() -> None:
    from dnsd.zone import ZoneError

    with pytest.raises(ZoneError, match="lies inside zone\\[1\\]"):
        compile_zones(
            [
                ZoneConfig(origin="example.test", ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
                           record=[RecordConfig("x.sub", "A", "192.0.2.1")]),
                ZoneConfig(origin="sub.example.test", ns=[NSConfig("ns1", ipv4=["192.0.2.54"])]),
            ]
        )  # fmt: skip


def test_other_types_share_the_default_answer_but_are_counted_by_type(table: AnswerTable) -> None:
    answerer = Answerer()
    for rdtype in ("MX", "SRV", "SVCB", "CAA"):
        r = ask(table, query("www.example.test", rdtype), answerer=answerer)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    counted = {k[0] for k in answerer.counts}
    assert counted == {15, 33, 64, 257}


def test_https_has_its_own_entry_in_the_question_index(table: AnswerTable) -> None:
    """Browsers' resolvers ask HTTPS beside A and AAAA: its NODATA is an entry of its own,
    indexed by its exact type bytes (65 is 'A', which a whole-question lower() would change)."""
    name = wire.to_wire("www.example.test")
    entry = table.names[name][struct.pack("!H", wire.HTTPS)]
    assert entry.qtype == wire.HTTPS
    assert table.questions[name + b"\x00\x41\x00\x01"] is entry
    assert name + b"\x00\x61\x00\x01" not in table.questions  # what lower() makes of it
    before = entry.served
    r = ask(table, query("www.example.test", "HTTPS"))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    assert r.question[0].rdtype == dns.rdatatype.HTTPS
    assert entry.served == before + 1  # counted as HTTPS by the entry, not by the answerer


def test_only_types_no_lowercased_question_can_alias_are_indexed() -> None:
    # Answerer.respond lowers the whole question: type 67 ('C') would become 99 ('c', SPF).
    assert _alias_free(wire.HTTPS) and _alias_free(wire.A) and _alias_free(wire.MX)
    assert not _alias_free(99) and not _alias_free(0x7A00)


def test_static_records_are_encoded_by_dnslib_with_names_left_to_our_compression(table: AnswerTable) -> None:
    # TXT: a value longer than 255 bytes becomes several character-strings.
    (txt,) = ask(table, query("big.example.test", "TXT"), udp=False).answer[0]
    assert txt.strings == (b"x" * 255,) * 3 + (b"x" * 235,)
    # MX: the exchange points into the question (offset 12) instead of being spelled out.
    raw = query("example.test", "MX").to_wire()
    response, _ = Answerer().respond(raw, table)
    assert response is not None
    assert response.endswith(b"\x00\x0a\x04mail\xc0\x0c")
    (mx,) = dns.message.from_wire(response).answer[0]
    assert mx.preference == 10 and mx.exchange.to_text() == "mail.example.test."
    # SOA: both names compressed, timers after them.
    soa_response, _ = Answerer().respond(query("example.test", "SOA").to_wire(), table)
    assert soa_response is not None
    (soa,) = dns.message.from_wire(soa_response).answer[0]
    assert soa.mname.to_text() == "ns1.example.test." and soa.rname.to_text() == "hostmaster.example.test."
    assert (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum) == (42, 14400, 3600, 1209600, 60)


def test_rdata_leaves_names_as_pieces() -> None:
    import dnslib

    mail = wire.to_wire("mail.example.test")
    assert wire.rdata(dnslib.MX(wire.to_label(mail), 10)) == [b"\x00\x0a", mail]
    assert isinstance(wire.rdata(dnslib.CNAME(wire.to_label(mail)))[0], wire.Name)
    assert wire.rdata(dnslib.TXT([b""])) == [b"\x00"]


def test_static_address_rotation_is_labelled_by_address() -> None:
    zone = ZoneConfig(
        origin="example.test",
        ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
        record=[RecordConfig("x", "A", "192.0.2.1"), RecordConfig("x", "A", "192.0.2.2")],
    )
    table = TableBuilder(compile_zones([zone])).build([], 1)
    entry = table.lookup(wire.to_wire("x.example.test"), wire.A)
    assert entry is not None and entry.rotation is not None
    assert entry.rotation.addresses == ["192.0.2.1", "192.0.2.2"]
