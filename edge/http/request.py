"""A complete client request, as the pipeline sees it, and what it needs from its connection.

The connection that parsed the request (edge/front/connection.py for HTTP/1.1;
an HTTP/2 stream would be another) travels with it as ``conn``: the pipeline
and the features only read ``peer`` and ``transport`` through the request, the
front layer that built it uses the rest. ``Request`` is generic in that
connection type, so a reader on either side sees the type it works with.
"""

from __future__ import annotations

import asyncio
from http.cookies import SimpleCookie
from typing import Generic, Protocol, TypeVar

from multidict import CIMultiDictProxy

from edge.http.http1 import HOST, Head


class ClientSide(Protocol):
    """What a request needs from the client connection it arrived on."""

    @property
    def peer(self) -> str: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def closing(self) -> bool: ...


C = TypeVar("C", bound=ClientSide)


class Request(Generic[C]):
    """A complete client request, as the pipeline sees it."""

    __slots__ = ("_cookies", "body", "conn", "head", "remote")

    def __init__(self, head: Head, conn: C, body: bytes | None) -> None:
        self.head = head
        self.conn = conn
        self.body = body
        self.remote = conn.peer
        self._cookies: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        """The decoded path, without the query."""
        return self.head.path

    @property
    def raw_path(self) -> str:
        """The normalised path (http1.normalize_path) and the query as sent: what is forwarded."""
        return self.head.raw_path

    @property
    def query_string(self) -> str:
        return self.head.query

    @property
    def version(self) -> str:
        return self.head.version

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.head.headers

    @property
    def host(self) -> str:
        return self.head.headers.get(HOST, "")

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies by name (parsed on first use)."""
        if self._cookies is None:
            jar: SimpleCookie = SimpleCookie()
            for value in self.head.headers.getall("Cookie", ()):
                try:
                    jar.load(value)
                except Exception:  # a malformed cookie header is just no cookies
                    continue
            self._cookies = {k: m.value for k, m in jar.items()}
        return self._cookies

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    def send_interim(self, head: bytes) -> None:
        """Write a 1xx interim response head, ahead of this request's final response."""
        transport = self.conn.transport
        if transport is not None and not self.conn.closing:
            transport.write(head)

    def is_upgrade(self, protocol: str) -> bool:
        """Does the client ask to switch to ``protocol`` (e.g. websocket)?"""
        h = self.head.headers
        return h.get("Upgrade", "").lower() == protocol and "upgrade" in h.get("Connection", "").lower()
