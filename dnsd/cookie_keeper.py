"""SecretKeeper: the cluster's DNS Cookie secret in etcd, read by every dnsd and rotated when due.

Each dnsd polls the key; the first to see it older than ``secret_rotation``
writes a new current secret (the old current becomes previous, still
accepted). Two dnsds rotating at once both write; the last write wins and
cookies made in between with the loser's secret just get a fresh cookie on
their next query, nobody is refused. Without etcd, dnsd keeps the last
secret it had, or its local one.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable

import structlog

from carousel.etcd import Etcd, EtcdError
from dnsd.cookies import Secrets, ServerCookies, decode_secrets, encode_secrets

log = structlog.get_logger("dnsd.cookies")


class SecretKeeper:
    """Keeps ``cookies.secrets`` equal to the cluster's secret in etcd, and rotates it when due."""

    def __init__(
        self,
        etcd: Etcd,
        key: str,
        cookies: ServerCookies,
        rotation: float,
        poll: float,
        on_change: Callable[[Secrets], None] | None = None,
    ) -> None:
        self.etcd = etcd
        self.key = key
        self.cookies = cookies
        self.rotation = rotation
        self.poll = poll
        self.on_change = on_change
        self._warned = False

    def _set(self, secrets: Secrets) -> None:
        if secrets != self.cookies.secrets:
            self.cookies.secrets = secrets
            if self.on_change is not None:
                self.on_change(secrets)

    async def sync_once(self) -> None:
        """Read the secret; create it if missing, rotate it if due."""
        now = time.time()
        kv = await self.etcd.get(self.key)
        secrets, rotated = None, 0.0
        if kv is not None:
            try:
                secrets, rotated = decode_secrets(kv.value)
            except (ValueError, KeyError, TypeError):
                log.warning("cookie secret in etcd is not readable; replacing it", key=self.key)
        if secrets is None or now - rotated >= self.rotation:
            old = secrets.current if secrets is not None else None
            secrets, rotated = Secrets(os.urandom(16), old), now
            await self.etcd.put(self.key, encode_secrets(secrets, rotated))
            log.info("cookie secret rotated", key=self.key)
        self._set(secrets)

    async def run(self) -> None:
        """Poll until cancelled; while etcd is away the last secret stays in use."""
        while True:
            try:
                await self.sync_once()
                self._warned = False
            except EtcdError as exc:
                if not self._warned:
                    log.warning("cookie secret: etcd unreachable, keeping the last secret", error=str(exc))
                    self._warned = True
            # Spread the polls so rotations by two dnsds rarely collide.
            await asyncio.sleep(self.poll * random.uniform(0.8, 1.2))
