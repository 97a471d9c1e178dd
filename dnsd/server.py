"""DnsServer: the thin I/O layer around the answer function (UDP and TCP listeners).

UDP has three engines, all around the same answer function:

* ``mmsg`` (the default on Linux, see mmsg.py): a receive thread per socket
  taking queued datagrams in batches with recvmmsg/sendmmsg;
* ``thread``: a receive thread per socket doing one blocking recvfrom/sendto
  per datagram. Measured on CPython 3.11 it answers ~35 % more queries per
  second than a DatagramProtocol on uvloop: a datagram costs two system calls
  and no event-loop machinery;
* ``asyncio``: a plain DatagramProtocol.

The threads release the GIL in their system calls, so the event loop
(registry watch, TCP, admin) keeps running beside them.

TCP (RFC 7766): 2-byte length framing, any number of queries per
connection, answered in order; an idle timeout; limits on connections in
total and per client address; and a cap on answers queued for a client that
does not read them (reading pauses until it catches up).

The current AnswerTable is one attribute, replaced whole by ``set_table``;
readers take a reference per query, so a swap needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import structlog

from dnsd import mmsg
from dnsd import rrl as rrl_mod
from dnsd.config import DnsConfig, split_hostport
from dnsd.respond import NEEDS_PEER, Answerer
from dnsd.shared import NodeShared
from dnsd.stats import ALL, OWN, Counters, Snapshot
from dnsd.table import AnswerTable

log = structlog.get_logger("dnsd.server")

UDP_RECV_SIZE = 4096  # larger datagrams are cut, then answered FORMERR
UDP_BUFFER = 4 << 20
TCP_BACKLOG = 1024
TCP_MAX_FRAME_BUFFER = 65535 + 2
TCP_MAX_MESSAGE = 65535
RRL_TICK = 0.1  # seconds between advances of the rate limiters' clock
GIL_SWITCH_INTERVAL = 0.0005


T = TypeVar("T")


def _same(value: T) -> T:
    return value


@dataclass
class Listener:
    """One listen address: a UDP socket and a TCP socket on the same port."""

    host: str
    port: int
    udp: socket.socket
    tcp: socket.socket

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _socket(family: int, kind: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind)
    if family == socket.AF_INET6:
        # [::] and 0.0.0.0 are configured separately; keep them from colliding.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def bind_listener(address: str, *, reuse_port: bool = False, attempts: int = 20) -> Listener:
    """Bind UDP and TCP on one host:port; port 0 picks a number free for both."""
    host, port = split_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts if port == 0 else 1):
        udp = _socket(family, socket.SOCK_DGRAM, reuse_port)
        tcp = _socket(family, socket.SOCK_STREAM, reuse_port)
        try:
            udp.bind((host, port))
            bound = udp.getsockname()[1]
            tcp.bind((host, bound))
        except OSError as exc:
            udp.close()
            tcp.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # the UDP number was taken for TCP: try another
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        tcp.listen(TCP_BACKLOG)
        with contextlib.suppress(OSError):  # capped by net.core.rmem_max; best effort
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
        return Listener(host, bound, udp, tcp)
    raise OSError(errno.EADDRINUSE, f"cannot listen on {address}: no port free for UDP and TCP")


class UdpThread:
    """A blocking receive/answer/send loop over one UDP socket, in its own thread."""

    def __init__(self, server: DnsServer, sock: socket.socket, name: str) -> None:
        self.server = server
        self.sock = sock
        self.answerer = Answerer()
        self.rrl = server.new_rate_limiter()
        self.send_errors = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Wake the blocked recvfrom (shutdown makes it return) and wait for the thread."""
        self._stopping = True
        with contextlib.suppress(OSError):  # ENOTCONN on UDP, but it still wakes the reader
            self.sock.shutdown(socket.SHUT_RD)
        self._thread.join(5)

    def _run(self) -> None:
        # Locals: the loop below is the hottest code in dnsd.
        server = self.server
        recv = self.sock.recvfrom
        send = self.sock.sendto
        respond = self.answerer.respond
        rrl = self.rrl
        check = rrl.check if rrl is not None else None
        failures = 0
        while True:
            try:
                data, addr = recv(UDP_RECV_SIZE)
            except OSError as exc:
                if self._stopping:
                    return
                log.warning("udp receive failed", error=str(exc))
                continue
            if not data:
                if self._stopping:
                    return
                continue
            try:
                table = server.table
                response, key = respond(data, table, True)
                if response is None:
                    if key is not NEEDS_PEER:
                        continue
                    response, key = self.answerer.respond_peer(data, table, True, addr[0])
                    if response is None:
                        continue
                if check is not None:
                    verdict = check(addr[0], key)
                    if verdict:
                        if verdict == rrl_mod.DROP:
                            continue
                        response = self.answerer.truncate(data, table)
                        if response is None:
                            continue
            except Exception:  # a bug must cost one answer, not the listener
                failures += 1
                if failures == 1 or failures % 10000 == 0:
                    log.exception("answering a UDP query failed", failures=failures)
                continue
            try:
                send(response, addr)
            except OSError:
                self.send_errors += 1


class DnsUdpProtocol(asyncio.DatagramProtocol):
    """The asyncio UDP engine."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.answerer = Answerer()
        self.rrl = server.new_rate_limiter()
        self.send_errors = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            table = self.server.table
            response, key = self.answerer.respond(data, table, True)
            if response is None:
                if key is not NEEDS_PEER:
                    return
                response, key = self.answerer.respond_peer(data, table, True, addr[0])
                if response is None:
                    return
            if self.rrl is not None:
                verdict = self.rrl.check(addr[0], key)
                if verdict == rrl_mod.DROP:
                    return
                if verdict == rrl_mod.SLIP:
                    response = self.answerer.truncate(data, table)
                    if response is None:
                        return
        except Exception:
            log.exception("answering a UDP query failed")
            return
        assert self.transport is not None
        self.transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1


class DnsTcpProtocol(asyncio.Protocol):
    """One TCP client: length-framed queries in, answers out in order."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.answerer = server.tcp_answerer
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.peer = ""
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        transport = cast(asyncio.Transport, base)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        if not self.server.tcp_admit(self.peer, self):
            transport.abort()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=self.server.config.tcp_max_pending_bytes)
        self._touch()

    def _touch(self) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.server.config.tcp_idle_timeout
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._idle_check)

    def _idle_check(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= self.deadline:
            self.server.tcp_idle_closed += 1
            self.transport.close()
        else:
            self.timer = loop.call_at(self.deadline, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        buf = self.buffer
        buf += data
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            try:
                table = self.server.table
                response, key = self.answerer.respond(message, table, False)
                if response is None and key is NEEDS_PEER:
                    response, _ = self.answerer.respond_peer(message, table, False, self.peer)
            except Exception:
                log.exception("answering a TCP query failed", peer=self.peer)
                response = None
            if response is None:
                # An unreadable message: the stream may be out of step. Close it.
                self.transport.close()
                self.transport = None
                return
            if len(response) > TCP_MAX_MESSAGE:  # huge static RRsets: the 2-byte length can't say it
                response = self.answerer.truncate(message, self.server.table) or b""
            self.transport.write(len(response).to_bytes(2, "big") + response)
            self._touch()  # idle is measured from the last answer, not the last byte
        if len(buf) > TCP_MAX_FRAME_BUFFER:  # cannot happen with valid framing
            self.transport.close()
            self.transport = None

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()  # stop reading queries of a client that won't read

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.tcp_release(self.peer, self)
        self.transport = None


class DnsServer:
    """UDP and TCP listeners answering from the current AnswerTable."""

    def __init__(self, config: DnsConfig, table: AnswerTable, shared: NodeShared | None = None) -> None:
        self.config = config
        self.table = table
        # A worker of a node (workers = N): RRL accounts in the node's shared memory, and
        # the exposure of node-rotated answers counted by the supervisor (stats.OWN).
        self.shared = shared
        self.counters = Counters(OWN if shared is not None else ALL)
        self.listeners: list[Listener] = []
        self.udp_threads: list[UdpThread | mmsg.MmsgThread] = []
        self.udp_protocols: list[DnsUdpProtocol] = []
        self.udp_transports: list[asyncio.BaseTransport] = []
        self.tcp_servers: list[asyncio.Server] = []
        self.tcp_answerer = Answerer()
        self.tcp_clients: dict[str, set[DnsTcpProtocol]] = {}
        self.tcp_open = 0
        self.tcp_accepted = 0
        self.tcp_rejected = 0
        self.tcp_idle_closed = 0
        self._rrls: list[rrl_mod.RateLimiter] = []
        self._ticker: asyncio.Task[None] | None = None

    # --- table --------------------------------------------------------------------------

    def set_table(self, table: AnswerTable) -> None:
        """Serve a new table from the next query on; fold the old one into the counters."""
        old, self.table = self.table, table
        if old is not table:
            self.counters.retire(old)

    # --- limits -------------------------------------------------------------------------

    def new_rate_limiter(self) -> rrl_mod.RateLimiter | None:
        if not self.config.rrl.enabled:
            return None
        limiter: rrl_mod.RateLimiter
        if self.shared is not None:
            limiter = rrl_mod.SharedRateLimiter(self.config.rrl, self.shared.buckets, self.shared.spec.salt)
        else:
            limiter = rrl_mod.RateLimiter(self.config.rrl)
        self._rrls.append(limiter)
        return limiter

    def tcp_admit(self, peer: str, proto: DnsTcpProtocol) -> bool:
        """Count a new connection in, or refuse it when a limit is reached."""
        clients = self.tcp_clients.get(peer)
        if self.tcp_open >= self.config.tcp_max_connections or (
            clients is not None and len(clients) >= self.config.tcp_max_connections_per_client
        ):
            self.tcp_rejected += 1
            return False
        self.tcp_accepted += 1
        self.tcp_open += 1
        self.tcp_clients.setdefault(peer, set()).add(proto)
        return True

    def tcp_release(self, peer: str, proto: DnsTcpProtocol) -> None:
        """Count a closed connection out (no-op for one that was refused)."""
        clients = self.tcp_clients.get(peer)
        if clients is None or proto not in clients:
            return
        clients.discard(proto)
        if not clients:
            del self.tcp_clients[peer]
        self.tcp_open -= 1

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, listeners: list[Listener]) -> None:
        """Serve on already bound listeners."""
        loop = asyncio.get_running_loop()
        self.listeners = listeners
        if self.config.rrl.enabled:
            self._ticker = asyncio.create_task(self._tick_rrl(), name="rrl-clock")
        if self.config.udp_engine != "asyncio":
            # A receive thread waiting for the GIL waits up to the switch interval
            # (5 ms by default) while another thread (the event loop, gRPC's poller)
            # holds it: that wait lands in the answer's latency.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        engine = self.config.udp_engine
        if engine == "mmsg" and not mmsg.available():
            log.warning("recvmmsg/sendmmsg unavailable here; using udp_engine 'thread'")
            engine = "thread"
        for lst in listeners:
            if engine in ("mmsg", "thread"):
                kind = mmsg.MmsgThread if engine == "mmsg" else UdpThread
                thread = kind(self, lst.udp, f"dnsd-udp-{lst.address}")
                self.udp_threads.append(thread)
                thread.start()
            else:
                lst.udp.setblocking(False)
                proto = DnsUdpProtocol(self)
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_same, proto), sock=lst.udp
                )
                self.udp_protocols.append(proto)
                self.udp_transports.append(transport)
            server = await loop.create_server(lambda: DnsTcpProtocol(self), sock=lst.tcp)
            self.tcp_servers.append(server)

    async def _tick_rrl(self) -> None:
        while True:
            for limiter in self._rrls:
                limiter.tick()
            await asyncio.sleep(RRL_TICK)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, finish the answers in flight, close every connection."""
        if self._ticker is not None:
            self._ticker.cancel()
        # 1. No new TCP connections.
        for server in self.tcp_servers:
            server.close()
        # 2. UDP: wake and join the receive threads; close asyncio endpoints.
        await asyncio.gather(*(asyncio.to_thread(t.stop) for t in self.udp_threads))
        for transport in self.udp_transports:
            transport.close()
        # 3. TCP clients get their pending answers flushed (close() writes the buffer out).
        for clients in list(self.tcp_clients.values()):
            for proto in list(clients):
                if proto.transport is not None:
                    proto.transport.close()
        # 4. Wait for the listening sockets to close, with a deadline.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in self.tcp_servers)), grace)
        for lst in self.listeners:
            lst.udp.close()
            lst.tcp.close()

    # --- statistics ---------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Counters of this process, computed now."""
        answerers = [t.answerer for t in self.udp_threads] + [p.answerer for p in self.udp_protocols]
        answerers.append(self.tcp_answerer)
        snap = self.counters.snapshot(self.table, [a.counts for a in answerers])
        snap.ignored = sum(a.ignored for a in answerers)
        snap.rrl_dropped = sum(r.dropped for r in self._rrls)
        snap.rrl_slipped = sum(r.slipped for r in self._rrls)
        snap.udp_send_errors = sum(t.send_errors for t in self.udp_threads) + sum(
            p.send_errors for p in self.udp_protocols
        )
        snap.tcp_connections = self.tcp_open
        snap.tcp_accepted = self.tcp_accepted
        snap.tcp_rejected = self.tcp_rejected
        snap.tcp_idle_closed = self.tcp_idle_closed
        return snap
