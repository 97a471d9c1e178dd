"""The etcd adapter: the only module that imports the etcd client library (aetcd).

It adds what the library lacks and every daemon needs:

* several endpoints, with failover to the next one on a transport error;
* TLS (CA, client certificate) and user/password auth, with re-authentication
  when etcd forgets a token (simple tokens expire, and restarts drop them);
* retries with tenacity (exponential backoff with full jitter) inside a time
  budget, so callers get a bounded wait and one clear exception type;
* gRPC channel options that notice a dead peer in seconds and reconnect fast
  (the gRPC default backoff grows to two minutes);
* ``hasleader`` request metadata, so a member that lost quorum fails calls and
  closes watches instead of serving a silently frozen view;
* cancellation that always arrives: every library call runs in a task of its
  own, awaited with ``asyncio.wait`` and abandoned after a grace period when it
  ignores its cancel (see ``_bounded``), so a daemon stops promptly even when
  etcd is down.

Keys and values cross this boundary as ``str`` and ``bytes``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aetcd
import aetcd.exceptions as aexc
import aetcd.rpc as arpc
import grpc
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from carousel.config import EtcdConfig

log = structlog.get_logger("carousel.etcd")
T = TypeVar("T")

_CHANNEL_OPTIONS: dict[str, Any] = {
    # Find a dead peer within ~15 s while a call (a watch, a keepalive) is open.
    # etcd's ping policy (--grpc-keepalive-min-time 5 s, no pings without an open
    # stream) answers any other ping pattern with GOAWAY "too_many_pings", which
    # closes the channel under every call: so ping only with calls open, and no
    # more often than every 10 s. Readers notice an outage faster anyway:
    # PrefixMirror proves the cluster answers every second.
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
    "grpc.keepalive_permit_without_calls": 0,
    # Reconnect within a second of etcd coming back, not after minutes.
    # (min_reconnect_backoff_ms is the connection attempt's deadline: channel_options
    # sets it to the dial timeout.)
    # A failed channel is kept (REDIAL_INTERVAL), so this cap is the redial pace while
    # etcd is away and the delay before a returning etcd is found: at 1 s (up to 1.2 s
    # with gRPC's jitter, then the next probe) dnsd's answers caught up with a healed
    # registry after 1.44 s in one of 10 runs here and 1.03 s in a CI run (the test's
    # bound is 1 s, test_dnsd_registry.py); at 0.5 s at most 0.86 s in 20 runs, for
    # about two dials a second.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    # A fresh channel after a failover must dial at once, not inherit the
    # backoff of a subchannel shared through gRPC's global pool.
    "grpc.use_local_subchannel_pool": 1,
}

# With one endpoint, a failed channel younger than this is kept rather than replaced:
# gRPC's own reconnect back-off (0.1 s growing to 0.5 s) then paces the dialling. Replaced
# on every failed attempt, four watchers with etcd stopped made 475 channels in 30 s
# (1.6 s of CPU here, the whole vCPU of a TCG VM). Replaced every second, each new channel
# starts its back-off again at 0.1 s: an agent with etcd stopped dialled 7.8 times a
# second (0.27 s of CPU in 20 s, against 0.09 s with etcd up), and on a TCG VM the edge
# and agent cut off from etcd kept the vCPU saturated until the edge's checks of its AP
# timed out. Kept for 30 s: 1.5 dials a second, 0.18 s of CPU (measured with a 1 s
# back-off cap; the 0.5 s cap above makes it about two).
REDIAL_INTERVAL = 30.0

# Once a call has spent its whole budget without reaching etcd, one call at a time probes
# again, at most this often, and the others wait for its outcome within their own budgets
# instead of dialling: every daemon has several callers (the mirrors' re-lists and probes,
# lease keepalives, registry writes, the DoS detector), and each running its own retry loop
# against a dead endpoint kept a TCG VM's vCPU busy (an edge used 79 s of CPU in 140 s with
# etcd unreachable; its health checks then timed out). Eight callers here: 207 attempts and
# 0.24 s of CPU in 4 s before, 21 and 0.06 s after. Short, so a returning etcd is found
# within about a second.
PROBE_INTERVAL = 0.5


def channel_options(dial_timeout: float) -> dict[str, Any]:
    """The gRPC channel options for a client whose connection attempts may take `dial_timeout` s.

    gRPC gives each connection attempt (TCP, TLS and HTTP/2 handshakes) max(backoff,
    min_reconnect_backoff) to finish (its MIN_CONNECT_TIMEOUT, connection-backoff.md).
    At 100 ms that cut every handshake short where TLS takes seconds (measured on
    TCG-emulated VMs: 3-8 s), and the client redialled for ever: etcd's accept queue
    filled with abandoned connections (126 in CLOSE-WAIT) and nothing ever connected.
    The request timeout was no better a deadline (see DIALLING). The retry pace after a
    refused connection stays 100 ms growing to 0.5 s, so a restarted etcd is still found
    within a second.
    """
    return {**_CHANNEL_OPTIONS, "grpc.min_reconnect_backoff_ms": max(100, int(dial_timeout * 1000))}


# DIALLING: when a call times out on a channel whose first connection attempt is still under
# way, the client moves on to the next endpoint as before, but that handshake is left to
# finish, up to the dial timeout: the first of the channels to become ready is used and
# the others are closed, and an endpoint with a handshake under way is not dialled again.
# Closed at the call's timeout instead, a handshake slower than the request timeout never
# completed: with every member 1.5 s from its first reply and a 1 s request timeout, a
# client here dialled 28 connections in 12 s, 25 of them given up mid-handshake, and
# never wrote a key. That is the overload seen on TCG VMs, where a loaded member took
# 3-8 s per TLS handshake: every daemon redialled about twice a second, the members spent
# their CPU on handshakes nobody waited for (4,156 "rejected connection" in 40 minutes on
# one member), and the lab did not recover. Moving on at once still matters: a member that
# is stalled rather than slow accepts the TCP connection and never answers.


class EtcdError(Exception):
    """An etcd operation failed for a reason other than availability."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the time budget."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials or certificate."""


class EtcdCompacted(EtcdError):
    """A watch asked for a revision that etcd has compacted away."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compacted_revision})")
        self.compacted_revision = compacted_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as read from etcd."""

    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The keys under a prefix at one revision."""

    revision: int
    items: list[KeyValue]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change to one key; ``revision`` is the revision of the change."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease."""

    id: int
    ttl: int


# How long a cancelled library call may take to unwind before it is abandoned.
_CANCEL_GRACE = 0.5
# Library calls abandoned after a cancel: referenced until they end (an
# unreferenced task may be garbage-collected while it runs).
_abandoned: set[asyncio.Future[Any]] = set()


def _forget(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


async def _bounded(coro: Awaitable[T], limit: float, on_late: Callable[[T], Any] | None = None) -> T:
    """Await a library call for at most ``limit`` s; a cancel of the caller always ends the wait.

    Why not ``asyncio.wait_for``: on Python 3.11 it returns the result and drops
    the caller's cancel when the cancel lands in the loop turn the call finishes
    (seen: 3 mirrors in 100 cancelled during start-up went on watching forever),
    and on a timeout it waits without limit for a call that ignores its own
    cancel. aetcd's watch set-up has both shapes inside (``wait_for`` on a
    Condition, whose lock is re-taken whatever happens). ``asyncio.wait`` never
    drops a cancel, and a call still running after ``_CANCEL_GRACE`` is left to
    end on its own; ``on_late`` receives what it returns then (a watch to cancel).
    """
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        await _stop(task, on_late)
        raise
    if not done:
        await _stop(task, on_late)
        raise TimeoutError(f"no answer within {limit:g} s")
    return task.result()


async def _stop(task: asyncio.Future[T], on_late: Callable[[T], Any] | None) -> None:
    """Cancel a library call and give it ``_CANCEL_GRACE`` to unwind, then leave it."""
    task.cancel()
    if on_late is not None:

        def late(t: asyncio.Future[T]) -> None:
            if not t.cancelled() and t.exception() is None:
                on_late(t.result())

        task.add_done_callback(late)
    _abandoned.add(task)
    task.add_done_callback(_forget)
    # gRPC closes a call on cancel within a loop turn or two; only a call stuck
    # behind a lock it will not give up (see above) reaches the grace limit.
    await asyncio.wait({task}, timeout=_CANCEL_GRACE)


def _prefix_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that starts with ``prefix``."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


def _split_endpoint(endpoint: str) -> tuple[str, int, bool]:
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port), scheme == "https"


# A login that ran out of time or found no connection yet: the channel is kept, so a
# handshake under way can finish (see DIALLING).
_IN_TRANSIT = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


class _Client(aetcd.Client):
    """aetcd.Client with TLS credentials and extra request metadata."""

    channel: grpc.aio.Channel | None

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout: float,
        dial_timeout: float,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            username=username,
            password=password,
            timeout=timeout,
            options=channel_options(dial_timeout),
            connect_wait_timeout=int(timeout) + 1,
        )
        self._credentials = credentials
        self._is_connecting: bool = False
        self._closed = False
        self.created = time.monotonic()
        self.dial_timeout = dial_timeout
        self.answered = False  # a call on this channel has succeeded

    def dialling(self) -> bool:
        """The channel's first connection attempt is under way, within its dial timeout (see DIALLING)."""
        channel = self.channel
        return (
            channel is not None
            and not self.answered
            and time.monotonic() - self.created < self.dial_timeout
            and channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.CONNECTING
        )

    def ready(self) -> bool:
        """The channel is connected."""
        channel = self.channel
        ready = grpc.ChannelConnectivity.READY
        return channel is not None and channel.get_state(try_to_connect=False) == ready

    async def connect(self) -> None:
        """Open the channel (TLS when configured), authenticate, set up stubs."""
        if self._connected.is_set():
            return
        if self._closed:
            # Every aetcd call connects first: a call still running on a client that was
            # closed (one left to end on its own, see _stop) would open a channel nobody closes.
            raise aexc.ConnectionFailedError("this etcd client was closed")
        if self._is_connecting:
            await _bounded(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            channel = self.channel
            if channel is None:  # else a handshake left under way (see DIALLING) goes on
                target = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
                opts = list(self._options.items())
                if self._credentials is not None:
                    channel = grpc.aio.secure_channel(target, self._credentials, options=opts)
                else:
                    channel = grpc.aio.insecure_channel(target, options=opts)
                self.channel = channel
            metadata: tuple[tuple[str, str], ...] = (("hasleader", "true"),)
            if self._username is not None and self._password is not None:
                self.auth_stub = arpc.AuthStub(channel)
                try:
                    resp = await self.auth_stub.Authenticate(
                        arpc.AuthenticateRequest(name=self._username, password=self._password),
                        timeout=self._timeout,
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in _IN_TRANSIT:  # refused: a new login needs a new channel
                        await channel.close()
                        self.channel = None
                    aexc._handle_exception(exc)
                metadata += (("token", resp.token),)
            self.metadata = metadata
            self.kvstub = arpc.KVStub(channel)
            self.clusterstub = arpc.ClusterStub(channel)
            self.leasestub = arpc.LeaseStub(channel)
            self.maintenancestub = arpc.MaintenanceStub(channel)
            self._watcher = aetcd.watcher.Watcher(
                arpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def close(self) -> None:
        """Close the channel first, then the rest as aetcd does.

        Closing the channel ends every call on it at once, the watch stream too.
        aetcd shuts its watcher down first, under a lock that a watch set-up stuck
        on a stalled member holds; the caller's time limit then cancelled the close
        before the channel was, and its connection stayed open: an edge on a loaded
        VM held 61 connections to a 3-member etcd, and a client here 2 after close.
        """
        self._closed = True
        channel = self.channel
        if channel is not None:
            await channel.close(grace=None)
        await super().close()


_TRANSIENT = (
    aexc.ConnectionFailedError,
    aexc.ConnectionTimeoutError,
    aexc.InternalError,
    asyncio.TimeoutError,
    aexc.WatchTimeoutError,
)


class _Reconnect(Exception):
    """Internal: the current endpoint failed; try again on the next one."""


class _TlsFailed(Exception):
    """Internal: a TLS handshake failed; the caller's own back-off paces the next try.

    Retrying it within the call, each time on a new channel, made a storm: one mirror
    with no CA for etcd's certificate dialled 22 handshakes a second (755 connections
    in 30 s on this machine), and on a TCG VM, where etcd takes seconds of CPU per
    handshake, 328 of them piled up on etcd. The channel is kept, so gRPC's own
    reconnect back-off applies, and the call fails at once with a clear message.
    """


def _tls_failed(exc: BaseException) -> bool:
    text = str(exc)
    return "andshake failed" in text or "CERTIFICATE_VERIFY_FAILED" in text


class Etcd:
    """A resilient etcd client over one or more endpoints."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._endpoints = [_split_endpoint(e) for e in config.endpoints]
        self._index = 0
        self._client: _Client | None = None
        # Channels left behind by a failover with their first handshake under way, by
        # endpoint index (see DIALLING).
        self._dialling: dict[int, _Client] = {}
        self._lock = asyncio.Lock()
        self._credentials = self._load_credentials(config)
        self._password = config.resolved_password()
        # While etcd is away (see PROBE_INTERVAL): the last call's error, the probe in
        # flight, and until when the next probe waits.
        self._away: str = ""
        self._probe: asyncio.Future[None] | None = None
        self._away_until = 0.0

    @staticmethod
    def _load_credentials(config: EtcdConfig) -> grpc.ChannelCredentials | None:
        uses_tls = config.ca_file or config.cert_file or any(_split_endpoint(e)[2] for e in config.endpoints)
        if not uses_tls:
            return None

        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise EtcdError(f"cannot read etcd {what} {path}: {exc.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(config.ca_file, "CA file"),
            private_key=read(config.key_file, "key file"),
            certificate_chain=read(config.cert_file, "certificate file"),
        )

    @property
    def endpoint(self) -> str:
        """The endpoint in use now, as host:port."""
        host, port, _ = self._endpoints[self._index]
        return f"{host}:{port}"

    async def _current(self) -> _Client:
        if self._dialling:
            await self._settle()
        client = self._client
        if client is None:
            spare = self._dialling.pop(self._index, None)
            if spare is not None and spare.dialling():
                client = spare  # its handshake is under way: not dialled again
                spare = None
            else:
                host, port, _ = self._endpoints[self._index]
                client = _Client(
                    host,
                    port,
                    credentials=self._credentials,
                    username=self.config.username,
                    password=self._password,
                    timeout=self.config.timeout,
                    dial_timeout=self.config.dial_timeout,
                )
            self._client = client
            if spare is not None:
                await _close(spare)
        return client

    async def _settle(self) -> None:
        """Use a left-behind channel that became ready first; close those no longer needed."""
        async with self._lock:
            current = self._client
            done: list[_Client] = []
            if current is not None and current.ready():
                done = list(self._dialling.values())
                self._dialling.clear()
            else:
                for index, spare in list(self._dialling.items()):
                    if spare.ready():
                        del self._dialling[index]
                        if current is not None:
                            done.append(current)
                        self._client, self._index = spare, index
                        done += self._dialling.values()
                        self._dialling.clear()
                        break
                    if not spare.dialling():
                        del self._dialling[index]
                        done.append(spare)
        for client in done:
            await _close(client)

    async def _failover(self, failed: _Client | None) -> None:
        """Drop the failed client and move to the next endpoint."""
        async with self._lock:
            if failed is not None and self._client is not failed:
                return  # someone else already moved on
            if (
                len(self._endpoints) == 1
                and failed is not None
                and time.monotonic() - failed.created < REDIAL_INTERVAL
            ):
                return  # see REDIAL_INTERVAL
            old, self._client = self._client, None
            if len(self._endpoints) > 1:
                if old is not None and old.dialling():
                    self._dialling[self._index], old = old, None  # see DIALLING
                self._index = (self._index + 1) % len(self._endpoints)
        if old is not None:
            await _close(old)

    async def close(self) -> None:
        """Close the connection; the object may be used again afterwards."""
        clients = [self._client, *self._dialling.values()]
        self._client = None
        self._dialling.clear()
        for client in clients:
            if client is not None:
                await _close(client, 2.0)

    async def _call(self, op: Callable[[_Client], Awaitable[T]], *, budget: float | None = None) -> T:
        """Run ``op`` on the current endpoint, failing over and retrying within a budget."""
        budget = self.config.timeout * 2 if budget is None else budget
        deadline = time.monotonic() + budget
        await self._wait_for_probe(deadline)
        probe: asyncio.Future[None] | None = None
        if self._away:  # etcd was away: this call is the probe, the others wait for it
            probe = self._probe = asyncio.get_running_loop().create_future()
        try:
            result = await self._attempts(op, max(deadline - time.monotonic(), 0.05))
        except EtcdUnavailable as exc:
            self._away = str(exc)
            self._away_until = time.monotonic() + PROBE_INTERVAL
            raise
        except EtcdError:
            self._away = ""  # etcd answered, if only to refuse
            raise
        else:
            self._away = ""
            return result
        finally:
            if probe is not None:
                self._probe = None
                probe.set_result(None)

    async def _wait_for_probe(self, deadline: float) -> None:
        """While etcd is known away, wait for the one probe in flight (or the next) until ``deadline``."""
        while self._away:
            now = time.monotonic()
            if now >= deadline:
                raise EtcdUnavailable(self._away)
            if self._probe is not None:
                await asyncio.wait({self._probe}, timeout=deadline - now)
            elif now < self._away_until:
                await asyncio.sleep(min(self._away_until, deadline) - now)
            else:
                return  # no probe in flight and its pause is over: the caller probes

    async def _attempts(self, op: Callable[[_Client], Awaitable[T]], budget: float) -> T:
        failed: list[_Client | None] = [None]

        async def before_sleep(state: RetryCallState) -> None:
            await self._failover(failed[0])

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(budget),
                wait=wait_random_exponential(multiplier=0.05, max=0.5),
                retry=retry_if_exception_type(_Reconnect),
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    client = await self._current()
                    failed[0] = client
                    try:
                        result = await _bounded(op(client), self.config.timeout)
                        client.answered = True
                        return result
                    except aexc.UnauthenticatedError as exc:
                        if "token" in str(exc):  # expired or unknown token: log in again
                            raise _Reconnect(str(exc)) from exc
                        raise EtcdAuthError(f"etcd refused the credentials: {exc}") from None
                    except aexc.InvalidArgumentError as exc:
                        if "authentication failed" in str(exc) or "user name" in str(exc):
                            raise EtcdAuthError(f"etcd refused the credentials: {exc}") from None
                        raise EtcdError(str(exc)) from None
                    except aexc.ClientError as exc:
                        if _tls_failed(exc):
                            raise _TlsFailed(f"{self.endpoint}: {exc}") from None
                        if isinstance(exc, _TRANSIENT):
                            raise _Reconnect(f"{self.endpoint}: {exc or type(exc).__name__}") from exc
                        raise _classify(exc) from None
                    except (TimeoutError, OSError, grpc.aio.AioRpcError) as exc:
                        if _tls_failed(exc):
                            raise _TlsFailed(f"{self.endpoint}: {exc}") from None
                        raise _Reconnect(f"{self.endpoint}: {exc or type(exc).__name__}") from exc
                    except asyncio.CancelledError:
                        # A concurrent failover closed the channel under this call;
                        # only a cancellation of our own task is a real one.
                        if _being_cancelled():
                            raise
                        raise _Reconnect(f"{self.endpoint}: call cancelled by channel close") from None
        except _Reconnect as exc:
            raise EtcdUnavailable(f"etcd unavailable ({', '.join(self.config.endpoints)}): {exc}") from None
        except _TlsFailed as exc:
            raise EtcdUnavailable(
                f"TLS handshake with etcd failed ({exc}); check [etcd] ca_file, cert_file and key_file"
            ) from None
        raise AssertionError("unreachable")

    # --- key/value ------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None."""

        async def op(c: _Client) -> KeyValue | None:
            r = await c.get(key.encode())
            return None if r is None else KeyValue(key, r.value, r.mod_revision, r.lease)

        return await self._call(op)

    async def get_prefix(self, prefix: str) -> Snapshot:
        """All keys under ``prefix`` and the revision they were read at."""

        async def op(c: _Client) -> Snapshot:
            r = await c.get_prefix(prefix.encode())
            items = [KeyValue(kv.key.decode(), kv.value, kv.mod_revision, kv.lease) for kv in r]
            return Snapshot(r.header.revision if r.header else 0, items)

        return await self._call(op)

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Write a key; returns the new revision."""

        async def op(c: _Client) -> int:
            r = await c.put(key.encode(), value, lease=lease)
            return int(r.header.revision)

        return await self._call(op)

    async def delete(self, key: str) -> bool:
        """Delete a key; True if it existed."""

        async def op(c: _Client) -> bool:
            r = await c.delete(key.encode())
            return bool(r and r.deleted)

        return await self._call(op)

    async def revision(self) -> int:
        """The cluster's current revision (a linearizable read: needs quorum)."""

        async def op(c: _Client) -> int:
            r = await c.get_prefix(self.config.prefix.encode() + b"\0probe", keys_only=True)
            return int(r.header.revision)

        return await self._call(op)

    # --- leases ---------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        """Grant a lease of ``ttl`` seconds."""

        async def op(c: _Client) -> Lease:
            lease = await c.lease(ttl)
            return Lease(lease.id, lease.ttl)

        return await self._call(op)

    async def keepalive(self, lease_id: int, *, budget: float | None = None) -> int:
        """Refresh a lease once; returns the TTL etcd granted (<= 0: the lease is gone)."""

        async def op(c: _Client) -> int:
            reply = await c.refresh_lease(lease_id)
            return -1 if reply is None else int(reply.TTL)

        return await self._call(op, budget=budget)

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds left on a lease (-1 when it no longer exists)."""

        async def op(c: _Client) -> int:
            info = await c.get_lease_info(lease_id, keys=False)
            return int(info.TTL)

        return await self._call(op)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting every key attached to it."""

        async def op(c: _Client) -> None:
            try:
                await c.revoke_lease(lease_id)
            except aexc.ClientError as exc:
                if "not found" not in str(exc):
                    raise

        await self._call(op)

    # --- watch ----------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Yield every change under ``prefix`` from ``start_revision`` on.

        Raises EtcdCompacted if that revision is gone, EtcdUnavailable when the
        stream breaks; the caller re-lists and watches again (see mirror.py).
        """
        client = await self._current()
        try:
            watch = await _bounded(
                client.watch(
                    prefix.encode(),
                    range_end=_prefix_end(prefix.encode()),
                    start_revision=start_revision,
                ),
                self.config.timeout,
                on_late=_cancel_watch,  # set up after we stopped waiting: nobody reads it
            )
        except aexc.RevisionCompactedError as exc:
            raise EtcdCompacted(exc.compacted_revision) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise EtcdUnavailable("watch set-up cancelled by a failover") from None
        except (aexc.ClientError, TimeoutError, OSError, grpc.aio.AioRpcError) as exc:
            await self._failover(client)
            raise EtcdUnavailable(f"watch on {self.endpoint} failed: {exc or type(exc).__name__}") from None
        try:
            async for ev in watch:
                kind: Literal["put", "delete"] = "put" if ev.kind == "PUT" else "delete"
                yield WatchEvent(kind, ev.kv.key.decode(), ev.kv.value, ev.kv.mod_revision)
        except aexc.RevisionCompactedError as exc:
            raise EtcdCompacted(exc.compacted_revision) from None
        except (aexc.ClientError, OSError, grpc.aio.AioRpcError) as exc:
            await self._failover(client)
            raise EtcdUnavailable(
                f"watch stream on {self.endpoint} broke: {exc or type(exc).__name__}"
            ) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise EtcdUnavailable("watch stream closed by a failover") from None
        finally:
            try:
                await _bounded(watch.cancel(), 1.0)
            except Exception:
                pass
        # The stream ended without an error (the client was closed under it).
        raise EtcdUnavailable("watch stream closed")


async def _close(client: _Client, limit: float = 1.0) -> None:
    """Close a client's channel within ``limit`` s; closing a broken channel may fail in many ways."""
    try:
        await _bounded(client.close(), limit)
    except Exception:
        pass


def _cancel_watch(watch: Any) -> None:
    """Cancel a watch nobody reads any more, in the background."""
    task = asyncio.ensure_future(watch.cancel())
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _classify(exc: Exception) -> EtcdError:
    text = str(exc) or type(exc).__name__
    if "permission denied" in text or "auth" in text:
        return EtcdAuthError(f"etcd refused the request: {text}")
    return EtcdError(text)
