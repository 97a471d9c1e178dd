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
import signal
import time
from collections.abc import Callable
from typing import Any

import prometheus_client
import structlog

from carousel.admin import AdminServer
from carousel.etcd import EtcdAuthError, EtcdError
from carousel.logs import setup_logging
from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.config import Config
from dnsd.feed import RegistryFeed
from dnsd.server import DnsServer, Listener, bind_listener
from dnsd.stats import DnsCollector, RegistryView
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones

log = structlog.get_logger("dnsd")


def make_builder(config: Config) -> TableBuilder:
    """The table builder for this config's zones and answer policy."""
    return TableBuilder(
        compile_zones(config.zone),
        max_answer_records=config.dns.max_answer_records,
        all_down=config.dns.all_down,
        degraded_ttl=config.dns.degraded_ttl,
        payload_size=config.dns.udp_payload_size,
        unknown_rcode=wire.SERVFAIL if refuses_unknown(config) else wire.NOERROR,
    )


def refuses_unknown(config: Config) -> bool:
    """With snapshots on and past_max_age = "refuse", knowing nothing servable answers SERVFAIL.

    SERVFAIL (not NODATA) sends resolvers to another of the zone's servers, which
    may have current data (RFC 1035 4.1.1, RFC 2308 7.1).
    """
    return bool(config.snapshot.directory) and config.snapshot.past_max_age == "refuse"


def registry_view(feed: RegistryFeed) -> RegistryView:
    """What the metrics and /status say about the registry."""
    return RegistryView(
        revision=feed.table.revision,
        seconds_since_sync=feed.mirror.seconds_since_sync,
        connected=feed.mirror.connected,
        builds=feed.builds,
        services={s: (st.mode, len(st.addresses)) for s, st in feed.table.services.items()},
    )


def health(feed: RegistryFeed) -> tuple[bool, str]:
    """200 once answers come from the first snapshot; etcd being away later is reported, not fatal."""
    # The table, not the mirror: the mirror is synced one loop step before its table is built.
    if not feed.table.synced:
        return False, "waiting for the first registry snapshot"
    age = feed.mirror.seconds_since_sync
    if feed.mirror.connected:
        return True, f"ok: serving registry revision {feed.table.revision}"
    return True, f"ok: etcd unreachable, serving revision {feed.table.revision} from memory ({age:.0f}s)"


def status(
    config: Config, feed: RegistryFeed, listeners: list[Listener], extra: dict[str, Any]
) -> dict[str, Any]:
    """The /status document."""
    table: AnswerTable = feed.table
    return {
        "daemon": "dnsd",
        "listen": [lst.address for lst in listeners],
        "zones": [z.origin for z in config.zone],
        "revision": table.revision,
        "serial": table.serial,
        "synced": feed.mirror.synced.is_set(),
        "registry_connected": feed.mirror.connected,
        "seconds_since_sync": round(feed.mirror.seconds_since_sync, 3) if feed.mirror.last_sync else None,
        "table_builds": feed.builds,
        "last_build_ms": round(feed.last_build_seconds * 1000, 3),
        "table_age_seconds": round(time.time() - table.built, 3),
        "services": {
            s: {"mode": st.mode, "addresses": st.addresses, "ttl": st.ttl} for s, st in table.services.items()
        },
        "names": sorted(wire.to_text(n) for n in table.names),
        **extra,
    }


def create_feed(config: Config, builder: TableBuilder) -> RegistryFeed | None:
    """The registry feed; None (after one clear log line) when the etcd client cannot be set up."""
    try:
        return RegistryFeed(config.etcd, builder, snapshot=config.snapshot)
    except EtcdError as exc:  # e.g. an unreadable CA, certificate or key file
        log.error("cannot start: etcd client setup failed", error=str(exc))
        return None


async def check_credentials(feed: RegistryFeed, refused: Callable[[], None]) -> None:
    """Call ``refused`` if etcd rejects our credentials; while it is unreachable, keep trying.

    Wrong credentials never fix themselves, unlike an outage: they stop dnsd with a
    clear message instead of leaving it to answer from an empty registry forever.
    """
    warned = False
    while True:
        try:
            await feed.etcd.revision()
            return
        except EtcdAuthError as exc:
            log.error("etcd refused the dnsd's credentials", error=str(exc))
            refused()
            return
        except EtcdError as exc:
            if not warned:  # the mirror only reports outages after a first success
                what = "the registry snapshot" if feed.table.synced else "static names"
                log.warning(f"etcd unreachable at startup; answering {what} until it answers", error=str(exc))
                warned = True
            await asyncio.sleep(1.0)


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


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
    prometheus_client.REGISTRY.register(collector)
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
            admin_port = await admin.start()
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
        ):
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
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(feed.close(), 2.0)
        await admin.stop()
        prometheus_client.REGISTRY.unregister(collector)
    log.info("dnsd stopped")
    return exit_code


def run_loop(main: Any) -> int:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(main))
    return int(uvloop.run(main))


def run(config: Config, config_path: str) -> int:
    """Entry point used by `carousel dnsd`."""
    setup_logging(config.log, daemon="dnsd")
    if config.dns.workers > 1:
        from dnsd.workers import run_supervisor

        return run_supervisor(config, config_path)
    return run_loop(serve(config))
