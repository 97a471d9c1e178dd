"""ZoneSigner: RRSIGs for the RRsets of one zone, cached by content, and compact denial.

Theory of operation
-------------------
An RRSIG covers an RRset in canonical form (RFC 4034 §6: owner lowercase,
RDATA uncompressed, records sorted by RDATA, duplicates dropped), never the
order records are sent in. So every rotation of one healthy set shares one
signature, and the cache key is the RRset's content: (owner, type, TTL,
sorted RDATAs). A table build asks for the signature of every RRset it
renders; a cached one that is not due for renewal is reused, anything else
is signed then. When answers are capped to a subset of the set, each subset
is a distinct RRset with its own cached signature. A change renders again
only the windows of a rotating answer that it touched (dnsd/dnssec/answers.py):
the kept windows carry their signatures and their renewal times, so the
cache holds what the last build asked for, and the builder's
``next_refresh`` adds the kept windows' times to ours.

Timing (RFC 6781 §4.4.2): inception is ``inception_offset`` in the past,
for validators with slow clocks; expiration is ``validity`` ahead, less a
random jitter of up to ``jitter`` so that signatures made in one build do
not all expire together; a signature is re-made once less than ``refresh``
of its validity is left. ``next_refresh`` tells the owner of the signer when
to rebuild so renewal happens in the background, never on the query path.

Denial (RFC 9824, "compact denial of existence"): a NODATA answer carries
an NSEC record owned by the query name whose next name is ``\\000.<qname>``
(nothing exists between the two), listing the types the name has; a name
that does not exist gets the same shape listing RRSIG, NSEC and the NXNAME
pseudo-type, with rcode NOERROR (NXDOMAIN when the client set the CO flag).
One NSEC per answer, no zone walking, and nothing to precompute. The NSEC
for a nonexistent name depends on that name, so it is signed when asked,
and kept in a bounded cache (a resolver asking again is answered without
signing).
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dnsd import wire
from dnsd.dnssec.keys import DNSKEY, NSEC, RRSIG, SigningKey

NXNAME = 128  # RFC 9824 §3.1: the pseudo-type marking a name that does not exist
NX_CACHE_MAX = 10_000


@dataclass(frozen=True)
class SigningPolicy:
    """Signature timing, in seconds (RFC 6781 §4.4.2)."""

    validity: int = 14 * 86400
    refresh: int = 5 * 86400
    jitter: int = 12 * 3600
    inception_offset: int = 3600


@dataclass(frozen=True)
class ZoneKey:
    """A key of the zone and whether it signs (active) or is only published (pre-publish rollover)."""

    key: SigningKey
    active: bool = True


def type_bitmap(types: Iterable[int]) -> bytes:
    """RFC 4034 §4.1.2: the NSEC type bit maps field."""
    windows: dict[int, bytearray] = {}
    for t in sorted(set(types)):
        block = windows.setdefault(t >> 8, bytearray(32))
        block[(t & 0xFF) >> 3] |= 0x80 >> (t & 7)
    out = bytearray()
    for window, bits in sorted(windows.items()):
        length = max(i for i, b in enumerate(bits) if b) + 1
        out += bytes((window, length)) + bits[:length]
    return bytes(out)


def _label_count(owner: bytes) -> int:
    return len(wire.labels(owner))


class ZoneSigner:
    """Signs one zone's RRsets with its active keys; caches the signatures by RRset content."""

    def __init__(
        self,
        origin: bytes,
        keys: Sequence[ZoneKey],
        policy: SigningPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        dnskey_ttl: int = 3600,
    ) -> None:
        if not any(k.active for k in keys):
            raise ValueError("a signed zone needs at least one active key")
        self.origin = origin
        self.keys = list(keys)
        self.policy = policy or SigningPolicy()
        self.clock = clock
        self.rng = rng or random.Random()
        active = [k.key for k in keys if k.active]
        # A CSK signs everything; with a KSK/ZSK split the SEP keys sign the DNSKEY RRset.
        self.zone_signers = [k for k in active if not k.sep] or active
        self.key_signers = [k for k in active if k.sep] or active
        self.dnskeys = sorted(k.key.dnskey for k in keys)
        self.dnskey_ttl = dnskey_ttl
        # (owner, type, ttl, rdatas) -> (RRSIG RDATAs, refresh at, build generation last used)
        self._cache: dict[tuple[bytes, int, int, tuple[bytes, ...]], tuple[list[bytes], float, int]] = {}
        self._nx: dict[tuple[bytes, int], bytes] = {}  # (qname, generation) -> signed authority records
        self.generation = 0
        self.signatures_made = 0

    # --- signing ----------------------------------------------------------------------

    def _times(self, now: float) -> tuple[int, int, int]:
        p = self.policy
        expiration = int(now + p.validity - self.rng.uniform(0, p.jitter))
        return int(now - p.inception_offset), expiration, expiration - p.refresh

    def _rrsig(self, key: SigningKey, owner: bytes, rtype: int, ttl: int, rdatas: Sequence[bytes],
               inception: int, expiration: int) -> bytes:  # fmt: skip
        head = (
            struct.pack(
                "!HBBIIIH",
                rtype,
                key.algorithm,
                _label_count(owner),
                ttl,
                expiration & 0xFFFFFFFF,  # RFC 4034 §3.1.5: serial number arithmetic, mod 2^32
                inception & 0xFFFFFFFF,
                key.tag,
            )
            + self.origin
        )
        rr_head = owner + struct.pack("!HHI", rtype, wire.CLASS_IN, ttl)
        data = head + b"".join(rr_head + struct.pack("!H", len(rd)) + rd for rd in rdatas)
        self.signatures_made += 1
        return head + key.sign(data)

    def rrsigs(self, owner: bytes, rtype: int, ttl: int, rdatas: Iterable[bytes]) -> list[bytes]:
        """RRSIG RDATAs covering the RRset (one per signing key); cached by the set's content."""
        return self.signed(owner, rtype, ttl, rdatas)[0]

    def signed(
        self, owner: bytes, rtype: int, ttl: int, rdatas: Iterable[bytes]
    ) -> tuple[list[bytes], float]:
        """The RRSIG RDATAs of the RRset (as ``rrsigs``) and when they are due for renewal."""
        canonical = tuple(sorted(set(rdatas)))
        cache_key = (owner, rtype, ttl, canonical)
        hit = self._cache.get(cache_key)
        now = self.clock()
        if hit is not None and now < hit[1]:
            if hit[2] != self.generation:
                self._cache[cache_key] = (hit[0], hit[1], self.generation)
            return hit[0], hit[1]
        inception, expiration, refresh_at = self._times(now)
        signers = self.key_signers if rtype == DNSKEY else self.zone_signers
        sigs = [self._rrsig(k, owner, rtype, ttl, canonical, inception, expiration) for k in signers]
        self._cache[cache_key] = (sigs, refresh_at, self.generation)
        return sigs, refresh_at

    # --- builds and renewal ------------------------------------------------------------

    def begin_build(self) -> None:
        """Start a build: signatures the build does not use again are dropped at ``end_build``."""
        self.generation += 1

    def end_build(self) -> None:
        """Forget signatures of RRsets no longer served, and denial signed for the last build."""
        gen = self.generation
        self._cache = {k: v for k, v in self._cache.items() if v[2] == gen}
        self._nx.clear()

    def next_refresh(self) -> float | None:
        """When the first cached signature in use is due for renewal (None: nothing cached)."""
        return min((v[1] for v in self._cache.values()), default=None)

    # --- denial -----------------------------------------------------------------------

    def nsec_rdata(self, name: bytes, types: Iterable[int]) -> bytes:
        """Compact denial NSEC RDATA at ``name``: next name \\000.name, the types plus RRSIG and NSEC."""
        return b"\x01\x00" + name + type_bitmap({*types, RRSIG, NSEC})

    def nx_records(self, qname: bytes, ttl: int, soa: bytes) -> bytes:
        """Authority records for a name that does not exist: ``soa`` (SOA + RRSIG, prepared), NSEC + RRSIG.

        Uncompressed, so they can follow any question. Cached per name until the next build.
        """
        cache_key = (qname, self.generation)
        hit = self._nx.get(cache_key)
        if hit is not None:
            return hit
        rdata = self.nsec_rdata(qname, (NXNAME,))
        out = bytearray(soa)
        out += qname + struct.pack("!HHIH", NSEC, wire.CLASS_IN, ttl, len(rdata)) + rdata
        now = self.clock()
        inception, expiration, _ = self._times(now)
        for key in self.zone_signers:
            sig = self._rrsig(key, qname, NSEC, ttl, (rdata,), inception, expiration)
            out += qname + struct.pack("!HHIH", RRSIG, wire.CLASS_IN, ttl, len(sig)) + sig
        if len(self._nx) >= NX_CACHE_MAX:
            self._nx.clear()  # a random-name flood: keep memory bounded
        result = bytes(out)
        self._nx[cache_key] = result
        return result
