"""What the e2e tests run on the lab's client host: a DNS watcher and an HTTP load client.

Both run as coroutines on the client host's NetnsThread (tests/lab.py), so
their sockets live inside the lab, and they time events with the one
monotonic clock every thread shares.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.asyncquery
import dns.exception
import dns.message
import dns.rdatatype

from tests.lab import Lab, NetnsThread

Answer = frozenset[str] | None  # the A records one server gave; None: no answer (timeout, error)
Answers = dict[str, Answer]  # server address -> its latest answer


async def query_a(server: str, name: str, limit: float = 0.5) -> tuple[frozenset[str], int]:
    """(addresses, TTL) of ``name`` A at ``server``; raises on timeout or a non-NOERROR answer."""
    q = dns.message.make_query(name, dns.rdatatype.A)
    resp = await dns.asyncquery.udp(q, server, timeout=limit)
    if resp.rcode() != 0:
        raise dns.exception.DNSException(f"rcode {resp.rcode()}")
    addrs: set[str] = set()
    ttl = 0
    for rrset in resp.answer:
        if rrset.rdtype == dns.rdatatype.A:
            addrs.update(r.address for r in rrset)
            ttl = rrset.ttl
    return frozenset(addrs), ttl


def without(address: str) -> Callable[[Answers], bool]:
    """Predicate: every server answers, and none includes ``address``."""
    return lambda cur: all(a is not None and address not in a for a in cur.values())


def exactly(addresses: set[str]) -> Callable[[Answers], bool]:
    """Predicate: every server answers exactly ``addresses``."""
    want = frozenset(addresses)
    return lambda cur: all(a == want for a in cur.values())


class DnsWatch:
    """Asks every dnsd for the name every ``interval`` s; tests wait on what they answer."""

    def __init__(self, thread: NetnsThread, servers: list[str], name: str, interval: float = 0.04) -> None:
        self.thread = thread
        self.servers = servers
        self.name = name
        self.interval = interval
        self.current: Answers = {s: None for s in servers}
        self.history: list[tuple[float, str, Answer]] = []  # (received at, server, answer)
        self._cond = threading.Condition()
        self._stop = False
        self._future = thread.submit(self._run())

    async def _ask(self, server: str) -> None:
        try:
            answer: Answer = (await query_a(server, self.name))[0]
        except (dns.exception.DNSException, OSError):
            answer = None
        now = time.monotonic()
        with self._cond:
            self.current[server] = answer
            self.history.append((now, server, answer))
            self._cond.notify_all()

    async def _run(self) -> None:
        while not self._stop:
            started = time.monotonic()
            await asyncio.gather(*(self._ask(s) for s in self.servers))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def wait(self, pred: Callable[[Answers], bool], timeout: float, what: str) -> float:
        """The monotonic time at which ``pred`` first held; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.current):
                left = deadline - time.monotonic()
                if left <= 0 or self._future.done():
                    raise AssertionError(f"DNS never showed {what} within {timeout:.1f}s: {self.current}")
                self._cond.wait(left)
            return self.history[-1][0]

    def answers_since(self, since: float) -> list[tuple[float, str, Answer]]:
        """Every answer received since ``since`` (monotonic)."""
        with self._cond:
            return [h for h in self.history if h[0] >= since]

    def stop(self) -> None:
        """End the polling loop."""
        self._stop = True
        try:
            self._future.result(5)
        except Exception:  # a watcher that failed has nothing left to stop
            pass


@dataclass
class LoadStats:
    """What a load run saw."""

    ok: int = 0
    failed: int = 0
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (time, address, error)
    by_address: Counter[str] = field(default_factory=Counter)
    resolutions: int = 0
    started: float = 0.0
    ended: float = 0.0

    @property
    def rate(self) -> float:
        return (self.ok + self.failed) / max(1e-9, self.ended - self.started)

    def summary(self) -> str:
        spread = ", ".join(f"{a}: {n}" for a, n in sorted(self.by_address.items()))
        return (
            f"{self.ok + self.failed} requests in {self.ended - self.started:.1f}s "
            f"({self.rate:.0f}/s), {self.failed} failed, {self.resolutions} DNS lookups; per edge: {spread}"
        )


class LoadClient:
    """HTTP clients that resolve through dnsd, honouring the TTL, before each new connection.

    Like a browser behind a caching stub resolver: one shared cache entry, kept
    for the answer's TTL; each request opens a new connection to the next
    address of the cached answer, sends GET and reads the whole response. Any
    error or non-200 answer counts as a failed request.
    """

    def __init__(
        self,
        servers: list[str],
        name: str,
        *,
        port: int = 80,
        path: str = "/",
        workers: int = 4,
        pause: float = 0.01,
        timeout: float = 5.0,
    ) -> None:
        self.servers = servers
        self.name = name
        self.port = port
        self.path = path
        self.workers = workers
        self.pause = pause
        self.timeout = timeout
        self.stats = LoadStats()
        self._cache: tuple[tuple[str, ...], float] | None = None  # (addresses, expires at)
        self._lookup: asyncio.Lock | None = None
        self._turn = 0
        self._stopping = threading.Event()

    async def _addresses(self) -> tuple[str, ...]:
        assert self._lookup is not None
        async with self._lookup:
            if self._cache is not None and time.monotonic() < self._cache[1]:
                return self._cache[0]
            error = "no server"
            for server in self.servers:  # a stub resolver's order: first, then the next
                try:
                    addrs, ttl = await query_a(server, self.name, limit=1.0)
                except (dns.exception.DNSException, OSError) as exc:
                    error = f"{server}: {exc!r}"
                    continue
                self.stats.resolutions += 1
                self._cache = (tuple(sorted(addrs)), time.monotonic() + ttl)
                return self._cache[0]
            raise OSError(f"resolution failed: {error}")

    async def _request(self, address: str) -> None:
        reader, writer = await asyncio.open_connection(address, self.port)
        try:
            writer.write(
                f"GET {self.path} HTTP/1.1\r\nHost: {self.name}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
        status, body = parse_response(data)
        if status != 200 or b"Served by AP" not in body:
            raise OSError(f"answer {data[:40]!r} ({len(data)} bytes)")

    async def _worker(self) -> None:
        while not self._stopping.is_set():
            address = "-"
            try:
                addrs = await self._addresses()
                if not addrs:
                    raise OSError("empty answer")
                self._turn += 1
                address = addrs[self._turn % len(addrs)]
                await asyncio.wait_for(self._request(address), self.timeout)
                self.stats.ok += 1
                self.stats.by_address[address] += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.stats.failed += 1
                self.stats.failures.append((time.monotonic(), address, repr(exc)))
            await asyncio.sleep(self.pause)

    async def run(self) -> LoadStats:
        """Send requests until ``stop()``; returns the statistics."""
        self._lookup = asyncio.Lock()
        self.stats.started = time.monotonic()
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))
        self.stats.ended = time.monotonic()
        return self.stats

    def stop(self) -> None:
        """Ask the workers to finish their current request and return."""
        self._stopping.set()


@contextmanager
def load(lab: Lab) -> Iterator[LoadClient]:
    """Continuous requests from the client host for the duration of the block."""
    client = LoadClient(lab.dns_servers, lab.fqdn)
    future: concurrent.futures.Future[LoadStats] = lab.client().submit(client.run())
    try:
        yield client
    finally:
        client.stop()
        future.result(15)


def parse_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 response read until close; OSError if it is truncated."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise OSError(f"no complete response head in {len(data)} bytes")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"bad status line {lines[0][:40]!r}") from None
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines[1:])}
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16) if sep else -1
            except ValueError:
                raise OSError(f"bad chunk size {size_line[:20]!r}") from None
            if size < 0 or len(rest) < size + 2:
                raise OSError("chunked body cut short")
            if size == 0:
                return status, bytes(body)
            body += rest[:size]
            rest = rest[size + 2 :]
    if b"content-length" in headers and len(rest) != int(headers[b"content-length"]):
        raise OSError(f"body of {len(rest)} bytes, Content-Length {headers[b'content-length']!r}")
    return status, rest


async def http_get(address: str, path: str = "/", host: str = "www.example.test") -> tuple[int, bytes]:
    """(status, body) of one GET over a fresh connection that closes after the response."""
    reader, writer = await asyncio.open_connection(address, 80)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    return parse_response(data)


async def edge_serves(address: str) -> bool:
    """True if the edge answers the dynamic page (through an AP) with 200."""
    status, body = await asyncio.wait_for(http_get(address), 5)
    return status == 200 and b"Served by AP" in body


def describe(samples: list[float]) -> str:
    """'min / median / max' of seconds, for the printed figures."""
    return f"{min(samples):.2f} / {statistics.median(samples):.2f} / {max(samples):.2f} s"
