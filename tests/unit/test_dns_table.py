"""AnswerTable building: rotation, weights, capped subsets, all-down policies, counters."""

from __future__ import annotations

from collections import Counter

import dns.message
import dns.rcode
import pytest

from carousel.registry import ServiceRecord
from dnsd.build import TableBuilder
from dnsd.config import AllDownPolicy, NSConfig, ZoneConfig
from dnsd.respond import Answerer
from dnsd.table import AnswerTable, _swrr
from dnsd.zone import compile_zones

ZONES = compile_zones(
    [
        ZoneConfig(
            origin="example.test",
            ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
            services={"www": "edge"},
        )
    ]
)


def rec(i: int, weight: int = 1, state: str = "up", v6: bool = False) -> ServiceRecord:
    return ServiceRecord(
        "edge",
        f"edge{i:02d}",
        80,
        ipv4=(f"10.0.0.{i}",),
        ipv6=(f"fd00::{i:x}",) if v6 else (),
        weight=weight,
        state=state,  # type: ignore[arg-type]
    )


def answers(table: AnswerTable, n: int, rdtype: str = "A") -> list[list[str]]:
    answerer = Answerer()
    raw = dns.message.make_query("www.example.test", rdtype).to_wire()
    out = []
    for _ in range(n):
        response, _ = answerer.respond(raw, table)
        assert response is not None
        msg = dns.message.from_wire(response)
        out.append([rr.address for rrset in msg.answer for rr in rrset])
    return out


def test_every_query_starts_one_position_later() -> None:
    table = TableBuilder(ZONES).build([rec(1), rec(2), rec(3)], 1)
    got = answers(table, 6)
    assert got[:3] == [
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        ["10.0.0.2", "10.0.0.3", "10.0.0.1"],
        ["10.0.0.3", "10.0.0.1", "10.0.0.2"],
    ]
    assert got[3:] == got[:3]


def test_weights_set_first_position_share() -> None:
    table = TableBuilder(ZONES).build([rec(1, weight=2), rec(2), rec(3)], 1)
    firsts = Counter(a[0] for a in answers(table, 1000))
    assert abs(firsts["10.0.0.1"] / 1000 - 0.5) <= 0.05
    assert abs(firsts["10.0.0.2"] / 1000 - 0.25) <= 0.05
    assert abs(firsts["10.0.0.3"] / 1000 - 0.25) <= 0.05


def test_smooth_weighted_schedule_interleaves() -> None:
    order = _swrr([5, 1, 1])
    assert Counter(order) == {0: 5, 1: 1, 2: 1}
    assert order != [0, 0, 0, 0, 0, 1, 2]  # spread out, not bunched
    assert _swrr([4, 2]) == _swrr([2, 1]) == [0, 1, 0]  # gcd reduced: a short period


def test_capped_answers_rotate_subsets_with_equal_exposure() -> None:
    records = [rec(i) for i in range(1, 21)]
    table = TableBuilder(ZONES, max_answer_records=8).build(records, 1)
    got = answers(table, 20)
    assert all(len(a) == 8 for a in got)
    exposure = Counter(addr for a in got for addr in a)
    assert set(exposure.values()) == {8}  # 20 x 8 / 20: everyone equally often
    assert len(exposure) == 20
    assert Counter(a[0] for a in got) == {f"10.0.0.{i}": 1 for i in range(1, 21)}


def test_exposure_counts_follow_the_served_counter() -> None:
    table = TableBuilder(ZONES, max_answer_records=2).build([rec(1), rec(2), rec(3)], 1)
    answers(table, 7)
    entry = table.lookup(b"\x03www\x07example\x04test\x00", 1)
    assert entry is not None and entry.rotation is not None
    incl, first = entry.rotation.counts_between(entry.start, entry.served)
    got = answers(table, 0)
    assert sum(first) == 7 and sum(incl) == 14
    assert first == [3, 2, 2] and incl == [5, 5, 4]
    assert got == []


def test_draining_records_are_not_served() -> None:
    table = TableBuilder(ZONES).build([rec(1), rec(2, state="draining"), rec(3)], 1)
    assert {addr for a in answers(table, 4) for addr in a} == {"10.0.0.1", "10.0.0.3"}


def test_rebuild_continues_the_rotation() -> None:
    builder = TableBuilder(ZONES)
    first = builder.build([rec(1), rec(2), rec(3)], 1)
    assert answers(first, 1)[0][0] == "10.0.0.1"
    second = builder.build([rec(1), rec(2), rec(3), rec(4)], 2, previous=first)
    assert answers(second, 1)[0][0] == "10.0.0.2"


def test_aaaa_only_registrations_give_a_nodata() -> None:
    records = [
        ServiceRecord("edge", "e1", 80, ipv6=("fd00::1",)),
        ServiceRecord("edge", "e2", 80, ipv6=("fd00::2",)),
    ]
    table = TableBuilder(ZONES).build(records, 1)
    assert answers(table, 1, "AAAA") == [["fd00::1", "fd00::2"]]
    msg = dns.message.from_wire(
        Answerer().respond(dns.message.make_query("www.example.test", "A").to_wire(), table)[0]
    )
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer
    assert msg.authority[0].ttl == 60  # a normal NODATA, not a degraded one


def all_down(policy: AllDownPolicy) -> tuple[list[list[str]], int, dns.message.Message]:
    builder = TableBuilder(ZONES, all_down=policy, degraded_ttl=1)
    builder.build([rec(1), rec(2)], 1)
    table = builder.build([rec(1, state="draining"), rec(3, state="draining")], 2)
    raw = dns.message.make_query("www.example.test", "A").to_wire()
    msg = dns.message.from_wire(Answerer().respond(raw, table)[0])
    ttl = msg.answer[0].ttl if msg.answer else msg.authority[0].ttl
    return [[rr.address for rr in rrset] for rrset in msg.answer], ttl, msg


def test_all_down_last_known_serves_the_last_healthy_set_with_reduced_ttl() -> None:
    got, ttl, _ = all_down("last-known")
    assert got == [["10.0.0.1", "10.0.0.2"]] and ttl == 1


def test_all_down_all_registered_serves_every_registration() -> None:
    got, ttl, _ = all_down("all-registered")
    assert got == [["10.0.0.1", "10.0.0.3"]] and ttl == 1


def test_all_down_nodata() -> None:
    got, ttl, msg = all_down("nodata")
    assert got == [] and msg.rcode() == dns.rcode.NOERROR and ttl == 1


def test_before_the_first_snapshot_service_names_get_a_short_nodata() -> None:
    table = TableBuilder(ZONES).build([], 0, synced=False)
    raw = dns.message.make_query("www.example.test", "A").to_wire()
    msg = dns.message.from_wire(Answerer().respond(raw, table)[0])
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer
    assert msg.authority[0].ttl == 1
    assert table.services["edge"].mode == "unknown"


@pytest.mark.parametrize(("count", "top"), [(3, 1), (59, 7), (200, 1000)])
def test_schedule_length_stays_bounded(count: int, top: int) -> None:
    records = [
        ServiceRecord("edge", f"e{i}", 80, ipv4=(f"10.0.{i // 250}.{i % 250 + 1}",),
                      weight=max(1, top - i))
        for i in range(count)
    ]  # fmt: skip
    table = TableBuilder(ZONES).build(records, 1)
    entry = table.lookup(b"\x03www\x07example\x04test\x00", 1)
    assert entry is not None and entry.rotation is not None
    assert count <= entry.period <= 1 << 16
    firsts = Counter(entry.rotation.slot_start)
    assert len(firsts) == count  # even the lightest weight is in the schedule


def test_exposure_counts_match_a_brute_force_count_for_any_window() -> None:
    table = TableBuilder(ZONES, max_answer_records=2).build(
        [rec(1, weight=3), rec(2), rec(3, weight=2), rec(4)], 1
    )
    entry = table.lookup(b"\x03www\x07example\x04test\x00", 1)
    assert entry is not None and entry.rotation is not None
    rot = entry.rotation
    period = len(rot.members)
    for start, end in [
        (0, 0),
        (0, 1),
        (3, 3 + period),
        (5, 5 + 3 * period + 4),
        (period - 1, 4 * period + 2),
    ]:
        incl, first = [0] * 4, [0] * 4
        for k in range(start, end):
            for i in rot.members[k % period]:
                incl[i] += 1
            first[rot.slot_start[k % period]] += 1
        assert rot.counts_between(start, end) == (incl, first)


def test_with_serial_copies_every_field_an_entry_is_made_with() -> None:
    """``Entry.with_serial`` copies an entry field by field (for speed): a field added to
    ``__init__`` and forgotten there would be missing, or differ, in every fixed answer."""
    from dnsd.table import Entry

    body = b"\x00\x00\x06\x00\x01" + b"\x00\x00\x00\x00" * 2
    fresh = Entry(6, 0, True, (1, 0, 0), [body], rrl_key=b"soa")
    fresh.serial_at = (9,)
    copy = fresh.with_serial(b"\x00\x00\x00\x2a")
    for slot in Entry.__slots__:
        assert hasattr(copy, slot), f"with_serial leaves {slot} unset"
        if slot not in ("schedule", "do_schedule"):
            assert getattr(copy, slot) == getattr(fresh, slot), slot
    patched = body[:9] + b"\x00\x00\x00\x2a" + body[13:]
    assert copy.schedule == copy.do_schedule == [patched]
    assert fresh.schedule == [body]  # the rendered original is never changed
