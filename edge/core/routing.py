"""The route table, compiled once at load: (host, path, method) -> Route.

Matching rules, in order:

1. Host tiers: routes naming the exact host, then wildcard routes (the longest
   matching ``*.suffix`` first), then routes for any host. The first tier that
   yields a match wins, so a host-specific table is never shadowed by a
   catch-all one.
2. Within a tier: regex routes in file order (first match wins), then the
   longest path prefix; equal prefixes keep file order. A prefix ending in
   ``/`` matches anything under it; ``/api`` matches ``/api`` and ``/api/...``
   but not ``/apix``.
3. A route listing methods only matches those methods.
4. Nothing matched: the default route if one is configured, else None (404).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from edge.core.config import RouteConfig

TargetKind = Literal["pool", "static", "redirect", "respond"]


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route; ``config`` keeps every option of the target."""

    name: str
    kind: TargetKind
    config: RouteConfig
    prefix: str
    regex: re.Pattern[str] | None
    methods: frozenset[str] | None
    extra_headers: tuple[tuple[str, str], ...] = field(default=())

    def matches_path(self, path: str) -> bool:
        """True if this route's path rule accepts ``path``."""
        if self.regex is not None:
            return self.regex.search(path) is not None
        p = self.prefix
        if p.endswith("/"):
            return path.startswith(p)
        return path == p or path.startswith(p + "/")


def strip_prefix(raw_path: str, prefix: str) -> str:
    """``raw_path`` (as forwarded: percent-encoded, query kept) without the route's ``prefix``.

    The router matched the decoded path against the decoded prefix, so the
    prefix is consumed here escape by escape ("/a%20b/x" under "/a b" is "/x").
    Only a whole segment goes: "%2F" is data inside a segment, not a boundary.
    """
    prefix = prefix.rstrip("/")
    want = prefix.encode("utf-8", "surrogateescape")
    got = bytearray()
    i, n = 0, len(raw_path)
    while len(got) < len(want) and i < n and raw_path[i] != "?":
        c = raw_path[i]
        if c == "%" and i + 3 <= n:
            try:
                got.append(int(raw_path[i + 1 : i + 3], 16))
            except ValueError:
                return raw_path
            i += 3
        else:
            got += c.encode("utf-8", "surrogateescape")
            i += 1
    if got != want:
        return raw_path
    rest = raw_path[i:]
    if not rest or rest[0] == "?":
        return "/" + rest
    return rest if rest[0] == "/" else raw_path


def compile_route(cfg: RouteConfig, index: int) -> Route:
    """Turn one `[[route]]` table into a Route."""
    if cfg.pool:
        kind: TargetKind = "pool"
    elif cfg.static:
        kind = "static"
    elif cfg.redirect:
        kind = "redirect"
    else:
        kind = "respond"
    return Route(
        name=cfg.name or f"route{index}",
        kind=kind,
        config=cfg,
        prefix=cfg.path,
        regex=re.compile(cfg.regex) if cfg.regex else None,
        methods=frozenset(m.upper() for m in cfg.methods) if cfg.methods else None,
        extra_headers=tuple(cfg.headers.items()),
    )


class _Tier:
    """The routes of one host tier, ordered for lookup."""

    __slots__ = ("prefixed", "regexes")

    def __init__(self) -> None:
        self.regexes: list[Route] = []
        self.prefixed: list[Route] = []

    def add(self, route: Route) -> None:
        (self.regexes if route.regex is not None else self.prefixed).append(route)

    def finish(self) -> None:
        # Longest prefix first; sort is stable, so equal prefixes keep file order.
        self.prefixed.sort(key=lambda r: len(r.prefix), reverse=True)

    def find(self, path: str, method: str) -> Route | None:
        for r in self.regexes:
            if (r.methods is None or method in r.methods) and r.matches_path(path):
                return r
        for r in self.prefixed:
            if (r.methods is None or method in r.methods) and r.matches_path(path):
                return r
        return None


# RFC 3986 3.2.2 reg-name: unreserved / pct-encoded / sub-delims (hex checked apart).
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]*")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def parse_host(value: str) -> str | None:
    """The normalised host of a Host field value, or None when it is not a valid one.

    Valid is RFC 9110 7.2 / RFC 3986 3.2.2-3.2.3: an IP-literal (``[IPv6]``), an
    IPv4 address or a reg-name, then an optional ``:port`` (digits, at most 65535).
    An empty value is valid (a target without authority); an empty host with a
    port is not (RFC 9110 4.2.1). Normalised as ``normalize_host`` does.
    """
    if not value:
        return ""
    if value[0] == "[":
        end = value.find("]")
        if end < 0:
            return None
        literal, rest = value[1:end], value[end + 1 :]
        if "%" in literal or ":" not in literal:  # no zone IDs, no IPvFuture
            return None
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        if rest and (rest[0] != ":" or not _port_ok(rest[1:])):
            return None
        return "[" + literal.lower() + "]"
    name, colon, port = value.partition(":")
    if colon and not _port_ok(port):
        return None
    if not name or not _REG_NAME.fullmatch(name) or _PCT.search(name):
        return None  # IPv4 addresses are reg-names to this grammar
    host = name.lower().rstrip(".")
    return host or None


def _port_ok(port: str) -> bool:
    return port == "" or (len(port) <= 5 and port.isascii() and port.isdigit() and int(port) <= 65535)


def normalize_host(host: str) -> str:
    """Lower-case, without port or trailing dot ('[::1]:80' -> '[::1]')."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    host = host.rpartition(":")[0] if ":" in host else host
    return host.rstrip(".")


MEMO_SIZE = 4096
_UNKNOWN = object()


class RouteTable:
    """All routes, grouped by host tier."""

    def __init__(self, routes: list[RouteConfig]) -> None:
        self.routes = [compile_route(cfg, i) for i, cfg in enumerate(routes)]
        self._exact: dict[str, _Tier] = {}
        self._wild: list[tuple[str, _Tier]] = []  # (".example.test", tier), longest first
        self._any = _Tier()
        self.default: Route | None = None
        wild: dict[str, _Tier] = {}
        for route in self.routes:
            if route.config.default:
                self.default = route
            if not route.config.hosts:
                self._any.add(route)
            for h in route.config.hosts:
                h = h.lower().rstrip(".")
                if h.startswith("*."):
                    wild.setdefault(h[1:], _Tier()).add(route)
                else:
                    self._exact.setdefault(h, _Tier()).add(route)
        self._wild = sorted(wild.items(), key=lambda kv: len(kv[0]), reverse=True)
        # Recent (host, path, method) -> route: most traffic asks for a few paths again and again.
        self._memo: dict[tuple[str, str, str], Route | object | None] = {}
        for tier in (*self._exact.values(), *wild.values(), self._any):
            tier.finish()

    def find(self, host: str, path: str, method: str) -> Route | None:
        """The route for a request, or None when nothing (not even a default) matches."""
        key = (host, path, method)
        memo = self._memo
        found = memo.get(key, _UNKNOWN)
        if found is _UNKNOWN:
            found = self._find(host, path, method)
            if len(memo) >= MEMO_SIZE:  # bounded: hosts and paths are client-chosen
                memo.clear()
            memo[key] = found
        return found  # type: ignore[return-value]

    def _find(self, host: str, path: str, method: str) -> Route | None:
        tier = self._exact.get(host)
        if tier is not None:
            found = tier.find(path, method)
            if found is not None:
                return found
        for suffix, tier in self._wild:
            if host.endswith(suffix):
                found = tier.find(path, method)
                if found is not None:
                    return found
        found = self._any.find(path, method)
        return found if found is not None else self.default
