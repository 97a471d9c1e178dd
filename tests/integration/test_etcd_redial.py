"""The etcd adapter does not dial in a storm: not after a failed TLS handshake, nor while etcd is down."""

from __future__ import annotations

import asyncio
import ssl

import grpc
import pytest
import trustme

import carousel.etcd as carousel_etcd
from carousel.config import EtcdConfig
from carousel.etcd import Etcd, EtcdUnavailable
from carousel.etcdserver import EtcdProcess, free_port
from carousel.mirror import PrefixMirror


async def test_failed_handshakes_are_paced_and_named(tmp_path) -> None:
    # A TLS listener standing in for etcd, with a certificate the client cannot verify
    # (it trusts another CA). It counts the connections the client opens.
    server_ca, client_ca = trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ctx.set_alpn_protocols(["h2"])
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    def counting_factory() -> asyncio.Protocol:
        nonlocal accepted
        accepted += 1
        reader = asyncio.StreamReader()
        return asyncio.StreamReaderProtocol(reader, handle)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(counting_factory, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    ca_file = tmp_path / "other-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    cfg = EtcdConfig(endpoints=[f"https://127.0.0.1:{port}"], timeout=1.0, ca_file=str(ca_file))
    etcd = Etcd(cfg)
    try:
        with pytest.raises(EtcdUnavailable, match="TLS handshake with etcd failed"):
            await etcd.get("/carousel/x")
        mirror = PrefixMirror(etcd, "/carousel/services/", lambda k, v: v, name="tls-test")
        accepted = 0
        task = asyncio.create_task(mirror.run())
        await asyncio.sleep(4.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await etcd.close()
        server.close()
    # Paced by the mirror's back-off (at most 1 s) and gRPC's: a handful in 4 s. Retried
    # within each call on a fresh channel, as before, it was about 90 (22 a second).
    print(f"FIGURE failed TLS handshakes: {accepted} connections in 4 s")
    assert accepted <= 16, f"{accepted} connections in 4 s"


async def test_a_stopped_etcd_is_redialled_at_a_bounded_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nobody listens: every dial is refused at once, as with etcd stopped
    channels = 0
    make = grpc.aio.insecure_channel

    def counting(*args: object, **kwargs: object) -> grpc.aio.Channel:
        nonlocal channels
        channels += 1
        return make(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(grpc.aio, "insecure_channel", counting)
    etcd = Etcd(EtcdConfig(endpoints=[f"127.0.0.1:{port}"], timeout=1.0))
    mirror = PrefixMirror(etcd, "/carousel/services/", lambda k, v: v, name="redial-test")
    task = asyncio.create_task(mirror.run())
    try:
        await asyncio.sleep(4.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await etcd.close()
    # One channel per REDIAL_INTERVAL (30 s) at most, gRPC's back-off pacing the dials on
    # it. A new channel for every failed attempt made 22; one a second (REDIAL_INTERVAL
    # 1 s) made 4-5, each restarting gRPC's back-off at 0.1 s.
    print(f"FIGURE etcd stopped: {channels} channels in 4 s")
    assert channels <= 2, f"{channels} channels in 4 s"


async def test_callers_wait_for_one_probe_while_etcd_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eight callers (a daemon has mirrors, keepalives, registry writes, the DoS detector)
    # against a stopped etcd, each retrying 0.1 s after an error, as the daemons' loops do.
    port = free_port()  # nobody listens
    attempts = 0
    real_get = carousel_etcd._Client.get

    async def counting_get(self: carousel_etcd._Client, *args: object, **kwargs: object) -> object:
        nonlocal attempts
        attempts += 1
        return await real_get(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(carousel_etcd._Client, "get", counting_get)
    etcd = Etcd(EtcdConfig(endpoints=[f"127.0.0.1:{port}"], timeout=0.5))
    failures = 0

    async def caller() -> None:
        nonlocal failures
        while True:
            try:
                await etcd.get("/carousel/x")
            except EtcdUnavailable:
                failures += 1
                await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(caller()) for _ in range(8)]
    try:
        # The calls in flight when etcd is first found away each finish their own retries;
        # what counts is the pace after that.
        await asyncio.sleep(1.5)
        attempts = failures = 0
        await asyncio.sleep(3.0)
        counted = attempts, failures
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await etcd.close()
    # One probe at a time, each a retry loop of a few attempts within its 1 s budget, the
    # others waiting for it: about 15 attempts in 3 s. Each caller retrying on its own made
    # about 150 (206 against 20 in 4 s, measured; 0.27 against 0.10 s of CPU).
    attempts, failures = counted
    print(f"FIGURE etcd away, 8 callers: {attempts} attempts, {failures} failed calls in 3 s")
    assert failures >= 8, "every caller hears that etcd is away"
    assert attempts <= 30, f"{attempts} attempts in 3 s"


async def test_a_returning_etcd_is_found_within_a_second_of_answering(tmp_path) -> None:
    port = free_port()
    etcd = Etcd(EtcdConfig(endpoints=[f"127.0.0.1:{port}"], timeout=0.5))
    loop = asyncio.get_running_loop()
    written: asyncio.Future[float] = loop.create_future()

    async def caller() -> None:  # a daemon's loop: retry 0.1 s after each failure
        while not written.done():
            try:
                await etcd.put("/carousel/x", b"1")
            except EtcdUnavailable:
                await asyncio.sleep(0.1)
                continue
            if not written.done():
                written.set_result(loop.time())

    tasks = [asyncio.create_task(caller()) for _ in range(4)]
    server = EtcdProcess(tmp_path / "etcd", client_port=port)
    try:
        await asyncio.sleep(1.5)  # etcd away: the probes pace the callers
        assert not written.done()
        await loop.run_in_executor(None, server.start)
        answering = loop.time()
        found = await asyncio.wait_for(written, 10) - answering
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await etcd.close()
        server.stop()
    # The probe pace (PROBE_INTERVAL) and gRPC's reconnect back-off (at most 1 s) bound it.
    print(f"FIGURE etcd back: first write {found:.2f} s after etcd answered")
    assert found < 1.5, f"{found:.2f} s"
