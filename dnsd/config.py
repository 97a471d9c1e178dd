"""dnsd configuration: every option with its default, validated at load.

A minimal file::

    [dns]
    listen = ["127.0.0.1:1053"]

    [[zone]]
    origin = "example.test"
    services = { "www" = "edge", "@" = "edge" }

    [[zone.ns]]
    name = "ns1"
    ipv4 = ["192.0.2.53"]

Names in a zone are relative to its origin unless they end with a dot; ``@``
is the origin itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from carousel.config import (
    AdminConfig,
    EtcdConfig,
    LogConfig,
    address_problem,
    load_config,
    non_negative,
    positive,
)
from carousel.registry import check_name
from carousel.snapshot import SnapshotConfig

AllDownPolicy = Literal["last-known", "all-registered", "nodata"]
RecordType = Literal["A", "AAAA", "CNAME", "TXT", "MX"]

MAX_TTL = 2**31 - 1


def ttl_value(v: int) -> str | None:
    """Validator: a TTL in seconds (RFC 2181: 0 to 2^31-1)."""
    return None if 0 <= v <= MAX_TTL else f"must be a TTL 0-{MAX_TTL}, found {v}"


def u32(v: int) -> str | None:
    """Validator: an unsigned 32-bit number (SOA timers)."""
    return None if 0 <= v < 2**32 else f"must be 0-4294967295, found {v}"


def split_hostport(text: str) -> tuple[str, int]:
    """('::', 53) from '[::]:53'; ValueError when it is not host:port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected 'host:port' or '[v6]:port', found {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 listen addresses as '[addr]:port', found {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address in 'host:port', found {text!r}") from None
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, int(port)


def _listen_list(values: list[str]) -> str | None:
    if not values:
        return "at least one listen address is required"
    for v in values:
        try:
            split_hostport(v)
        except ValueError as exc:
            return str(exc)
    return None


def _cidr_list(values: list[str]) -> str | None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"expected CIDR networks like '192.0.2.0/24', found {v!r}"
    return None


@dataclass(frozen=True)
class RRLConfig:
    """Response Rate Limiting as in BIND, per client prefix and response (UDP only)."""

    enabled: bool = True
    # Responses per second per (client prefix, name and type) before limiting.
    # Generous: a resolver honouring a 5 s TTL asks far less often than this.
    responses_per_second: int = field(default=100, metadata={"check": positive})
    # Seconds of debt a flooder can accumulate: it stays limited this long after it stops.
    window: int = field(default=5, metadata={"check": positive})
    # Every Nth limited response is sent truncated (TC=1) instead of dropped, so a
    # real client behind a spoofed address retries over TCP. 0 = always drop.
    slip: int = field(default=2, metadata={"check": non_negative})
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    # Beyond this many tracked accounts, idle ones are forgotten first.
    max_accounts: int = field(default=100_000, metadata={"check": positive})
    exempt: list[str] = field(default_factory=list, metadata={"check": _cidr_list})

    def validate(self) -> str | None:
        if not 8 <= self.ipv4_prefix <= 32:
            return f"ipv4_prefix: must be 8-32, found {self.ipv4_prefix}"
        if not 16 <= self.ipv6_prefix <= 128:
            return f"ipv6_prefix: must be 16-128, found {self.ipv6_prefix}"
        return None


@dataclass(frozen=True)
class DnssecConfig:
    """Signature timing for every signed zone (RFC 6781 §4.4.2), in seconds."""

    # How long a signature is valid from the moment it is made.
    signature_validity: int = field(default=14 * 86400, metadata={"check": positive})
    # Re-sign (in the background) once less than this is left of a signature's validity.
    signature_refresh: int = field(default=5 * 86400, metadata={"check": positive})
    # Expirations are spread over this much (less than the validity) so they do not all fall together.
    signature_jitter: int = field(default=12 * 3600, metadata={"check": non_negative})
    # Inception is set this far in the past, for validators whose clocks run slow.
    inception_offset: int = field(default=3600, metadata={"check": non_negative})

    def validate(self) -> str | None:
        if self.signature_refresh + self.signature_jitter >= self.signature_validity:
            return (
                "signature_refresh + signature_jitter must be less than signature_validity, found "
                f"{self.signature_refresh} + {self.signature_jitter} >= {self.signature_validity}"
            )
        return None


@dataclass(frozen=True)
class SiteConfig:
    """One site: the client networks it serves, and where its clients go when it has no edge."""

    networks: list[str] = field(default_factory=list, metadata={"check": _cidr_list})
    # Other sites, nearest first; sites not listed come after them, by name.
    fallback: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CookiesConfig:
    """DNS Cookies (RFC 7873, server cookies by RFC 9018); the secret is shared through etcd."""

    enabled: bool = False
    # A new cluster-wide secret this often; cookies of the one before stay valid.
    secret_rotation: float = field(default=86400.0, metadata={"check": positive})
    # How often each dnsd reads the secret from etcd (and rotates it when due).
    poll_interval: float = field(default=10.0, metadata={"check": positive})


@dataclass(frozen=True)
class DnssecKeyConfig:
    """One DNSSEC key of a zone: a BIND .private file (`carousel dnssec keygen` writes one)."""

    file: str
    # csk: signs everything; ksk: signs the DNSKEY RRset; zsk: signs the rest.
    role: Literal["csk", "ksk", "zsk"] = "csk"
    # active: in the DNSKEY RRset and signing; published: in the DNSKEY RRset only
    # (the first and last steps of a pre-publish rollover, see dnsd/README.md "DNSSEC").
    state: Literal["active", "published"] = "active"


@dataclass(frozen=True)
class ZoneDnssecConfig:
    """A zone's DNSSEC keys; no keys: the zone is served unsigned."""

    key: list[DnssecKeyConfig] = field(default_factory=list)
    dnskey_ttl: int = field(default=3600, metadata={"check": ttl_value})


@dataclass(frozen=True)
class DnsConfig:
    """Listeners, transport limits and answer policy."""

    listen: list[str] = field(
        default_factory=lambda: ["0.0.0.0:53", "[::]:53"], metadata={"check": _listen_list}
    )
    # Processes sharing the listen ports through SO_REUSEPORT (1 = no supervisor).
    workers: int = field(default=1, metadata={"check": positive})
    # "mmsg": a receive thread per UDP socket taking datagrams in batches with
    # recvmmsg/sendmmsg (Linux; elsewhere it falls back to "thread");
    # "thread": a receive thread doing one recvfrom/sendto per datagram;
    # "asyncio": a DatagramProtocol on the event loop.
    udp_engine: Literal["mmsg", "thread", "asyncio"] = "mmsg"
    # EDNS0 payload size we advertise and accept (1232: the DNS flag day 2020 value).
    udp_payload_size: int = 1232
    max_answer_records: int = field(default=8, metadata={"check": positive})
    all_down: AllDownPolicy = "last-known"
    # TTL of answers given while degraded (all-down fallback, nothing known yet).
    degraded_ttl: int = field(default=1, metadata={"check": ttl_value})
    tcp_idle_timeout: float = field(default=10.0, metadata={"check": positive})
    tcp_max_connections: int = field(default=1024, metadata={"check": positive})
    tcp_max_connections_per_client: int = field(default=32, metadata={"check": positive})
    # A client that does not read its answers may not queue more than this.
    tcp_max_pending_bytes: int = field(default=256 * 1024, metadata={"check": positive})
    rrl: RRLConfig = field(default_factory=RRLConfig)
    dnssec: DnssecConfig = field(default_factory=DnssecConfig)
    cookies: CookiesConfig = field(default_factory=CookiesConfig)
    # Site-aware answers (dnsd/sites.py): site name -> its client networks and fallbacks.
    # Empty (the default): every client gets the same answers.
    sites: dict[str, SiteConfig] = field(default_factory=dict)

    def validate(self) -> str | None:
        if not 512 <= self.udp_payload_size <= 65535:
            return f"udp_payload_size: must be 512-65535, found {self.udp_payload_size}"
        for name, site in self.sites.items():
            try:
                check_name("site", name)
            except ValueError as exc:
                return f"sites.{name}: {exc}"
            for i, other in enumerate(site.fallback):
                if other not in self.sites or other == name:
                    return (
                        f"sites.{name}.fallback[{i}]: expected another site in [dns.sites], found {other!r}"
                    )
        return None


@dataclass(frozen=True)
class SOAConfig:
    """The zone's SOA; the serial is not configured: it follows the registry revision."""

    mname: str = ""  # default: the first NS name
    rname: str = "hostmaster"  # the mailbox hostmaster@<origin>, written as a name
    # No secondary transfers the zone (every dnsd reads the registry), so the three timers
    # below only inform; they take Zonemaster's recommended floors (ZONE02, ZONE04, ZONE05;
    # RFC 1912 asks for an expire of 2-4 weeks), which its test against dnsd checks.
    refresh: int = field(default=14400, metadata={"check": u32})
    retry: int = field(default=3600, metadata={"check": u32})
    expire: int = field(default=1209600, metadata={"check": u32})
    # RFC 2308: the negative-caching TTL is min(SOA TTL, minimum). Short on purpose, below
    # Zonemaster's 300 s (ZONE06, a notice): the first AAAA of a service, or a name added to
    # the zone, reaches resolvers a minute after, not five.
    minimum: int = field(default=60, metadata={"check": ttl_value})
    ttl: int = field(default=3600, metadata={"check": ttl_value})


@dataclass(frozen=True)
class NSConfig:
    """One name server of the zone, with glue addresses when it lives inside the zone."""

    name: str
    ipv4: list[str] = field(default_factory=list)
    ipv6: list[str] = field(default_factory=list)

    def validate(self) -> str | None:
        return address_problem(self.ipv4, self.ipv6)


@dataclass(frozen=True)
class RecordConfig:
    """A static record. MX values are 'preference exchange', e.g. '10 mail'."""

    name: str
    type: RecordType
    value: str
    ttl: int = field(default=300, metadata={"check": ttl_value})


@dataclass(frozen=True)
class ZoneConfig:
    """One authoritative zone."""

    origin: str
    soa: SOAConfig = field(default_factory=SOAConfig)
    ns: list[NSConfig] = field(default_factory=list)
    ns_ttl: int = field(default=3600, metadata={"check": ttl_value})
    # TTL of answers built from the registry: short, so a removed edge leaves caches fast.
    service_ttl: int = field(default=5, metadata={"check": ttl_value})
    # name -> registry service whose healthy instances answer A/AAAA for that name.
    services: dict[str, str] = field(default_factory=dict)
    record: list[RecordConfig] = field(default_factory=list)
    dnssec: ZoneDnssecConfig = field(default_factory=ZoneDnssecConfig)

    def validate(self) -> str | None:
        if not self.ns:
            return "ns: a zone needs at least one NS ([[zone.ns]] name = ...)"
        for name, service in self.services.items():
            try:
                check_name("service", service)
            except ValueError as exc:
                return f"services.{name}: {exc}"
        return None


@dataclass(frozen=True)
class Config:
    """The whole dnsd config file."""

    zone: list[ZoneConfig]
    dns: DnsConfig = field(default_factory=DnsConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)

    def validate(self) -> str | None:
        if not self.zone:
            return "zone: at least one [[zone]] is required"
        return None


def load(path: str) -> Config:
    """Load and validate a dnsd config against the schema (ConfigError names the key).

    Compiling the zones (bad names, conflicting records) is zone.py's check, run
    by ``dnsd.main.load_config`` with the same file/key errors.
    """
    return load_config(Config, path)
