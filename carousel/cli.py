"""The `carousel` command: daemons, operations and config checks.

Daemon packages are imported only when their subcommand runs, so
`carousel status` does not pay for the edge's imports.

Each daemon package (agent, dnsd, edge, sampleapp) exposes:
    <pkg>.main.load_config(path) -> Config   the schema (<pkg>/config.py), then the checks that
                                             need the daemon's parts (zones compile, certificates
                                             load, modules import); raises carousel.config.ConfigError
    <pkg>.main.run(config, config_path) -> int   runs until stopped; returns the exit status
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from typing import Any

from carousel.config import ConfigError, EtcdConfig, from_dict, load_toml

EXIT_CONFIG = 2

DAEMONS = {
    "agent": "agent",
    "dnsd": "dnsd",
    "edge": "edge",
    "app": "sampleapp",
    "dashboard": "carousel.dashboard",
}


def _fail_config(exc: ConfigError) -> int:
    print(f"carousel: config error: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def load_daemon_config(kind: str, path: str) -> Any:
    """Load the config of daemon ``kind`` (agent, dnsd, edge, app)."""
    module = importlib.import_module(f"{DAEMONS[kind]}.main")
    return module.load_config(path)


def guess_kind(path: str) -> str:
    """Which daemon a config file is for, from its top-level tables."""
    data = load_toml(path)
    for kind, markers in (
        ("dnsd", ("zone", "dns")),
        ("edge", ("route", "pool", "listen", "edge", "forward", "passthrough", "tls", "cache")),
        ("agent", ("service", "agent")),
        ("dashboard", ("dashboard",)),
        ("app", ("app",)),
    ):
        if any(m in data for m in markers):
            return kind
    raise ConfigError(path, "", "cannot tell which daemon this config is for; pass --kind")


def _run_daemon(kind: str, args: argparse.Namespace) -> int:
    try:
        config = load_daemon_config(kind, args.config)
    except ConfigError as exc:
        return _fail_config(exc)
    main = importlib.import_module(f"{DAEMONS[kind]}.main")
    return int(main.run(config, args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        kind = args.kind or guess_kind(args.file)
        load_daemon_config(kind, args.file)
    except ConfigError as exc:
        return _fail_config(exc)
    print(f"{args.file}: valid {kind} config")
    return 0


def _etcd_config(args: argparse.Namespace) -> EtcdConfig:
    """Where etcd is, first found wins: the [etcd] table of --config, --etcd, $CAROUSEL_ETCD,
    a running `carousel demo` (its state file), else the default 127.0.0.1:2379."""
    if args.config:
        return from_dict(EtcdConfig, load_toml(args.config).get("etcd", {}), args.config)
    endpoints = args.etcd or [e for e in os.environ.get("CAROUSEL_ETCD", "").split(",") if e]
    data: dict[str, Any] = {}
    prefix = args.registry_prefix or os.environ.get("CAROUSEL_PREFIX")
    if not endpoints:
        from carousel.demo_plan import read_state, state_path

        demo = read_state()
        if demo is not None:
            endpoints = demo["etcd"]
            prefix = prefix or demo.get("prefix")
            where = ",".join(endpoints)
            print(f"carousel: using the running demo's etcd {where} ({state_path()})", file=sys.stderr)
    if endpoints:
        data["endpoints"] = endpoints
    data["prefix"] = prefix or "/carousel/"
    return from_dict(EtcdConfig, data, "command line")


def _with_etcd(args: argparse.Namespace, fn: Any) -> int:
    from carousel.etcd import Etcd, EtcdError

    try:
        cfg = _etcd_config(args)
    except ConfigError as exc:
        return _fail_config(exc)

    async def go() -> int:
        etcd = Etcd(cfg)
        try:
            return int(await fn(etcd, cfg))
        finally:
            await etcd.close()

    try:
        return asyncio.run(go())
    except EtcdError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    from carousel import ops

    return _with_etcd(args, lambda etcd, cfg: ops.print_status(etcd, cfg, as_json=args.json))


def cmd_drain(args: argparse.Namespace, on: bool) -> int:
    from carousel import ops

    return _with_etcd(args, lambda etcd, cfg: ops.set_drain(etcd, cfg, args.node, on, args.reason))


def cmd_purge(args: argparse.Namespace) -> int:
    from carousel import ops

    if args.prefix_path:
        kind, target = "prefix", args.prefix_path
    elif args.tag:
        kind, target = "tag", args.tag
    elif args.url:
        kind, target = "url", args.url
    else:
        print("carousel purge: give a URL, --prefix PATH or --tag TAG", file=sys.stderr)
        return EXIT_CONFIG
    return _with_etcd(args, lambda etcd, cfg: ops.publish_purge(etcd, cfg, kind, target))


def _add_etcd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="read the [etcd] table of this daemon config")
    p.add_argument(
        "--etcd",
        action="append",
        metavar="HOST:PORT",
        help="etcd endpoint (repeatable; default $CAROUSEL_ETCD, a running demo's, or 127.0.0.1:2379)",
    )
    p.add_argument(
        "--registry-prefix", dest="registry_prefix", help="registry key prefix (default /carousel/)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="carousel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for kind, what in (
        ("agent", "health-check local services and register them in etcd"),
        ("dnsd", "authoritative round-robin DNS for the healthy edges"),
        ("edge", "L7 reverse proxy"),
    ):
        p = sub.add_parser(kind, help=what)
        p.add_argument("--config", required=True, help="TOML config file")
        p.set_defaults(func=lambda a, k=kind: _run_daemon(k, a))

    p = sub.add_parser("app", help="sample AP server for the demo, the tests and the lab")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--name", default=None, help="name shown in pages (default: host:port)")
    p.add_argument("--admin-token", default=None, help="bearer token for POST /admin/health (16+ chars)")
    p.set_defaults(func=lambda a: importlib.import_module("sampleapp.main").cli(a))

    p = sub.add_parser("demo", help="a whole cluster on loopback with an embedded etcd")
    p.set_defaults(func=lambda a: importlib.import_module("carousel.demo").cli(a))
    p.add_argument("--edges", type=int, default=3)
    p.add_argument("--apps", type=int, default=2)
    p.add_argument("--dns-port", type=int, default=1053)
    p.add_argument("--edge-port", type=int, default=8080)
    p.add_argument("--app-port", type=int, default=9000)
    p.add_argument("--etcd-port", type=int, default=23790)
    p.add_argument("--tls-port", type=int, default=8443, help="each edge's HTTPS listener")
    p.add_argument("--forward-port", type=int, default=3128, help="each edge's forward proxy")
    p.add_argument("--dashboard-port", type=int, default=8090)
    p.add_argument("--workdir", default=None, help="keep configs and data here (default: a temp dir)")
    p.add_argument("--json-ready", action="store_true", help="print a JSON line once ready (for scripts)")

    p = sub.add_parser("dashboard", help="live cluster dashboard in the browser, with operator actions")
    p.add_argument("--config", help="TOML config file (default: a running demo's cluster)")
    p.add_argument("--host", default=None, help="listen address (overrides the config)")
    p.add_argument("--port", type=int, default=None, help="listen port (overrides the config)")
    p.set_defaults(func=lambda a: importlib.import_module("carousel.dashboard.main").cli(a))

    p = sub.add_parser("status", help="table of registered services")
    _add_etcd_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)

    for name, on in (("drain", True), ("undrain", False)):
        p = sub.add_parser(name, help=f"{'set' if on else 'clear'} the maintenance flag of a node")
        p.add_argument("node")
        _add_etcd_args(p)
        p.add_argument("--reason", default="", help="free text kept with the flag")
        p.set_defaults(func=lambda a, on=on: cmd_drain(a, on))

    p = sub.add_parser("purge", help="purge cached objects on every edge")
    p.add_argument("url", nargs="?", help="absolute URL to purge")
    p.add_argument(
        "--prefix",
        dest="prefix_path",
        metavar="URL_PREFIX",
        help="purge every URL starting with this",
    )
    p.add_argument("--tag", help="purge every object carrying this Surrogate-Key tag")
    _add_etcd_args(p)
    p.set_defaults(func=cmd_purge)

    importlib.import_module("dnsd.dnssec.cli").add_parser(sub)

    p = sub.add_parser("check-config", help="validate a daemon config (exit 2 if invalid)")
    p.add_argument("file")
    p.add_argument("--kind", choices=sorted(DAEMONS), help="daemon kind (guessed from the tables if omitted)")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `carousel` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
