"""`carousel dashboard [--config FILE]`: serve the live cluster page until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys

import structlog

from carousel.config import ConfigError, EtcdConfig, from_dict
from carousel.dashboard.collect import Collector
from carousel.dashboard.config import Config, DashboardSection, load
from carousel.dashboard.server import DashboardServer, Hub
from carousel.dashboard.view import ClusterView
from carousel.logs import setup_logging

log = structlog.get_logger("carousel.dashboard")
EXIT_CONFIG = 2


def load_config(path: str) -> Config:
    """Read and check a dashboard config file (the CLI's check-config contract)."""
    return load(path)


async def serve(config: Config) -> int:
    """Run the collector and the listener until a signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    d = config.dashboard
    view = ClusterView(window=d.window, history=d.history, interval=d.scrape_interval)
    hub = Hub()
    collector = Collector(config, view, hub.notify)
    server = DashboardServer(config, view, hub, collector.etcd)
    try:
        port = await server.start()
    except OSError as exc:
        log.error("cannot listen", host=d.host, port=d.port, error=str(exc))
        await collector.etcd.close()
        return 1
    log.info("dashboard listening", url=f"http://{d.host}:{port}/", actions=bool(d.operators()))
    task = asyncio.ensure_future(collector.run())
    try:
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # the collector never ends by itself: surface what ended it
    finally:
        # Stop accepting and cut the streams first, then the collector (mirrors, scrapes, etcd).
        await server.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.info("dashboard stopped")
    return 0


def run(config: Config, config_path: str | None = None) -> int:
    """Entry point for `carousel dashboard --config FILE`."""
    setup_logging(config.log, daemon="dashboard")
    return asyncio.run(serve(config))


def config_from_demo() -> Config:
    """A config for the running demo, from its state file; ConfigError if none runs."""
    from carousel.demo_plan import read_state, state_path

    state = read_state()
    if state is None:
        raise ConfigError(str(state_path()), "", "no --config given and no running `carousel demo` found")
    etcd = from_dict(EtcdConfig, {"endpoints": state["etcd"], "prefix": state.get("prefix", "/carousel/")})
    section = from_dict(
        DashboardSection,
        {"token": state.get("token", ""), "target": state.get("targets", [])},
        str(state_path()),
    )
    return Config(dashboard=section, etcd=etcd)


def cli(args: argparse.Namespace) -> int:
    """`carousel dashboard`: --config, else the running demo; --host/--port override the config."""
    try:
        config = load(args.config) if args.config else config_from_demo()
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            section = dataclasses.replace(config.dashboard, **overrides)
            problem = section.validate()
            if problem:
                raise ConfigError("command line", problem.partition(": ")[0], problem.partition(": ")[2])
            config = dataclasses.replace(config, dashboard=section)
    except ConfigError as exc:
        print(f"carousel: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run(config, args.config)
