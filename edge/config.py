"""The edge's typed configuration: `[edge]`, `[[route]]`, `[pool.NAME]`, `[etcd]`, `[log]`, `[admin]`.

Every option and its default is listed here, once. ``load(path)`` validates the
file (unknown keys, wrong types, routes naming missing pools, bad regexes) and
raises ``ConfigError`` naming the file and the key path.
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
    max_header_size: int = field(default=8190, metadata={"check": _at_least_one})
    max_headers: int = field(default=100, metadata={"check": _at_least_one})
    # Seconds in-flight requests get to finish after SIGTERM.
    shutdown_timeout: float = field(default=10.0, metadata={"check": non_negative})
    # Peers whose X-Forwarded-For we extend instead of replacing.
    trusted_proxies: list[str] = field(default_factory=list, metadata={"check": _networks})
    # Response headers removed on top of Server and X-Powered-By.
    hide_headers: list[str] = field(default_factory=list)
    # The edge's own Server header value.
    server_header: str = "carousel"
    access_log: bool = True
    # User features, as "package.module:factory" (see edge/pipeline.py).
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
    redirect_status: int = 301
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"
    # Extra response headers set on this route's answers.
    headers: dict[str, str] = field(default_factory=dict)

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


@dataclass(frozen=True)
class Config:
    """The whole edge config file."""

    edge: ServerConfig = field(default_factory=ServerConfig)
    route: list[RouteConfig] = field(default_factory=list)
    pool: dict[str, PoolConfig] = field(default_factory=dict)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)

    def validate(self) -> str | None:
        for i, r in enumerate(self.route):
            if r.pool and r.pool not in self.pool:
                return f"route[{i}].pool: no pool named {r.pool!r}"
        if sum(1 for r in self.route if r.default) > 1:
            return "route: only one route may be the default"
        if self.edge.workers > 1 and self.edge.port == 0:
            return "edge.workers: several workers need a fixed port"
        return None


def from_dict(data: dict[str, object], file: str = "<config>") -> Config:
    """Build and validate a Config from parsed TOML."""
    return _from_dict(Config, data, file)


def load(path: str) -> Config:
    """Load and validate an edge config file (raises ConfigError).

    User features are imported here too, so `carousel check-config` catches a
    misspelt module before a deploy does.
    """
    config = from_dict(load_toml(path), path)
    from edge.pipeline import load_factory

    for i, spec in enumerate(config.edge.features):
        try:
            load_factory(spec)
        except ValueError as exc:
            raise ConfigError(path, f"edge.features[{i}]", str(exc)) from None
    return config


__all__ = [
    "Config",
    "ConfigError",
    "EjectConfig",
    "HealthConfig",
    "MemberConfig",
    "PoolConfig",
    "RouteConfig",
    "ServerConfig",
    "from_dict",
    "load",
]
