"""Site-aware answers: EDNS Client Subnet (RFC 7871) and source addresses pick the client's site."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from carousel.registry import ServiceRecord
from dnsd.build import TableBuilder
from dnsd.respond import NEEDS_PEER, Answerer
from dnsd.sites import EcsError, SiteMap, parse_ecs, site_order
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE

SITES = {"tokyo": ["10.1.0.0/16", "2001:db8:1::/48"], "osaka": ["10.2.0.0/16"], "paris": ["10.3.0.0/16"]}
FALLBACK = {"tokyo": ["osaka"], "osaka": ["tokyo"], "paris": []}


def edge(i: int, site: str, state: str = "up") -> ServiceRecord:
    return ServiceRecord("edge", f"e{i}", 80, ipv4=(f"192.0.2.{i}",), ipv6=(f"2001:db8::{i}",),
                         state=state, site=site)  # type: ignore[arg-type]  # fmt: skip


EDGES = [edge(1, "tokyo"), edge(2, "tokyo"), edge(3, "osaka"), edge(4, "paris")]


def build(records: list[ServiceRecord] = EDGES) -> AnswerTable:
    builder = TableBuilder(compile_zones([ZONE]))
    builder.site_map = SiteMap(SITES)
    builder.site_orders = {s: site_order(s, FALLBACK) for s in SITES}
    return builder.build(records, revision=3)


def ecs(subnet: str) -> dns.edns.ECSOption:
    net = ipaddress.ip_network(subnet)
    return dns.edns.ECSOption(str(net.network_address), net.prefixlen)


def ask(table: AnswerTable, name: str = "www.example.test", rdtype: str = "A", *, host: str = "203.0.113.9",
        options: list[dns.edns.Option] | None = None) -> dns.message.Message:  # fmt: skip
    edns = 0 if options else -1
    q = dns.message.make_query(name, rdtype, use_edns=edns, options=options or [])
    raw = q.to_wire()
    answerer = Answerer()
    response, key = answerer.respond(raw, table, True)
    if response is None:
        assert key == NEEDS_PEER
        response, key = answerer.respond_peer(raw, table, True, host)
    assert response is not None
    return dns.message.from_wire(response)


def addresses(r: dns.message.Message) -> set[str]:
    return {rr.address for s in r.answer if s.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rr in s}


def scope(r: dns.message.Message) -> tuple[str, int, int]:
    (opt,) = [o for o in r.options if isinstance(o, dns.edns.ECSOption)]
    return opt.address, opt.srclen, opt.scopelen


def test_ecs_picks_the_site_and_says_how_wide_the_answer_holds() -> None:
    table = build()
    r = ask(table, options=[ecs("10.1.7.0/24")])
    assert addresses(r) == {"192.0.2.1", "192.0.2.2"}
    assert scope(r) == ("10.1.7.0", 24, 16)  # the whole tokyo /16 gets this answer
    r = ask(table, options=[ecs("10.2.0.0/24")])
    assert addresses(r) == {"192.0.2.3"} and scope(r)[2] == 16
    r = ask(table, "www.example.test", "AAAA", options=[ecs("2001:db8:1:ff00::/56")])
    assert addresses(r) == {"2001:db8::1", "2001:db8::2"} and scope(r)[2] == 48


def test_a_client_in_no_site_gets_every_edge_with_the_widest_true_scope() -> None:
    table = build()
    r = ask(table, options=[ecs("192.0.2.0/24")])
    assert addresses(r) == {f"192.0.2.{i}" for i in (1, 2, 3, 4)}
    assert scope(r)[2] == 1  # 128.0.0.0/1 holds no site network: the answer holds for all of it
    r = ask(table, options=[ecs("10.0.0.0/24")])
    assert scope(r)[2] == 16  # 10.0.0.0/16 is the widest block next to tokyo, osaka and paris


def test_ecs_source_prefix_is_capped_at_24_and_56_bits() -> None:
    table = build()
    r = ask(table, options=[ecs("10.1.7.9/32")])
    address, source, used_scope = scope(r)
    assert (address, source) == ("10.1.7.9", 32) and used_scope <= 24
    # RFC 7871 §11.1: a /32 and a /24 of the same network get the same answer
    assert addresses(r) == addresses(ask(table, options=[ecs("10.1.7.0/24")]))


def test_without_ecs_the_resolver_address_picks_the_site() -> None:
    table = build()
    assert addresses(ask(table, host="10.2.9.9")) == {"192.0.2.3"}
    assert addresses(ask(table, host="10.3.1.1")) == {"192.0.2.4"}
    assert addresses(ask(table, host="198.51.100.1")) == {f"192.0.2.{i}" for i in (1, 2, 3, 4)}


def test_a_site_without_edges_falls_back_nearest_first() -> None:
    table = build([edge(1, "tokyo", "draining"), edge(3, "osaka"), edge(4, "paris")])
    assert addresses(ask(table, host="10.1.0.1")) == {"192.0.2.3"}  # tokyo -> osaka, not paris
    table = build([edge(4, "paris")])
    assert addresses(ask(table, host="10.1.0.1")) == {"192.0.2.4"}  # then the others by name


def test_source_prefix_zero_and_other_names_say_scope_zero() -> None:
    table = build()
    r = ask(table, options=[dns.edns.ECSOption("0.0.0.0", 0)])
    assert addresses(r) == {f"192.0.2.{i}" for i in (1, 2, 3, 4)} and scope(r)[2] == 0
    r = ask(table, "mail.example.test", options=[ecs("10.1.7.0/24")])
    assert r.answer and scope(r)[2] == 0  # not site-dependent


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!HBB", 3, 24, 0) + b"\x0a\x01\x07",  # unknown family
        struct.pack("!HBB", 1, 33, 0) + b"\x0a\x01\x07\x00\x00",  # prefix over 32
        struct.pack("!HBB", 1, 24, 0) + b"\x0a\x01",  # address too short
        struct.pack("!HBB", 1, 24, 0) + b"\x0a\x01\x07\x00",  # address too long
        struct.pack("!HBB", 1, 20, 0) + b"\x0a\x01\x0f",  # bits beyond the prefix
        struct.pack("!HBB", 1, 24, 8) + b"\x0a\x01\x07",  # a scope in a query
        b"\x00\x01",
    ],
)
def test_malformed_ecs_is_formerr(data: bytes) -> None:
    with pytest.raises(EcsError):
        parse_ecs(data)
    r = ask(build(), options=[dns.edns.GenericOption(8, data)])
    assert r.rcode() == dns.rcode.FORMERR


def test_off_by_default_no_peer_needed() -> None:
    table = TableBuilder(compile_zones([ZONE])).build(EDGES, revision=1)
    q = dns.message.make_query("www.example.test", "A", use_edns=0, options=[ecs("10.1.7.0/24")])
    response, _ = Answerer().respond(q.to_wire(), table, True)
    assert response is not None
    r = dns.message.from_wire(response)
    assert len(addresses(r)) == 4 and r.options == ()


def test_site_rotation_continues_across_rebuilds() -> None:
    table = build()
    firsts = []
    for _ in range(2):
        r = ask(table, host="10.1.0.1")
        firsts.append(r.answer[0][0].address)
    table2 = TableBuilder(compile_zones([ZONE]))
    table2.site_map = SiteMap(SITES)
    table2.site_orders = {s: site_order(s, FALLBACK) for s in SITES}
    new = table2.build(EDGES, revision=4, previous=table)
    r = ask(new, host="10.1.0.1")
    assert r.answer[0][0].address == firsts[0]  # the third answer starts where the first did


def test_registry_site_field_is_additive_and_checked() -> None:
    with_site = edge(1, "tokyo")
    assert ServiceRecord.decode(with_site.encode()).site == "tokyo"
    plain = ServiceRecord("edge", "e1", 80, ipv4=("192.0.2.1",))
    assert b"site" not in plain.encode()  # records of clusters without sites do not change
    assert ServiceRecord.decode(plain.encode()).site == ""
    assert with_site.with_state("draining").site == "tokyo"
    with pytest.raises(ValueError):
        ServiceRecord("edge", "e1", 80, ipv4=("192.0.2.1",), site="no spaces")


def test_agent_and_dnsd_configs_validate_sites(tmp_path) -> None:
    from agent.config import load as load_agent
    from carousel.config import ConfigError
    from dnsd.config import load as load_dnsd

    agent = tmp_path / "agent.toml"
    agent.write_text(
        '[agent]\nsite = "bad site"\n[[service]]\nname = "edge"\nport = 80\nipv4 = ["192.0.2.1"]\n'
    )
    with pytest.raises(ConfigError, match=r"agent\.site"):
        load_agent(str(agent))
    dnsd = tmp_path / "dnsd.toml"
    zone = '[[zone]]\norigin = "example.test"\n[[zone.ns]]\nname = "ns1"\nipv4 = ["192.0.2.53"]\n'
    dnsd.write_text('[dns.sites.tokyo]\nnetworks = ["10.1.0.0/16"]\nfallback = ["nowhere"]\n' + zone)
    with pytest.raises(ConfigError, match=r"dns.sites.tokyo.fallback\[0\]"):
        load_dnsd(str(dnsd))
    dnsd.write_text('[dns.sites.tokyo]\nnetworks = ["10.1.0.0/33"]\n' + zone)
    with pytest.raises(ConfigError, match=r"dns\.sites\.tokyo\.networks"):
        load_dnsd(str(dnsd))


def test_site_answers_are_counted_in_the_statistics() -> None:
    table = build()
    before = sum(e.served for e in table.entries())
    for _ in range(5):
        ask(table, host="10.1.0.1")
    assert sum(e.served for e in table.entries()) == before + 5
