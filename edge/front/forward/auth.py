"""Basic proxy authentication (RFC 9110 11.7, RFC 7617): Proxy-Authorization checks and password hashes.

Passwords in `[forward] users` are plain text or ``pbkdf2_sha256$ITERATIONS$SALT$HASH``
(base64 salt and hash; ``python -m edge.front.forward.auth`` prints one). A PBKDF2 check
costs tens of milliseconds by design, so it runs in a worker thread (hashlib lets
go of the GIL) and its verdict is remembered by a digest of the header value,
never the header itself: a client sending the same credentials on every request
pays the cost once, and so does one repeating a wrong guess.

A name that is not configured is checked against a dummy hash of the same cost,
so the answer's timing does not tell which names exist (without it: 0.4 ms for
an unknown name, 56 ms for a known one). Failed checks are counted per client
address: past ``MAX_FAILURES`` in ``FAILURE_WINDOW`` seconds the client gets 429
until the window ends, and no more PBKDF2 is spent on it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
import time
from collections import OrderedDict

HASH_PREFIX = "pbkdf2_sha256$"
DEFAULT_ITERATIONS = 200_000
# Remembered verdicts (digest of the header value -> user or "" for wrong); oldest dropped first.
VERDICTS = 4096
# Failed checks a client may make per window before it is refused without a check (429).
MAX_FAILURES = 20
FAILURE_WINDOW = 60.0
# Clients whose failures are remembered; oldest dropped first (bounded: addresses are many).
FAILURE_CLIENTS = 10000


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A "pbkdf2_sha256$..." string for `[forward] users`."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{HASH_PREFIX}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Does ``password`` match ``stored`` (plain text or a pbkdf2_sha256 hash)? Constant time."""
    if not stored.startswith(HASH_PREFIX):
        return hmac.compare_digest(password.encode(), stored.encode())
    try:
        iterations_text, salt_text, digest_text = stored[len(HASH_PREFIX) :].split("$")
        iterations = int(iterations_text)
        salt = base64.b64decode(salt_text, validate=True)
        expected = base64.b64decode(digest_text, validate=True)
    except (ValueError, binascii.Error):
        return False
    actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.compare_digest(actual, expected)


def check_stored(stored: str) -> str | None:
    """Why a `users` value is unusable, or None."""
    if not stored:
        return "empty password"
    if stored.startswith(HASH_PREFIX):
        parts = stored[len(HASH_PREFIX) :].split("$")
        try:
            if len(parts) != 3 or int(parts[0]) < 1:
                raise ValueError
            base64.b64decode(parts[1], validate=True)
            base64.b64decode(parts[2], validate=True)
        except (ValueError, binascii.Error):
            return "malformed pbkdf2_sha256 hash (make one with `python -m edge.front.forward.auth`)"
    return None


def parse_basic(value: str) -> tuple[str, str] | None:
    """(user, password) from "Basic base64(user:password)", or None."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class ProxyAuthenticator:
    """Checks Proxy-Authorization against the configured users."""

    def __init__(self, users: dict[str, str], realm: str) -> None:
        self.users = dict(users)
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'
        self._verdicts: OrderedDict[bytes, str] = OrderedDict()
        # client -> (window start, failures in it)
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # What an unknown name is checked against: as costly as the costliest configured hash.
        iterations = [_iterations(v) for v in self.users.values() if v.startswith(HASH_PREFIX)]
        if iterations:
            self._dummy = hash_password(os.urandom(16).hex(), max(iterations))
        else:
            self._dummy = os.urandom(16).hex()

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        entry = self._failures.get(client)
        if entry is None or entry[1] < MAX_FAILURES:
            return 0.0
        left = entry[0] + FAILURE_WINDOW - time.monotonic()
        return left if left > 0 else 0.0

    def _failed(self, client: str) -> None:
        now = time.monotonic()
        start, count = self._failures.pop(client, (now, 0))
        if now - start >= FAILURE_WINDOW:
            start, count = now, 0
        self._failures[client] = (start, count + 1)
        if len(self._failures) > FAILURE_CLIENTS:
            self._failures.popitem(last=False)

    async def user(self, header: str | None, client: str = "") -> str | None:
        """The authenticated user name, or None (missing, malformed or wrong credentials)."""
        if not header:
            return None
        key = hashlib.sha256(header.encode("latin-1", "replace")).digest()
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
            if not verdict:
                self._failed(client)
            return verdict or None
        credentials = parse_basic(header)
        user = ""
        if credentials is not None:
            name, password = credentials
            stored = self.users.get(name)
            known = stored is not None
            stored = stored if stored is not None else self._dummy
            if stored.startswith(HASH_PREFIX):
                ok = await asyncio.to_thread(verify_password, password, stored)
            else:
                ok = verify_password(password, stored)
            user = name if ok and known else ""
        self._verdicts[key] = user
        if len(self._verdicts) > VERDICTS:
            self._verdicts.popitem(last=False)
        if not user:
            self._failed(client)
        return user or None


def _iterations(stored: str) -> int:
    try:
        return int(stored[len(HASH_PREFIX) :].split("$")[0])
    except ValueError:
        return DEFAULT_ITERATIONS


def main(argv: list[str] | None = None) -> int:
    """`python -m edge.front.forward.auth`: read a password, print its hash for `[forward] users`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    args = parser.parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 1
    print(hash_password(password, args.iterations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
