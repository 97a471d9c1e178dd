"""Config of `carousel app`: where it listens and the name it shows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from carousel.config import ConfigError, LogConfig, load_config, port_number


def token_length(value: str) -> str | None:
    """An admin token is empty (no admin) or at least 16 characters."""
    if value and len(value) < 16:
        return f"must be empty or at least 16 characters, found {len(value)}"
    return None


@dataclass(frozen=True)
class AppSection:
    """The `[app]` table."""

    host: str = "127.0.0.1"
    port: int = field(default=9000, metadata={"check": port_number})
    name: str = ""  # shown in pages; default host:port
    # Bearer token for POST /admin/health (at least 16 characters); "" = the endpoint answers
    # 403 to everyone. A client that reaches the AP through an edge must never flip its health
    # (the agents would drain the whole tier).
    admin_token: str = field(default="", metadata={"check": token_length})


@dataclass(frozen=True)
class Config:
    """Everything `carousel app` reads."""

    app: AppSection = field(default_factory=AppSection)
    log: LogConfig = field(default_factory=LogConfig)


def load(path: str) -> Config:
    """Load and validate an app config file."""
    return load_config(Config, path)


def override(
    config: Config,
    *,
    host: str | None,
    port: int | None,
    name: str | None,
    admin_token: str | None = None,
) -> Config:
    """Apply command-line flags on top of the file."""
    app = config.app
    if admin_token is not None and (problem := token_length(admin_token)):
        raise ConfigError("<command line>", "--admin-token", problem)
    app = dataclasses.replace(
        app,
        host=app.host if host is None else host,
        port=app.port if port is None else port,
        name=app.name if name is None else name,
        admin_token=app.admin_token if admin_token is None else admin_token,
    )
    return dataclasses.replace(config, app=app)
