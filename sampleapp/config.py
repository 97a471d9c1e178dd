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
    changes = {k: v for k, v in (("host", host), ("port", port), ("name", name)) if v is not None}
    return dataclasses.replace(config, app=dataclasses.replace(config.app, **changes))
