"""The edge's typed configuration: `[edge]`, `[[route]]`, `[pool.NAME]`, `[tls]`, `[http2]`,
`[[passthrough]]`, `[dos]`, `[etcd]`, `[log]`, `[admin]`.

Every option and its default is listed here, once. ``load(path)`` validates the
file (unknown keys, wrong types, routes naming missing pools, bad regexes) and
raises ``ConfigError`` naming the file and the key path.

This module imports no feature: a check that needs one (certificates that load,
proxy passwords that parse, user feature modules that import) belongs to the
part that builds it and runs in ``edge.front.server.check_config``, which
``edge.main.load_config`` (what `carousel edge` and `carousel check-config`
call) runs after this schema.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from carousel.config import (
    AdminConfig,
    ConfigError,
    EtcdConfig,
    LogConfig,
    load_toml,
    non_negative,
    port_number,
    positive,
)
from carousel.config import from_dict as _from_dict
from carousel.snapshot import SnapshotConfig


def _networks(values: list[str]) -> str | None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"expected an address or CIDR network, found {v!r}"
    return None


def _at_least_one(v: int) -> str | None:
    return None if v >= 1 else f"must be >= 1, found {v}"


@dataclass(frozen=True)
class ServerConfig:
    """`[edge]`: the client-facing listener and process-wide limits."""

    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata={"check": port_number})
    # Processes sharing the port through SO_REUSEPORT (needs a fixed port when > 1).
    workers: int = field(default=1, metadata={"check": _at_least_one})
    # Client keep-alive: idle seconds before closing, and requests per connection.
    keepalive_timeout: float = field(default=75.0, metadata={"check": positive})
    max_requests_per_connection: int = field(default=1000, metadata={"check": _at_least_one})
    # Request bodies are read whole before the upstream is contacted; larger -> 413.
    max_body_size: int = field(default=10 * 1024 * 1024, metadata={"check": non_negative})
    # Seconds a client may take to send its whole body; slower -> 408.
    body_timeout: float = field(default=30.0, metadata={"check": positive})
    # Upstream responses are kept in memory up to this many bytes, then spilled to a file.
    response_memory_limit: int = field(default=1024 * 1024, metadata={"check": non_negative})
    # Larger buffered responses are refused (502): stream them with `buffering = false`.
    max_response_size: int = field(default=1024**3, metadata={"check": positive})
    temp_dir: str | None = None
    # Forward request headers whose names contain "_" (dropped by default, as nginx does:
    # CGI-style apps would read "X_Forwarded_For" as the edge's X-Forwarded-For).
    underscores_in_headers: bool = False
    max_header_size: int = field(default=8190, metadata={"check": _at_least_one})
    max_headers: int = field(default=100, metadata={"check": _at_least_one})
    # Seconds a client gets to send a whole request head, counted from connecting or
    # from the first byte of a later request; slower -> closed (slowloris). Also the
    # TLS handshake deadline.
    header_timeout: float = field(default=10.0, metadata={"check": positive})
    # Open client connections in total and per client address (0: no cap); over -> closed at accept.
    max_connections: int = field(default=0, metadata={"check": non_negative})
    max_connections_per_ip: int = field(default=0, metadata={"check": non_negative})
    # Seconds in-flight requests get to finish after SIGTERM.
    shutdown_timeout: float = field(default=10.0, metadata={"check": non_negative})
    # Peers whose X-Forwarded-For we extend instead of replacing.
    trusted_proxies: list[str] = field(default_factory=list, metadata={"check": _networks})
    # Response headers removed on top of Server and X-Powered-By.
    hide_headers: list[str] = field(default_factory=list)
    # The edge's own Server header value.
    server_header: str = "carousel"
    access_log: bool = True
    # User features, as "package.module:factory" (see edge/core/pipeline.py).
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MemberConfig:
    """One static pool member."""

    address: str
    weight: int = 1

    def validate(self) -> str | None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"address: expected 'host:port', found {self.address!r}"
        if not 0 < self.weight <= 1000:
            return f"weight: must be 1-1000, found {self.weight}"
        return None


@dataclass(frozen=True)
class HealthConfig:
    """`[pool.NAME.health]`: active checks on top of the registry state."""

    enabled: bool = False
    # "http": GET `path`, healthy on `expect_status`; "tcp": a connection that opens is
    # healthy (for passthrough pools, whose members speak TLS).
    type: Literal["http", "tcp"] = "http"
    path: str = "/healthz"
    interval: float = field(default=2.0, metadata={"check": positive})
    timeout: float = field(default=1.0, metadata={"check": positive})
    rise: int = field(default=2, metadata={"check": _at_least_one})
    fall: int = field(default=2, metadata={"check": _at_least_one})
    expect_status: list[int] = field(default_factory=lambda: [200])


@dataclass(frozen=True)
class EjectConfig:
    """`[pool.NAME.eject]`: passive ejection after failures seen on real traffic."""

    failures: int = field(default=3, metadata={"check": _at_least_one})
    window: float = field(default=10.0, metadata={"check": positive})
    cooldown: float = field(default=10.0, metadata={"check": positive})


@dataclass(frozen=True)
class PoolConfig:
    """`[pool.NAME]`: a group of upstream AP servers."""

    # Static members, or a registry service name to discover them from (or both).
    members: list[MemberConfig] = field(default_factory=list)
    service: str | None = None
    balance: Literal["round_robin", "least_conn", "hash"] = "round_robin"
    # For balance = "hash": "client", "header:NAME" or "cookie:NAME".
    hash_key: str = "client"
    # Per-member concurrent requests (0: unlimited); excess waits in a FIFO queue.
    max_conns: int = field(default=0, metadata={"check": non_negative})
    max_queue: int = field(default=1000, metadata={"check": non_negative})
    queue_timeout: float = field(default=10.0, metadata={"check": non_negative})
    connect_timeout: float = field(default=2.0, metadata={"check": positive})
    read_timeout: float = field(default=30.0, metadata={"check": positive})
    # Upstream keep-alive: "off" = one request per connection, "pool" = reuse idle ones.
    keepalive: Literal["off", "pool"] = "off"
    keepalive_idle: float = field(default=4.0, metadata={"check": positive})
    # Retries (idempotent methods, before any byte reached the client).
    max_tries: int = field(default=3, metadata={"check": _at_least_one})
    retry_budget: float = field(default=10.0, metadata={"check": positive})
    # Keep the client's Host header (else send the member's address).
    preserve_host: bool = True
    health: HealthConfig = field(default_factory=HealthConfig)
    eject: EjectConfig = field(default_factory=EjectConfig)

    def validate(self) -> str | None:
        if not self.members and not self.service:
            return "members: a pool needs static members or a registry service"
        kind, _, name = self.hash_key.partition(":")
        if kind not in ("client", "header", "cookie") or (kind != "client" and not name):
            return f"hash_key: expected 'client', 'header:NAME' or 'cookie:NAME', found {self.hash_key!r}"
        return None


@dataclass(frozen=True)
class RouteConfig:
    """`[[route]]`: match (host, path, method) -> target (pool, static, redirect, respond)."""

    name: str = ""
    # Exact names or "*.example.test" wildcards; empty = any host.
    hosts: list[str] = field(default_factory=list)
    path: str = "/"
    regex: str | None = None
    methods: list[str] = field(default_factory=list)
    # Used when no other route matches.
    default: bool = False
    # Targets: exactly one of these.
    pool: str | None = None
    static: str | None = None
    redirect: str | None = None
    respond: int | None = None
    # Options of the targets.
    strip_prefix: bool = False
    buffering: bool = True
    websocket: bool = False
    index: list[str] = field(default_factory=lambda: ["index.html"])
    # Static: serve path segments starting with "." (/.env, /.git/config); off, they are 404,
    # except /.well-known/ (RFC 8615: ACME challenges, security.txt).
    dotfiles: bool = False
    redirect_status: int = 301
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"
    # Extra response headers set on this route's answers.
    headers: dict[str, str] = field(default_factory=dict)
    # Cache (needs [cache] enabled): unset = on for pool routes, off for the others.
    cache: bool | None = None
    # Query parameters left out of the cache key: names, globs ("utm_*"), or "*" for the whole query.
    cache_ignore_query: list[str] = field(default_factory=list)
    # Sort query parameters in the key, so ?a=1&b=2 and ?b=2&a=1 share an entry.
    cache_sort_query: bool = False
    # Request headers and cookies added to the cache key.
    cache_key_headers: list[str] = field(default_factory=list)
    cache_key_cookies: list[str] = field(default_factory=list)
    # Responses with Set-Cookie: false = not stored; true = stored without Set-Cookie;
    # "store" = stored with it and replayed to every client, as RFC 9111 7.3 allows.
    cache_set_cookie: bool | Literal["store"] = False
    # Compress this route's answers (needs [compression] enabled).
    compress: bool = True

    def validate(self) -> str | None:
        targets = [t for t in (self.pool, self.static, self.redirect, self.respond) if t]
        if self.respond == 0 or len(targets) != 1:
            return "pool: a route needs exactly one of pool, static, redirect, respond"
        if not self.path.startswith("/"):
            return f"path: must start with '/', found {self.path!r}"
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                return f"regex: invalid regular expression: {exc}"
        for h in self.hosts:
            if "*" in h and (not h.startswith("*.") or "*" in h[1:]):
                return f"hosts: wildcards look like '*.example.test', found {h!r}"
        if self.redirect_status not in (301, 302, 303, 307, 308):
            return f"redirect_status: expected 301, 302, 303, 307 or 308, found {self.redirect_status}"
        for name, value in self.headers.items():
            if not name or any(c in name for c in " :\r\n\t") or "\r" in value or "\n" in value:
                return f"headers: invalid header {name!r}"
        if self.respond is not None and not 100 <= self.respond <= 599:
            return f"respond: expected an HTTP status 100-599, found {self.respond}"
        return None


def _server_names(values: list[str]) -> str | None:
    for v in values:
        if not v or "*" in v[1:] or (v.startswith("*") and not v.startswith("*.")):
            return f"expected a host name or '*.example.test', found {v!r}"
    return None


@dataclass(frozen=True)
class CertificateConfig:
    """`[[tls.certificate]]`: one certificate chain and its key, chosen by SNI."""

    cert_file: str
    key_file: str
    # Names it serves (exact or "*.example.test"); empty = the certificate's DNS subjectAltNames.
    names: list[str] = field(default_factory=list, metadata={"check": _server_names})


@dataclass(frozen=True)
class TlsConfig:
    """`[tls]`: the HTTPS listener, on when at least one certificate is configured."""

    # Listen address; empty = the same host as [edge].
    host: str = ""
    port: int = field(default=8443, metadata={"check": port_number})
    # The first certificate also answers clients without SNI or with an unknown name.
    certificate: list[CertificateConfig] = field(default_factory=list)
    min_version: Literal["1.2", "1.3"] = "1.2"
    # OpenSSL cipher list for TLS 1.2 (forward secret AEAD only); TLS 1.3 suites are all modern.
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    # Seconds between checks of the certificate files for changes (0: reload on SIGHUP only).
    reload_interval: float = field(default=5.0, metadata={"check": non_negative})
    # Answer plain-HTTP requests with 308 to https:// (ACME http-01 challenges excepted).
    redirect_http: bool = False
    # The HTTPS port named in those redirects (what clients reach, maybe not `port`).
    redirect_port: int = field(default=443, metadata={"check": port_number})
    # Strict-Transport-Security on HTTPS responses: max-age in seconds (0: not sent).
    hsts_max_age: int = field(default=0, metadata={"check": non_negative})
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False

    def validate(self) -> str | None:
        if not self.certificate and (self.redirect_http or self.hsts_max_age):
            return "certificate: redirect_http and HSTS need an HTTPS listener (a certificate)"
        return None


def _window_size(v: int) -> str | None:
    return None if 0 <= v <= 2**31 - 1 else f"must be between 0 and 2147483647, found {v}"


@dataclass(frozen=True)
class Http2Config:
    """`[http2]`: HTTP/2 to clients (edge/front/h2conn.py); ALPN h2 on the HTTPS listener."""

    # Offer h2 by ALPN on the HTTPS listener (http/1.1 stays the fallback).
    enabled: bool = True
    # Also take cleartext HTTP/2 with prior knowledge (RFC 9113 3.3) on the plain listener.
    h2c: bool = False
    # SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 6.5.2), and the cap on requests in flight.
    max_concurrent_streams: int = field(default=100, metadata={"check": _at_least_one})
    # SETTINGS_MAX_HEADER_LIST_SIZE: decoded header bytes per request (HPACK bombs, CONTINUATION floods).
    max_header_list_size: int = field(default=32768, metadata={"check": _at_least_one})
    # SETTINGS_INITIAL_WINDOW_SIZE: request body bytes a client may send per stream unacknowledged.
    initial_window_size: int = field(default=65535, metadata={"check": _window_size})
    # Seconds a connection with no stream open is kept.
    idle_timeout: float = field(default=75.0, metadata={"check": positive})
    # Seconds a response may wait for the client's flow-control window (or a full socket)
    # before the connection is cut: a client that opens a window of 0 and never reads.
    send_timeout: float = field(default=30.0, metadata={"check": positive})


@dataclass(frozen=True)
class PassthroughRouteConfig:
    """`[[passthrough.route]]`: SNI names whose encrypted streams go to a pool."""

    names: list[str] = field(metadata={"check": _server_names})
    pool: str


@dataclass(frozen=True)
class PassthroughConfig:
    """`[[passthrough]]`: a TCP listener forwarding TLS streams by SNI, never decrypting them."""

    host: str = "127.0.0.1"
    port: int = field(default=8444, metadata={"check": port_number})
    route: list[PassthroughRouteConfig] = field(default_factory=list)
    # Pool for a ClientHello without SNI or with an unlisted name ("": close the connection).
    default_pool: str = ""
    # PROXY protocol header sent to the member first, so it learns the client address.
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    # Seconds to receive the whole ClientHello.
    hello_timeout: float = field(default=5.0, metadata={"check": positive})
    # Seconds without a byte in either direction before the stream is closed.
    idle_timeout: float = field(default=300.0, metadata={"check": positive})


@dataclass(frozen=True)
class DosConfig:
    """`[dos]`: per-client request rate and concurrency; soft -> 429 or delay, hard -> ban."""

    enabled: bool = False
    # Detect, log and count, but enforce nothing (and publish no bans).
    dry_run: bool = False
    # Rates are requests per second, measured over a sliding window of this many seconds.
    window: float = field(default=1.0, metadata={"check": positive})
    soft_rate: float = field(default=50.0, metadata={"check": positive})
    hard_rate: float = field(default=200.0, metadata={"check": positive})
    # Concurrent connections (requests in flight for clients behind a trusted proxy).
    soft_connections: int = field(default=64, metadata={"check": _at_least_one})
    hard_connections: int = field(default=256, metadata={"check": _at_least_one})
    # Over a soft threshold: "reject" (429 + Retry-After) or "delay" (then serve).
    soft_action: Literal["reject", "delay"] = "reject"
    delay: float = field(default=0.5, metadata={"check": positive})
    # Over a hard threshold: banned (403, connections refused) for this many seconds.
    ban_seconds: int = field(default=300, metadata={"check": _at_least_one})
    # Clients never limited nor banned.
    allowlist: list[str] = field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"], metadata={"check": _networks}
    )
    # IPv6 clients are counted and banned per network of this prefix length.
    ipv6_prefix: int = 64
    # Publish bans to etcd (under a lease as long as the ban) and enforce every edge's bans.
    cluster: bool = True
    # Most clients tracked at once; beyond it new clients go uncounted until the next sweep.
    max_clients: int = field(default=100_000, metadata={"check": _at_least_one})

    def validate(self) -> str | None:
        if self.hard_rate < self.soft_rate:
            return "hard_rate: must be >= soft_rate"
        if self.hard_connections < self.soft_connections:
            return "hard_connections: must be >= soft_connections"
        if not 1 <= self.ipv6_prefix <= 128:
            return f"ipv6_prefix: must be 1-128, found {self.ipv6_prefix}"
        return None


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be > 0 and <= 1, found {v}"


@dataclass(frozen=True)
class CacheConfig:
    """`[cache]`: the RFC 9111 shared cache (edge/features/cache/)."""

    enabled: bool = False
    # Memory tier: bytes of stored responses, and the largest one kept in memory.
    memory_size: int = field(default=256 * 1024 * 1024, metadata={"check": _at_least_one})
    max_object_size: int = field(default=1024 * 1024, metadata={"check": _at_least_one})
    # Disk tier ("" = none): survives restarts, shared by the node's workers, holds large objects.
    disk_dir: str = ""
    disk_size: int = field(default=1024 * 1024 * 1024, metadata={"check": _at_least_one})
    disk_max_object_size: int = field(default=256 * 1024 * 1024, metadata={"check": _at_least_one})
    # This cache's name in the Cache-Status response header (RFC 9211); "" = no header.
    name: str = "carousel"
    # Targeted cache-control fields (RFC 9213), first valid one wins over Cache-Control.
    targeted_fields: list[str] = field(default_factory=lambda: ["CDN-Cache-Control"])
    # Heuristic freshness (RFC 9111 4.2.2) for responses with Last-Modified but no lifetime.
    heuristic: bool = False
    heuristic_fraction: float = field(default=0.1, metadata={"check": _fraction})
    heuristic_max: float = field(default=86400.0, metadata={"check": non_negative})
    # Seconds a stale response may stand in for an origin error when the response names none.
    stale_if_error: float = field(default=0.0, metadata={"check": non_negative})
    # Concurrent misses on a key wait for one fetch, at most this many seconds.
    coalesce: bool = True
    coalesce_timeout: float = field(default=30.0, metadata={"check": positive})
    # Seconds a key whose response could not be stored skips coalescing (hit-for-miss).
    hit_for_miss: float = field(default=60.0, metadata={"check": non_negative})
    # Honour the client's Cache-Control: no-cache / max-age (else only the origin decides).
    honor_client_cache_control: bool = True
    # Stored variants (Vary, compression) per URL.
    max_variants: int = field(default=32, metadata={"check": _at_least_one})
    # Response headers carrying Surrogate-Key tags (space separated), hidden from clients.
    tag_headers: list[str] = field(default_factory=lambda: ["Surrogate-Key"])
    strip_tag_headers: bool = True
    # Peers allowed to send PURGE requests.
    purge_from: list[str] = field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"], metadata={"check": _networks}
    )
    # Apply `carousel purge` events published in etcd (under [etcd] prefix).
    cluster_purge: bool = True

    def validate(self) -> str | None:
        if self.max_object_size > self.memory_size // 10:
            return "max_object_size: must be at most a tenth of memory_size"
        return None


@dataclass(frozen=True)
class CompressionConfig:
    """`[compression]`: gzip and brotli for compressible responses (edge/features/compress.py)."""

    enabled: bool = False
    # Server preference among what the client accepts.
    encodings: list[Literal["br", "gzip"]] = field(default_factory=lambda: ["br", "gzip"])
    # Bodies smaller than this stay as they are.
    min_size: int = field(default=1024, metadata={"check": non_negative})
    # Media types compressed ("text/*" covers every text type).
    types: list[str] = field(
        default_factory=lambda: [
            "text/*",
            "application/json",
            "application/javascript",
            "application/xml",
            "application/manifest+json",
            "application/wasm",
            "image/svg+xml",
            "font/ttf",
            "font/otf",
        ]
    )
    gzip_level: int = 6
    brotli_quality: int = 4

    def validate(self) -> str | None:
        if not 1 <= self.gzip_level <= 9:
            return f"gzip_level: must be 1-9, found {self.gzip_level}"
        if not 0 <= self.brotli_quality <= 11:
            return f"brotli_quality: must be 0-11, found {self.brotli_quality}"
        return None


def _port_specs(values: list[int | str]) -> str | None:
    for v in values:
        low, _, high = str(v).partition("-")
        if not low.isdigit() or not (high or low).isdigit() or not 0 < int(low) <= int(high or low) < 65536:
            return f"expected a port or a range like '1024-65535', found {v!r}"
    return None


def _regexes(values: list[str]) -> str | None:
    for v in values:
        try:
            re.compile(v)
        except re.error as exc:
            return f"invalid regular expression {v!r}: {exc}"
    return None


def _addresses(hosts: dict[str, str]) -> str | None:
    for name, address in hosts.items():
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return f"{name}: expected an IP address, found {address!r}"
    return None


@dataclass(frozen=True)
class DomainListConfig:
    """`[forward.allow]` / `[forward.deny]`: destination host names, matched three ways."""

    # Names as written ("example.test"); an IP literal destination matches its text.
    exact: list[str] = field(default_factory=list)
    # A name and every name under it: "example.test" matches "www.example.test", not "badexample.test".
    suffix: list[str] = field(default_factory=list)
    # Regular expressions searched in the lower-case name (anchor them: '^ads?\.').
    regex: list[str] = field(default_factory=list, metadata={"check": _regexes})


# Every block that is not the public Internet (IANA special-purpose registries, RFC 6890):
# a forward proxy's client must not reach the proxy's own host, the private networks behind it,
# nor the cloud metadata services (169.254.169.254, fd00:ec2::254, 100.100.100.200,
# 192.0.0.192 all fall in blocks below). IPv6 forms that carry an IPv4 address (mapped,
# compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo) are decoded and checked as that
# address too (edge/front/forward/policy.py).
FORWARD_DENIED_NETWORKS = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # CGNAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
    "::/128",  # unspecified
    "::1/128",  # loopback
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "100::/64",  # discard-only
    "2001:db8::/32",  # documentation
    "fc00::/7",  # unique local (ULA)
    "fd00:ec2::254/128",  # AWS metadata (inside fc00::/7; named so nobody carves it out by accident)
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)


@dataclass(frozen=True)
class ForwardConfig:
    """`[forward]`: a forward-proxy listener (absolute-form HTTP and CONNECT tunnels), off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=3128, metadata={"check": port_number})
    # Ports CONNECT may open a tunnel to (ranges as "A-B"); any other -> 403.
    connect_ports: list[int | str] = field(default_factory=lambda: [443], metadata={"check": _port_specs})
    # Ports plain-HTTP requests may go to; any other -> 403 (keeps HTTP away from SMTP, admin
    # listeners and databases on high ports). Add more explicitly, e.g. [80, 8080].
    http_ports: list[int | str] = field(default_factory=lambda: [80], metadata={"check": _port_specs})
    # Destination names: a denied name -> 403; when `allow` lists anything, only those names pass.
    allow: DomainListConfig = field(default_factory=DomainListConfig)
    deny: DomainListConfig = field(default_factory=DomainListConfig)
    # Resolved addresses refused whatever the name (checked after DNS, so no rebinding trick):
    # every non-public block (FORWARD_DENIED_NETWORKS), so clients cannot reach the edge's own
    # admin listener, the private networks or a metadata service. Set [] to allow them all.
    deny_networks: list[str] = field(
        default_factory=lambda: list(FORWARD_DENIED_NETWORKS), metadata={"check": _networks}
    )
    # Exceptions carved out of deny_networks (e.g. ["10.1.2.0/24"] for an internal origin).
    allow_networks: list[str] = field(default_factory=list, metadata={"check": _networks})
    # Name -> address map consulted before DNS (split horizon, tests); DNS otherwise.
    hosts: dict[str, str] = field(default_factory=dict, metadata={"check": _addresses})
    # Basic authentication (Proxy-Authorization): user -> password, plain or a
    # "pbkdf2_sha256$..." hash from `python -m edge.front.forward.auth`. Empty: no authentication.
    users: dict[str, str] = field(default_factory=dict)
    realm: str = "carousel"
    # Tell origins the client's address (X-Forwarded-For, Forwarded); off, nothing carries it.
    reveal_client: bool = False
    # The pseudonym in the Via header added both ways (RFC 9110 7.6.3); "" sends none.
    via: str = "carousel"
    # Keep plain-HTTP responses in the edge's RFC 9111 cache (when [cache] is enabled).
    cache: bool = True
    # Seconds for the DNS lookup plus the TCP connect to an origin; slower -> 504.
    connect_timeout: float = field(default=5.0, metadata={"check": positive})
    # Seconds an origin may stay silent while answering; slower -> 504.
    read_timeout: float = field(default=30.0, metadata={"check": positive})
    # Seconds a CONNECT tunnel may carry no byte either way before it is closed.
    tunnel_idle_timeout: float = field(default=300.0, metadata={"check": positive})
    # Tunnels open at once (0: no cap); over -> 503.
    max_tunnels: int = field(default=0, metadata={"check": non_negative})
    # Client-side limits; unset = the [edge] value (as on the reverse side).
    keepalive_timeout: float | None = field(default=None, metadata={"check": positive})
    max_requests_per_connection: int | None = field(default=None, metadata={"check": _at_least_one})
    max_body_size: int | None = field(default=None, metadata={"check": non_negative})
    body_timeout: float | None = field(default=None, metadata={"check": positive})
    header_timeout: float | None = field(default=None, metadata={"check": positive})
    access_log: bool = True

    def validate(self) -> str | None:
        for name in self.users:
            if not name or ":" in name:
                return f"users: a user name is non-empty and has no ':', found {name!r}"
        if '"' in self.realm or "\\" in self.realm:
            return f"realm: no quotes or backslashes, found {self.realm!r}"
        if any(c in self.via for c in ",()\r\n"):
            return f"via: a plain pseudonym, found {self.via!r}"
        return None


@dataclass(frozen=True)
class Config:
    """The whole edge config file."""

    edge: ServerConfig = field(default_factory=ServerConfig)
    route: list[RouteConfig] = field(default_factory=list)
    pool: dict[str, PoolConfig] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    passthrough: list[PassthroughConfig] = field(default_factory=list)
    dos: DosConfig = field(default_factory=DosConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)

    def validate(self) -> str | None:
        for i, r in enumerate(self.route):
            if r.pool and r.pool not in self.pool:
                return f"route[{i}].pool: no pool named {r.pool!r}"
        for i, p in enumerate(self.passthrough):
            for j, pr in enumerate(p.route):
                if pr.pool not in self.pool:
                    return f"passthrough[{i}].route[{j}].pool: no pool named {pr.pool!r}"
                health = self.pool[pr.pool].health
                if health.enabled and health.type != "tcp":
                    # HTTP checks speak plain HTTP; these members speak TLS.
                    return f'pool.{pr.pool}.health.type: a passthrough pool needs type = "tcp" checks'
            if p.default_pool and p.default_pool not in self.pool:
                return f"passthrough[{i}].default_pool: no pool named {p.default_pool!r}"
            if self.edge.workers > 1 and p.port == 0:
                return f"passthrough[{i}].port: several workers need a fixed port"
        if self.tls.certificate and self.edge.workers > 1 and self.tls.port == 0:
            return "tls.port: several workers need a fixed port"
        if sum(1 for r in self.route if r.default) > 1:
            return "route: only one route may be the default"
        # Written into response fields: a CR or LF would start a line of its own.
        for where, text in (("edge.server_header", self.edge.server_header), ("cache.name", self.cache.name)):
            if any(c in text for c in "\r\n\0"):
                return f"{where}: no CR, LF or NUL in a header value"
        if self.edge.workers > 1 and self.edge.port == 0:
            return "edge.workers: several workers need a fixed port"
        if self.forward.enabled and self.edge.workers > 1 and self.forward.port == 0:
            return "forward.port: several workers need a fixed port"
        return None


def from_dict(data: dict[str, object], file: str = "<config>") -> Config:
    """Build and validate a Config from parsed TOML."""
    return _from_dict(Config, data, file)


def load(path: str) -> Config:
    """Load and validate an edge config file against the schema (raises ConfigError)."""
    return from_dict(load_toml(path), path)


__all__ = [
    "CacheConfig",
    "CertificateConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DomainListConfig",
    "DosConfig",
    "EjectConfig",
    "ForwardConfig",
    "HealthConfig",
    "Http2Config",
    "MemberConfig",
    "PassthroughConfig",
    "PassthroughRouteConfig",
    "PoolConfig",
    "RouteConfig",
    "ServerConfig",
    "TlsConfig",
    "from_dict",
    "load",
]
