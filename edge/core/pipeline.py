"""The request pipeline: every feature is one module behind one interface.

Theory of operation
-------------------
A request becomes an ``Exchange`` (the request, its route, the client and
scratch fields that features fill in). The exchange goes through a chain of
features, each an object with::

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply

A feature may answer by itself (a cache hit, a ban), change the exchange
before calling ``call_next`` (request side), and change the ``Reply`` it gets
back (response side). Response-side features that transform the body wrap
``reply.body`` in another ``Body`` (compression does ``GzipBody(reply.body)``)
and never mutate a body shared with someone else (a cached object).

The chain ends in a terminal handler chosen by the route (upstream pool,
static directory, redirect, fixed response). Terminal handlers never call
``call_next``.

A feature comes from a factory ``factory(config: Config, ctx: EdgeContext)
-> Feature | None`` (None: disabled by this config). Which factories run, and
in what order, is fixed in one place: ``FEATURE_ORDER`` in
edge/features/__init__.py.

ANSWERING AT ONCE. A feature may also have a synchronous twin::

    def now(self, ex: Exchange, call_next: NowHandler) -> Reply | None

which does the same work when nothing needs waiting for, and returns None
as soon as something would (an upstream fetch, a delay). The edge tries this
chain first, inside the connection's ``data_received``: a cache hit, a ban
or a fixed response is answered and written with no task and no await,
which is most of what a hit costs otherwise. On None the edge runs the async
chain from the start with the same Exchange, so a ``now`` that returns None
must leave nothing done that ``__call__`` would do again: request-side work
it did anyway (the DoS verdict) goes into ``ex.notes`` for ``__call__`` to
reuse. The chain stops (None) at the first feature without ``now``; user
features without one simply keep every request on the async path. Terminal
``now``s are pure or idempotent (a fixed response, a redirect, a static file's
answer after a stat, or None) and hold nothing a dropped Reply would leak (a static
file sent from disk is opened when written: ``FileBody.of_path``).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from multidict import CIMultiDict

from edge.http.http1 import field_lines

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.routing import Route
    from edge.http.request import Request


class BodyWriter(Protocol):
    """Where a body is written: the client connection, with flow control."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    async def write(self, data: bytes) -> None: ...


class Body:
    """A response body the edge will write; subclasses say how."""

    #: Bytes in the body, or None when unknown (then the response is chunked).
    length: int | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as a stream of chunks (what transforming features consume)."""
        if False:  # pragma: no cover - makes this an async generator
            yield b""

    async def write_to(self, out: BodyWriter) -> None:
        """Write the whole body (after the head; framing is the connection's job)."""
        async for chunk in self.chunks():
            await out.write(chunk)

    def close(self) -> None:
        """Free what the body holds (temp files, upstream connections)."""


class BytesBody(Body):
    """A body held in memory."""

    __slots__ = ("data", "length")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.data

    async def write_to(self, out: BodyWriter) -> None:
        await out.write(self.data)


class FileBody(Body):
    """A slice of an open file: a static file or a response spilled to disk."""

    __slots__ = ("chunk_size", "fd", "length", "offset", "owned", "path")

    def __init__(self, fd: int, offset: int, length: int, *, owned: bool = True, path: str = "") -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.owned = owned
        self.chunk_size = 256 * 1024
        # Opened when the body is written (fd -1 until then): a reply built on the synchronous
        # chain and dropped when a feature gives up on it holds no descriptor.
        self.path = path

    @classmethod
    def of_path(cls, path: str, offset: int, length: int) -> FileBody:
        """A slice of the file at ``path``, opened only when it is written."""
        return cls(-1, offset, length, path=path)

    def _open(self) -> None:
        if self.fd < 0 and self.path:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self.owned = True

    async def chunks(self) -> AsyncIterator[bytes]:
        self._open()
        pos, end = self.offset, self.offset + (self.length or 0)
        while pos < end:
            data = os.pread(self.fd, min(self.chunk_size, end - pos), pos)
            if not data:
                raise OSError("file shrank while being sent")
            pos += len(data)
            yield data

    async def write_to(self, out: BodyWriter) -> None:
        transport = out.transport
        if transport is None or not self.length:
            return await super().write_to(out)
        self._open()
        loop = asyncio.get_running_loop()
        if isinstance(loop, asyncio.BaseEventLoop):  # the stdlib loop's own sendfile() waits well
            try:
                with os.fdopen(os.dup(self.fd), "rb") as f:
                    await loop.sendfile(transport, f, self.offset, self.length)
                return None
            except NotImplementedError:  # TLS, or a transport that is not a socket
                return await super().write_to(out)
        # uvloop has no loop.sendfile(): the kernel copies page cache to the socket itself
        # (sendfile(2)) for as much as the socket takes now, once what was written before
        # (the head) has left the transport; the rest, if the socket filled, is read and
        # written with the transport's flow control.
        sent = _sendfile_now(transport, self.fd, self.offset, self.length)
        if sent < self.length:
            rest = FileBody(self.fd, self.offset + sent, self.length - sent, owned=False)
            async for chunk in rest.chunks():
                await out.write(chunk)
        return None

    def send_now(self, transport: asyncio.Transport) -> int:
        """Bytes of the body sent with sendfile(2) as far as the socket takes them now, without
        waiting (-1: the file cannot be opened). Called with the head already written: a head
        the socket took whole leaves the transport empty, the one state sendfile may start in
        (else nothing is sent here). ``rest`` is what is left, for ``write_to``."""
        if not self.length:
            return 0
        try:
            self._open()
        except OSError:
            return -1
        return _sendfile_now(transport, self.fd, self.offset, self.length)

    def rest(self, sent: int) -> FileBody:
        """The part after the first ``sent`` bytes, on this body's descriptor (which it never closes)."""
        return FileBody(self.fd, self.offset + sent, (self.length or 0) - sent, owned=False)

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _sendfile_now(transport: asyncio.Transport, fd: int, offset: int, length: int) -> int:
    """Bytes of the file slice sent with sendfile(2) without waiting (0 when it cannot be used:
    TLS, not a socket, or bytes still queued in the transport, which must go first)."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return 0
    if transport.get_write_buffer_size():
        return 0
    out = sock.fileno()
    sent = 0
    while sent < length:
        try:
            n = os.sendfile(out, fd, offset + sent, length - sent)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # the chunked path below meets the same error and reports it
        if n == 0:
            raise OSError("file shrank while being sent")
        sent += n
    return sent


class StreamBody(Body):
    """A body produced while it is sent (buffering off): length unknown or given."""

    __slots__ = ("_iterator", "_on_close", "length")

    def __init__(
        self,
        iterator: AsyncIterator[bytes],
        length: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._iterator = iterator
        self.length = length
        self._on_close = on_close

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._iterator:
            yield chunk

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


EMPTY = BytesBody(b"")


class Reply:
    """What the pipeline answers: status, headers and a body to write.

    A reply built from a stored response (a cache hit) carries the stored fields
    already serialised (``stored``) ahead of ``headers``, which then holds only
    what this answer adds: the edge writes those bytes as they are. The edge's own
    per-answer fields (a hit's Age and Cache-Status) may come serialised too
    (``added``: "Name: value\\r\\n" lines the edge made, never Date, Server or a
    framing field), so a hit builds no field object at all. The first read of
    ``headers`` merges all of them in, so a feature sees, and may change, every field
    as in any other reply; only a hit that nobody looks into skips building and
    serialising its fields. ``headers`` may be passed as None: an empty set, made
    only if someone reads it.
    """

    __slots__ = (
        "_added",
        "_headers",
        "_stored",
        "body",
        "close_connection",
        "reason",
        "status",
        "tunnel",
        "tunnel_head",
    )

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | None = None,
        body: Body = EMPTY,
        reason: str | None = None,
        *,
        tunnel: asyncio.Transport | None = None,
        tunnel_head: bytes = b"",
        close_connection: bool = False,
        stored: StoredFields | None = None,
        added: bytes = b"",
    ) -> None:
        self.status = status
        self._headers = headers
        self.body = body
        self.reason = reason
        # A 101 reply for a WebSocket: the connection becomes a pipe to this member transport.
        self.tunnel = tunnel
        # Bytes the member sent after its 101 head (already WebSocket frames).
        self.tunnel_head = tunnel_head
        # Close the client connection after this response.
        self.close_connection = close_connection
        self._stored = stored
        self._added = added

    @property
    def headers(self) -> CIMultiDict[str]:
        stored = self._stored
        if stored is not None or self._added:
            self._stored = None
            merged = CIMultiDict(stored.fields) if stored is not None else CIMultiDict()
            if self._added:
                merged.extend(added_pairs(self._added))
                self._added = b""
            if self._headers:
                merged.extend(self._headers)
            self._headers = merged
        elif self._headers is None:
            self._headers = CIMultiDict()
        return self._headers

    @headers.setter
    def headers(self, value: CIMultiDict[str]) -> None:
        self._stored = None
        self._added = b""
        self._headers = value

    def unmerged(self) -> tuple[Wire, CIMultiDict[str]] | None:
        """For the writer: (the stored fields' wire form, the fields added) while nobody merged them."""
        stored = self._stored
        if stored is None:
            return None
        added = CIMultiDict(added_pairs(self._added)) if self._added else CIMultiDict()
        if self._headers:
            added.extend(self._headers)
        return stored.wire, added

    def wire_parts(self) -> tuple[Wire, bytes, CIMultiDict[str] | None] | None:
        """For the HTTP/1.1 writer: (the stored fields' wire form, the edge's added lines as
        bytes, the other fields added or None) while nobody merged them."""
        stored = self._stored
        if stored is None:
            return None
        return stored.wire, self._added, self._headers

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.reason or ''}>"


def added_pairs(lines: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs of serialised "Name: value\\r\\n" lines the edge made."""
    return [
        (name, value.strip())
        for name, _, value in (line.partition(":") for line in lines.decode("latin-1").split("\r\n") if line)
    ]


class Wire(NamedTuple):
    """Stored fields serialised ("Name: value\\r\\n" each), and whether Date and Server are among them."""

    data: bytes
    date: bool
    server: bool


class StoredFields(Protocol):
    """Header fields kept with a stored response: as pairs, and ready to send."""

    @property
    def fields(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def wire(self) -> Wire: ...


class FixedFields:
    """Header fields fixed at start-up (a ``respond`` route's), serialised once: StoredFields."""

    __slots__ = ("fields", "wire")

    def __init__(self, fields: tuple[tuple[str, str], ...]) -> None:
        self.fields = fields
        names = {name.lower() for name, _ in fields}
        self.wire = Wire(field_lines(fields).encode("latin-1"), "date" in names, "server" in names)


@dataclass(slots=True)
class Exchange:
    """One request on its way through the pipeline."""

    request: Request
    route: Route
    host: str
    client_ip: str
    scheme: str
    started: float = field(default_factory=time.monotonic)
    # Filled by the headers feature: what goes to the upstream.
    upstream_headers: CIMultiDict[str] | None = None
    # Filled by the terminal handlers, read by the access log and metrics.
    member: str = ""
    upstream_seconds: float = 0.0
    queue_seconds: float = 0.0
    tries: int = 0
    cache_status: str = ""
    # Forwards a 1xx interim response to the client ahead of the final one (RFC 9110
    # 15.2); None where that is not allowed (HTTP/1.0, answers already sent, background fetches).
    send_interim: Callable[[bytes], None] | None = None
    # Free-form space for features (e.g. a cache key).
    notes: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Exchange], Awaitable[Reply]]
NowHandler = Callable[[Exchange], "Reply | None"]


class Feature(Protocol):
    """One pipeline feature: answer, or call the next handler and adjust its reply.

    Usually an ``async def``; a feature with nothing to do on the way back may be a plain
    function that returns ``call_next(ex)`` as it is (no coroutine of its own per request).
    """

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[Reply]: ...


class SyncFeature:
    """Base for a feature whose own work never waits: write ``before`` and ``after``; both
    chains (``now`` and ``__call__``) are derived from them here, so they cannot disagree.

    ``before(ex)`` is the request side: a Reply answers at once (and skips ``after``), None
    goes on. ``after(ex, reply)`` adjusts what the rest of the chain answered. When a feature
    further in gives up on the synchronous chain (an upstream fetch), the edge runs the async
    chain from the start, so ``before`` runs again on the same exchange: it must decide the
    same way twice (read the exchange, set fields to the same values). A subclass that writes
    its own ``now`` or ``__call__`` is refused when the class is defined: a feature with two
    hand-written chains subclasses nothing (see the ANSWERING AT ONCE rules above).
    """

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("now", "__call__"):
            if name in cls.__dict__:
                raise TypeError(f"{cls.__name__}: a SyncFeature defines before/after, not {name}")

    def before(self, ex: Exchange) -> Reply | None:
        """The request side: a Reply to answer at once, or None to go on."""
        return None

    def after(self, ex: Exchange, reply: Reply) -> Reply:
        """The response side: adjust (or replace) what the rest of the chain answered."""
        return reply

    def now(self, ex: Exchange, call_next: NowHandler) -> Reply | None:
        """The synchronous chain, derived: None when something further in must wait."""
        reply = self.before(ex)
        if reply is not None:
            return reply
        reply = call_next(ex)
        return None if reply is None else self.after(ex, reply)

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        """The async chain, derived from the same two steps."""
        reply = self.before(ex)
        if reply is not None:
            return reply
        return self.after(ex, await call_next(ex))


class EdgeContext(Protocol):
    """What a feature factory may use from the running edge."""

    @property
    def config(self) -> Config: ...


FeatureFactory = Callable[["Config", EdgeContext], Feature | None]


def load_factory(spec: str) -> FeatureFactory:
    """Import "package.module:name" (or "package.module.name")."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"feature {spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"feature {spec!r}: cannot import {module_name}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"feature {spec!r}: {module_name} has no callable {attr!r}")
    return cast(FeatureFactory, factory)


def chain(features: list[Feature], terminal: Handler) -> Handler:
    """Compose features around the terminal handler, once, at startup."""
    handler = terminal
    for feature in reversed(features):
        handler = _link(feature, handler)
    return handler


def _link(feature: Feature, call_next: Handler) -> Handler:
    # A plain function handing back the feature's own coroutine: an `async def` wrapper would
    # add a coroutine object and a frame per feature to every request on the async chain.
    def step(ex: Exchange) -> Awaitable[Reply]:
        return feature(ex, call_next)

    return step


def _never(ex: Exchange) -> Reply | None:
    return None


def chain_now(features: list[Feature], terminal: NowHandler) -> NowHandler:
    """The synchronous twin of ``chain``: it ends (None) at the first feature without ``now``.

    A feature whose ``now`` would only call the next handler (it says so with a true
    ``now_passes_through``, fixed at start-up) is left out of it: two calls less on every
    answer made at once (a hit, a static file, a fixed answer)."""
    handler = terminal
    for feature in reversed(features):
        now = getattr(feature, "now", None)
        if now is not None and getattr(feature, "now_passes_through", False):
            continue
        handler = _never if now is None else _link_now(now, handler)
    return handler


def _link_now(now: Callable[[Exchange, NowHandler], Reply | None], call_next: NowHandler) -> NowHandler:
    # A closure: partial(now, call_next=...) builds a keyword dict on every call (2.6x slower).
    def step(ex: Exchange) -> Reply | None:
        return now(ex, call_next)

    return step
