"""Signed rotating answers patched on a change: only the touched windows are signed again,
every window still validates, and renewal counts the windows a change kept."""

from __future__ import annotations

import dataclasses

import dns.dnssec
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

from carousel.registry import ServiceRecord
from dnsd.table import AnswerTable
from tests.unit.test_dns_answer import edges
from tests.unit.test_dnssec import NOW, ZONE_NAME, Clock, ask, dnskey_rrset, signed_builder

N = 40  # addresses per service
CAP = 3  # windows of 3: one distinct RRset (and signature) per window


def a_rrsigs(
    table: AnswerTable, when: float, name: str = "www.example.test", rdtype: str = "A", asks: int = N
) -> dict:
    """Ask ``asks`` times (every window at least once); validate each answer; RRset -> its RRSIG."""
    keyset = {ZONE_NAME: dnskey_rrset(table)}
    seen = {}
    for _ in range(asks):
        r = ask(table, name, rdtype)
        found = {(s.name, s.rdtype, s.covers): s for s in r.answer}
        (rrset,) = [s for s in r.answer if s.rdtype == dns.rdatatype.from_text(rdtype)]  # the CNAME's target
        sig = found[(rrset.name, dns.rdatatype.RRSIG, rrset.rdtype)]
        for other in r.answer:  # a CNAME before it is signed too
            if other.rdtype != dns.rdatatype.RRSIG:
                other_sig = found[(other.name, dns.rdatatype.RRSIG, other.rdtype)]
                dns.dnssec.validate(other, other_sig, keyset, now=when)
        seen[frozenset(rd.to_text() for rd in rrset)] = sig[0]
    return seen


def drained(records: list[ServiceRecord], i: int) -> tuple[ServiceRecord, ServiceRecord]:
    return records[i], dataclasses.replace(records[i], state="draining")


def test_a_change_signs_only_the_windows_it_touched_and_every_window_validates() -> None:
    builder, signer = signed_builder(cap=CAP)
    records = edges(N)
    table = builder.build(records, revision=7)
    before = a_rrsigs(table, NOW + 60)
    assert len(before) == N  # one RRset per window
    made = signer.signatures_made
    table = builder.update([drained(records, 10)], revision=8, previous=table)
    after = a_rrsigs(table, NOW + 60)
    assert len(after) == N - 1
    assert not any("10.0.0.11" in rd for s in after for rd in s)  # the drained edge is gone from every window
    fresh = [s for s in after if s not in before]
    assert len(fresh) == CAP - 1  # windows that held the drained edge now hold the next one
    assert all(after[s] == before[s] for s in after if s in before)  # kept windows keep their signature
    # The new windows of A and AAAA under www, the apex and alias (the chain's own answer), and
    # the SOA of each TTL it is served with: a handful, not a signature per window.
    assert signer.signatures_made - made <= 2 * 2 * (CAP - 1) + 3


def test_windows_kept_by_a_change_are_renewed_when_due() -> None:
    clock = Clock()
    builder, signer = signed_builder(cap=CAP, clock=clock)
    records = edges(N)
    table = builder.build(records, revision=7)
    first = a_rrsigs(table, NOW + 60)
    # Days later a change patches a few windows (fresh signatures); the others are kept.
    clock.now = NOW + 3 * 86400
    table = builder.update([drained(records, 10)], revision=8, previous=table)
    after = a_rrsigs(table, clock.now)
    kept = [sig for rrset, sig in after.items() if first.get(rrset) == sig]
    assert len(kept) == N - CAP  # the windows that held the drained edge were signed again, no others
    # Planned from the earliest kept window (the jitter spreads them), whichever window that is:
    # the earliest of the first build may have been one the change replaced.
    earliest_kept = min(s.expiration for s in kept) - signer.policy.refresh
    due = builder.next_refresh()
    assert due is not None and due <= earliest_kept  # planned from every window served, not just the new ones
    clock.now = due + 1
    table = builder.update([], revision=8, previous=table)  # what the renewal task does
    renewed = a_rrsigs(table, clock.now)
    assert all(s.expiration - signer.policy.refresh > clock.now for s in renewed.values())
    # Past every kept window's renewal time: all of them renewed, none expired.
    clock.now = max(s.expiration for s in first.values()) - signer.policy.refresh + 1
    table = builder.update([], revision=8, previous=table)
    for sig in a_rrsigs(table, clock.now).values():
        assert sig.expiration - signer.policy.refresh > clock.now


def test_a_weighted_change_keeps_every_window_valid_through_a_cname() -> None:
    builder, signer = signed_builder(cap=CAP)
    records = [dataclasses.replace(r, weight=1 + i % 3) for i, r in enumerate(edges(N))]
    table = builder.build(records, revision=7)
    period = 2 * N  # weights 1, 2, 3 in turn: one period of first places is 2 * N queries
    assert len(a_rrsigs(table, NOW + 60, "alias.example.test", asks=period)) == N
    made = signer.signatures_made
    reweighted = (records[5], dataclasses.replace(records[5], weight=7))
    table = builder.update([reweighted], revision=8, previous=table)
    assert signer.signatures_made - made <= 3  # re-weighted only: the windows are the same, only the SOAs
    table = builder.update([drained(records, 20)], revision=9, previous=table)
    for name in ("www.example.test", "alias.example.test"):
        for rdtype in ("A", "AAAA"):
            assert len(a_rrsigs(table, NOW + 60, name, rdtype, asks=period)) == N - 1
