"""The TCP protocol object without sockets: framing, pipelining, limits, oversize answers."""

from __future__ import annotations

import asyncio
import struct

import dns.flags
import dns.message
import pytest

from dnsd.build import TableBuilder
from dnsd.config import DnsConfig, NSConfig, RecordConfig, ZoneConfig
from dnsd.server import DnsServer, DnsTcpProtocol
from dnsd.zone import compile_zones


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes and whether it closed the connection."""

    def __init__(self, peer: str = "192.0.2.9") -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 5353) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def messages(self) -> list[dns.message.Message]:
        out, buf = [], bytes(self.written)
        while buf:
            (size,) = struct.unpack("!H", buf[:2])
            out.append(dns.message.from_wire(buf[2 : 2 + size]))
            buf = buf[2 + size :]
        return out


def frame(msg: dns.message.Message) -> bytes:
    raw = msg.to_wire()
    return struct.pack("!H", len(raw)) + raw


@pytest.fixture
def server() -> DnsServer:
    zones = compile_zones(
        [
            ZoneConfig(
                origin="example.test",
                ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
                record=[
                    RecordConfig("a", "A", "192.0.2.1"),
                    *[RecordConfig("huge", "TXT", f"{i:04d}" + "z" * 250) for i in range(280)],
                ],
            )
        ]
    )
    return DnsServer(DnsConfig(tcp_max_connections_per_client=2), TableBuilder(zones).build([], 1))


async def connect(server: DnsServer, peer: str = "192.0.2.9") -> tuple[DnsTcpProtocol, FakeTransport]:
    proto, transport = DnsTcpProtocol(server), FakeTransport(peer)
    proto.connection_made(transport)
    return proto, transport


async def test_frames_split_anywhere_and_pipelined_are_answered_in_order(server: DnsServer) -> None:
    proto, transport = await connect(server)
    queries = [dns.message.make_query(n, "A") for n in ("a.example.test", "b.example.test", "a.example.test")]
    data = b"".join(frame(q) for q in queries)
    for i in range(0, len(data), 7):  # dribbled in 7-byte pieces
        proto.data_received(data[i : i + 7])
    answers = transport.messages()
    assert [a.id for a in answers] == [q.id for q in queries]
    assert answers[0].answer[0][0].address == "192.0.2.1" and answers[1].rcode() == 3
    assert not transport.closed


async def test_answer_too_big_for_tcp_framing_is_truncated(server: DnsServer) -> None:
    proto, transport = await connect(server)
    proto.data_received(frame(dns.message.make_query("huge.example.test", "TXT")))
    (answer,) = transport.messages()
    assert answer.flags & dns.flags.TC and not answer.answer


async def test_unreadable_message_closes_the_connection(server: DnsServer) -> None:
    proto, transport = await connect(server)
    proto.data_received(b"\x00\x03abc")
    assert transport.closed and not transport.written


async def test_per_client_limit_and_release(server: DnsServer) -> None:
    first = await connect(server)
    second = await connect(server)
    _, third_transport = await connect(server)
    assert third_transport.aborted and server.tcp_rejected == 1
    _, other_client = await connect(server, peer="192.0.2.10")
    assert not other_client.aborted
    first[0].connection_lost(None)
    _, again = await connect(server)
    assert not again.aborted
    assert server.tcp_open == 3  # second, other_client, again
    second[0].connection_lost(None)
    assert server.tcp_open == 2


async def test_a_client_that_does_not_read_is_paused(server: DnsServer) -> None:
    proto, transport = await connect(server)
    proto.pause_writing()
    assert not transport.reading
    proto.resume_writing()
    assert transport.reading
