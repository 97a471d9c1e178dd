"""`carousel dnsd --config FILE`: startup, serving, and graceful shutdown.

Startup: bind every listen address (UDP and TCP; a taken port is a clear
error and exit status 1), start the admin listener, start answering from an
empty table (mapped names get a short NODATA until the first snapshot),
then follow the registry. ``/healthz`` turns 200 once the first registry
snapshot is loaded and stays 200 while etcd is away (we still answer).

With ``workers > 1`` a supervisor process follows the registry and the
workers answer (see workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from carousel.admin import AdminServer
from carousel.config import ConfigError
from carousel.logs import setup_logging
from carousel.tasks import stop_tasks
from dnsd.builder import make_builder
from dnsd.config import Config, load
from dnsd.daemon import (
    check_credentials,
    cookie_keeper,
    create_feed,
    health,
    install_stop_handlers,
    registry_view,
    run_loop,
    status,
)
from dnsd.dnssec.setup import renew_signatures, signers_from_config
from dnsd.feed import RegistryFeed
from dnsd.server import DnsServer, bind_listener
from dnsd.stats import DnsCollector
from dnsd.zone import ZoneError, compile_zones

log = structlog.get_logger("dnsd")

ADMIN_WAIT = 1.0  # seconds the admin listener waits for the first snapshot before it serves


async def serve(config: Config, *, on_ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run one dnsd process until SIGTERM/SIGINT; returns the exit status."""
    builder = make_builder(config)
    try:
        listeners = [bind_listener(address) for address in config.dns.listen]
    except OSError as exc:
        log.error("cannot start: a listen address is unavailable", error=exc.strerror or str(exc))
        return 1
    feed = create_feed(config, builder)
    if feed is None:
        for lst in listeners:
            lst.udp.close()
            lst.tcp.close()
        return 1
    server = DnsServer(config.dns, feed.table)
    feed.publish = server.set_table
    collector = DnsCollector(server.snapshot, lambda: registry_view(feed))
    admin = AdminServer(
        config.admin,
        status=lambda: status(config, feed, listeners, {"workers": 1}),
        health=lambda: health(feed),
    )
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    exit_code = 0

    def credentials_refused() -> None:
        nonlocal exit_code
        exit_code = 1
        stop.set()

    try:
        try:
            admin_port = admin.bind()  # served once the first table is in (serve_admin)
        except OSError as exc:
            log.error("cannot start the admin listener", error=exc.strerror or str(exc))
            for lst in listeners:
                lst.udp.close()
                lst.tcp.close()
            return 1
        await server.start(listeners)
        for coro, name in (
            (feed.run(), "registry-feed"),
            (check_credentials(feed, credentials_refused), "etcd-credentials"),
            (renew_signatures(builder.next_refresh, feed.rebuild), "dnssec-renewal"),
            (serve_admin(admin, feed, collector), "admin-listener"),
        ):
            task = asyncio.create_task(coro, name=name)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        keeper = cookie_keeper(config, feed, builder)
        for coro, name in ((keeper.run(), "cookie-secret"),) if keeper is not None else ():
            task = asyncio.create_task(coro, name=name)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        ready = {
            "listen": [lst.address for lst in listeners],
            "admin": f"{config.admin.host}:{admin_port}",
            "zones": [z.origin for z in config.zone],
            "udp_engine": config.dns.udp_engine,
            "rrl": config.dns.rrl.enabled,
        }
        log.info("dnsd listening", **ready)
        if on_ready is not None:
            on_ready(ready)
        install_stop_handlers(stop)
        await stop.wait()
        log.info("dnsd stopping")
    finally:
        # Shutdown, in order: stop answering (listeners, then TCP clients), stop
        # following the registry, close etcd, then the admin listener.
        await server.stop()
        await stop_tasks(tasks, what="dnsd task")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(feed.close(), 2.0)
        await admin.stop()
        import prometheus_client

        with contextlib.suppress(KeyError):  # registered when the admin listener started
            prometheus_client.REGISTRY.unregister(collector)
    log.info("dnsd stopped")
    return exit_code


async def serve_admin(admin: AdminServer, feed: RegistryFeed, collector: DnsCollector) -> None:
    """Serve the admin listener (bound already) once the first registry snapshot is answered.

    Importing aiohttp and setting up the app costs ~0.25 s of CPU; done first,
    it delayed the first full answer by as much. A health check that connects
    meanwhile waits in the listen backlog, at most ADMIN_WAIT when etcd is slow.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(feed.mirror.synced.wait(), ADMIN_WAIT)
    await asyncio.sleep(0)  # the snapshot's table is built on the turn that set ``synced``
    import prometheus_client

    prometheus_client.REGISTRY.register(collector)
    try:
        await admin.start()
    except OSError as exc:
        log.error("cannot start the admin listener", error=exc.strerror or str(exc))


def load_config(path: str) -> Config:
    """Read and check a dnsd config file: the schema (config.py), then the zones compile
    (zone.py), each mistake as a ConfigError naming the file and key."""
    config = load(path)
    try:
        compile_zones(config.zone)
        signers_from_config(config)  # every DNSSEC key file readable and usable
    except ZoneError as exc:
        raise ConfigError(path, exc.key, exc.message) from None
    return config


def run(config: Config, config_path: str) -> int:
    """Entry point used by `carousel dnsd`."""
    setup_logging(config.log, daemon="dnsd")
    if config.dns.workers > 1:
        # Imported here: one process never needs multiprocessing, pickle and the
        # supervisor (12-18 ms of CPU at every start-up, measured).
        from dnsd.workers import run_supervisor

        return run_supervisor(config, config_path)
    return run_loop(serve(config))
