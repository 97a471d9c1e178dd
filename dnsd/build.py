"""TableBuilder: zones + registry records -> a fresh AnswerTable.

Called on every registry change (coalesced to one build per event-loop turn)
and never on the query path. It applies the all-down policy, follows CNAME
chains inside our zones, and renders every answer a name can get.

The all-down policy decides what a mapped name answers when its service has
no ``up`` instance (see README section "All-down policy"):

* ``last-known``: the last set that had an ``up`` instance, with the degraded TTL;
* ``all-registered``: every registered instance whatever its state, degraded TTL;
* ``nodata``: NOERROR/NODATA, with the degraded TTL as negative-caching TTL.

Before the first registry snapshot nothing is known: mapped names answer
NODATA with the degraded TTL, so resolvers ask again within a second.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

import dnslib

from carousel.registry import ServiceRecord
from dnsd import wire
from dnsd.config import AllDownPolicy
from dnsd.table import (
    MAX_CNAME_CHAIN,
    RFC8482_HINFO,
    RR,
    AddressItem,
    AnswerTable,
    Entry,
    Plan,
    ServiceState,
    render,
)
from dnsd.wire import RData
from dnsd.zone import Zone


def _lowercase_safe(qtype: int) -> bool:
    """True when lowercasing the type's two bytes cannot change them or map others onto them.

    The fast path looks questions up by their lowercased bytes; a type byte in
    A-Z or a-z (e.g. HTTPS = 65 = 'A') would alias another type, so such types
    are looked up by name and exact type instead.
    """
    return all(not (0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A) for b in struct.pack("!H", qtype))


# Every name gets its own entries for these types (the ones clients ask most) even
# when the answer is NODATA, plus one per type it holds; any other type shares the
# name's default entry, and the answerer counts those answers by the asked type.
ALWAYS_TYPES = (wire.A, wire.AAAA, wire.ANY)
# Answers pre-assembled whole (see Entry.prepare_full): the hot types only, to keep
# the build fast and the table small.
FULL_TYPES = frozenset(struct.pack("!H", t) for t in (wire.A, wire.AAAA))
META_ANSWERS = {wire.IXFR: wire.REFUSED, wire.AXFR: wire.REFUSED,
                wire.MAILB: wire.NOTIMP, wire.MAILA: wire.NOTIMP, wire.OPT: wire.FORMERR}  # fmt: skip


def type_key(qtype: int) -> bytes:
    """The key of a query type in an AnswerTable name node."""
    return struct.pack("!H", qtype)


class TableBuilder:
    """Builds AnswerTables for a fixed set of zones, remembering the last healthy sets."""

    def __init__(
        self,
        zones: list[Zone],
        *,
        max_answer_records: int = 8,
        all_down: AllDownPolicy = "last-known",
        degraded_ttl: int = 1,
        payload_size: int = 1232,
        unknown_rcode: int = wire.NOERROR,
    ) -> None:
        self.zones = {z.origin: z for z in zones}
        self.payload_size = payload_size
        self.cap = max_answer_records
        self.all_down = all_down
        self.degraded_ttl = degraded_ttl
        self.last_healthy: dict[str, list[ServiceRecord]] = {}
        # What a service name answers while nothing servable is known (NODATA, or SERVFAIL
        # when a too-old registry snapshot was refused).
        self.unknown_rcode = unknown_rcode
        self._unknown: set[str] = set()
        self._names = {z.origin: z.names() for z in zones}
        # Filled per build:
        self._serial = 1
        self._soa_rdata: dict[tuple[bytes, int], RData] = {}
        self._service_items: dict[str, tuple[list[ServiceRecord], int, bool]] = {}

    # --- registry -> per-service answer sets ------------------------------------------

    def _choose(self, records: Iterable[ServiceRecord], synced: bool) -> dict[str, ServiceState]:
        by_service: dict[str, list[ServiceRecord]] = {}
        for r in records:
            by_service.setdefault(r.service, []).append(r)
        states: dict[str, ServiceState] = {}
        self._service_items = {}
        self._unknown = set()
        wanted = {s for z in self.zones.values() for s in z.services.values()}
        for service in sorted(wanted):
            registered = sorted(by_service.get(service, []), key=lambda r: r.node)
            up = [r for r in registered if r.state == "up"]
            degraded = True
            if up:
                chosen, mode, degraded = up, "healthy", False
                self.last_healthy[service] = up
            elif not synced:
                chosen, mode = [], "unknown"
                self._unknown.add(service)
            elif self.all_down == "last-known":
                chosen = self.last_healthy.get(service, [])
                mode = "last-known" if chosen else "nodata"
            elif self.all_down == "all-registered":
                chosen, mode = registered, "all-registered" if registered else "nodata"
            else:
                chosen, mode = [], "nodata"
            ttl = self.degraded_ttl if degraded else -1  # -1: the zone's service TTL
            self._service_items[service] = (chosen, ttl, degraded)
            states[service] = ServiceState(service, mode, [a for r in chosen for a in r.addresses], ttl)
        return states

    @staticmethod
    def _items(records: list[ServiceRecord], rtype: int) -> list[AddressItem]:
        by_addr: dict[bytes, AddressItem] = {}
        for r in records:
            for text in r.ipv4 if rtype == wire.A else r.ipv6:
                packed = wire.ipv4_bytes(text) if rtype == wire.A else wire.ipv6_bytes(text)
                old = by_addr.get(packed)
                if old is None or old.weight < r.weight:
                    by_addr[packed] = AddressItem(packed, text, r.weight)
        return list(by_addr.values())

    # --- planning ---------------------------------------------------------------------

    def _zone_of(self, name: bytes) -> Zone | None:
        for _, suffix in wire.suffixes(name):
            zone = self.zones.get(suffix)
            if zone is not None:
                return zone
        return self.zones.get(wire.ROOT)

    def _soa(self, zone: Zone, ttl: int) -> RR:
        key = (zone.origin, self._serial)
        rdata = self._soa_rdata.get(key)
        if rdata is None:  # once per zone and build: a build asks for it per name and type
            s = zone.soa
            times = (self._serial, s.refresh, s.retry, s.expire, s.minimum)
            rd = dnslib.SOA(wire.to_label(zone.mname), wire.to_label(zone.rname), times)
            rdata = self._soa_rdata[key] = wire.rdata(rd)
        return (zone.origin, wire.SOA, ttl, rdata)

    def _negative(self, zone: Zone, rcode: int, degraded: bool = False) -> Plan:
        ttl = self.degraded_ttl if degraded else zone.negative_ttl
        return Plan(rcode=rcode, authority=[self._soa(zone, ttl)])

    def _data(self, zone: Zone, name: bytes, qtype: int) -> Plan:
        """The answer for a name that exists in ``zone`` and is not a CNAME."""
        static = zone.static.get(name, {})
        service = zone.services.get(name)
        if service is not None and qtype in (wire.A, wire.AAAA):
            records, ttl, degraded = self._service_items[service]
            items = self._items(records, qtype)
            if not items and service in self._unknown and self.unknown_rcode != wire.NOERROR:
                return Plan(rcode=self.unknown_rcode)
            if not items:
                return self._negative(zone, wire.NOERROR, degraded)
            return Plan(rotating=(name, qtype, zone.service_ttl if ttl < 0 else ttl, items))
        if qtype == wire.SOA and name == zone.origin:
            return Plan(fixed=[self._soa(zone, zone.soa.ttl)])
        if qtype == wire.NS and name == zone.origin:
            glue: list[RR] = []
            for ns in zone.ns:
                for t in (wire.A, wire.AAAA):
                    rrset = zone.static.get(ns, {}).get(t)
                    if rrset is not None:
                        glue += [(ns, t, rrset.ttl, rd) for rd in rrset.rdatas]
            fixed: list[RR] = [(name, wire.NS, zone.ns_ttl, [wire.Name(ns)]) for ns in zone.ns]
            return Plan(fixed=fixed, additional=glue)
        if qtype == wire.ANY:
            # RFC 8482: one small synthesized RRset instead of everything we hold.
            return Plan(fixed=[(name, wire.HINFO, zone.service_ttl, list(RFC8482_HINFO))])
        rrset = static.get(qtype)
        if rrset is None:
            return self._negative(zone, wire.NOERROR)
        if qtype in (wire.A, wire.AAAA) and len(rrset.rdatas) > 1:
            items = [AddressItem(rd[0], str(ipaddress.ip_address(rd[0])), 1) for rd in rrset.rdatas]
            return Plan(rotating=(name, qtype, rrset.ttl, items))
        return Plan(fixed=[(name, qtype, rrset.ttl, rd) for rd in rrset.rdatas])

    def plan(self, name: bytes, qtype: int) -> Plan:
        """The full answer for (name, type), following CNAMEs inside our zones."""
        chain: list[RR] = []
        seen = set()
        current = name
        while True:
            zone = self._zone_of(current)
            if zone is None:
                return Plan(prefix=chain)  # left our authority: the resolver continues
            if current not in self._names[zone.origin]:
                plan = self._negative(zone, wire.NXDOMAIN)
                plan.prefix = chain
                return plan
            cname = zone.static.get(current, {}).get(wire.CNAME)
            if cname is None or qtype == wire.CNAME:
                plan = self._data(zone, current, qtype)
                plan.prefix = chain + plan.prefix
                return plan
            chain.append((current, wire.CNAME, cname.ttl, cname.rdatas[0]))
            seen.add(current)
            current = bytes(cname.rdatas[0][0])
            if current in seen or len(chain) >= MAX_CNAME_CHAIN:
                return Plan(prefix=chain)  # a loop or a long chain: stop, say no more

    # --- the table --------------------------------------------------------------------

    def build(
        self,
        records: Iterable[ServiceRecord],
        revision: int,
        *,
        synced: bool = True,
        previous: AnswerTable | None = None,
    ) -> AnswerTable:
        """A new table for this registry state; counters continue from ``previous``."""
        table = AnswerTable(revision, synced, self.payload_size)
        self._serial = table.serial
        self._soa_rdata.clear()
        table.services = self._choose(records, synced)
        for qtype, rcode in META_ANSWERS.items():
            table.meta[type_key(qtype)] = Entry(qtype, rcode, False, (0, 0, 0), [b""])
        for origin, zone in self.zones.items():
            table.nxdomain[origin] = self._render_nxdomain(zone)
            for name in self._names[origin]:
                if self._zone_of(name) is not zone:
                    continue  # a deeper zone's apex (or above it): that zone answers
                node = self._node(zone, name, table.meta)
                table.names[name] = node
                for key, entry in node.items():
                    if key and key not in table.meta and _lowercase_safe(entry.qtype):
                        question = name + key + b"\x00\x01"
                        table.questions[question] = entry
                        if key in FULL_TYPES:
                            entry.prepare_full(question, table.opt)
        if previous is not None:
            _carry(previous, table)
        return table

    def _render_nxdomain(self, zone: Zone) -> Entry:
        # The question name is not known in advance, so nothing is compressed.
        plan = self._negative(zone, wire.NXDOMAIN)
        return render(None, 0, plan, self.cap, rrl_key=zone.origin + b"/nxdomain")

    def _types_at(self, name: bytes) -> set[int]:
        """The types a name answers with data, following its CNAME chain inside our zones."""
        types: set[int] = set()
        seen = set()
        while name not in seen:
            seen.add(name)
            zone = self._zone_of(name)
            if zone is None or name not in self._names[zone.origin]:
                break
            static = zone.static.get(name, {})
            types |= set(static)
            if name in zone.services:
                types |= {wire.A, wire.AAAA}
            if name == zone.origin:
                types |= {wire.SOA, wire.NS}
            cname = static.get(wire.CNAME)
            if cname is None:
                break
            name = bytes(cname.rdatas[0][0])
        return types

    def _node(self, zone: Zone, name: bytes, meta: dict[bytes, Entry]) -> dict[bytes, Entry]:
        node: dict[bytes, Entry] = dict(meta)
        types = set(ALWAYS_TYPES) | self._types_at(name)
        for qtype in sorted(types):
            key = type_key(qtype)
            node[key] = render(name, qtype, self.plan(name, qtype), self.cap, name + key)
        # Any other type: the same answer as a type the name surely lacks.
        node[b""] = render(name, 0, self.plan(name, 0), self.cap, name + b"/other")
        return node


def _carry(old: AnswerTable, new: AnswerTable) -> None:
    for name, node in new.names.items():
        old_node = old.names.get(name)
        if old_node is not None:
            for key, entry in node.items():
                prev = old_node.get(key)
                if prev is not None and key not in new.meta:
                    entry.carry_from(prev)
    for origin, entry in new.nxdomain.items():
        prev = old.nxdomain.get(origin)
        if prev is not None:
            entry.carry_from(prev)
    for key, entry in new.meta.items():
        prev = old.meta.get(key)
        if prev is not None:
            entry.carry_from(prev)
    new.refused.carry_from(old.refused)
