"""Logging through structlog: JSON off a TTY, readable on one; level from config or env."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from carousel.config import LogConfig

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(config: LogConfig | None = None, *, daemon: str = "carousel") -> None:
    """Configure structlog and stdlib logging once per process.

    ``CAROUSEL_LOG_LEVEL`` and ``CAROUSEL_LOG_FORMAT`` override the config file,
    so an operator can turn on debug without editing it.
    """
    config = config or LogConfig()
    level_name = os.environ.get("CAROUSEL_LOG_LEVEL", config.level).lower()
    fmt = os.environ.get("CAROUSEL_LOG_FORMAT", config.format).lower()
    level = _LEVELS.get(level_name, logging.INFO)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(daemon=daemon)
    # Libraries that use stdlib logging (aiohttp, grpc, asyncio) go to stderr at WARNING+.
    logging.basicConfig(
        level=max(level, logging.WARNING),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
