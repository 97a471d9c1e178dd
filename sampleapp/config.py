"""Config of `carousel app`: where it listens and the name it shows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from carousel.config import LogConfig, load_config, port_number


@dataclass(frozen=True)
class AppSection:
    """The `[app]` table."""

    host: str = "127.0.0.1"
    port: int = field(default=9000, metadata={"check": port_number})
    name: str = ""  # shown in pages; default host:port


@dataclass(frozen=True)
class Config:
    """Everything `carousel app` reads."""

    app: AppSection = field(default_factory=AppSection)
    log: LogConfig = field(default_factory=LogConfig)


def load(path: str) -> Config:
    """Load and validate an app config file."""
    return load_config(Config, path)


def override(config: Config, *, host: str | None, port: int | None, name: str | None) -> Config:
    """Apply command-line flags on top of the file."""
    app = config.app
    app = dataclasses.replace(
        app,
        host=app.host if host is None else host,
        port=app.port if port is None else port,
        name=app.name if name is None else name,
    )
    return dataclasses.replace(config, app=app)
