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
from typing import TYPE_CHECKING

import dnslib

from carousel.registry import ServiceRecord
from dnsd import wire
from dnsd.config import AllDownPolicy
from dnsd.dnssec.keys import DNSKEY, NSEC, RRSIG
from dnsd.dnssec.sign import NXNAME, ZoneSigner
from dnsd.sites import SiteMap
from dnsd.table import (
    MAX_CNAME_CHAIN,
    RFC8482_HINFO,
    RR,
    AddressItem,
    AnswerTable,
    Entry,
    NxDenial,
    Plan,
    ServiceState,
    render,
)
from dnsd.wire import MessageWriter, RData
from dnsd.zone import Zone

if TYPE_CHECKING:
    from dnsd.cookies import ServerCookies


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
        signers: dict[bytes, ZoneSigner] | None = None,
    ) -> None:
        self.zones = {z.origin: z for z in zones}
        # Zone origin -> its signer, for the zones served with DNSSEC.
        self.signers = signers or {}
        self.cookies: ServerCookies | None = None  # handed to every table (DNS Cookies on)
        # Site-aware answers: site -> its fallback order (itself first); {} when off.
        self.site_orders: dict[str, list[str]] = {}
        self.site_map: SiteMap | None = None
        self.payload_size = payload_size
        self.cap = max_answer_records
        self.all_down = all_down
        self.degraded_ttl = degraded_ttl
        self.last_healthy: dict[str, list[ServiceRecord]] = {}
        self._names = {z.origin: z.names() for z in zones}
        # Filled per build:
        self._serial = 1
        self._soa_rdata: dict[tuple[bytes, int], RData] = {}
        self._service_items: dict[str, tuple[list[ServiceRecord], int, bool]] = {}

    def next_refresh(self) -> float | None:
        """When the first DNSSEC signature in use is due for renewal (None: nothing signed)."""
        return min((t for s in self.signers.values() if (t := s.next_refresh()) is not None), default=None)

    # --- registry -> per-service answer sets ------------------------------------------

    def _choose(self, records: Iterable[ServiceRecord], synced: bool) -> dict[str, ServiceState]:
        by_service: dict[str, list[ServiceRecord]] = {}
        for r in records:
            by_service.setdefault(r.service, []).append(r)
        states: dict[str, ServiceState] = {}
        self._service_items = {}
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

    def _negative(self, zone: Zone, rcode: int, degraded: bool = False, name: bytes | None = None) -> Plan:
        """NXDOMAIN or NODATA; in a signed zone the DO variant adds compact denial for ``name``."""
        ttl = self.degraded_ttl if degraded else zone.negative_ttl
        plan = Plan(rcode=rcode, authority=[self._soa(zone, ttl)])
        signer = self.signers.get(zone.origin)
        if signer is not None and name is not None:
            types = (NXNAME,) if rcode == wire.NXDOMAIN else self._types_with_data(zone, name)
            plan.denial = [(name, NSEC, ttl, [signer.nsec_rdata(name, types)])]
            plan.signed_rcode = wire.NOERROR  # RFC 9824 §3: the name "exists" with no data
        return plan

    def _types_with_data(self, zone: Zone, name: bytes) -> set[int]:
        """The types ``name`` answers with records right now (an NSEC type bitmap, RFC 4034 §4.1.2)."""
        types = set(zone.static.get(name, {}))
        service = zone.services.get(name)
        if service is not None:
            records = self._service_items[service][0]
            types |= {t for t in (wire.A, wire.AAAA) if self._items(records, t)}
        if name == zone.origin:
            types |= {wire.SOA, wire.NS}
            if zone.origin in self.signers:
                types.add(DNSKEY)
        return types

    def _sign(self, owner: bytes, rtype: int, ttl: int, rdatas: list[bytes]) -> list[bytes]:
        """RRSIGs of an RRset by the signer of the zone that holds its owner ([] if unsigned)."""
        zone = self._zone_of(owner)
        signer = self.signers.get(zone.origin) if zone is not None else None
        return signer.rrsigs(owner, rtype, ttl, rdatas) if signer is not None else []

    def _data(self, zone: Zone, name: bytes, qtype: int) -> Plan:
        """The answer for a name that exists in ``zone`` and is not a CNAME."""
        static = zone.static.get(name, {})
        service = zone.services.get(name)
        if service is not None and qtype in (wire.A, wire.AAAA):
            records, ttl, degraded = self._service_items[service]
            items = self._items(records, qtype)
            if not items:
                return self._negative(zone, wire.NOERROR, degraded, name)
            return Plan(rotating=(name, qtype, zone.service_ttl if ttl < 0 else ttl, items))
        if qtype == wire.SOA and name == zone.origin:
            return Plan(fixed=[self._soa(zone, zone.soa.ttl)])
        signer = self.signers.get(zone.origin)
        if qtype == DNSKEY and name == zone.origin and signer is not None:
            return Plan(fixed=[(name, DNSKEY, signer.dnskey_ttl, [rd]) for rd in signer.dnskeys])
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
            return self._negative(zone, wire.NOERROR, name=name)
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
                plan = self._negative(zone, wire.NXDOMAIN, name=current)
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
        table.cookies = self.cookies
        self._serial = table.serial
        self._soa_rdata.clear()
        for signer in self.signers.values():
            signer.begin_build()
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
        if self.site_map is not None:
            self._render_sites(table)
        for origin, signer in self.signers.items():
            table.denial[origin] = self._nx_denial(self.zones[origin], signer)
            signer.end_build()
        if previous is not None:
            _carry(previous, table)
        return table

    def _render_sites(self, table: AnswerTable) -> None:
        """Per-site answers for names mapped to a service: that site's edges, else the nearest."""
        table.site_map = self.site_map
        sign = self._sign if self.signers else None
        for zone in self.zones.values():
            for name, service in zone.services.items():
                if self._zone_of(name) is not zone:
                    continue
                records, ttl, degraded = self._service_items[service]
                for qtype in (wire.A, wire.AAAA):
                    question = name + type_key(qtype) + b"\x00\x01"
                    default = table.questions.pop(question, None)
                    if default is None:
                        continue
                    table.site_questions[question] = default
                    for site, order in self.site_orders.items():
                        chosen = next(
                            (r for r in ([x for x in records if x.site == o] for o in order)
                             if self._items(r, qtype)),
                            records,
                        )  # fmt: skip
                        items = self._items(chosen, qtype)
                        if not items:
                            plan = self._negative(zone, wire.NOERROR, degraded, name)
                        else:
                            plan = Plan(rotating=(name, qtype, zone.service_ttl if ttl < 0 else ttl, items))
                        key = type_key(qtype)
                        rrl_key = name + key + b"@" + site.encode()
                        entry = render(name, qtype, plan, self.cap, rrl_key, signer=sign)
                        entry.prepare_full(question, table.opt)
                        table.by_site.setdefault(site, {})[question] = entry

    def _render_nxdomain(self, zone: Zone) -> Entry:
        # The question name is not known in advance, so nothing is compressed.
        plan = self._negative(zone, wire.NXDOMAIN)
        return render(None, 0, plan, self.cap, rrl_key=zone.origin + b"/nxdomain")

    def _nx_denial(self, zone: Zone, signer: ZoneSigner) -> NxDenial:
        """The signed SOA every NXDOMAIN of a signed zone carries, for ``ZoneSigner.nx_records``."""
        owner, rtype, ttl, rdata = self._soa(zone, zone.negative_ttl)
        w = MessageWriter(None, 0)
        w.rr(owner, rtype, ttl, rdata, compress=False)
        sigs = signer.rrsigs(owner, rtype, ttl, [b"".join(rdata)])
        for sig in sigs:
            w.rr(owner, RRSIG, ttl, [sig], compress=False)
        return NxDenial(signer, w.getvalue(), ttl, 2 + 2 * len(sigs))

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
                if zone.origin in self.signers:
                    types.add(DNSKEY)
            cname = static.get(wire.CNAME)
            if cname is None:
                break
            name = bytes(cname.rdatas[0][0])
        return types

    def _node(self, zone: Zone, name: bytes, meta: dict[bytes, Entry]) -> dict[bytes, Entry]:
        node: dict[bytes, Entry] = dict(meta)
        sign = self._sign if self.signers else None
        types = set(ALWAYS_TYPES) | self._types_at(name)
        for qtype in sorted(types):
            key = type_key(qtype)
            node[key] = render(name, qtype, self.plan(name, qtype), self.cap, name + key, signer=sign)
        # Any other type: the same answer as a type the name surely lacks.
        node[b""] = render(name, 0, self.plan(name, 0), self.cap, name + b"/other", signer=sign)
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
    for site, entries in new.by_site.items():
        old_entries = old.by_site.get(site, {})
        for question, entry in entries.items():
            prev = old_entries.get(question)
            if prev is not None:
                entry.carry_from(prev)
