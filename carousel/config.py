"""Typed TOML configuration: one dataclass tree per daemon, validated at load.

Every daemon describes its options as frozen dataclasses whose fields carry
their defaults. ``load_config`` reads a TOML file and converts it into that
tree, rejecting unknown keys and wrong types. A ``ConfigError`` names the file,
the dotted key path, what was expected and what was found; the CLI turns it
into exit status 2.

Supported field types: bool, int, float, str, Literal[...], X | None,
list[X], dict[str, X] and nested dataclasses. A field may declare a
validator in its metadata (``field(metadata={"check": fn})``) that returns an
error string or None.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file is missing, unreadable or invalid."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + message)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"an array of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Converter:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, expected: Any, found: Any) -> ConfigError:
        exp = expected if isinstance(expected, str) else _type_name(expected)
        return ConfigError(self.file, key, f"expected {exp}, found {_describe(found)}")

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            for arg in args:
                try:
                    return self.convert(arg, value, key)
                except ConfigError:
                    continue
            raise self.fail(key, tp, value)
        if origin is Literal:
            if value in get_args(tp) and not isinstance(value, bool):
                return value
            raise self.fail(key, tp, value)
        if origin is list:
            if not isinstance(value, list):
                raise self.fail(key, tp, value)
            (item,) = get_args(tp)
            return [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise self.fail(key, tp, value)
            _, item = get_args(tp)
            return {k: self.convert(item, v, f"{key}.{k}") for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.fail(key, tp, value)
            return self.build(tp, value, key)
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise self.fail(key, tp, value)
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise self.fail(key, tp, value)
        if tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise self.fail(key, tp, value)
        if tp is str:
            if isinstance(value, str):
                return value
            raise self.fail(key, tp, value)
        if tp is Any:
            return value
        raise TypeError(f"unsupported config type {tp!r} at {key}")

    def build(self, cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
        hints = get_type_hints(cls)
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls) if f.init}
        by_name = {f.name: f for f in fields.values()}
        kwargs: dict[str, Any] = {}
        for raw_key, value in data.items():
            f = by_name.get(raw_key) or fields.get(raw_key)
            key = f"{prefix}.{raw_key}" if prefix else raw_key
            if f is None:
                known = ", ".join(sorted(by_name))
                raise ConfigError(self.file, key, f"unknown key (known keys here: {known})")
            converted = self.convert(hints[f.name], value, key)
            check: Callable[[Any], str | None] | None = f.metadata.get("check")
            if check is not None:
                problem = check(converted)
                if problem:
                    raise ConfigError(self.file, key, problem)
            kwargs[f.name] = converted
        for f in by_name.values():
            if (
                f.name not in kwargs
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                key = f"{prefix}.{f.name}" if prefix else f.name
                raise ConfigError(self.file, key, f"missing required key ({_type_name(hints[f.name])})")
        try:
            obj = cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(self.file, prefix, str(exc)) from None
        validate = getattr(obj, "validate", None)
        if validate is not None:
            problem = validate()
            if problem:
                sub, _, msg = problem.partition(": ") if ": " in problem else ("", "", problem)
                key = ".".join(p for p in (prefix, sub) if p)
                raise ConfigError(self.file, key, msg)
        return obj


def from_dict(cls: type[T], data: Mapping[str, Any], file: str = "<config>") -> T:
    """Build a config dataclass from an already parsed mapping."""
    return typing.cast(T, _Converter(file).build(cls, data))


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a ConfigError naming the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), "", "file not found") from None
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(p), "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "", f"invalid TOML: {exc}") from None


def load_config(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Load and validate the TOML file at ``path`` into ``cls``."""
    return from_dict(cls, load_toml(path), str(path))


# --- pieces every daemon's config shares -------------------------------------------------


def positive(v: float) -> str | None:
    """Validator: strictly positive number."""
    return None if v > 0 else f"must be > 0, found {v}"


def non_negative(v: float) -> str | None:
    """Validator: zero or more."""
    return None if v >= 0 else f"must be >= 0, found {v}"


def _up_to_a_second(v: float) -> str | None:
    """Validator: 0-1 s (a drain must still show within a second)."""
    return None if 0 <= v <= 1 else f"must be 0-1 seconds, found {v}"


def port_number(v: int) -> str | None:
    """Validator: a TCP/UDP port (0 means 'pick a free one')."""
    return None if 0 <= v <= 65535 else f"must be a port 0-65535, found {v}"


def address_problem(ipv4: list[str], ipv6: list[str]) -> str | None:
    """For validate(): 'ipv4: ...' or 'ipv6: ...' naming the first bad address, or None."""
    checks = (("ipv4", "IPv4", ipv4, ipaddress.IPv4Address), ("ipv6", "IPv6", ipv6, ipaddress.IPv6Address))
    for key, label, values, parse in checks:
        for a in values:
            try:
                parse(a)
            except ValueError:
                return f"{key}: not an {label} address: {a!r}"
    return None


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd: endpoints, TLS, auth, timeouts and the key prefix."""

    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    prefix: str = "/carousel/"
    timeout: float = field(default=2.0, metadata={"check": positive})
    # Seconds a connection attempt (TCP, TLS and HTTP/2 handshakes) may take before the
    # next endpoint is tried. A request's timeout does not cut a first handshake short: a
    # loaded etcd that takes longer than `timeout` to shake hands is still reached.
    dial_timeout: float = field(default=10.0, metadata={"check": positive})
    # Registry watchers apply changes at most once per this many seconds (a burst
    # of events costs one rebuild), and never lag etcd by more than this plus one
    # rebuild. 0: on every event loop turn.
    batch_interval: float = field(default=0.05, metadata={"check": _up_to_a_second})
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None

    def validate(self) -> str | None:
        if not self.endpoints:
            return "endpoints: at least one endpoint is required"
        for ep in self.endpoints:
            hostport = ep.split("://", 1)[-1]
            host, sep, port = hostport.rpartition(":")
            if not sep or not host or not port.isdigit():
                return f"endpoints: expected 'host:port', found {ep!r}"
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            return f"prefix: must start and end with '/', found {self.prefix!r}"
        if (self.cert_file is None) != (self.key_file is None):
            return "cert_file: cert_file and key_file go together"
        if self.username is None and (self.password or self.password_file):
            return "username: a password needs a username"
        if self.password and self.password_file:
            return "password: give password or password_file, not both"
        return None

    def resolved_password(self) -> str | None:
        """The password, read from password_file when one is configured."""
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password


@dataclass(frozen=True)
class LogConfig:
    """Logging: level and format (auto = readable on a TTY, JSON otherwise)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener: /healthz, /metrics, /status. Loopback by default."""

    host: str = "127.0.0.1"
    port: int = field(default=0, metadata={"check": port_number})
    token: str | None = None

    def validate(self) -> str | None:
        if self.token and len(self.token) < MIN_ADMIN_TOKEN:
            return f"token: must be at least {MIN_ADMIN_TOKEN} characters, found {len(self.token)}"
        if not self.token and not is_loopback_address(self.host):
            return "token: an admin listener off loopback requires a token"
        return None


# A bearer token short enough to guess is no token: 16 characters is 96+ bits when random.
MIN_ADMIN_TOKEN = 16


def is_loopback_address(host: str) -> bool:
    """True only for a literal loopback IP address: names (even "127.x.example") may resolve anywhere."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
