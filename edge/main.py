"""`carousel edge --config edge.toml`: run one worker, or supervise N with SO_REUSEPORT.

With ``workers = N`` (N > 1) the parent builds the node's shared parts
(edge/core/node.py: the bus, the client table, the snapshot slots), then forks
N workers before any event loop exists. Each binds its own listening socket
with SO_REUSEPORT, so the kernel spreads new connections across them; a
crashed worker is restarted after a second and inherits the same shared parts.
Worker 0 also runs the admin listener, which reports the whole node
(edge/front/node.py). SIGTERM/SIGINT to the parent is passed to every worker,
which then shuts down gracefully; SIGHUP is passed on too (reload).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time

import structlog

from carousel.logs import setup_logging
from edge.core.config import Config, load
from edge.core.config import from_dict as schema_from_dict
from edge.core.node import Node
from edge.front.server import Edge, check_config

log = structlog.get_logger("carousel.edge")

EXIT_CONFIG = 2


def load_config(path: str) -> Config:
    """Read and check an edge config file: the schema (core/config.py), then the checks the
    edge's parts own (front/server.py check_config); a ConfigError names the file and key."""
    return check_config(load(path), path)


def from_dict(data: dict[str, object], file: str = "<config>") -> Config:
    """The same checks for a config already parsed from TOML."""
    return check_config(schema_from_dict(data, file), file)


async def serve(config: Config, worker: int = 0, node: Node | None = None) -> int:
    """Run one edge until SIGTERM/SIGINT, then shut down gracefully."""
    try:
        edge = Edge(config, worker=worker, node=node)
    except ValueError as exc:  # a user feature that cannot be imported or built
        print(f"carousel edge: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP reloads the TLS certificates; connections in progress keep theirs.
    loop.add_signal_handler(signal.SIGHUP, edge.reload_certificates)
    edge.on_fatal = stop.set
    try:
        await edge.start()
    except OSError as exc:
        log.error("cannot listen", error=str(exc), host=config.edge.host, port=config.edge.port)
        await edge.stop()
        return 1
    # Startup objects (config, routes, modules) live forever: keep them out of
    # the collector's way so full collections stay short under load.
    gc.freeze()
    # A request allocates a few dozen objects that reference counting frees at once; the
    # young generation's default trigger (700 allocations) would run it every ~20 requests.
    gc.set_threshold(20_000, 10, 10)
    try:
        await stop.wait()
    finally:
        if edge.node_worker is not None:
            edge.node_worker.publish()  # even on the way out of an error: keep the totals
    log.info("shutting down", worker=worker, deadline=config.edge.shutdown_timeout)
    await edge.stop()
    if edge.fatal:
        print(f"carousel edge: {edge.fatal}", file=sys.stderr)
        return 1
    return 0


def _run_loop(config: Config, worker: int, node: Node | None = None) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, worker, node))
    return uvloop.run(serve(config, worker, node))


def _supervise(config: Config) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    dos = config.dos
    node = Node(config.edge.workers, dos.max_clients if dos.enabled else 1024, dos.window)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it
            code = 1
            try:
                node.enter(index)
                code = _run_loop(config, index, node)
            finally:
                os._exit(code)
        children[pid] = index

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def forward_hup(signum: int, frame: object) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, forward_hup)
    for i in range(config.edge.workers):
        spawn(i)
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = max(status, code if code > 0 else 0)
            continue
        if code == EXIT_CONFIG:
            on_signal(signal.SIGTERM, None)
            status = EXIT_CONFIG
            continue
        log.error("worker died; restarting", worker=index, exit=code)
        time.sleep(1.0)
        if not stopping:
            spawn(index)
    return status


def run(config: Config, config_path: str | None = None) -> int:
    """Entry point for `carousel edge`; returns the exit status."""
    setup_logging(config.log, daemon="edge")
    if config.edge.workers > 1:
        return _supervise(config)
    return _run_loop(config, 0)
