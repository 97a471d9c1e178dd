"""The registry contract: etcd key layout and versioned JSON values.

This module is the schema only (like CoreDNS's plugin/etcd/msg): no I/O.
Everything lives under one configurable prefix, ``/carousel/`` by default::

    {prefix}services/{service}/{node}   ServiceRecord   under the agent's lease
    {prefix}maintenance/{node}          MaintenanceFlag no lease: survives restarts
    {prefix}purge/{event-id}            PurgeEvent      under a short lease
    {prefix}bans/{address}              BanRecord       under a lease = ban length

Values are JSON objects carrying ``"v": 1``. A value that is not valid JSON,
has an unknown version or misses a field raises ``SchemaError``; readers skip
such keys with one warning and keep serving the rest.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

SCHEMA_VERSION = 1
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

State = Literal["up", "draining"]


class SchemaError(ValueError):
    """A registry value that cannot be understood."""


# NAME_CHARS as a pattern: a C match, about a tenth of building a set per name (measured
# while decoding 10,000 records at dnsd's start-up, where names were checked 20,000 times).
_NAME = re.compile(r"[A-Za-z0-9\-_.]+")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid key segment, else raise ValueError."""
    if type(name) is not str or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid {kind} name {name!r}: use letters, digits, '-', '_', '.'")
    return name


@dataclass(frozen=True)
class Keys:
    """The key layout under one prefix."""

    prefix: str = "/carousel/"

    @property
    def services(self) -> str:
        return f"{self.prefix}services/"

    def service_prefix(self, service: str) -> str:
        return f"{self.prefix}services/{service}/"

    def service(self, service: str, node: str) -> str:
        return f"{self.prefix}services/{service}/{node}"

    @property
    def maintenance(self) -> str:
        return f"{self.prefix}maintenance/"

    def maintenance_flag(self, node: str) -> str:
        return f"{self.prefix}maintenance/{node}"

    @property
    def purges(self) -> str:
        return f"{self.prefix}purge/"

    def purge(self, event_id: str) -> str:
        return f"{self.prefix}purge/{event_id}"

    @property
    def bans(self) -> str:
        return f"{self.prefix}bans/"

    def ban(self, address: str) -> str:
        return f"{self.prefix}bans/{address}"

    @property
    def cookie_secret(self) -> str:
        """The DNS Cookie secret every dnsd of the cluster shares (dnsd/cookies.py)."""
        return f"{self.prefix}dnsd/cookie-secret"

    def split_service(self, key: str) -> tuple[str, str]:
        """(service, node) from a service key; ValueError if it is not one."""
        rest = key.removeprefix(self.services)
        service, sep, node = rest.partition("/")
        if rest == key or not sep or not service or not node or "/" in node:
            raise ValueError(f"not a service key: {key!r}")
        return service, node


_decode_json = json.JSONDecoder().decode


def _pure_loads(raw: bytes | str) -> Any:
    """JSON from a value, with the standard library.

    Values are UTF-8 (RFC 8259 §8.1): decoded directly, without json.loads's
    detection of UTF-16/32, which cost a fifth of decoding a record.
    """
    return _decode_json(raw.decode() if isinstance(raw, bytes) else raw)


_loads: Callable[[bytes | str], Any] = _pure_loads
try:  # orjson decodes 10,000 records in 35-44 ms of CPU against 75-120 ms (dnsd's start-up)
    from orjson import loads as _orjson_loads

    _loads = _orjson_loads
except ImportError:  # the standard library: the same values, slower
    pass


def _load(raw: bytes | str) -> dict[str, Any]:
    try:
        obj = _loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError("not a JSON object")
    v = obj.get("v")
    if v != SCHEMA_VERSION:
        raise SchemaError(f"unknown schema version {v!r} (this build reads {SCHEMA_VERSION})")
    return obj


def _get(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in obj:
        if default is ...:
            raise SchemaError(f"missing field {name!r}")
        return default
    value = obj[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise SchemaError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _is_ip(family: int, parse: Callable[[str], object], text: str) -> bool:
    """Whether ``text`` is an address of ``family``: inet_pton in C first (a tenth of the
    cost of ipaddress, which was a third of decoding 10,000 records at dnsd's start-up),
    ipaddress for what it also accepts (an IPv6 scope id)."""
    try:
        socket.inet_pton(family, text)
        return True
    except (OSError, ValueError, TypeError):
        pass
    try:
        parse(text)
        return True
    except ValueError:
        return False


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps({"v": SCHEMA_VERSION, **obj}, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class ServiceRecord:
    """One registered instance of a service (an edge, an AP server, ...)."""

    service: str
    node: str
    port: int
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    weight: int = 1
    state: State = "up"
    meta: dict[str, str] = field(default_factory=dict)
    since: float = 0.0  # unix time of the last state change, for `carousel status`
    # Where the node stands (a site or region label, from the agent's config); "" when unset.
    # dnsd's site-aware answers prefer the edges of the client's site.
    site: str = ""

    def __post_init__(self) -> None:
        check_name("service", self.service)
        check_name("node", self.node)
        if self.site:
            check_name("site", self.site)
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if not self.ipv4 and not self.ipv6:
            raise ValueError("a record needs at least one IPv4 or IPv6 address")
        for a in self.ipv4:
            if not _is_ip(socket.AF_INET, ipaddress.IPv4Address, a):
                raise ValueError(f"not an IPv4 address: {a!r}")
        for a in self.ipv6:
            if not _is_ip(socket.AF_INET6, ipaddress.IPv6Address, a):
                raise ValueError(f"not an IPv6 address: {a!r}")
        if not 0 < self.weight <= 1000:
            raise ValueError(f"weight must be 1-1000, found {self.weight}")
        if self.state not in ("up", "draining"):
            raise ValueError(f"state must be 'up' or 'draining', found {self.state!r}")

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.ipv4 + self.ipv6

    def encode(self) -> bytes:
        """The JSON value stored in etcd."""
        return _dump(
            {
                "service": self.service,
                "node": self.node,
                "port": self.port,
                "ipv4": list(self.ipv4),
                "ipv6": list(self.ipv6),
                "weight": self.weight,
                "state": self.state,
                "meta": self.meta,
                "since": self.since,
                # Written only when set: records stay byte-identical for clusters without sites.
                **({"site": self.site} if self.site else {}),
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> ServiceRecord:
        """Parse a stored value; SchemaError if it is corrupt or of another version."""
        obj = _load(raw)
        fast = cls._decode_plain(obj)
        if fast is not None:
            return fast
        try:
            meta = _get(obj, "meta", dict, {})
            return cls(
                service=_get(obj, "service", str),
                node=_get(obj, "node", str),
                port=_get(obj, "port", int),
                ipv4=tuple(_strs(_get(obj, "ipv4", list, []), "ipv4")),
                ipv6=tuple(_strs(_get(obj, "ipv6", list, []), "ipv6")),
                weight=_get(obj, "weight", int, 1),
                state=_get(obj, "state", str, "up"),
                meta={str(k): str(v) for k, v in meta.items()},
                since=float(_get(obj, "since", (int, float), 0.0)),
                site=_get(obj, "site", str, ""),
            )
        except ValueError as exc:
            if isinstance(exc, SchemaError):
                raise
            raise SchemaError(str(exc)) from None

    @classmethod
    def _decode_plain(cls, obj: dict[str, Any]) -> ServiceRecord | None:
        """The record when every field has exactly its expected type, else None (``decode``
        then checks field by field and names what is wrong). About half the cost of the
        general path: dnsd decodes every record at start-up (10,000 at the scale target)."""
        get = obj.get
        service, node, port, weight = get("service"), get("node"), get("port"), get("weight", 1)
        ipv4, ipv6, state, meta = get("ipv4", []), get("ipv6", []), get("state", "up"), get("meta", {})
        since, site = get("since", 0.0), get("site", "")
        if not (
            type(service) is str and type(node) is str and type(port) is int and type(weight) is int
            and type(ipv4) is list and type(ipv6) is list and type(state) is str and type(site) is str
            and (type(since) is float or type(since) is int) and type(meta) is dict and not meta
            and all(type(a) is str for a in ipv4) and all(type(a) is str for a in ipv6)
        ):  # fmt: skip
            return None
        try:
            checked = cast(State, state)  # __post_init__ rejects anything but "up" and "draining"
            return cls(service, node, port, tuple(ipv4), tuple(ipv6), weight, checked, {}, float(since), site)
        except ValueError as exc:
            raise SchemaError(str(exc)) from None

    def with_state(self, state: State) -> ServiceRecord:
        """A copy in another state, stamped with the time of the change."""
        return ServiceRecord(
            self.service,
            self.node,
            self.port,
            self.ipv4,
            self.ipv6,
            self.weight,
            state,
            dict(self.meta),
            time.time(),
            self.site,
        )


def _strs(values: list[Any], name: str) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise SchemaError(f"field {name!r} must be a list of strings")
    return values


@dataclass(frozen=True)
class MaintenanceFlag:
    """Set by `carousel drain NODE`; the node's agent drains while it exists."""

    node: str
    reason: str = ""
    since: float = 0.0

    def encode(self) -> bytes:
        return _dump({"node": self.node, "reason": self.reason, "since": self.since})

    @classmethod
    def decode(cls, raw: bytes | str) -> MaintenanceFlag:
        obj = _load(raw)
        return cls(
            node=_get(obj, "node", str),
            reason=_get(obj, "reason", str, ""),
            since=float(_get(obj, "since", (int, float), 0.0)),
        )


PurgeKind = Literal["url", "prefix", "tag"]


@dataclass(frozen=True)
class PurgeEvent:
    """A cluster-wide cache purge; every edge applies it once."""

    kind: PurgeKind
    target: str
    issued: float = 0.0

    def encode(self) -> bytes:
        return _dump({"kind": self.kind, "target": self.target, "issued": self.issued})

    @classmethod
    def decode(cls, raw: bytes | str) -> PurgeEvent:
        obj = _load(raw)
        kind = _get(obj, "kind", str)
        if kind not in ("url", "prefix", "tag"):
            raise SchemaError(f"unknown purge kind {kind!r}")
        return cls(
            kind=kind,
            target=_get(obj, "target", str),
            issued=_get(obj, "issued", (int, float), 0.0),
        )


@dataclass(frozen=True)
class BanRecord:
    """A client address banned cluster-wide until its lease expires."""

    address: str
    reason: str = ""
    until: float = 0.0
    by: str = ""

    def encode(self) -> bytes:
        return _dump({"address": self.address, "reason": self.reason, "until": self.until, "by": self.by})

    @classmethod
    def decode(cls, raw: bytes | str) -> BanRecord:
        obj = _load(raw)
        address = _get(obj, "address", str)
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise SchemaError(f"not an address: {address!r}") from None
        return cls(
            address=address,
            reason=_get(obj, "reason", str, ""),
            until=float(_get(obj, "until", (int, float), 0.0)),
            by=_get(obj, "by", str, ""),
        )
