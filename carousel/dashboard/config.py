"""Config of `carousel dashboard`: where to listen, who may act, what to scrape besides the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from carousel.config import EtcdConfig, LogConfig, load_config, port_number, positive
from carousel.registry import check_name


@dataclass(frozen=True)
class TargetConfig:
    """An admin endpoint the registry does not name (dnsd, etcd): scraped every interval."""

    name: str
    url: str
    role: Literal["dns", "etcd", "edge", "app"] = "dns"

    def validate(self) -> str | None:
        if not self.url.startswith(("http://", "https://")):
            return f"url: expected an http:// or https:// URL, found {self.url!r}"
        try:
            check_name("target", self.name)
        except ValueError as exc:
            return f"name: {exc}"
        return None


@dataclass(frozen=True)
class DashboardSection:
    """The `[dashboard]` table."""

    host: str = "127.0.0.1"
    port: int = field(default=8090, metadata={"check": port_number})
    # The admin token: required for every action, and sent to the admin endpoints it scrapes.
    # Empty: the page is read-only (actions answer 403).
    token: str = ""
    # More operators, each with a token of their own: name -> token. Actions are logged by name.
    tokens: dict[str, str] = field(default_factory=dict)
    # true: the page's data (state and live stream) needs a token too; the page itself never holds data.
    view_requires_token: bool = False
    # Origins besides the listener's own that may send actions (a reverse proxy's public URL).
    allowed_origins: list[str] = field(default_factory=list)
    scrape_interval: float = field(default=2.0, metadata={"check": positive})
    scrape_timeout: float = field(default=1.5, metadata={"check": positive})
    # Seconds of history the charts show.
    history: float = field(default=900.0, metadata={"check": positive})
    # Window of the ratios (hit ratio, status mix, first-place shares), in seconds.
    window: float = field(default=60.0, metadata={"check": positive})
    # Actions are appended here as JSON lines as well as logged; "" = log only.
    audit_log: str = ""
    target: list[TargetConfig] = field(default_factory=list)

    def validate(self) -> str | None:
        loopback = self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")
        if not loopback and not (self.token or self.tokens):
            return "token: a dashboard listening off loopback requires a token"
        if self.view_requires_token and not (self.token or self.tokens):
            return "view_requires_token: set a token first"
        for name, tok in self.tokens.items():
            if len(tok) < 16:
                return f"tokens.{name}: use at least 16 characters, found {len(tok)}"
        if self.token and len(self.token) < 16:
            return f"token: use at least 16 characters, found {len(self.token)}"
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                return f"allowed_origins: expected 'https://host[:port]', found {origin!r}"
        return None

    def operators(self) -> dict[str, str]:
        """Token -> operator name ("admin" for the admin token)."""
        found = {tok: name for name, tok in self.tokens.items()}
        if self.token:
            found[self.token] = "admin"
        return found


@dataclass(frozen=True)
class Config:
    """Everything `carousel dashboard` reads."""

    dashboard: DashboardSection = field(default_factory=DashboardSection)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load(path: str) -> Config:
    """Load and validate a dashboard config file."""
    return load_config(Config, path)
