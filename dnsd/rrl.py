"""Response Rate Limiting (RRL) as in BIND: rate, window and slip, per client prefix.

Each account is (client prefix, response key): the prefix is the client's
/24 (IPv6 /56) and the key names the answer (name and type, or the zone for
NXDOMAIN, or "error"), so one busy resolver asking many names is not
punished for the total, while a flood of one answer towards one victim is.

An account holds a credit balance. Every second adds ``rate`` credits (the
balance never exceeds ``rate``); every response costs one. Below zero the
response is limited; the balance can fall to ``-window * rate``, so a
flooder stays limited up to ``window`` seconds after it stops. Of the
limited responses, every ``slip``-th is sent truncated (TC=1, no answer)
instead of dropped: a real client whose address is being spoofed retries
over TCP and still gets its answer, while the reflected traffic stays tiny.

Only UDP is limited; TCP cannot be spoofed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
from collections.abc import Callable

from dnsd.config import RRLConfig

SEND, DROP, SLIP = 0, 1, 2
_CACHE_MAX = 65_536  # remembered client addresses (exempt flag, prefix)


class RateLimiter:
    """Decides per UDP response: send it, drop it, or send it truncated.

    ``now`` is a whole-second clock advanced by ``tick()`` (the server calls it
    from the event loop several times a second), so the query path reads an
    attribute instead of calling the clock.
    """

    def __init__(self, config: RRLConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = config.responses_per_second
        self.floor = -config.window * config.responses_per_second
        self.slip = config.slip
        self.max_accounts = config.max_accounts
        self.v4_bits = config.ipv4_prefix
        self.v6_bits = config.ipv6_prefix
        self.clock = clock
        self.now = int(clock())
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in config.exempt]
        self._exempt_cache: dict[str, bool] = {}
        self._prefixes: dict[str, object] = {}
        self.accounts: dict[tuple[object, bytes], list[int]] = {}
        self.dropped = 0
        self.slipped = 0

    def tick(self) -> None:
        """Advance the clock (seconds resolution is all the accounting needs)."""
        self.now = int(self.clock())

    def prefix(self, host: str) -> object:
        """The client's network, as a hashable value (a string for the common /24)."""
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            return ("6", int.from_bytes(packed, "big") >> (128 - self.v6_bits))
        if self.v4_bits == 24:
            return host[: host.rfind(".")]
        return ("4", int.from_bytes(socket.inet_aton(host), "big") >> (32 - self.v4_bits))

    def _is_exempt(self, host: str) -> bool:
        known = self._exempt_cache.get(host)
        if known is None:
            if len(self._exempt_cache) >= _CACHE_MAX:
                self._exempt_cache.clear()
            addr = ipaddress.ip_address(host.partition("%")[0])
            known = any(addr in net for net in self.exempt)
            self._exempt_cache[host] = known
        return known

    def check(self, host: str, key: bytes) -> int:
        """SEND, DROP or SLIP for one response to ``host`` from account ``key``.

        An empty key marks an answer to a client that proved its address with a
        valid DNS server cookie (RFC 7873): it cannot be a spoofed victim, so it is
        never limited.
        """
        if not key or (self.exempt and self._is_exempt(host)):
            return SEND
        prefix = self._prefixes.get(host)
        if prefix is None:
            if len(self._prefixes) >= _CACHE_MAX:
                self._prefixes.clear()
            prefix = self._prefixes[host] = self.prefix(host)
        account = self.accounts.get((prefix, key))
        now = self.now
        if account is None:
            if len(self.accounts) >= self.max_accounts:
                self._forget_idle()
            self.accounts[(prefix, key)] = [now, self.rate - 1, 0]
            return SEND
        if account[0] == now:
            balance = account[1] - 1
        else:
            balance = account[1] + (now - account[0]) * self.rate
            if balance > self.rate:
                balance = self.rate
            balance -= 1
            account[0] = now
        if balance >= 0:
            account[1] = balance
            return SEND
        if balance < self.floor:
            balance = self.floor
        account[1] = balance
        if self.slip:
            account[2] += 1
            if account[2] >= self.slip:
                account[2] = 0
                self.slipped += 1
                return SLIP
        self.dropped += 1
        return DROP

    def _forget_idle(self) -> None:
        """Keep only the accounts being limited; the rest start afresh with full credit."""
        limited = {k: v for k, v in self.accounts.items() if v[1] < 0}
        if len(limited) >= self.max_accounts:
            limited.clear()  # a spoofed flood across prefixes: nothing is worth keeping
        self.accounts = limited


class SharedRateLimiter(RateLimiter):
    """The same accounting, with the accounts in the node's shared memory (``workers = N``).

    Every worker of a node checks the same accounts, so a client whose queries
    SO_REUSEPORT spreads over N workers gets the node's rate, not N times it.
    An account is a bucket of four 64-bit fields (fingerprint, second, balance,
    slip count) at a keyed hash of (client prefix, response key); a bucket
    found holding another fingerprint is taken over with full credit, as an
    idle account forgotten by ``RateLimiter`` would be. There are at least
    twice ``max_accounts`` buckets (dnsd/shared.py) and the hash is keyed with
    a secret, so a client cannot aim its accounts at another's. Loads and
    stores are not atomic across processes: two workers charging one account
    in the same instant may charge it once.
    """

    def __init__(
        self,
        config: RRLConfig,
        buckets: memoryview,
        salt: bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, clock)
        self.buckets = buckets
        self.mask = len(buckets) // 4 - 1
        self.salt = salt
        self._where: dict[tuple[str, bytes], tuple[int, int]] = {}

    def _locate(self, host: str, key: bytes) -> tuple[int, int]:
        """(index of the bucket's first field, fingerprint) of an account."""
        digest = hashlib.blake2b(
            repr(self.prefix(host)).encode() + b"\x00" + key, digest_size=16, key=self.salt
        ).digest()
        bucket = int.from_bytes(digest[:8], "big") & self.mask
        fingerprint = int.from_bytes(digest[8:], "big") >> 1 or 1  # a positive int64; 0 = empty
        return bucket * 4, fingerprint

    def check(self, host: str, key: bytes) -> int:
        """SEND, DROP or SLIP, as ``RateLimiter.check``, charged to the node's account."""
        if not key or (self.exempt and self._is_exempt(host)):
            return SEND
        where = self._where.get((host, key))
        if where is None:
            if len(self._where) >= _CACHE_MAX:
                self._where.clear()
            where = self._where[(host, key)] = self._locate(host, key)
        i, fingerprint = where
        b = self.buckets
        now = self.now
        if b[i] != fingerprint:  # a new account, or a bucket another account held
            b[i], b[i + 1], b[i + 2], b[i + 3] = fingerprint, now, self.rate - 1, 0
            return SEND
        elapsed = now - b[i + 1]
        if elapsed <= 0:  # this second (or a worker whose clock tick is a moment behind)
            balance = b[i + 2] - 1
        else:
            balance = b[i + 2] + elapsed * self.rate
            if balance > self.rate:
                balance = self.rate
            balance -= 1
            b[i + 1] = now
        if balance >= 0:
            b[i + 2] = balance
            return SEND
        if balance < self.floor:
            balance = self.floor
        b[i + 2] = balance
        if self.slip:
            slipped = b[i + 3] + 1
            if slipped >= self.slip:
                b[i + 3] = 0
                self.slipped += 1
                return SLIP
            b[i + 3] = slipped
        self.dropped += 1
        return DROP
