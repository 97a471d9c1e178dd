"""How connections become HTTP/2: ALPN ``h2`` after a TLS handshake, or the client preface
on a plain listener with ``[http2] h2c`` on (prior knowledge, RFC 9113 3.3)."""

from __future__ import annotations

import asyncio

from edge.front.connection import ClientConnection, ConnectionHost
from edge.front.h2conn import H2ClientConnection
from edge.http.h2 import PREFACE


class H2cSniffingConnection(ClientConnection):
    """The plain listener with ``h2c`` on: HTTP/1.1, unless the first bytes are the HTTP/2
    client preface (prior knowledge, RFC 9113 3.3); then the connection is handed over."""

    __slots__ = ("_sniff",)

    def __init__(self, edge: ConnectionHost) -> None:
        super().__init__(edge)
        self._sniff: bytes | None = b""

    def data_received(self, data: bytes) -> None:
        if self.requests or self._sniff is None:
            super().data_received(data)
            return
        seen = (self._sniff or b"") + data
        if PREFACE.startswith(seen[: len(PREFACE)]) and len(seen) < len(PREFACE):
            self._sniff = seen  # too early to tell
            return
        self._sniff = None
        if not seen.startswith(PREFACE):
            super().data_received(seen)
            return
        transport = self.transport
        if transport is None:
            return
        # The guard admitted this client already; the HTTP/2 connection takes its place.
        self.edge.connections.discard(self)
        self._cancel_deadline()
        self.closing = True
        self.transport = None
        h2conn = H2ClientConnection(self.edge, "http")
        h2conn.peer = self.peer
        transport.set_protocol(h2conn)
        h2conn.connection_made(transport, admitted=True)
        h2conn.data_received(seen)


def start_h2(edge: ConnectionHost, transport: asyncio.BaseTransport, scheme: str) -> None:
    """Serve a connection whose TLS handshake chose ``h2`` by ALPN."""
    conn = H2ClientConnection(edge, scheme)
    transport.set_protocol(conn)
    conn.connection_made(transport)
