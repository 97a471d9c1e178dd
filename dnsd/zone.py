"""Compile ``[[zone]]`` tables into wire-format data the answer table is built from.

Every mistake a zone can hold (a bad name, a CNAME next to other data, a
service name that also has static addresses, a glue address for a name
outside the zone) is found here, once, at load time, and reported with the
config key that holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import dnslib

from dnsd import wire
from dnsd.config import SOAConfig, ZoneConfig
from dnsd.wire import RData


class ZoneError(ValueError):
    """A zone definition that cannot be served; ``key`` is the dotted config path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class StaticRRset:
    """The records of one (name, type) from the config file."""

    rtype: int
    ttl: int
    rdatas: tuple[RData, ...]


@dataclass(frozen=True)
class Zone:
    """One zone, ready to be turned into answers."""

    origin: bytes
    soa: SOAConfig
    mname: bytes
    rname: bytes
    ns: tuple[bytes, ...]
    ns_ttl: int
    service_ttl: int
    services: dict[bytes, str]  # owner name -> registry service
    static: dict[bytes, dict[int, StaticRRset]] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return wire.to_text(self.origin)

    @property
    def negative_ttl(self) -> int:
        """RFC 2308: the TTL of the SOA in negative answers."""
        return min(self.soa.ttl, self.soa.minimum)

    def names(self) -> set[bytes]:
        """Every name that exists in the zone, empty non-terminals included."""
        owners = {self.origin, *self.services, *self.static}
        out = set()
        for name in owners:
            while True:
                out.add(name)
                if name == self.origin:
                    break
                name = wire.parent(name)
        return out


def _absolute(name: str, origin: bytes, key: str) -> bytes:
    """A config name (relative, '@' or absolute with a trailing dot) as wire bytes."""
    if name == "@":
        return origin
    try:
        if name.endswith("."):
            return wire.to_wire(name)
        rel = wire.to_wire(name)
    except wire.BadName as exc:
        raise ZoneError(key, str(exc)) from None
    full = rel[:-1] + origin
    if len(full) > wire.MAX_NAME:
        raise ZoneError(key, f"name too long once the origin is appended: {name!r}")
    return full


def _owner(name: str, origin: bytes, key: str) -> bytes:
    """An owner name, which must lie inside the zone."""
    full = _absolute(name, origin, key)
    if not wire.is_subdomain(full, origin):
        raise ZoneError(key, f"{name!r} is outside the zone {wire.to_text(origin)}")
    return full


def _address(rtype: int, value: str, key: str) -> bytes:
    try:
        return wire.ipv4_bytes(value) if rtype == wire.A else wire.ipv6_bytes(value)
    except ValueError:
        kind = "IPv4" if rtype == wire.A else "IPv6"
        raise ZoneError(key, f"not an {kind} address: {value!r}") from None


def _rdata(rtype: int, value: str, origin: bytes, key: str) -> RData:
    """The RDATA of a static record's value; names are checked by our rules, the rest by dnslib."""
    # Addresses stay with ipaddress: dnslib's parsers are lax ('01.2.3.4' passes, and
    # '2001:db8::1::2' becomes another address) and its A/AAAA RDATA is the packed address anyway.
    if rtype in (wire.A, wire.AAAA):
        return [_address(rtype, value, key)]
    rd: dnslib.RD
    if rtype == wire.CNAME:
        rd = dnslib.CNAME(wire.to_label(_absolute(value, origin, key)))
    elif rtype == wire.TXT:
        # A value longer than one character-string (255 bytes) becomes several.
        raw = value.encode("utf-8")
        rd = dnslib.TXT([raw[i : i + 255] for i in range(0, len(raw) or 1, 255)])
    else:  # MX: "preference exchange"
        pref, _, exchange = value.strip().partition(" ")
        if not (pref.isascii() and pref.isdigit()) or not exchange.strip():
            raise ZoneError(key, f"MX value must be 'preference exchange', e.g. '10 mail', found {value!r}")
        target = wire.to_label(_absolute(exchange.strip(), origin, key))
        try:
            rd = dnslib.MX(target, int(pref))
        except ValueError:
            raise ZoneError(key, f"MX preference must be 0-65535, found {pref}") from None
    return wire.rdata(rd)


class _ZoneBuilder:
    def __init__(self, cfg: ZoneConfig, key: str) -> None:
        self.cfg = cfg
        self.key = key
        try:
            self.origin = wire.to_wire(cfg.origin)
        except wire.BadName as exc:
            raise ZoneError(f"{key}.origin", str(exc)) from None
        self.static: dict[bytes, dict[int, StaticRRset]] = {}
        self.where: dict[tuple[bytes, int], str] = {}  # (owner, type) -> key, for messages

    def add(self, owner: bytes, rtype: int, ttl: int, rdata: RData, key: str) -> None:
        by_type = self.static.setdefault(owner, {})
        old = by_type.get(rtype)
        if old is None:
            by_type[rtype] = StaticRRset(rtype, ttl, (rdata,))
            self.where[(owner, rtype)] = key
            return
        if old.ttl != ttl:
            raise ZoneError(
                key,
                f"records of one name and type must share a TTL ({old.ttl} at {self.where[(owner, rtype)]})",
            )
        if rdata not in old.rdatas:
            by_type[rtype] = StaticRRset(rtype, ttl, (*old.rdatas, rdata))

    def build(self) -> Zone:
        cfg, key, origin = self.cfg, self.key, self.origin
        ns_names = []
        for i, ns in enumerate(cfg.ns):
            nkey = f"{key}.ns[{i}]"
            ns_name = _absolute(ns.name, origin, f"{nkey}.name")
            ns_names.append(ns_name)
            glue = [(wire.A, a) for a in ns.ipv4] + [(wire.AAAA, a) for a in ns.ipv6]
            if glue and not wire.is_subdomain(ns_name, origin):
                raise ZoneError(nkey, "glue addresses only make sense for a name inside the zone")
            for rtype, addr in glue:
                self.add(ns_name, rtype, cfg.ns_ttl, [_address(rtype, addr, nkey)], nkey)
        for i, rec in enumerate(cfg.record):
            rkey = f"{key}.record[{i}]"
            owner = _owner(rec.name, origin, f"{rkey}.name")
            rtype = wire.TYPE_CODES[rec.type]
            self.add(owner, rtype, rec.ttl, _rdata(rtype, rec.value, origin, f"{rkey}.value"), rkey)

        for owner, by_type in self.static.items():
            if wire.CNAME in by_type:
                where = self.where[(owner, wire.CNAME)]
                if owner == origin:
                    raise ZoneError(where, "a CNAME cannot sit at the zone apex (it has SOA and NS)")
                if len(by_type) > 1 or len(by_type[wire.CNAME].rdatas) > 1:
                    raise ZoneError(where, "a CNAME name can hold no other record (RFC 1034)")

        services: dict[bytes, str] = {}
        for name, service in cfg.services.items():
            skey = f"{key}.services.{name}"
            owner = _owner(name, origin, skey)
            clash = {wire.A, wire.AAAA, wire.CNAME} & set(self.static.get(owner, {}))
            if clash:
                what = ", ".join(wire.TYPE_NAMES[t] for t in sorted(clash))
                raise ZoneError(skey, f"the name also has static {what} records")
            services[owner] = service

        mname = _absolute(cfg.soa.mname, origin, f"{key}.soa.mname") if cfg.soa.mname else ns_names[0]
        rname = _absolute(cfg.soa.rname, origin, f"{key}.soa.rname")
        return Zone(
            origin=origin,
            soa=cfg.soa,
            mname=mname,
            rname=rname,
            ns=tuple(dict.fromkeys(ns_names)),
            ns_ttl=cfg.ns_ttl,
            service_ttl=cfg.service_ttl,
            services=services,
            static=self.static,
        )


def compile_zones(configs: Sequence[ZoneConfig]) -> list[Zone]:
    """Compile and cross-check every zone; ZoneError names the offending key."""
    zones: list[Zone] = []
    seen: dict[bytes, int] = {}
    for i, cfg in enumerate(configs):
        zone = _ZoneBuilder(cfg, f"zone[{i}]").build()
        if zone.origin in seen:
            raise ZoneError(f"zone[{i}].origin", f"zone {cfg.origin!r} is already zone[{seen[zone.origin]}]")
        seen[zone.origin] = i
        zones.append(zone)
    # A zone inside another (sub.example.test in example.test) owns its names: the
    # parent may not define records there, or the two would answer differently.
    for i, outer in enumerate(zones):
        for j, inner in enumerate(zones):
            if i == j or inner.origin == outer.origin or not wire.is_subdomain(inner.origin, outer.origin):
                continue
            owners = [*outer.static, *outer.services]
            for owner in owners:
                if wire.is_subdomain(owner, inner.origin):
                    raise ZoneError(
                        f"zone[{i}]",
                        f"{wire.to_text(owner)} lies inside zone[{j}] ({wire.to_text(inner.origin)}); "
                        "define it there",
                    )
    return zones
