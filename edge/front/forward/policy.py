"""Where a forward-proxy client may go: target parsing, port sets, name lists, address checks.

Pure functions and small classes, no I/O: the forward chain (edge/front/forward/chain.py)
asks ``DestinationPolicy.check`` about a (host, port) before anything is resolved,
and ``NetworkList.denied`` about every address the name resolved to before a
connection is opened, so a name that resolves to loopback (DNS rebinding, a
hostile hosts entry) is refused like the literal address would be.

Names are compared lower-case without a trailing dot. A suffix entry matches the
name itself and names under it at a label boundary ("example.test" matches
"www.example.test", never "badexample.test"). Regexes are searched, as in
``[[route]] regex``. Deny wins over allow; a non-empty allow list makes
everything it does not match denied.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.core.config import DomainListConfig, ForwardConfig

# One DNS label; underscores are tolerated (they exist in real names), nothing else is.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


class BadTarget(ValueError):
    """A request target the proxy cannot make sense of (400)."""


def parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """(host, port) of "host[:port]" or "[v6]:port"; host lower-case, no dot at the end, no brackets."""
    port_text: str | None
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadTarget("unclosed IPv6 literal")
        host, rest = authority[1:end].lower(), authority[end + 1 :]
        try:
            if "%" in host:  # zone identifiers name an interface of ours: never a destination
                raise ValueError
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadTarget("bad IPv6 literal") from None
        if rest and not rest.startswith(":"):
            raise BadTarget("junk after the IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, None
        if ":" in host:
            raise BadTarget("an IPv6 address needs brackets")
        host = host.lower().rstrip(".")
        if not host or len(host) > 253 or not host.isascii():
            raise BadTarget("bad host name")
        if not all(_LABEL.match(label) for label in host.split(".")):
            raise BadTarget("bad host name")
    if port_text is None:
        if default_port is None:
            raise BadTarget("missing port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise BadTarget("bad port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise BadTarget("bad port")
    return host, port


def format_authority(host: str, port: int, default_port: int | None = None) -> str:
    """The inverse of parse_authority: brackets for IPv6, no port when it is the default."""
    name = f"[{host}]" if ":" in host else host
    return name if port == default_port else f"{name}:{port}"


class PortSet:
    """Ports given as numbers and "A-B" ranges."""

    __slots__ = ("ranges", "single")

    def __init__(self, specs: list[int | str]) -> None:
        self.single: set[int] = set()
        self.ranges: list[tuple[int, int]] = []
        for spec in specs:
            low, _, high = str(spec).partition("-")
            if high:
                self.ranges.append((int(low), int(high)))
            else:
                self.single.add(int(low))

    def __contains__(self, port: int) -> bool:
        return port in self.single or any(low <= port <= high for low, high in self.ranges)


def _name(value: str) -> str:
    return value.strip().lower().rstrip(".")


class NameList:
    """Host names matched exactly, by suffix or by regex."""

    __slots__ = ("exact", "regexes", "suffixes")

    def __init__(self, config: DomainListConfig) -> None:
        self.exact = frozenset(_name(n) for n in config.exact)
        # Stored with a leading dot: "www.example.test".endswith(".example.test").
        self.suffixes = tuple("." + _name(n).lstrip(".") for n in config.suffix)
        self.regexes = tuple(re.compile(r) for r in config.regex)

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes or self.regexes)

    def matches(self, host: str) -> bool:
        """Does ``host`` (already lower-case, no trailing dot) match any entry?"""
        if host in self.exact:
            return True
        dotted = "." + host
        if any(dotted.endswith(s) for s in self.suffixes):
            return True
        return any(r.search(host) for r in self.regexes)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible (RFC 4291 2.5.5.1)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for: mapped, compatible, NAT64, 6to4, Teredo."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # (server, client): either may be internal
    return []


class NetworkList:
    """Address blocks (minus ``allow`` exceptions); IPv6 forms that carry an IPv4 address count
    as that address too, so 64:ff9b::10.0.0.1 or 2002:a00:1:: is 10.0.0.1 to the check."""

    __slots__ = ("allow", "networks")

    def __init__(self, cidrs: list[str], allow: list[str] | None = None) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self.allow = tuple(ipaddress.ip_network(c, strict=False) for c in allow or ())

    def denied(self, address: str) -> bool:
        """Is ``address`` inside one of the blocks? Unparsable addresses are denied."""
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return True
        forms: list[Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            carried = carried_ipv4(ip)
            if ip.ipv4_mapped is not None:
                forms = list[Address](carried)  # ::ffff:a.b.c.d is a.b.c.d on the wire
            else:
                forms += carried
        return any(self._denied(form) for form in forms)

    def _denied(self, ip: Address) -> bool:
        if any(ip.version == n.version and ip in n for n in self.allow):
            return False
        return any(ip.version == n.version and ip in n for n in self.networks)


class DestinationPolicy:
    """The `[forward]` rules about destinations, compiled once."""

    __slots__ = ("allow", "connect_ports", "deny", "http_ports", "networks")

    def __init__(self, config: ForwardConfig) -> None:
        self.connect_ports = PortSet(config.connect_ports)
        self.http_ports = PortSet(config.http_ports)
        self.allow = NameList(config.allow)
        self.deny = NameList(config.deny)
        self.networks = NetworkList(config.deny_networks, config.allow_networks)

    def check(self, host: str, port: int, tunnel: bool) -> str | None:
        """None when the destination may be tried, else why not: "port", "denied" or "not-allowed"."""
        if port not in (self.connect_ports if tunnel else self.http_ports):
            return "port"
        if self.deny and self.deny.matches(host):
            return "denied"
        if self.allow and not self.allow.matches(host):
            return "not-allowed"
        if _is_literal(host) and self.networks.denied(host):
            return "network"
        return None


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
