"""Config of `carousel agent`: the node, its lease, and the services it registers."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from carousel.config import (
    AdminConfig,
    EtcdConfig,
    LogConfig,
    address_problem,
    load_config,
    non_negative,
    port_number,
    positive,
)
from carousel.registry import check_name


def _name(kind: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            check_name(kind, value)
        except ValueError as exc:
            return str(exc)
        return None

    return check


@dataclass(frozen=True)
class CheckConfig:
    """How to tell that a service is healthy."""

    type: Literal["http", "tcp"] = "http"
    # http: the URL to GET; default http://<first address>:<port>/healthz
    url: str = ""
    expect_status: int = 200
    body_match: str = ""  # a substring the body must contain ("" = any body)
    # tcp: where to connect; default the service's first address and port
    host: str = ""
    port: int = field(default=0, metadata={"check": port_number})
    interval: float = field(default=1.0, metadata={"check": positive})
    timeout: float = field(default=1.0, metadata={"check": positive})
    rise: int = field(default=2, metadata={"check": positive})
    fall: int = field(default=2, metadata={"check": positive})


@dataclass(frozen=True)
class ServiceConfig:
    """One service this node offers, and how to check it."""

    name: str = field(metadata={"check": _name("service")})
    port: int = field(metadata={"check": port_number})
    ipv4: list[str] = field(default_factory=list)
    ipv6: list[str] = field(default_factory=list)
    weight: int = 1
    meta: dict[str, str] = field(default_factory=dict)
    check: CheckConfig = field(default_factory=CheckConfig)

    def validate(self) -> str | None:
        if not self.ipv4 and not self.ipv6:
            return "ipv4: give at least one IPv4 or IPv6 address"
        problem = address_problem(self.ipv4, self.ipv6)
        if problem:
            return problem
        if not 0 < self.port < 65536:
            return f"port: must be 1-65535, found {self.port}"
        if not 0 < self.weight <= 1000:
            return f"weight: must be 1-1000, found {self.weight}"
        if self.check.type == "http" and self.check.url and "://" not in self.check.url:
            return f"check.url: expected an http:// URL, found {self.check.url!r}"
        return None

    @property
    def first_address(self) -> str:
        return self.ipv4[0] if self.ipv4 else self.ipv6[0]


def _election_timeout(v: float) -> str | None:
    """Validator: an etcd election timeout in seconds (etcd refuses more than 50,000 ms)."""
    return None if 0 < v <= 50 else f"must be > 0 and at most 50 seconds (etcd's limit), found {v}"


@dataclass(frozen=True)
class AgentSection:
    """The `[agent]` table."""

    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    ttl: int = field(default=5, metadata={"check": positive})
    # Seconds a draining service keeps serving before its key is deleted:
    # at least the DNS TTL, so resolvers that cached it stop sending first.
    drain_delay: float = field(default=6.0, metadata={"check": non_negative})
    # The etcd cluster's --election-timeout; etcd raises any lease TTL below
    # 1.5 x this, so a lower ttl here would silently not mean what it says.
    etcd_election_timeout: float = field(default=1.0, metadata={"check": _election_timeout})
    # The site (or region) this node stands in, written into its registrations; dnsd's
    # site-aware answers (its `[dns.sites]`) prefer edges of the client's site. "": none.
    site: str = ""

    def validate(self) -> str | None:
        try:
            check_name("node", self.node)
        except ValueError as exc:
            return f"node: {exc}"
        if self.site:
            try:
                check_name("site", self.site)
            except ValueError as exc:
                return f"site: {exc}"
        minimum = math.ceil(1.5 * self.etcd_election_timeout)
        if self.ttl < minimum:
            return (
                f"ttl: {self.ttl}s is below etcd's minimum lease TTL of {minimum}s "
                f"(1.5 x election timeout {self.etcd_election_timeout}s)"
            )
        return None


@dataclass(frozen=True)
class Config:
    """Everything `carousel agent` reads."""

    agent: AgentSection = field(default_factory=AgentSection)
    service: list[ServiceConfig] = field(default_factory=list)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)

    def validate(self) -> str | None:
        if not self.service:
            return "service: at least one [[service]] is required"
        names = [s.name for s in self.service]
        for n in names:
            if names.count(n) > 1:
                return f"service: service {n!r} is listed twice"
        return None


def load(path: str) -> Config:
    """Load and validate an agent config file."""
    return load_config(Config, path)
