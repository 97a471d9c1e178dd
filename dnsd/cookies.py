"""DNS Cookies (RFC 7873) with interoperable server cookies (RFC 9018), secret shared through etcd.

Theory of operation
-------------------
A client sends an 8-byte client cookie in the COOKIE option (code 10), and
after its first answer also the server cookie we gave it. Our server cookie
is RFC 9018's: version 1, three reserved bytes, a 32-bit timestamp and an
8-byte SipHash-2-4 of (client cookie | version | reserved | timestamp |
client address) keyed by a 16-byte secret. Every dnsd of the cluster uses
the same secret, so a cookie from one validates at all of them (anycast, or
a resolver switching between our NS addresses).

A valid server cookie proves the client receives answers at its address: it
is not spoofed. Such a client is exempt from response rate limiting. A
client that offers a cookie but holds no valid server cookie, and whose
answers RRL would slip or drop, gets BADCOOKIE with a fresh server cookie
instead (RFC 7873 §5.2.3): small, and it tells a real client how to get
through. A server cookie is valid from 5 minutes in the future back to an
hour in the past (RFC 9018 §4.3); past half an hour a new one is issued.

The secret lives in etcd (``<prefix>dnsd/cookie-secret``, JSON with
``current``, ``previous`` and ``rotated``), kept by cookie_keeper.py.
Cookies made with either secret validate, so rotating loses nobody.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from siphash24 import siphash24

COOKIE = 10  # EDNS option code (RFC 7873 §4)
VERSION_1 = b"\x01\x00\x00\x00"
MAX_AGE = 3600  # RFC 9018 §4.3: older server cookies are invalid
MAX_AHEAD = 300  # ... as are those more than 5 minutes in the future
RENEW_AGE = 1800  # a cookie older than this gets a fresh one in the answer


@dataclass(frozen=True)
class Secrets:
    """The secret cookies are made with, and the one before it (still accepted)."""

    current: bytes
    previous: bytes | None = None


def find_option(options: bytes, wanted: int) -> bytes | None:
    """The data of the first EDNS option ``wanted`` (options tile their RDATA), or None."""
    at, end = 0, len(options)
    while at + 4 <= end:
        code = (options[at] << 8) | options[at + 1]
        length = (options[at + 2] << 8) | options[at + 3]
        if code == wanted:
            return options[at + 4 : at + 4 + length]
        at += 4 + length
    return None


def find_cookie(options: bytes) -> bytes | None:
    """The COOKIE option's data, or None."""
    return find_option(options, COOKIE)


def well_formed(cookie: bytes) -> bool:
    """RFC 7873 §5.2.2: a client cookie alone (8) or with a server cookie of 8 to 32 bytes."""
    return len(cookie) == 8 or 16 <= len(cookie) <= 40


def _hash(secret: bytes, client_cookie: bytes, stamp: bytes, client: bytes) -> bytes:
    return siphash24(client_cookie + VERSION_1 + stamp + client, key=secret).digest()


class ServerCookies:
    """Makes and checks RFC 9018 server cookies; ``secrets`` is replaced whole on rotation."""

    def __init__(self, secrets: Secrets, clock: Callable[[], float] = time.time) -> None:
        self.secrets = secrets
        self.clock = clock

    def make(self, client_cookie: bytes, client: bytes, now: int | None = None) -> bytes:
        """A 16-byte server cookie for this client cookie and client address (packed)."""
        stamp = struct.pack("!I", (int(self.clock()) if now is None else now) & 0xFFFFFFFF)
        return VERSION_1 + stamp + _hash(self.secrets.current, client_cookie, stamp, client)

    def check(self, cookie: bytes, client: bytes) -> tuple[bool, bool]:
        """(valid, fresh enough to echo back) for a client + server cookie from ``client``."""
        if len(cookie) != 24 or cookie[8:12] != VERSION_1:
            return False, False
        stamp = cookie[12:16]
        # Serial number arithmetic (RFC 1982) on the 32-bit timestamp.
        age = (int(self.clock()) - struct.unpack("!I", stamp)[0] + 2**31) % 2**32 - 2**31
        if not -MAX_AHEAD <= age <= MAX_AGE:
            return False, False
        secrets = self.secrets
        for secret in (secrets.current, secrets.previous):
            if secret is not None and _hash(secret, cookie[:8], stamp, client) == cookie[16:]:
                return True, age <= RENEW_AGE and secret is secrets.current
        return False, False


def packed_address(host: str) -> bytes:
    """The client address as the hash input wants it: 4 or 16 bytes."""
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    return socket.inet_aton(host)


def cookie_option(client_cookie: bytes, server_cookie: bytes) -> bytes:
    """The COOKIE option of an answer."""
    data = client_cookie + server_cookie
    return struct.pack("!HH", COOKIE, len(data)) + data


# --- the shared secret ---------------------------------------------------------------------


def decode_secrets(raw: bytes) -> tuple[Secrets, float]:
    """(secrets, rotated at) from the etcd value; ValueError when it is not ours."""
    doc = json.loads(raw)
    current = bytes.fromhex(doc["current"])
    previous = bytes.fromhex(doc["previous"]) if doc.get("previous") else None
    if len(current) != 16 or (previous is not None and len(previous) != 16):
        raise ValueError("cookie secrets must be 16 bytes")
    return Secrets(current, previous), float(doc["rotated"])


def encode_secrets(secrets: Secrets, rotated: float) -> bytes:
    prev = secrets.previous.hex() if secrets.previous else ""
    return json.dumps({"current": secrets.current.hex(), "previous": prev, "rotated": rotated}).encode()
