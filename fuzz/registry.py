"""Fuzz what daemons read from etcd: registry records, keys, and the registry snapshot file.

Every value a mirror parses goes through one of these decoders
(carousel/registry.py); a corrupt value must raise ``SchemaError`` (a
ValueError), which the mirror logs once and skips. A service key that is not
one must raise ValueError. A snapshot file must load or raise ``SnapshotError``.
The first byte picks the target.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["carousel.registry", "carousel.snapshot"]):
    from carousel.registry import BanRecord, Keys, MaintenanceFlag, PurgeEvent, SchemaError, ServiceRecord
    from carousel.snapshot import RegistrySnapshot, SnapshotError

from fuzz.common import run

KEYS = Keys("/carousel/")
DECODERS = (ServiceRecord.decode, MaintenanceFlag.decode, PurgeEvent.decode, BanRecord.decode)


class Violation(AssertionError):
    """A decoder broke a rule; the fuzzer reports it as a crash with this message."""


def test_one_input(data: bytes) -> None:
    """One fuzz input: a value (or key, or snapshot file) as etcd or the disk would hand it over."""
    if not data:
        return
    pick, raw = data[0] % 6, data[1:]
    if pick < len(DECODERS):
        try:
            value = DECODERS[pick](raw)
        except SchemaError:
            return
        # What was accepted must survive its own encoding unchanged (the agent writes, dnsd reads).
        again = type(value).decode(value.encode())
        if again != value:
            raise Violation(f"{type(value).__name__} changed through encode/decode: {value!r} != {again!r}")
    elif pick == 4:
        try:
            KEYS.split_service(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            pass
    else:
        try:
            RegistrySnapshot.decode(raw)
        except SnapshotError:
            pass


_REC = ServiceRecord("edge", "edge1", 8080, ("10.0.0.1",), ("fd00::1",), 3, "draining", {"zone": "a"}, 1.5)
SEEDS = [
    b"\x00" + _REC.encode(),
    b"\x01" + MaintenanceFlag("ops", "kernel update", 1.0).encode(),
    b"\x02" + PurgeEvent("prefix", "/static/", 1.0).encode(),
    b"\x03" + BanRecord("192.0.2.7", "flood", 9.0, "edge1").encode(),
    b"\x04/carousel/services/edge/edge1",
    b"\x05"
    + RegistrySnapshot(
        "/carousel/services/", 5, 1.0, {"/carousel/services/edge/edge1": _REC.encode()}
    ).encode(),
]

if __name__ == "__main__":
    run("registry", test_one_input, SEEDS)
    sys.exit(0)
