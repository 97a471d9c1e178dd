"""TableBuilder: zones + registry records -> a fresh AnswerTable.

Called when the registry changes (at most once per ``etcd.batch_ms``, see
carousel/mirror.py) and never on the query path. It applies the all-down
policy, follows CNAME chains inside our zones, and renders every answer a
name can get.

Cost: the builder keeps, per service, its registrations and the address sets
it answers with. ``update`` applies a batch of changed records to them and
derives new sets from the old (rotation.py), so a change costs time in
proportion to what changed; ``build`` starts from a full list of records (a
snapshot, or a worker's copy) and diffs it against the same state, O(n).
Fixed answers (SOA, NS, NODATA, NXDOMAIN) are planned on every build but
rendered only when their plan changes: the SOA serial (the registry
revision) is a placeholder in the rendered bytes, written into a copy per
build (wire.Serial, Entry.with_serial). In signed zones the signatures cover
the serial, so there they are rendered (and signed) on every build.

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
import socket
import struct
import time
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING

import dnslib

from carousel.registry import ServiceRecord
from dnsd import wire
from dnsd.config import AllDownPolicy
from dnsd.dnssec.answers import add_signed
from dnsd.dnssec.keys import DNSKEY, NSEC, RRSIG
from dnsd.dnssec.sign import NXNAME, ZoneSigner
from dnsd.rotation import AddressSet, RotatingAnswer
from dnsd.sites import SiteMap
from dnsd.table import (
    MAX_CNAME_CHAIN,
    RFC8482_HINFO,
    RR,
    AnswerTable,
    Entry,
    NxDenial,
    Plan,
    ServiceState,
    SharedCounters,
    render,
)
from dnsd.wire import MessageWriter, RData
from dnsd.zone import Zone

if TYPE_CHECKING:
    from dnsd.cookies import ServerCookies

ADDRESS_TYPES = (wire.A, wire.AAAA)
Change = tuple[ServiceRecord | None, ServiceRecord | None]  # (before, after) of one registration


def _alias_free(qtype: int) -> bool:
    """True when no other type's bytes lowercase onto this type's.

    Answerer.respond (dnsd/respond.py) looks a question up by its bytes lowercased
    whole, type included: a type byte in a-z (SPF = 99 = 'c') would be found for
    the type whose byte is that letter in upper case (67), so such types are
    answered by name and exact type instead. A type byte in A-Z (HTTPS = 65 = 'A')
    is safe to index: that lookup never produces it (it misses, and the name
    lookup answers), while the compiled loop, which lowercases the name alone,
    finds it.
    """
    return all(not 0x61 <= b <= 0x7A for b in struct.pack("!H", qtype))


# Every name gets its own entries for these types (the ones clients ask most) even
# when the answer is NODATA, plus one per type it holds; any other type shares the
# name's default entry, and the answerer counts those answers by the asked type.
# HTTPS (RFC 9460): browsers' resolvers ask it beside A and AAAA for every name; as
# a shared-entry type it cost dnsd 0.85x NSD's CPU per query against 1.07x for A.
ALWAYS_TYPES = (wire.A, wire.AAAA, wire.HTTPS, wire.ANY)
# Answers pre-assembled whole (see Entry.prepare_full): the hot types only, to keep
# the build fast and the table small.
FULL_TYPES = frozenset(struct.pack("!H", t) for t in (wire.A, wire.AAAA))
META_ANSWERS = {wire.IXFR: wire.REFUSED, wire.AXFR: wire.REFUSED,
                wire.MAILB: wire.NOTIMP, wire.MAILA: wire.NOTIMP, wire.OPT: wire.FORMERR}  # fmt: skip


def type_key(qtype: int) -> bytes:
    """The key of a query type in an AnswerTable name node."""
    return struct.pack("!H", qtype)


def _packed(rtype: int, text: str) -> bytes:
    """An address in wire form; inet_pton is ~20x faster than ipaddress at 10,000 records."""
    try:
        return socket.inet_pton(socket.AF_INET if rtype == wire.A else socket.AF_INET6, text)
    except OSError:  # forms only ipaddress reads (an IPv6 scope id): validated already
        return wire.ipv4_bytes(text) if rtype == wire.A else wire.ipv6_bytes(text)


def _address_set(records: Iterable[ServiceRecord], rtype: int) -> AddressSet:
    """The address set of some records (a site's), each address with its heaviest weight."""
    items: dict[bytes, tuple[str, int]] = {}
    for r in records:
        for text in r.ipv4 if rtype == wire.A else r.ipv6:
            packed = _packed(rtype, text)
            old = items.get(packed)
            if old is None or old[1] < r.weight:
                items[packed] = (text, r.weight)
    return AddressSet.of(items)


class ServiceView:
    """One service's registrations and the address sets dnsd answers it with."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registered: dict[str, ServiceRecord] = {}  # node -> record
        self.up: dict[str, ServiceRecord] = {}
        # type -> packed address -> node -> (weight, text): who offers each address
        self.claims: dict[int, dict[bytes, dict[str, tuple[int, str]]]] = {t: {} for t in ADDRESS_TYPES}
        self.sets: dict[int, AddressSet] = {t: AddressSet.of({}) for t in ADDRESS_TYPES}
        self.mode = "unknown"
        # What the service answers with. While healthy, a live view of ``up``: a list copied
        # on every update was an O(n) pass (0.2 ms at 10,000 edges, timeit) that only
        # /status and the log read, through the table's ServiceState.
        self.chosen: Collection[ServiceRecord] = ()
        self.ttl = -1  # -1: the zone's service TTL
        self.degraded = True

    def claim(self, record: ServiceRecord, add: bool, touched: dict[int, set[bytes]]) -> None:
        """Add (or withdraw) a record's addresses to the claims; note which addresses moved."""
        for rtype, texts in ((wire.A, record.ipv4), (wire.AAAA, record.ipv6)):
            if not texts:
                continue
            claims = self.claims[rtype]
            for text in texts:
                packed = _packed(rtype, text)
                touched[rtype].add(packed)
                if add:
                    claims.setdefault(packed, {})[record.node] = (record.weight, text)
                else:
                    by_node = claims.get(packed)
                    if by_node is not None:
                        by_node.pop(record.node, None)
                        if not by_node:
                            del claims[packed]

    def best(self, rtype: int, packed: bytes) -> tuple[str, int] | None:
        """The text and weight an address is answered with: its heaviest claim (then first node)."""
        by_node = self.claims[rtype].get(packed)
        if not by_node:
            return None
        if len(by_node) == 1:
            for weight, text in by_node.values():
                return text, weight
        _, (weight, text) = min(by_node.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return text, weight

    def claim_all(self, records: Iterable[ServiceRecord]) -> None:
        """Claims from scratch for ``records``, then sets diffed against the current ones.

        The one O(n) step of a full build, written for speed: about 1 us per record.
        """
        self.claims = {t: {} for t in ADDRESS_TYPES}
        items: dict[int, dict[bytes, tuple[str, int]]] = {t: {} for t in ADDRESS_TYPES}
        contested: dict[int, set[bytes]] = {t: set() for t in ADDRESS_TYPES}
        for rtype, family, attr in ((wire.A, socket.AF_INET, "ipv4"), (wire.AAAA, socket.AF_INET6, "ipv6")):
            claims, found, clash = self.claims[rtype], items[rtype], contested[rtype]
            pton = socket.inet_pton
            for r in records:
                texts = getattr(r, attr)
                if not texts:
                    continue
                node, weight = r.node, r.weight
                for text in texts:
                    try:
                        packed = pton(family, text)
                    except OSError:
                        packed = _packed(rtype, text)
                    by_node = claims.get(packed)
                    if by_node is None:
                        claims[packed] = {node: (weight, text)}
                        found[packed] = (text, weight)
                    else:
                        by_node[node] = (weight, text)
                        clash.add(packed)
            for packed in clash:
                found[packed] = self.best(rtype, packed)  # type: ignore[assignment]
            self.sets[rtype] = self.sets[rtype].diff(found)

    def reclaim(self, changes: list[Change]) -> None:
        """Move the claims by a batch of changed up records; derive the sets."""
        touched: dict[int, set[bytes]] = {t: set() for t in ADDRESS_TYPES}
        for old, new in changes:
            if old is not None and old.state == "up":
                self.claim(old, False, touched)
            if new is not None and new.state == "up":
                self.claim(new, True, touched)
        for rtype in ADDRESS_TYPES:
            if touched[rtype]:
                moved = {p: self.best(rtype, p) for p in touched[rtype]}
                self.sets[rtype] = self.sets[rtype].derive(moved)


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
        unknown_rcode: int = wire.NOERROR,
    ) -> None:
        self.zones = {z.origin: z for z in zones}
        # Zone origin -> its signer, for the zones served with DNSSEC.
        self.signers = signers or {}
        self.cookies: ServerCookies | None = None  # handed to every table (DNS Cookies on)
        # workers = N: answer key -> the node's rotation counter for it (dnsd/shared.py).
        self.shared: SharedCounters | None = None
        # Site-aware answers: site -> its fallback order (itself first); {} when off.
        self.site_orders: dict[str, list[str]] = {}
        self.site_map: SiteMap | None = None
        self.payload_size = payload_size
        self.cap = max_answer_records
        self.all_down = all_down
        self.degraded_ttl = degraded_ttl
        self._last_healthy: dict[str, Sequence[ServiceRecord]] = {}
        # What a service name answers while nothing servable is known (NODATA, or SERVFAIL
        # when a too-old registry snapshot was refused).
        self.unknown_rcode = unknown_rcode
        self._names = {z.origin: z.names() for z in zones}
        self._wanted = sorted({s for z in zones for s in z.services.values()})
        self._views = {s: ServiceView(s) for s in self._wanted}
        self._synced = False
        # (name, type key) -> its rotating answer in the last table, to re-use or patch.
        self._rotations: dict[tuple[bytes, bytes], RotatingAnswer] = {}
        # Filled per build:
        self._serial = 1
        self._soa_rdata: dict[tuple[bytes, int], RData] = {}
        # Unsigned zones: fixed answers rendered once with a placeholder serial, by
        # (name, type, RRL key) -> (the plan they were rendered from, the entry), kept
        # from one build to the next for the answers the build used.
        self._patch_serial = not self.signers
        self._serial_bytes = b"\x00\x00\x00\x01"
        self._fixed: dict[tuple[bytes | None, int, bytes], tuple[Plan, Entry]] = {}
        self._fixed_next: dict[tuple[bytes | None, int, bytes], tuple[Plan, Entry]] = {}

    @property
    def last_healthy(self) -> dict[str, Sequence[ServiceRecord]]:
        """Per service, the last set of up instances (what the last-known policy serves)."""
        out = dict(self._last_healthy)
        for service, view in self._views.items():
            if view.up:
                out[service] = list(view.up.values())
        return out

    @last_healthy.setter
    def last_healthy(self, value: dict[str, Sequence[ServiceRecord]]) -> None:
        self._last_healthy = dict(value)

    def next_refresh(self) -> float | None:
        """When the first DNSSEC signature in use is due for renewal (None: nothing signed).

        The signers know what the last build asked them for; the rotating answers'
        windows that a build kept carry their own renewal times (dnsd/dnssec/answers.py).
        """
        due = [t for s in self.signers.values() if (t := s.next_refresh()) is not None]
        due += [a.signed.due for a in self._rotations.values() if a.signed is not None]  # type: ignore[attr-defined]
        return min(due, default=None)

    def rotating_keys(self) -> list[bytes]:
        """The answer keys (``rrl_key``) of every answer that can rotate, from the zones alone.

        With ``workers = N`` the supervisor gives each its node-wide rotation counter
        before any table is built, so it need not build tables to hand out counters
        (workers.py): service names, names with several static addresses, and CNAMEs
        (a chain can end at either), for A and AAAA, and per site for service names.
        """
        keys = []
        for origin, zone in self.zones.items():
            for name in sorted(self._names[origin]):
                if self._zone_of(name) is not zone:
                    continue
                static = zone.static.get(name, {})
                for qtype in ADDRESS_TYPES:
                    rrset = static.get(qtype)
                    if name in zone.services or wire.CNAME in static or (rrset and len(rrset.rdatas) > 1):
                        key = name + type_key(qtype)
                        keys.append(key)
                        if name in zone.services:
                            keys += [key + b"@" + site.encode() for site in self.site_orders]
        return keys

    # --- registry -> per-service answer sets ------------------------------------------

    def _choose(self, view: ServiceView, synced: bool) -> None:
        """Apply the all-down policy to a view: what it answers with, from scratch (O(n))."""
        up = view.up
        view.degraded = True
        if up:
            view.chosen, view.mode, view.degraded = list(up.values()), "healthy", False
        elif not synced:
            view.chosen, view.mode = [], "unknown"
        elif self.all_down == "last-known":
            view.chosen = self._last_healthy.get(view.service, [])
            view.mode = "last-known" if view.chosen else "nodata"
        elif self.all_down == "all-registered":
            view.chosen = list(view.registered.values())
            view.mode = "all-registered" if view.chosen else "nodata"
        else:
            view.chosen, view.mode = [], "nodata"
        view.ttl = self.degraded_ttl if view.degraded else -1
        view.claim_all(view.chosen)

    def _reset(self, records: Iterable[ServiceRecord], synced: bool) -> None:
        """Every view from a full list of records (diffed against what the views held)."""
        registered: dict[str, dict[str, ServiceRecord]] = {s: {} for s in self._wanted}
        for r in records:
            by_node = registered.get(r.service)
            if by_node is not None:
                by_node[r.node] = r
        for service, view in self._views.items():
            if view.up:
                self._last_healthy[service] = list(view.up.values())
            view.registered = registered[service]
            view.up = {n: r for n, r in view.registered.items() if r.state == "up"}
            self._choose(view, synced)
        self._synced = synced

    def _apply(self, changes: Iterable[Change], synced: bool) -> None:
        """Apply changed registrations to the views; O(what changed) while a service stays healthy."""
        if synced != self._synced:
            self._synced = synced
            for view in self._views.values():
                self._choose(view, synced)
        batches: dict[str, list[Change]] = {}
        for old, new in changes:
            some = new if new is not None else old
            if some is None or some.service not in self._views:
                continue
            view = self._views[some.service]
            before = view.registered.get(some.node)  # our own copy is the truth for "before"
            if before is None and new is None:
                continue
            if new is None or new.service != some.service:
                view.registered.pop(some.node, None)
                new = None
            else:
                view.registered[new.node] = new
            batches.setdefault(some.service, []).append((before, new))
        for service, batch in batches.items():
            view = self._views[service]
            was_up = view.up
            last_up = list(was_up.values()) if was_up and len(batch) >= len(was_up) else None
            for before, after in batch:
                node = (after or before).node  # type: ignore[union-attr]
                if after is not None and after.state == "up":
                    was_up[node] = after
                else:
                    was_up.pop(node, None)
            if view.mode == "healthy" and view.up and synced:
                view.reclaim(batch)
                view.chosen = view.up.values()
            else:
                if not view.up and last_up:
                    self._last_healthy[service] = last_up
                self._choose(view, synced)

    def _states(self) -> dict[str, ServiceState]:
        return {s: ServiceState(s, v.mode, v.chosen, v.ttl) for s, v in self._views.items()}

    # --- planning ---------------------------------------------------------------------

    def _zone_of(self, name: bytes) -> Zone | None:
        for _, suffix in wire.suffixes(name):
            zone = self.zones.get(suffix)
            if zone is not None:
                return zone
        return self.zones.get(wire.ROOT)

    def _soa(self, zone: Zone, ttl: int) -> RR:
        # Unsigned: one RDATA per zone with a placeholder serial (see _fixed_entry).
        key = (zone.origin, 0 if self._patch_serial else self._serial)
        rdata = self._soa_rdata.get(key)
        if rdata is None:  # once per zone (signed: and build): a build asks for it per name and type
            s = zone.soa
            times = (key[1], s.refresh, s.retry, s.expire, s.minimum)
            rd = dnslib.SOA(wire.to_label(zone.mname), wire.to_label(zone.rname), times)
            rdata = wire.rdata(rd)
            if self._patch_serial:
                rdata[-1] = wire.Serial(rdata[-1])  # the times: serial first (RFC 1035 3.3.13)
            self._soa_rdata[key] = rdata
        return (zone.origin, wire.SOA, ttl, rdata)

    def _fixed_entry(self, qname: bytes | None, qtype: int, plan: Plan, rrl_key: bytes) -> Entry:
        """A fixed answer: rendered when its plan changed, else copied with this build's serial."""
        key = (qname, qtype, rrl_key)
        done = self._fixed.get(key)
        if done is None or done[0] != plan:
            done = (plan, render(qname, qtype, plan, self.cap, rrl_key))
        self._fixed_next[key] = done
        return done[1].with_serial(self._serial_bytes)

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
            sets = self._views[service].sets
            types |= {t for t in ADDRESS_TYPES if sets[t].keys}
        if name == zone.origin:
            types |= {wire.SOA, wire.NS}
            if zone.origin in self.signers:
                types.add(DNSKEY)
        return types

    def _clock(self) -> float:
        """The signers' time (one clock for every zone: tests give the signers a fake one)."""
        for signer in self.signers.values():
            return signer.clock()
        return time.time()

    def _sign(self, owner: bytes, rtype: int, ttl: int, rdatas: list[bytes]) -> tuple[list[bytes], float]:
        """RRSIGs of an RRset by the signer of the zone that holds its owner, and when they are due."""
        zone = self._zone_of(owner)
        signer = self.signers.get(zone.origin) if zone is not None else None
        return signer.signed(owner, rtype, ttl, rdatas) if signer is not None else ([], float("inf"))

    def _data(self, zone: Zone, name: bytes, qtype: int) -> Plan:
        """The answer for a name that exists in ``zone`` and is not a CNAME."""
        static = zone.static.get(name, {})
        service = zone.services.get(name)
        if service is not None and qtype in ADDRESS_TYPES:
            view = self._views[service]
            aset = view.sets[qtype]
            if not aset.keys:
                if view.mode == "unknown" and self.unknown_rcode != wire.NOERROR:
                    return Plan(rcode=self.unknown_rcode)
                return self._negative(zone, wire.NOERROR, view.degraded, name)
            return Plan(rotating=(name, qtype, zone.service_ttl if view.ttl < 0 else view.ttl, aset))
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
            items = {rd[0]: (str(ipaddress.ip_address(rd[0])), 1) for rd in rrset.rdatas}
            return Plan(rotating=(name, qtype, rrset.ttl, AddressSet.of(items)))
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
        self._reset(records, synced)
        return self._assemble(revision, synced, previous)

    def update(
        self,
        changes: Iterable[Change],
        revision: int,
        *,
        synced: bool = True,
        previous: AnswerTable | None = None,
    ) -> AnswerTable:
        """The next table after ``changes`` ((before, after) per changed registration)."""
        self._apply(changes, synced)
        return self._assemble(revision, synced, previous)

    def _assemble(self, revision: int, synced: bool, previous: AnswerTable | None) -> AnswerTable:
        table = AnswerTable(revision, synced, self.payload_size)
        table.cookies = self.cookies
        self._serial = table.serial
        self._serial_bytes = struct.pack("!I", table.serial)
        if not self._patch_serial:
            self._soa_rdata.clear()
        self._fixed_next = {}
        for signer in self.signers.values():
            signer.begin_build()
        table.services = self._states()
        rotations: dict[tuple[bytes, bytes], RotatingAnswer] = {}
        for qtype, rcode in META_ANSWERS.items():
            table.meta[type_key(qtype)] = Entry(qtype, rcode, False, (0, 0, 0), [b""])
        for origin, zone in self.zones.items():
            table.nxdomain[origin] = self._render_nxdomain(zone)
            for name in self._names[origin]:
                if self._zone_of(name) is not zone:
                    continue  # a deeper zone's apex (or above it): that zone answers
                node = self._node(zone, name, table.meta, rotations)
                table.names[name] = node
                for key, entry in node.items():
                    if key and key not in table.meta and _alias_free(entry.qtype):
                        question = name + key + b"\x00\x01"
                        table.questions[question] = entry
                        if key in FULL_TYPES:
                            entry.prepare_full(question, table.opt)
        self._rotations = rotations
        if self.site_map is not None:
            self._render_sites(table)
        self._fixed, self._fixed_next = self._fixed_next, {}
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
                view = self._views[service]
                records, ttl, degraded = view.chosen, view.ttl, view.degraded
                for qtype in ADDRESS_TYPES:
                    question = name + type_key(qtype) + b"\x00\x01"
                    default = table.questions.pop(question, None)
                    if default is None:
                        continue
                    table.site_questions[question] = default
                    for site, order in self.site_orders.items():
                        aset = next(
                            (a for o in order
                             if (a := _address_set([x for x in records if x.site == o], qtype)).keys),
                            view.sets[qtype],
                        )  # fmt: skip
                        if not aset.keys:
                            plan = self._negative(zone, wire.NOERROR, degraded, name)
                        else:
                            plan = Plan(rotating=(name, qtype, zone.service_ttl if ttl < 0 else ttl, aset))
                        key = type_key(qtype)
                        rrl_key = name + key + b"@" + site.encode()
                        if plan.rotating is None and sign is None:
                            entry = self._fixed_entry(name, qtype, plan, rrl_key)
                        else:
                            entry = render(name, qtype, plan, self.cap, rrl_key, shared=self.shared)
                        if sign is not None:
                            add_signed(entry, name, plan, sign)
                        entry.prepare_full(question, table.opt)
                        table.by_site.setdefault(site, {})[question] = entry

    def _render_nxdomain(self, zone: Zone) -> Entry:
        # The question name is not known in advance, so nothing is compressed.
        plan = self._negative(zone, wire.NXDOMAIN)
        if self._patch_serial:
            return self._fixed_entry(None, 0, plan, zone.origin + b"/nxdomain")
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

    def _node(
        self,
        zone: Zone,
        name: bytes,
        meta: dict[bytes, Entry],
        rotations: dict[tuple[bytes, bytes], RotatingAnswer],
    ) -> dict[bytes, Entry]:
        node: dict[bytes, Entry] = dict(meta)
        sign = self._sign if self.signers else None
        types = set(ALWAYS_TYPES) | self._types_at(name)
        for qtype in sorted(types):
            key = type_key(qtype)
            previous = self._rotations.get((name, key))
            plan = self.plan(name, qtype)
            if plan.rotating is None and sign is None:
                entry = self._fixed_entry(name, qtype, plan, name + key)
            else:
                entry = render(name, qtype, plan, self.cap, name + key, previous=previous, shared=self.shared)
            if sign is not None:
                add_signed(entry, name, plan, sign, previous, self._clock)
            node[key] = entry
            if entry.answer is not None:
                rotations[name, key] = entry.answer
        # Any other type: the same answer as a type the name surely lacks.
        plan = self.plan(name, 0)
        if sign is None and plan.rotating is None:
            node[b""] = other = self._fixed_entry(name, 0, plan, name + b"/other")
        else:
            node[b""] = other = render(name, 0, plan, self.cap, name + b"/other")
        if sign is not None:
            add_signed(other, name, plan, sign)
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
