"""Signers from the config, and the background task that renews signatures before they expire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from dnsd import wire
from dnsd.config import Config
from dnsd.dnssec import keys
from dnsd.dnssec.sign import SigningPolicy, ZoneKey, ZoneSigner
from dnsd.zone import ZoneError

log = structlog.get_logger("dnsd.dnssec")

RECHECK = 3600.0  # a rebuild may move the next due time: look again at least this often


def signers_from_config(config: Config) -> dict[bytes, ZoneSigner]:
    """Zone origin -> ZoneSigner for every zone with keys; ZoneError names the bad key."""
    d = config.dns.dnssec
    policy = SigningPolicy(d.signature_validity, d.signature_refresh, d.signature_jitter, d.inception_offset)
    signers: dict[bytes, ZoneSigner] = {}
    for i, zone in enumerate(config.zone):
        if not zone.dnssec.key:
            continue
        zone_keys = []
        for j, kc in enumerate(zone.dnssec.key):
            try:
                key = keys.load(kc.file, kc.role)
            except keys.KeyFileError as exc:
                raise ZoneError(f"zone[{i}].dnssec.key[{j}].file", str(exc)) from None
            zone_keys.append(ZoneKey(key, active=kc.state == "active"))
        if not any(k.active for k in zone_keys):
            raise ZoneError(f"zone[{i}].dnssec.key", "a signed zone needs a key with state 'active'")
        if not any(k.active and k.key.sep for k in zone_keys):
            raise ZoneError(f"zone[{i}].dnssec.key", "no active csk or ksk: nothing signs the DNSKEY RRset")
        origin = wire.to_wire(zone.origin)
        signers[origin] = ZoneSigner(origin, zone_keys, policy, dnskey_ttl=zone.dnssec.dnskey_ttl)
    return signers


async def renew_signatures(
    next_due: Callable[[], float | None], rebuild: Callable[[], None], clock: Callable[[], float] = time.time
) -> None:
    """Rebuild the table when a signature is due for renewal, so no query waits for a signature."""
    while True:
        due = next_due()
        wait = RECHECK if due is None else min(RECHECK, max(1.0, due - clock()))
        await asyncio.sleep(wait)
        due = next_due()
        if due is not None and clock() >= due:
            log.info("renewing DNSSEC signatures")
            rebuild()
