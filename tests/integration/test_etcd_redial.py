"""The etcd adapter does not dial in a storm: not after a failed TLS handshake, nor while etcd is down."""

from __future__ import annotations

import asyncio
import socket
import ssl

import grpc
import pytest
import trustme

from carousel.config import EtcdConfig
from carousel.etcd import Etcd, EtcdUnavailable
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
    # A port nobody listens on: every dial is refused at once, as with etcd stopped.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
    # One channel per REDIAL_INTERVAL (1 s) at most, gRPC's back-off pacing the dials on
    # it: 4-5 in 4 s. A new channel for every failed attempt made 22.
    print(f"FIGURE etcd stopped: {channels} channels in 4 s")
    assert channels <= 7, f"{channels} channels in 4 s"
