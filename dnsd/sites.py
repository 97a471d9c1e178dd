"""Site-aware answers: which site a client is in, from EDNS Client Subnet or its source address.

Theory of operation
-------------------
``[dns.sites]`` maps site names to client networks and a fallback order.
Edges carry a site label in their registry records (the agent's
``[agent] site``). For a name mapped to a service, the table holds one
answer per site: that site's healthy edges, or, when it has none, those of
the first site of its fallback list that has some (then the other sites by
name, then every healthy edge): nearest first.

A query's client address is the EDNS Client Subnet option's (RFC 7871) when
present, else the resolver's source address. Either is cut to /24 (IPv4) or
/56 (IPv6) before use, the privacy limits of RFC 7871 §11.1, so nothing
finer than that ever selects an answer. The longest configured network
containing the address gives the site.

ECS answers echo the option with a SCOPE PREFIX-LENGTH saying for how wide
a block the answer holds (RFC 7871 §7.2.1): the shortest prefix, from the
matched network's length up, whose block around the client holds no network
of another answer; for an address in no network, the shortest prefix whose
block touches no configured network at all. Answers that do not depend on
the client (every other name) say scope 0. The scope never exceeds the bits
used.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ECS = 8  # EDNS option code (RFC 7871 §6)
V4_CAP, V6_CAP = 24, 56  # RFC 7871 §11.1: never look at more of an address than this
_CACHE_MAX = 65_536


class EcsError(ValueError):
    """An ECS option a server must answer FORMERR (RFC 7871 §7.1.2)."""


@dataclass(frozen=True)
class ClientSubnet:
    """A parsed ECS option: family 1 (IPv4) or 2 (IPv6), the prefix, and the address as an integer."""

    family: int
    source: int
    address: int  # the first ``source`` bits, left-aligned in 32 or 128 bits
    raw: bytes  # the option data as sent (echoed with our scope)

    def reply(self, scope: int) -> bytes:
        """The ECS option of our answer: the client's, with SCOPE PREFIX-LENGTH set."""
        data = self.raw[:3] + bytes((scope,)) + self.raw[4:]
        return struct.pack("!HH", ECS, len(data)) + data


def parse_ecs(data: bytes) -> ClientSubnet:
    """Validate and parse ECS option data; EcsError when it is malformed."""
    if len(data) < 4:
        raise EcsError("ECS option shorter than 4 bytes")
    family, source, scope = struct.unpack_from("!HBB", data)
    if family not in (1, 2):
        raise EcsError(f"ECS family {family}")
    bits = 32 if family == 1 else 128
    addr = data[4:]
    if source > bits or scope != 0 or len(addr) != (source + 7) // 8:
        raise EcsError("ECS prefix length, scope or address length")
    value = int.from_bytes(addr.ljust(bits // 8, b"\x00"), "big")
    if value & ((1 << (bits - source)) - 1):
        raise EcsError("ECS address has bits set beyond its prefix")
    return ClientSubnet(family, source, value, data)


class SiteMap:
    """Client networks -> site, with the scope each decision holds for."""

    def __init__(self, sites: dict[str, list[str]]) -> None:
        # (family, prefix length, network as int, site), longest first.
        self.networks: list[tuple[int, int, int, str]] = []
        for site, nets in sites.items():
            for text in nets:
                net = ipaddress.ip_network(text, strict=False)
                fam = 1 if net.version == 4 else 2
                self.networks.append((fam, net.prefixlen, int(net.network_address), site))
        self.networks.sort(key=lambda n: -n[1])
        self._cache: dict[tuple[int, int, int], tuple[str | None, int]] = {}

    def lookup(self, family: int, address: int, used: int) -> tuple[str | None, int]:
        """(site or None, scope) for the first ``used`` bits of ``address``."""
        key = (family, address, used)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            hit = self._cache[key] = self._decide(family, address, used)
        return hit

    def _decide(self, family: int, address: int, used: int) -> tuple[str | None, int]:
        bits = 32 if family == 1 else 128

        def block(prefix: int) -> tuple[int, int]:
            mask = ((1 << prefix) - 1) << (bits - prefix) if prefix else 0
            return address & mask, prefix

        def inside(net: tuple[int, int, int, str], base: int, prefix: int) -> bool:
            """The network overlaps the block base/prefix."""
            shorter = min(prefix, net[1])
            mask = ((1 << shorter) - 1) << (bits - shorter) if shorter else 0
            return (net[2] & mask) == (base & mask)

        nets = [n for n in self.networks if n[0] == family]
        match = next((n for n in nets if n[1] <= used and inside(n, address, used)), None)
        start = match[1] if match is not None else 0
        site = match[3] if match is not None else None
        for prefix in range(start, used + 1):
            base, _ = block(prefix)
            # Another answer inside this block: a network of another site, or a deeper one
            # of any site (its own, more specific rule could change with config).
            if not any(inside(n, base, prefix) and (match is None or (n is not match and n[1] > start))
                       for n in nets):  # fmt: skip
                return site, prefix
        return site, used


def cap(family: int) -> int:
    """The most bits of an address that may select an answer (RFC 7871 §11.1)."""
    return V4_CAP if family == 1 else V6_CAP


def address_of(host: str) -> tuple[int, int]:
    """(family, address as int) of a text address."""
    addr = ipaddress.ip_address(host.partition("%")[0])
    return (1 if addr.version == 4 else 2), int(addr)


def site_order(site: str, sites: dict[str, list[str]]) -> list[str]:
    """The sites to take edges from for clients of ``site``: itself, its fallbacks, the rest by name."""
    order = [site, *sites.get(site, [])]
    order += sorted(s for s in sites if s not in order)
    return list(dict.fromkeys(order))
