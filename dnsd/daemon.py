"""The parts one dnsd process is assembled from, shared by the one-process daemon
(main.py) and the supervisor and its workers (workers.py): the table builder, the
registry feed, /healthz and /status, signal handling, the event loop.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog

from carousel import tasks
from carousel.etcd import EtcdAuthError, EtcdError
from carousel.registry import Keys
from dnsd import mmsg, wire
from dnsd.build import TableBuilder
from dnsd.config import Config
from dnsd.cookie_keeper import SecretKeeper
from dnsd.feed import RegistryFeed
from dnsd.server import Listener
from dnsd.stats import RegistryView
from dnsd.table import AnswerTable

log = structlog.get_logger("dnsd")


def cookie_keeper(config: Config, feed: RegistryFeed, builder: TableBuilder) -> SecretKeeper | None:
    """The task that keeps the cluster's cookie secret, when DNS Cookies are on."""
    if builder.cookies is None:
        return None
    c = config.dns.cookies
    key = Keys(config.etcd.prefix).cookie_secret
    return SecretKeeper(feed.etcd, key, builder.cookies, c.secret_rotation, c.poll_interval)


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
        # Where the mmsg engine's receive loop runs: "compiled" (dnsd/_udploop.c) or "python".
        "udp_loop": "compiled" if config.dns.udp_engine == "mmsg" and mmsg.compiled() else "python",
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


def run_loop(main: Any) -> int:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop; teardown bounded."""
    return int(tasks.run_loop(main))
