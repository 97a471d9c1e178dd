"""DNSSEC online signing, checked by an independent validator: dnspython's dns.dnssec."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.dnssec import keys
from dnsd.dnssec.setup import renew_signatures
from dnsd.dnssec.sign import NXNAME, SigningPolicy, ZoneKey, ZoneSigner
from dnsd.respond import Answerer
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE, edges

ORIGIN = wire.to_wire("example.test")
NOW = 1_800_000_000.0
ZONE_NAME = dns.name.from_text("example.test.")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def signed_builder(
    algorithm: int = keys.ECDSAP256SHA256, cap: int = 8, clock: Clock | None = None, zone_keys=None
) -> tuple[TableBuilder, ZoneSigner]:
    if zone_keys is None:
        zone_keys = [ZoneKey(keys.generate(algorithm, "csk"))]
    signer = ZoneSigner(ORIGIN, zone_keys, SigningPolicy(), clock=clock or Clock())
    builder = TableBuilder(compile_zones([ZONE]), max_answer_records=cap, signers={ORIGIN: signer})
    return builder, signer


def ask(table: AnswerTable, name: str, rdtype: str, do: bool = True, udp: bool = False, **kw):
    q = dns.message.make_query(name, rdtype, use_edns=0, want_dnssec=do, payload=1232, **kw)
    response, _ = Answerer().respond(q.to_wire(), table, udp)
    assert response is not None
    return dns.message.from_wire(response)


def dnskey_rrset(table: AnswerTable) -> dns.rrset.RRset:
    r = ask(table, "example.test", "DNSKEY")
    return r.find_rrset(r.answer, ZONE_NAME, dns.rdataclass.IN, dns.rdatatype.DNSKEY)


def validate_all(table: AnswerTable, r: dns.message.Message, sections: tuple[str, ...] = ("answer",)) -> int:
    """Validate every RRset of the sections against the zone's DNSKEYs; returns how many were checked."""
    keyset = {ZONE_NAME: dnskey_rrset(table)}
    when = NOW + 60
    checked = 0
    for section in sections:
        rrsets = getattr(r, section)
        sigs = {(s.name, s.covers): s for s in rrsets if s.rdtype == dns.rdatatype.RRSIG}
        for rrset in rrsets:
            if rrset.rdtype == dns.rdatatype.RRSIG:
                continue
            sig = sigs[(rrset.name, rrset.rdtype)]
            dns.dnssec.validate(rrset, sig, keyset, now=when)
            checked += 1
    return checked


@pytest.mark.parametrize("algorithm", [keys.ECDSAP256SHA256, keys.ED25519])
def test_a_aaaa_and_dnskey_validate(algorithm: int) -> None:
    builder, _ = signed_builder(algorithm)
    table = builder.build(edges(3), revision=7)
    keyset = dnskey_rrset(table)
    (dnskey,) = keyset
    assert dnskey.algorithm == algorithm and dnskey.flags == 257
    for name, rdtype in [("www.example.test", "A"), ("www.example.test", "AAAA"), ("example.test", "DNSKEY"),
                         ("example.test", "SOA"), ("example.test", "NS"), ("alias.example.test", "A"),
                         ("example.test", "MX"), ("www.example.test", "ANY")]:  # fmt: skip
        r = ask(table, name, rdtype)
        assert r.rcode() == dns.rcode.NOERROR and r.answer, (name, rdtype)
        assert validate_all(table, r) >= 1
    # The CNAME chain: both RRsets signed.
    assert validate_all(table, ask(table, "alias.example.test", "A")) == 2
    # NS glue in the additional section is signed too.
    assert validate_all(table, ask(table, "example.test", "NS"), ("answer", "additional")) == 3


def test_nothing_extra_without_do() -> None:
    builder, _ = signed_builder()
    table = builder.build(edges(3), revision=7)
    signed_types = (dns.rdatatype.RRSIG, dns.rdatatype.NSEC)
    for name, rdtype in [("www.example.test", "A"), ("nope.example.test", "A"), ("mail.example.test", "TXT")]:
        for edns in (-1, 0):
            q = dns.message.make_query(name, rdtype, use_edns=edns)
            response, _ = Answerer().respond(q.to_wire(), table, True)
            assert response is not None
            r = dns.message.from_wire(response)
            assert not any(s.rdtype in signed_types for s in r.answer + r.authority + r.additional)
    r = ask(table, "nope.example.test", "A", do=False)
    assert r.rcode() == dns.rcode.NXDOMAIN


def test_nodata_is_proven_by_a_signed_compact_nsec() -> None:
    builder, _ = signed_builder()
    table = builder.build(edges(3), revision=7)
    for name, rdtype, present in [
        ("mail.example.test", "TXT", {"A", "RRSIG", "NSEC"}),
        ("leaf.example.test", "A", {"RRSIG", "NSEC"}),  # empty non-terminal
        ("example.test", "TXT", {"A", "AAAA", "SOA", "NS", "MX", "DNSKEY", "RRSIG", "NSEC"}),
    ]:
        r = ask(table, name, rdtype)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer
        assert validate_all(table, r, ("authority",)) == 2  # SOA and NSEC
        nsec = r.find_rrset(r.authority, dns.name.from_text(name), dns.rdataclass.IN, dns.rdatatype.NSEC)
        assert nsec[0].next == dns.name.from_text("\\000." + name)
        got = {dns.rdatatype.to_text(t) for w in nsec[0].windows for t in _types(w)}
        assert got == present, name


def _types(window: tuple[int, bytes]) -> list[int]:
    base, bits = window
    return [base * 256 + i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte & (0x80 >> b)]


def test_a_service_without_ipv6_is_nodata_for_aaaa_and_its_nsec_omits_aaaa() -> None:
    builder, _ = signed_builder()
    only_v4 = [e.__class__(e.service, e.node, e.port, ipv4=e.ipv4, ipv6=()) for e in edges(2)]
    table = builder.build(only_v4, revision=7)
    r = ask(table, "www.example.test", "AAAA")
    assert not r.answer and validate_all(table, r, ("authority",)) == 2
    nsec = r.find_rrset(r.authority, dns.name.from_text("www.example.test"), dns.rdataclass.IN,
                        dns.rdatatype.NSEC)  # fmt: skip
    got = {t for w in nsec[0].windows for t in _types(w)}
    assert dns.rdatatype.AAAA not in got and dns.rdatatype.A in got


def test_nxdomain_is_compact_denial_signed_per_name() -> None:
    builder, signer = signed_builder()
    table = builder.build(edges(3), revision=7)
    before = signer.signatures_made
    r = ask(table, "nope.example.test", "A", udp=True)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.flags & dns.flags.AA
    assert validate_all(table, r, ("authority",)) == 2
    nsec = r.find_rrset(r.authority, dns.name.from_text("nope.example.test"), dns.rdataclass.IN,
                        dns.rdatatype.NSEC)  # fmt: skip
    assert {t for w in nsec[0].windows for t in _types(w)} == {NXNAME, 46, 47}
    assert signer.signatures_made == before + 1
    ask(table, "NOPE.example.test", "AAAA")  # the same name again: served from the cache
    assert signer.signatures_made == before + 1
    # CO flag (RFC 9824 §4): the client can take NXDOMAIN back.
    r = ask(table, "nope.example.test", "A", ednsflags=0x4000)
    assert r.rcode() == dns.rcode.NXDOMAIN and r.ednsflags & 0x4000


def test_cname_to_a_missing_name_proves_the_target_missing() -> None:
    builder, _ = signed_builder()
    table = builder.build(edges(3), revision=7)
    r = ask(table, "dangling.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert validate_all(table, r, ("answer", "authority")) == 3  # CNAME, SOA, NSEC


def test_every_rotation_of_one_set_shares_one_signature() -> None:
    builder, _ = signed_builder(cap=8)
    table = builder.build(edges(5), revision=7)
    sigs = set()
    orders = set()
    for _ in range(5):
        r = ask(table, "www.example.test", "A", udp=True)
        a = r.find_rrset(r.answer, dns.name.from_text("www.example.test"), dns.rdataclass.IN, dns.rdatatype.A)
        orders.add(tuple(rd.address for rd in a))
        sig = r.find_rrset(r.answer, a.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.A)
        sigs.add(sig[0].signature)
        validate_all(table, r)
    assert len(orders) == 5 and len(sigs) == 1


def test_each_capped_subset_gets_its_own_signature() -> None:
    builder, _ = signed_builder(cap=2)
    table = builder.build(edges(4), revision=7)
    by_set = {}
    for _ in range(8):
        r = ask(table, "www.example.test", "A")
        a = r.find_rrset(r.answer, dns.name.from_text("www.example.test"), dns.rdataclass.IN, dns.rdatatype.A)
        sig = r.find_rrset(r.answer, a.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.A)
        by_set.setdefault(frozenset(rd.address for rd in a), set()).add(sig[0].signature)
        validate_all(table, r)
    assert len(by_set) == 4 and all(len(s) == 1 for s in by_set.values())


def test_a_registry_change_signs_only_what_changed() -> None:
    builder, signer = signed_builder()
    builder.build(edges(3), revision=7)
    before, made = set(signer._cache), signer.signatures_made
    builder.build(edges(3), revision=8)  # same sets: only the SOA is new (its serial follows the revision)
    new = set(signer._cache) - before
    assert {k[1] for k in new} == {wire.SOA}
    assert signer.signatures_made - made == len(new) == 3  # one per SOA TTL served: 3600, 60, degraded 1
    before, made = set(signer._cache), signer.signatures_made
    builder.build(edges(4), revision=9)  # an edge joins: A and AAAA of www and the apex, and the SOAs
    new = set(signer._cache) - before
    assert sorted((k[0], k[1]) for k in new if k[1] != wire.SOA) == sorted(
        (owner, t) for owner in (ORIGIN, wire.to_wire("www.example.test")) for t in (wire.A, wire.AAAA)
    )
    assert signer.signatures_made - made == len(new) == 7


def test_signatures_are_renewed_before_expiry_with_jitter() -> None:
    clock = Clock()
    builder, signer = signed_builder(clock=clock)
    table = builder.build(edges(3), revision=7)
    r = ask(table, "www.example.test", "A")
    sig = r.find_rrset(r.answer, dns.name.from_text("www.example.test"), dns.rdataclass.IN,
                       dns.rdatatype.RRSIG, dns.rdatatype.A)[0]  # fmt: skip
    policy = signer.policy
    assert sig.inception == int(NOW) - policy.inception_offset
    assert NOW + policy.validity - policy.jitter <= sig.expiration <= NOW + policy.validity
    due = signer.next_refresh()
    assert due is not None and due <= sig.expiration - policy.refresh
    made = signer.signatures_made
    clock.now = due - 1
    builder.build(edges(3), revision=7)
    assert signer.signatures_made == made  # nothing due yet
    clock.now = due + 1
    builder.build(edges(3), revision=7)
    assert signer.signatures_made > made  # the first one due (signatures expire spread by the jitter)
    clock.now = sig.expiration - policy.refresh + 1
    table = builder.build(edges(3), revision=7)
    r = ask(table, "www.example.test", "A")
    new = r.find_rrset(r.answer, dns.name.from_text("www.example.test"), dns.rdataclass.IN,
                       dns.rdatatype.RRSIG, dns.rdatatype.A)[0]  # fmt: skip
    assert new.expiration > sig.expiration


def test_prepublished_key_is_in_dnskey_but_does_not_sign() -> None:
    old, new = keys.generate(role="zsk"), keys.generate(role="zsk")
    ksk = keys.generate(role="ksk")
    builder, _ = signed_builder(zone_keys=[ZoneKey(ksk), ZoneKey(old), ZoneKey(new, active=False)])
    table = builder.build(edges(3), revision=7)
    assert len(dnskey_rrset(table)) == 3
    r = ask(table, "www.example.test", "A")
    tags = {s[0].key_tag for s in r.answer if s.rdtype == dns.rdatatype.RRSIG}
    assert tags == {old.tag}
    r = ask(table, "example.test", "DNSKEY")
    assert {s[0].key_tag for s in r.answer if s.rdtype == dns.rdatatype.RRSIG} == {ksk.tag}
    validate_all(table, r)
    validate_all(table, ask(table, "www.example.test", "A"))


def test_signed_answers_respect_the_udp_buffer() -> None:
    builder, _ = signed_builder(cap=28)
    table = builder.build(edges(28), revision=7)
    for do in (False, True):  # 28 A records fit 512 bytes; with their RRSIG they do not
        q = dns.message.make_query("www.example.test", "A", use_edns=0, want_dnssec=do, payload=512)
        response, _ = Answerer().respond(q.to_wire(), table, True)
        assert response is not None and len(response) <= 512
        r = dns.message.from_wire(response)
        assert bool(r.flags & dns.flags.TC) == do and bool(r.answer) != do
    r = ask(table, "www.example.test", "A", udp=True)  # 1232 bytes advertised: it fits
    assert not r.flags & dns.flags.TC and validate_all(table, r) == 1
    r = ask(table, "www.example.test", "A", udp=False)  # the TCP retry gets it all
    assert len(r.answer[0]) == 28 and validate_all(table, r) == 1


@pytest.mark.parametrize("algorithm", [keys.ECDSAP256SHA256, keys.ED25519])
def test_key_files_round_trip_and_ds_matches_dnspython(tmp_path: Path, algorithm: int) -> None:
    key = keys.generate(algorithm, "csk")
    private = keys.write(tmp_path, ORIGIN, key)
    assert private.name == f"Kexample.test.+{algorithm:03d}+{key.tag:05d}.private"
    assert private.stat().st_mode & 0o077 == 0
    loaded = keys.load(private, "csk")
    assert loaded.dnskey == key.dnskey
    rdata_text = keys.dnskey_text(ORIGIN, key).split("DNSKEY")[1]
    rrset = dns.rrset.from_text("example.test.", 3600, "IN", "DNSKEY", rdata_text)
    assert dns.dnssec.key_id(rrset[0]) == key.tag
    ds = dns.dnssec.make_ds(ZONE_NAME, rrset[0], "SHA256")
    assert keys.ds_text(ORIGIN, key).endswith(ds.to_text().upper().split(" ", 3)[3])


def test_bad_key_files_say_what_is_wrong(tmp_path: Path) -> None:
    cases = {
        "missing": None,
        "notbind": "hello\n",
        "rsa": "Private-key-format: v1.3\nAlgorithm: 8 (RSASHA256)\nPrivateKey: AAAA\n",
        "short": "Private-key-format: v1.3\nAlgorithm: 13 (ECDSAP256SHA256)\nPrivateKey: AAAA\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(keys.KeyFileError):
            keys.load(path, "csk")


async def test_renewal_rebuilds_when_a_signature_is_due() -> None:
    clock = Clock()
    due = [NOW + 0.0]
    rebuilt: list[float] = []

    def rebuild() -> None:
        rebuilt.append(clock.now)
        due[0] = clock.now + 10**6  # the rebuild renewed it

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dnsd.dnssec.setup.asyncio.sleep", _advance(clock))
        task = asyncio.create_task(renew_signatures(lambda: due[0], rebuild, clock))
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
    assert rebuilt == [NOW + 1.0]  # due at once: one rebuild after the 1 s minimum wait, then none


def _advance(clock: Clock):
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await real_sleep(0)

    return sleep


@pytest.mark.parametrize("payload", [512, 1232, 4096])
@pytest.mark.parametrize("do", [False, True])
def test_remembered_opt_records_answer_as_the_checked_path_does(payload: int, do: bool) -> None:
    """respond() serves a seen OPT record straight from the prepared answers: same result, TC included."""
    builder, _ = signed_builder(cap=28)
    table = builder.build(edges(28), revision=7)
    q = dns.message.make_query("www.example.test", "A", use_edns=0, want_dnssec=do, payload=payload)
    warm = Answerer()
    first, _ = warm.respond(q.to_wire(), table, True)  # checked by _with_extra, then remembered
    assert q.to_wire()[-11:] in warm._opts
    second, _ = warm.respond(q.to_wire(), table, True)  # the remembered path
    assert first is not None and second is not None
    a, b = dns.message.from_wire(first), dns.message.from_wire(second)
    assert a.flags == b.flags and a.ednsflags == b.ednsflags and a.payload == b.payload
    assert [(s.rdtype, sorted(map(str, s))) for s in a.answer] == [
        (s.rdtype, sorted(map(str, s))) for s in b.answer
    ]
    assert bool(b.flags & dns.flags.TC) == (payload == 512 and do)
