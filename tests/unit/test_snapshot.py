"""The registry snapshot file: round trip, atomic 0600 writes, and every kind of damage refused cleanly."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from carousel.mirror import PrefixMirror
from carousel.registry import ServiceRecord
from carousel.snapshot import (
    RegistrySnapshot,
    SnapshotConfig,
    SnapshotError,
    SnapshotStore,
    read_snapshot,
    write_atomic,
)
from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.config import NSConfig, ZoneConfig
from dnsd.respond import Answerer
from dnsd.zone import compile_zones

PREFIX = "/carousel/services/"


def _record(i: int) -> ServiceRecord:
    return ServiceRecord("edge", f"edge{i}", 8080, (f"10.0.0.{i}",))


def _snap(age: float = 0.0, n: int = 3) -> RegistrySnapshot:
    items = {f"{PREFIX}edge/edge{i}": _record(i).encode() for i in range(1, n + 1)}
    return RegistrySnapshot(PREFIX, 42, time.time() - age, items)


def test_round_trip_keeps_revision_items_and_age(tmp_path: Path) -> None:
    path = tmp_path / "s" / "dnsd.snapshot"
    snap = _snap(age=10)
    write_atomic(path, snap.encode())
    back = read_snapshot(path)
    assert back is not None
    assert (back.prefix, back.revision, back.items) == (snap.prefix, 42, snap.items)
    assert 9.5 < back.age() < 11
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["dnsd.snapshot"]  # no temp file left


def test_a_missing_file_is_none_not_an_error(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path / "nothing.snapshot") is None


def _damaged() -> dict[str, bytes]:
    data = _snap().encode()
    header, _, body = data.partition(b"\n")
    return {
        "empty": b"",
        "truncated": data[:-1],
        "truncated-header": data[:20],
        "padded": data + b" ",
        "bit-flip": data[:-3] + bytes([data[-3] ^ 0x20]) + data[-2:],
        "other-version": header.replace(b" 1 ", b" 2 ") + b"\n" + body,
        "garbage": os.urandom(2048),
        "not-json": b"carousel-registry-snapshot 1 sha256=%s length=3\n{x}"
        % __import__("hashlib").sha256(b"{x}").hexdigest().encode(),
    }


@pytest.mark.parametrize("kind", sorted(_damaged()))
def test_every_damage_is_one_snapshot_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.snapshot"
    path.write_bytes(_damaged()[kind])
    with pytest.raises(SnapshotError):
        read_snapshot(path)


def test_a_body_of_the_wrong_shape_is_refused_even_with_a_good_checksum() -> None:
    import hashlib

    for body in (b"[]", b'{"prefix":1,"revision":1,"verified_at":1,"items":{}}',
                 b'{"prefix":"/","revision":true,"verified_at":1,"items":{}}',
                 b'{"prefix":"/","revision":1,"verified_at":1,"items":{"k":"!!"}}'):  # fmt: skip
        header = b"carousel-registry-snapshot 1 sha256=%s length=%d\n" % (
            hashlib.sha256(body).hexdigest().encode(),
            len(body),
        )
        with pytest.raises(SnapshotError):
            RegistrySnapshot.decode(header + body)


def test_store_refuses_another_prefix_and_too_old_unless_told_to_serve(tmp_path: Path) -> None:
    cfg = SnapshotConfig(directory=str(tmp_path), max_age=60)
    store = SnapshotStore(cfg, "dnsd-registry", ServiceRecord.encode)
    write_atomic(store.path, _snap(age=120).encode())
    assert store.load(PREFIX) is None  # too old, refused
    assert store.load("/other/") is None
    serve = SnapshotStore(SnapshotConfig(str(tmp_path), 60, "serve"), "dnsd-registry", ServiceRecord.encode)
    loaded = serve.load(PREFIX)
    assert loaded is not None and len(loaded.items) == 3


def test_seeding_a_mirror_parses_values_and_skips_bad_ones() -> None:
    async def main() -> None:
        mirror: PrefixMirror[ServiceRecord] = PrefixMirror(
            SimpleNamespace(config=SimpleNamespace(batch_interval=0.05)),  # type: ignore[arg-type]  # seeding never calls etcd
            PREFIX,
            lambda k, v: ServiceRecord.decode(v),
        )
        values = dict(_snap().items)
        values[f"{PREFIX}edge/bad"] = b'{"v":1,"service":"edge"}'
        assert mirror.seed(values, 42, 30.0) == 3
        assert mirror.synced.is_set() and mirror.revision == 42
        assert 29 < mirror.seconds_since_sync < 31
        mirror.forget_seed()
        assert not mirror.items and not mirror.synced.is_set()

    asyncio.run(main())


def test_refused_knowledge_answers_servfail_for_service_names_only() -> None:
    zones = compile_zones([ZoneConfig("example.test", ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
                                      services={"www": "edge"})])  # fmt: skip
    import dnslib

    def rcode(builder: TableBuilder, name: str) -> int:
        table = builder.build([], 0, synced=False)
        q = bytes(dnslib.DNSRecord.question(name, "A").pack())
        reply, _ = Answerer().respond(q, table)
        assert reply is not None
        return dnslib.DNSRecord.parse(reply).header.rcode

    assert rcode(TableBuilder(zones), "www.example.test") == wire.NOERROR  # NODATA, as before
    servfail = TableBuilder(zones, unknown_rcode=wire.SERVFAIL)
    assert rcode(servfail, "www.example.test") == wire.SERVFAIL
    assert rcode(servfail, "example.test") == wire.NOERROR
    synced = servfail.build([_record(1)], 5, synced=True)
    reply, _ = Answerer().respond(bytes(dnslib.DNSRecord.question("www.example.test", "A").pack()), synced)
    assert reply is not None and dnslib.DNSRecord.parse(reply).header.rcode == wire.NOERROR


def test_a_crashed_writers_temp_file_is_removed_once_stale(tmp_path: Path) -> None:
    store = SnapshotStore(SnapshotConfig(str(tmp_path)), "dnsd-registry", ServiceRecord.encode)
    stale = tmp_path / f".{store.path.name}.999999.tmp"
    live = tmp_path / f".{store.path.name}.999998.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert store.load(PREFIX) is None
    assert not stale.exists() and live.exists()
