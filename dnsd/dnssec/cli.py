"""`carousel dnssec keygen` and `carousel dnssec ds`: make keys, print what the parent zone needs."""

from __future__ import annotations

import argparse
import sys

from carousel.config import ConfigError
from dnsd import wire
from dnsd.dnssec import keys

EXIT_USAGE = 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `dnssec` subcommand and its own subcommands."""
    p = sub.add_parser("dnssec", help="DNSSEC keys for dnsd: keygen, ds")
    dsub = p.add_subparsers(dest="dnssec_command", required=True)

    k = dsub.add_parser("keygen", help="make a key; writes BIND's K<zone>+<alg>+<tag>.key/.private")
    k.add_argument("zone", help="zone origin, e.g. example.test")
    k.add_argument(
        "--algorithm",
        default="ecdsap256sha256",
        choices=["ecdsap256sha256", "ed25519", "13", "15"],
        help="ECDSA P-256 (13, default) or Ed25519 (15)",
    )
    k.add_argument("--role", default="csk", choices=["csk", "ksk", "zsk"], help="default csk")
    k.add_argument("--dir", default=".", help="directory for the key files (default: here)")
    k.set_defaults(func=cmd_keygen)

    d = dsub.add_parser("ds", help="print the DS record(s) to give the parent zone")
    d.add_argument("files", nargs="*", help="key files (.private); with --zone")
    d.add_argument("--zone", help="zone origin of the key files")
    d.add_argument("--config", help="a dnsd config: DS of every csk/ksk of every signed zone")
    d.add_argument(
        "--digest", type=int, default=2, choices=[2, 4], help="SHA-256 (2, default) or SHA-384 (4)"
    )
    d.set_defaults(func=cmd_ds)


def cmd_keygen(args: argparse.Namespace) -> int:
    """Generate a key and print its .private path and DS (for a csk or ksk)."""
    try:
        zone = wire.to_wire(args.zone)
    except wire.BadName as exc:
        print(f"carousel dnssec keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key = keys.generate(keys.ALGORITHM_CODES[args.algorithm], args.role)
    path = keys.write(args.dir, zone, key)
    print(path)
    if key.sep:
        print(keys.ds_text(zone, key), file=sys.stderr)
    return 0


def cmd_ds(args: argparse.Namespace) -> int:
    """Print DS records, from key files or from a dnsd config."""
    pairs: list[tuple[bytes, keys.SigningKey]] = []
    try:
        if args.config:
            from dnsd.config import load

            config = load(args.config)
            for zone in config.zone:
                for kc in zone.dnssec.key:
                    if kc.role != "zsk":
                        pairs.append((wire.to_wire(zone.origin), keys.load(kc.file, kc.role)))
        elif args.zone and args.files:
            zone_wire = wire.to_wire(args.zone)
            # A ZSK has no DS: only keys with the SEP flag (their .key file says 257) are printed.
            pairs = [(zone_wire, keys.load(f, "csk")) for f in args.files if keys.role_of(f) != "zsk"]
        else:
            print("carousel dnssec ds: give --config FILE, or --zone ZONE and key files", file=sys.stderr)
            return EXIT_USAGE
    except ConfigError as exc:
        print(f"carousel: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (keys.KeyFileError, wire.BadName) as exc:
        print(f"carousel dnssec ds: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for zone_wire, key in pairs:
        print(keys.ds_text(zone_wire, key, args.digest))
    return 0
