"""AnswerTable: every answer dnsd can give, prepared in wire format when the registry changes.

Theory of operation
-------------------
A query is answered by looking up its lowercase wire name, then its type,
in ``AnswerTable.names``; the result is an ``Entry``. An entry holds the
header bytes (flags and section counts, per RD/CD combination and with or
without an OPT record) and one or more *bodies*: the bytes that follow the
question. Compression pointers inside a body point at the question name
(offset 12) or at names inside the body, so a body is valid after any
question of the same name, whatever its 0x20 spelling.

Rotation is a schedule: ``schedule[k]`` is the body of the k-th query. For an
address set of n items (see rotation.py) the body for "item s first" lists s
and the items after it in a fixed cyclic order, capped at
``max_answer_records``, and the schedule lists those bodies in the weighted
order of first places (a weight-2 item is first twice as often, spread out).
With equal weights every query starts one position later, and every item
appears in exactly ``min(cap, n)`` of every n answers: equal exposure.

Tables are immutable once built except for the per-entry ``served`` counter.
A rebuild carries each counter over, so rotation continues where it was and
statistics can be derived from the counters at scrape time instead of being
counted per query. A rebuild re-uses the rendered rotation of every address
set that did not change (and patches the ones that did), so its cost follows
what changed, not the number of edges.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from carousel.registry import ServiceRecord
from dnsd import wire
from dnsd.rotation import AddressSet, RotatingAnswer, Rotation, weighted_order
from dnsd.shared import LOCK_WAIT
from dnsd.wire import MessageWriter, RData


class SharedCounters(Protocol):
    """The node's rotation counters (dnsd.shared.NodeShared): one per answer key, and their lock."""

    lock: Any

    def counter(self, key: bytes) -> memoryview | None: ...


if TYPE_CHECKING:
    from dnsd.cookies import ServerCookies
    from dnsd.sites import SiteMap

RR = tuple[bytes, int, int, RData]  # owner, type, TTL, rdata
MAX_CNAME_CHAIN = 8
MAX_FULL_PERIOD = 64
RFC8482_HINFO: RData = [b"\x07RFC8482\x00"]
RRSIG = 46

# Index into Entry.heads: the query's RD bit (first flag byte) and CD bit (second).
RDCD_INDEXES = (0x00, 0x01, 0x10, 0x11)


def _heads(aa: bool, rcode: int, counts: tuple[int, int, int], tc: bool = False) -> list[bytes]:
    """Flags + counts for each RD/CD combination, indexed by (flags1 & 1) | (flags2 & 0x10)."""
    out = [b""] * 0x12
    an, ns, ar = counts
    for idx in RDCD_INDEXES:
        hi = wire.QR | (wire.AA if aa else 0) | (wire.TC if tc else 0) | (idx & wire.RD)
        lo = (idx & wire.CD) | (rcode & 0x0F)
        out[idx] = struct.pack("!BBHHHH", hi, lo, 1, an, ns, ar)
    return out


class Entry:
    """A prepared answer for one (name, type): header variants and the body schedule."""

    # dnsd/_udploop.c reads served, shared, period, full, heads, heads_edns, do_heads,
    # schedule, do_schedule, fit_plain, body_len, do_body_len and rrl_key by name, calls
    # node_step(), and AnswerTable's questions, opt and payload_size: a rename there is
    # one here (tests/unit/test_dns_udploop.py fails otherwise).
    __slots__ = (
        "aa",
        "answer",
        "body_len",
        "continued",
        "counts",
        "do_body_len",
        "do_heads",
        "do_rcode",
        "do_schedule",
        "fallback",
        "fit_plain",
        "full",
        "heads",
        "heads_edns",
        "missed",
        "period",
        "qtype",
        "rcode",
        "rotation",
        "rrl_key",
        "schedule",
        "serial_at",
        "served",
        "shared",
        "shared_end",
        "shared_lock",
        "shared_start",
        "start",
    )

    def __init__(
        self,
        qtype: int,
        rcode: int,
        aa: bool,
        counts: tuple[int, int, int],
        schedule: Sequence[bytes],
        rotation: Rotation | None = None,
        rrl_key: bytes = b"error",
        answer: RotatingAnswer | None = None,
    ) -> None:
        self.qtype = qtype
        self.rcode = rcode
        self.aa = aa
        self.counts = counts
        self.heads = _heads(aa, rcode, counts)
        self.heads_edns = _heads(aa, rcode, (counts[0], counts[1], counts[2] + 1))
        self.schedule = schedule
        self.period = len(schedule)
        # A rotating answer's bodies all have one length (one record per address).
        self.body_len = answer.body_len if answer is not None else max(len(b) for b in schedule)
        # The longest question (counted from the message start) whose answer fits 512 bytes.
        self.fit_plain = wire.PLAIN_UDP_LIMIT - self.body_len
        self.rotation = rotation
        # The rotating address set behind this entry, with the identity of every
        # RRset it serves (see RotatingAnswer.rrset); None for fixed answers.
        self.answer = answer
        # True once a successor entry took over this one's statistics window.
        self.continued = False
        # Response Rate Limiting account: the same for equal answers across rebuilds.
        self.rrl_key = rrl_key
        self.served = 0
        self.start = 0
        # With workers = N (dnsd/shared.py): the node's rotation counter for this answer
        # (a one-item 'Q' view), stepped under ``shared_lock``, which picks the schedule
        # step instead of ``served``; ``served`` still counts this process's answers for
        # its statistics. ``shared_start``: the counter where this entry's window began.
        self.shared: memoryview | None = None
        self.shared_lock: Any = None
        # Schedule steps answered without the lock (step -> times), from this worker's
        # ``served``: counted by this worker's statistics, as the node counter did not.
        self.missed: dict[int, int] = {}
        self.fallback = 0  # this worker's own rotation, for the steps taken without the lock
        self.shared_start = 0
        self.shared_end: int | None = None  # set when a successor took over the counter
        # Whole responses minus the ID, for a question spelled exactly as ours (see prepare_full).
        self.full: list[list[bytes]] | None = None
        # What a query with the DO bit gets: the same unless the zone is signed (see add_signed).
        self.do_heads = self.heads_edns
        self.do_schedule = schedule
        self.do_body_len = self.body_len
        self.do_rcode = rcode
        # A fixed answer rendered with a placeholder SOA serial (wire.Serial): where the
        # serial sits in its body, for ``with_serial``; () when it carries no serial.
        self.serial_at: tuple[int, ...] = ()

    def with_serial(self, serial: bytes) -> Entry:
        """A fresh entry for this fixed answer, its SOA serial (4 bytes) written in.

        Rendering a fixed answer again on every build only to change its serial
        was about half the CPU of a table update at 10,000 edges (one change,
        ``bench/scale_bench.py``): the builder renders each once (wire.Serial)
        and copies it per build. The copy is a new entry, so its statistics
        window and ``served`` counter work as for a rendered one.
        """
        body = self.schedule[0]
        if self.serial_at:
            patched = bytearray(body)
            for at in self.serial_at:
                patched[at : at + 4] = serial
            body = bytes(patched)
        e = Entry.__new__(Entry)
        e.qtype, e.rcode, e.aa, e.counts = self.qtype, self.rcode, self.aa, self.counts
        e.heads, e.heads_edns = self.heads, self.heads_edns
        e.schedule = e.do_schedule = [body]
        e.period = 1
        e.body_len = e.do_body_len = self.body_len
        e.fit_plain = self.fit_plain
        e.rotation = e.answer = None
        e.continued = False
        e.rrl_key = self.rrl_key
        e.served = e.start = e.fallback = e.shared_start = 0
        e.shared = e.shared_lock = e.shared_end = e.full = None
        e.missed = {}
        e.do_heads, e.do_rcode = self.heads_edns, self.rcode
        e.serial_at = self.serial_at
        return e

    def node_step(self) -> int:
        """The node's next schedule step with workers = N (``shared`` is set; dnsd/shared.py).

        A worker that cannot take the lock within LOCK_WAIT (its holder is stalled)
        takes a step of its own rotation instead, counted in ``missed`` for its statistics.
        """
        lock = self.shared_lock
        if lock.acquire(True, LOCK_WAIT):
            shared: Any = self.shared
            n: int = shared[0]
            shared[0] = n + 1
            lock.release()
            return n
        n = self.fallback % self.period
        self.fallback += 1
        self.missed[n] = self.missed.get(n, 0) + 1
        return n

    def add_signed(self, rcode: int, counts: tuple[int, int, int], schedule: list[bytes]) -> None:
        """The DNSSEC variant, served when the query has the DO bit: bodies with RRSIGs (and NSEC).

        ``schedule`` runs parallel to the unsigned one (same rotation slots), so
        one ``served`` counter drives both.
        """
        self.do_heads = _heads(self.aa, rcode, (counts[0], counts[1], counts[2] + 1))
        self.do_schedule = schedule
        self.do_body_len = max(len(b) for b in schedule)
        self.do_rcode = rcode

    def prepare_full(self, question: bytes, opts: tuple[bytes, bytes]) -> None:
        """Pre-assemble header + question + body (+ OPT) for every RD/CD and EDNS state.

        ``full[edns * 18 + rdcd]`` with edns 0 (no OPT), 1 (OPT) or 2 (OPT with DO).
        Only for short schedules: memory is 12 x period responses.
        """
        if self.period > MAX_FULL_PERIOD:
            return
        unused: list[bytes] = []  # slots of RD/CD values a query cannot produce
        full = [unused] * 54
        for rdcd in RDCD_INDEXES:
            full[rdcd] = [self.heads[rdcd] + question + body for body in self.schedule]
            head = self.heads_edns[rdcd]
            full[18 + rdcd] = [head + question + body + opts[0] for body in self.schedule]
            head = self.do_heads[rdcd]
            full[36 + rdcd] = [head + question + body + opts[1] for body in self.do_schedule]
        self.full = full

    def share(self, counter: memoryview | None, lock: Any) -> None:
        """Take rotation steps from the node's counter for this answer, under ``lock``."""
        if counter is not None:
            self.shared, self.shared_lock = counter, lock
            self.shared_start = counter[0]

    def carry_from(self, old: Entry) -> None:
        """Continue the rotation (and the statistics window) where ``old`` stopped."""
        self.served = old.served
        self.fallback = old.fallback
        if self.rotation is not None and self.rotation is old.rotation:
            # The same rotation: keep counting in one window, so the old entry
            # need not be folded into the statistics (O(n) at 10,000 edges).
            self.start = old.start
            if self.shared is not None and old.shared is not None:
                self.shared_start = old.shared_start
                self.missed = old.missed
            old.continued = True
        else:
            self.start = old.served
            if self.shared is not None and old.shared is not None:
                # One reading closes the old window and opens this one: no query counted twice.
                self.shared_start = old.shared_end = self.shared[0]


def _swrr(weights: list[int]) -> list[int]:
    """A smooth weighted round robin: one period of item indexes (see rotation.weighted_order)."""
    return list(weighted_order(weights))


@dataclass
class Plan:
    """What one answer contains, before it is rendered to bytes."""

    rcode: int = wire.NOERROR
    prefix: list[RR] = field(default_factory=list)  # CNAME chain, fixed order
    rotating: tuple[bytes, int, int, AddressSet] | None = None  # owner, type, TTL, addresses
    fixed: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    # Signed zones only, in the DO variant: NSEC records after the authority (RFC 9824),
    # and the rcode that variant answers (NOERROR for a nonexistent name, by RFC 9824).
    denial: list[RR] = field(default_factory=list)
    signed_rcode: int | None = None


class NxSigner(Protocol):
    """What answers a nonexistent name in a signed zone (dnsd.dnssec.sign.ZoneSigner)."""

    def nx_records(self, qname: bytes, ttl: int, soa: bytes) -> bytes: ...


@dataclass(frozen=True)
class NxDenial:
    """A signed zone's NXDOMAIN answer for the DO bit: made per query name (RFC 9824)."""

    signer: NxSigner
    soa: bytes  # SOA + its RRSIGs, uncompressed
    ttl: int  # the NSEC's TTL: the negative-caching TTL
    authority_count: int  # records in the authority section


@dataclass
class ServiceState:
    """How a mapped service is answered right now (for /status and the log)."""

    service: str
    mode: str  # healthy, last-known, all-registered, nodata, unknown
    # The instances answered with; while healthy, a live view of the builder's, which the
    # next update moves on: read it (``addresses``) before the table is replaced.
    records: Collection[ServiceRecord]
    ttl: int

    @cached_property
    def addresses(self) -> list[str]:
        """Every address answered with, by node (computed when asked: O(n) at 10,000 edges)."""
        return [a for r in sorted(self.records, key=lambda r: r.node) for a in r.addresses]


class AnswerTable:
    """Every prepared answer of one registry revision."""

    def __init__(self, revision: int, synced: bool, payload_size: int = 1232) -> None:
        self.revision = revision
        self.payload_size = payload_size
        # Our OPT record without and with the DO bit (we echo the client's DO).
        self.opt = (wire.opt_record(payload_size), wire.opt_record(payload_size, do=True))
        self.opt_co = wire.opt_record(payload_size, do=True, co=True)
        self.serial = max(1, revision & 0xFFFFFFFF)
        self.synced = synced
        self.built = time.time()
        # Lowercase question (name + type + class IN) -> entry, for the common types.
        self.questions: dict[bytes, Entry] = {}
        # Lowercase name -> type (2 bytes; b"" for any other type) -> entry.
        self.names: dict[bytes, dict[bytes, Entry]] = {}
        self.nxdomain: dict[bytes, Entry] = {}  # zone origin -> NXDOMAIN answer
        self.meta: dict[bytes, Entry] = {}  # qtype -> answer for AXFR, IXFR, MAILA, MAILB, OPT
        self.refused = Entry(0, wire.REFUSED, False, (0, 0, 0), [b""], rrl_key=b"error")
        self.services: dict[str, ServiceState] = {}
        self.denial: dict[bytes, NxDenial] = {}  # zone origin -> signed NXDOMAIN maker
        # DNS Cookies (dnsd.cookies.ServerCookies), shared by every table of a process; None: off.
        self.cookies: ServerCookies | None = None
        # Site-aware answers (dnsd/sites.py); None: off. Questions whose answer depends on
        # the client's site are left out of ``questions`` (the fast path asks for the client).
        self.site_map: SiteMap | None = None
        self.site_questions: dict[bytes, Entry] = {}  # question -> the answer for no site
        self.by_site: dict[str, dict[bytes, Entry]] = {}  # site -> question -> its answer

    def entries(self) -> Iterable[Entry]:
        """Every distinct entry (for statistics)."""
        seen: set[int] = set()
        for node in self.names.values():
            for e in node.values():
                if id(e) not in seen:
                    seen.add(id(e))
                    yield e
        site_entries = [e for entries in self.by_site.values() for e in entries.values()]
        for e in (*self.nxdomain.values(), *self.meta.values(), self.refused, *site_entries):
            if id(e) not in seen:
                seen.add(id(e))
                yield e

    def lookup(self, name: bytes, qtype: int) -> Entry | None:
        """The entry for a lowercase wire name and type, or None (NXDOMAIN or REFUSED)."""
        node = self.names.get(name)
        if node is None:
            return None
        return node.get(struct.pack("!H", qtype)) or node[b""]

    def zone_of(self, name: bytes) -> bytes | None:
        """The origin of the closest enclosing zone of a lowercase wire name."""
        for _, suffix in wire.suffixes(name):
            if suffix in self.nxdomain:
                return suffix
        return wire.ROOT if wire.ROOT in self.nxdomain else None


def render(
    qname: bytes | None,
    qtype: int,
    plan: Plan,
    cap: int,
    rrl_key: bytes,
    aa: bool = True,
    previous: RotatingAnswer | None = None,
    shared: SharedCounters | None = None,
) -> Entry:
    """Turn a plan into an entry: one body per rotation start, scheduled by weight.

    ``qname`` None means the question is not known in advance (NXDOMAIN for
    any name of a zone): the body is then written without compression.
    ``previous`` is this entry's rotating answer in the last table: re-used
    when its address set is the same, patched when the set derives from it.
    A signed zone's DNSSEC variant is added by dnsd.dnssec.answers (``Entry.add_signed``).
    ``shared`` gives a rotating answer its node-wide rotation counter by ``rrl_key``
    (``workers = N``, see dnsd/shared.py).
    """
    base = 12 + len(qname) + 4 if qname is not None else 0
    compress = qname is not None
    sections = len(plan.prefix) + len(plan.fixed), len(plan.authority), len(plan.additional)
    w = MessageWriter(qname, base)
    for owner, rtype, ttl, rdata in plan.prefix:
        w.rr(owner, rtype, ttl, rdata, compress=compress)
    if plan.rotating is None or not plan.rotating[3].keys:
        for owner, rtype, ttl, rdata in (*plan.fixed, *plan.authority, *plan.additional):
            w.rr(owner, rtype, ttl, rdata, compress=compress)
        entry = Entry(qtype, plan.rcode, aa, sections, [w.getvalue()], rrl_key=rrl_key)
        entry.serial_at = tuple(w.serials)
        return entry
    owner, rtype, ttl, aset = plan.rotating
    if qname is None:
        raise ValueError("a rotating answer needs a known question name")
    shown = min(cap, len(aset.keys))
    # Every rotating record has the same owner bytes (the owner is the question
    # name or a name of the CNAME chain before it, so always a pointer) and the
    # same length: the bytes around the records are the same for every window.
    head = w.getvalue()
    records = []
    for key in aset.keys[:shown]:
        at = len(w.buf)
        w.rr(owner, rtype, ttl, [key], compress=True)
        records.append(bytes(w.buf[at:]))
    rr_prefix = records[0][: -len(aset.keys[0])]
    if any(r != rr_prefix + k for r, k in zip(records, aset.keys, strict=False)):
        raise AssertionError("rotating records differ in more than their address")
    tail_at = len(w.buf)
    for owner2, rtype2, ttl2, rdata in (*plan.fixed, *plan.authority, *plan.additional):
        w.rr(owner2, rtype2, ttl2, rdata, compress=compress)
    if w.serials:  # positive answers carry no SOA; a placeholder here would be served as is
        raise ValueError("a rotating answer cannot carry a placeholder SOA serial")
    parts = (head, rr_prefix, bytes(w.buf[tail_at:]))
    if (
        previous is not None
        and previous.set is aset
        and previous.shown == shown
        and (previous.head, previous.rr_prefix, previous.tail) == parts
    ):
        answer = previous
    else:
        answer = RotatingAnswer(wire.to_text(qname), aset, shown, parts, (owner, rtype, ttl), previous)
    counts = (sections[0] + shown, sections[1], sections[2])
    entry = Entry(qtype, plan.rcode, aa, counts, answer.schedule, answer.rotation, rrl_key, answer)
    if shared is not None:
        entry.share(shared.counter(rrl_key), shared.lock)
    return entry
