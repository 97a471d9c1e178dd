"""The DNSSEC variant of prepared answers: every RRset followed by its RRSIGs.

Theory of operation
-------------------
A fixed answer gets one signed body. A rotating answer (dnsd/rotation.py)
gets one signed body per window (rotation start), parallel to its unsigned
bodies, and the signed schedule follows the unsigned one slot for slot, so
one ``served`` counter drives both.

A registry change re-renders only the signed windows whose content changed,
as the unsigned ones are patched (``RotatingAnswer.dirty``): the other
windows keep their bodies, and with them the signatures they carry.
Renewal is planned from the whole signed set, not from what one build asked
for: each window remembers when the earliest signature in it is due
(``SignedWindows.refresh``), ``SignedWindows.due`` is the earliest of all,
and the builder's ``next_refresh`` includes it. A build (the renewal task's,
or any other) re-renders every window that is due, so a kept window is never
served past its renewal time by more than the renewal task's wake-up delay.

Measured at 10,000 edges (one change, in-process, loaded machine): every
window rendered again cost 1.5 s of CPU; patched, see dnsd/README.md.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence

from dnsd.rotation import RotatingAnswer
from dnsd.table import RR, Entry, Plan
from dnsd.wire import MessageWriter

RRSIG = 46

# Signs an RRset: (owner, type, TTL, RDATAs) -> (RRSIG RDATAs, renewal due at);
# ([], inf) when its zone is unsigned.
RRsetSigner = Callable[[bytes, int, int, list[bytes]], tuple[list[bytes], float]]


class SignedWindows:
    """The signed bodies of one rotating answer, by window start address, with their renewal times."""

    __slots__ = ("body_of", "counts", "due", "refresh", "schedule")

    def __init__(
        self, body_of: dict[bytes, bytes], refresh: dict[bytes, float], counts: tuple[int, int, int]
    ) -> None:
        self.body_of = body_of  # packed start address -> signed body of that window
        self.refresh = refresh  # packed start address -> when its earliest signature is due
        self.counts = counts  # section counts of a signed body (the same for every window)
        self.due = min(refresh.values(), default=float("inf"))
        self.schedule: list[bytes] | None = None  # the DO schedule, once laid out


def signed_rcode(plan: Plan) -> int:
    """The rcode of the DO variant (RFC 9824: NOERROR for a name that does not exist)."""
    return plan.rcode if plan.signed_rcode is None else plan.signed_rcode


def signed_body(
    qname: bytes | None, plan: Plan, first: list[RR], sign: RRsetSigner
) -> tuple[bytes, tuple[int, int, int], float]:
    """A body with every RRset followed by its RRSIGs, denial NSEC in authority; counts; renewal due."""
    w = MessageWriter(qname, 12 + len(qname) + 4 if qname is not None else 0)
    compress = qname is not None
    answer = [*plan.prefix, *first, *plan.fixed]
    counts = []
    due = float("inf")
    for section in (answer, [*plan.authority, *plan.denial], plan.additional):
        n = 0
        for i, (owner, rtype, ttl, rdata) in enumerate(section):
            w.rr(owner, rtype, ttl, rdata, compress=compress)
            n += 1
            if i + 1 == len(section) or section[i + 1][:2] != (owner, rtype):  # the end of an RRset
                rrset = [b"".join(r[3]) for r in section if r[0] == owner and r[1] == rtype]
                sigs, at = sign(owner, rtype, ttl, rrset)
                due = min(due, at)
                for sig in sigs:
                    w.rr(owner, RRSIG, ttl, [sig], compress=compress)
                    n += 1
        counts.append(n)
    return w.getvalue(), (counts[0], counts[1], counts[2]), due


def add_signed(
    entry: Entry,
    qname: bytes | None,
    plan: Plan,
    sign: RRsetSigner,
    previous: RotatingAnswer | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Give ``entry`` its DNSSEC variant; a rotating one re-uses ``previous``'s windows that still hold."""
    answer = entry.answer
    if answer is None or plan.rotating is None:
        body, counts, _ = signed_body(qname, plan, [], sign)
        entry.add_signed(signed_rcode(plan), counts, [body])
        return
    now = clock()
    kept = answer.signed
    if isinstance(kept, SignedWindows) and kept.schedule is not None and kept.due > now:
        # The previous table's answer, re-used unchanged, and no signature due: nothing to do.
        entry.add_signed(signed_rcode(plan), kept.counts, kept.schedule)
        return
    windows = _windows(answer, qname, plan, sign, previous, now)
    answer.signed = windows
    body_of = windows.body_of
    bodies = list(map(body_of.__getitem__, answer.set.keys))  # C loops: no Python per window
    if answer.schedule is answer.bodies:
        schedule = bodies  # equal weights: slot s starts at address s
    else:
        schedule = list(map(bodies.__getitem__, answer.rotation.slot_start))
    windows.schedule = schedule
    entry.add_signed(signed_rcode(plan), windows.counts, schedule)


def _windows(
    answer: RotatingAnswer,
    qname: bytes | None,
    plan: Plan,
    sign: RRsetSigner,
    previous: RotatingAnswer | None,
    now: float,
) -> SignedWindows:
    """The signed windows of ``answer``: ``previous``'s where unchanged and not due, the rest rendered."""
    keys = answer.set.keys
    kept = _reusable(answer, previous)
    if kept is None:
        body_of: dict[bytes, bytes] = {}
        refresh: dict[bytes, float] = {}
        todo: Sequence[int] = range(len(keys))
    else:
        body_of, refresh = dict(kept.body_of), dict(kept.refresh)  # C copies
        if answer is not previous:  # patched: the windows of a change are rendered below
            for key in answer.set.changed:
                at = bisect_left(keys, key)
                if at == len(keys) or keys[at] != key:  # an address that left
                    body_of.pop(key, None)
                    refresh.pop(key, None)
        dirty = set(answer.dirty or ()) if answer is not previous else set()
        if kept.due <= now:
            index = {k: i for i, k in enumerate(keys)}
            dirty.update(index[k] for k, t in refresh.items() if t <= now and k in index)
        todo = sorted(dirty)
    owner, rtype, ttl, _ = plan.rotating  # type: ignore[misc]
    n, shown = len(keys), answer.shown
    counts = kept.counts if kept is not None else (0, 0, 0)
    for s in todo:
        first: list[RR] = [(owner, rtype, ttl, [keys[(s + j) % n]]) for j in range(shown)]
        body, counts, due = signed_body(qname, plan, first, sign)
        body_of[keys[s]] = body
        refresh[keys[s]] = due
    return SignedWindows(body_of, refresh, counts)


def _reusable(answer: RotatingAnswer, previous: RotatingAnswer | None) -> SignedWindows | None:
    """The signed windows this answer can start from: its own (the same set), or the ones it patched."""
    if answer.signed is not None:  # the previous table's answer, re-used as it was
        return answer.signed  # type: ignore[return-value]
    if previous is None or previous.signed is None or answer.dirty is None:
        return None  # every unsigned window was rendered afresh: so are the signed ones
    return previous.signed  # type: ignore[return-value]
