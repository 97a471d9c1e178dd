"""Parsing the header fields HTTP caching depends on: no I/O, no policy.

Cache-Control follows the list and quoted-string rules of RFC 9110 5.6: commas
inside quotes do not split, ``max-age =1`` and ``max-age= 1`` are not
directives, ``max-age="60"`` is accepted, and conflicting duplicates of one
directive give ``INVALID`` (RFC 9111 4.2.1 lets a cache treat them as stale).
Targeted fields (CDN-Cache-Control, RFC 9213) and Cache-Status (RFC 9211) are
Structured Fields (RFC 9651, which obsoletes RFC 8941) parsed by ``http_sf``:
an unparsable field is ignored whole, a member of the wrong type on its own.
Dates are the three HTTP-date forms, strictly; Age is the first member of its
list when that is a non-negative integer, else ignored.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import http_sf
from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# delta-seconds beyond this are this (RFC 9111 1.2.2).
MAX_DELTA = 2147483648
# A conflicting or unparsable argument: the directive is present but gives no value.
INVALID = "\x00"

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"


def _skip_to_comma(value: str, i: int) -> int:
    """Index after the next comma outside quotes (or the end): skips a malformed member."""
    n = len(value)
    quoted = False
    while i < n:
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ",":
            return i + 1
        i += 1
    return n


def _quoted(value: str, i: int) -> tuple[str, int] | None:
    """Parse a quoted-string starting at value[i] == '"'; (text, index after) or None."""
    out = []
    i += 1
    n = len(value)
    while i < n:
        c = value[i]
        if c == "\\":
            if i + 1 >= n:
                return None
            out.append(value[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return None


def split_directives(value: str) -> Iterable[tuple[str, str | None]]:
    """(name lower-cased, argument or None) for each well-formed member of one field line."""
    i, n = 0, len(value)
    while i < n:
        while i < n and (value[i] in _OWS or value[i] == ","):
            i += 1
        start = i
        while i < n and value[i] in _TCHAR:
            i += 1
        name = value[start:i].lower()
        if not name:
            i = _skip_to_comma(value, i)
            continue
        arg: str | None = None
        if i < n and value[i] == "=":
            i += 1
            if i < n and value[i] == '"':
                parsed = _quoted(value, i)
                if parsed is None:
                    return
                arg, i = parsed
            else:
                start = i
                while i < n and value[i] in _TCHAR:
                    i += 1
                arg = value[start:i]
                if not arg:  # "max-age= 60" or "max-age=": not a directive
                    i = _skip_to_comma(value, i)
                    continue
        j = i
        while j < n and value[j] in _OWS:
            j += 1
        if j < n and value[j] != ",":  # "max-age =60", "max-age=60x y": malformed member
            i = _skip_to_comma(value, j)
            continue
        i = j
        yield name, arg


def _merge(old: str | None, new: str | None, listed: bool) -> str | None:
    if old == new:
        return old
    if listed:  # no-cache="a" and no-cache="b" -> both; unqualified wins (most restrictive)
        if old is None or new is None:
            return None
        return f"{old}, {new}"
    return INVALID


_LISTED = frozenset({"no-cache", "private"})


def parse_directives(lines: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives from all field lines; conflicting duplicates become INVALID."""
    out: dict[str, str | None] = {}
    for line in lines:
        for name, arg in split_directives(line):
            if name in out:
                out[name] = _merge(out[name], arg, name in _LISTED)
            else:
                out[name] = arg
    return out


def delta_seconds(arg: str | None) -> int | None:
    """A delta-seconds argument, or None when absent or invalid."""
    if arg is None or not arg.isascii() or not arg.isdigit():
        return None
    if len(arg) > 10:
        return MAX_DELTA
    return min(int(arg), MAX_DELTA)


def field_names(arg: str | None) -> frozenset[str]:
    """The lower-cased field names of a qualified no-cache/private argument."""
    if not arg or arg == INVALID:
        return frozenset()
    return frozenset(n.strip().lower() for n in arg.split(",") if n.strip())


# RFC 9213 2.1: directives whose argument is delta-seconds must be Integers in a
# targeted field; no-cache and private take a String (field names) or nothing.
_TARGETED_INTEGER = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})
_TARGETED_FIELD_LIST = frozenset({"no-cache", "private"})


def _structured(text: str, kind: str) -> Any:
    """``text`` parsed as a Structured Field of ``kind`` ("dictionary", "list"); None if invalid.

    The result is loosely typed on purpose: callers check each member's type,
    which is exactly the validation RFC 9213 and RFC 9211 ask for.
    """
    try:
        return http_sf.parse(text.encode("ascii"), tltype=kind)
    except (http_sf.StructuredFieldError, UnicodeEncodeError):
        return None


def parse_targeted(value: str) -> dict[str, str | None] | None:
    """A targeted cache-control field (RFC 9213: a Structured Fields Dictionary); None if invalid.

    The whole field is ignored when it is not a valid Dictionary (RFC 9213 2.1);
    a member of the wrong type (``max-age="60"``, ``max-age=-1``) is ignored on
    its own. True booleans become argument-less directives, false ones are
    absent; parameters are ignored.
    """
    parsed = _structured(value, "dictionary")
    if not isinstance(parsed, dict):
        return None
    out: dict[str, str | None] = {}
    for key, member in parsed.items():
        item = member[0]
        if item is True:
            if key not in _TARGETED_INTEGER:
                out[key] = None
        elif item is False or isinstance(item, bool | list):
            continue
        elif key in _TARGETED_INTEGER:
            if isinstance(item, int) and item >= 0:
                out[key] = str(min(item, MAX_DELTA))
        elif key in _TARGETED_FIELD_LIST:
            if isinstance(item, str):  # a String; a Token (not a str) is the wrong type
                out[key] = item
        else:  # an extension: its argument is kept as text, never interpreted
            out[key] = str(item)
    return out


def surrogate_device(name: str) -> str:
    """This cache's device token in Surrogate-Control / Surrogate-Capability: its name when a token."""
    return name if name and all(c in _TCHAR for c in name) else "carousel"


def parse_surrogate_control(value: str, device: str) -> dict[str, str | None] | None:
    """Surrogate-Control (W3C Edge Architecture 1.0) directives meant for ``device``; None if none.

    Members are Cache-Control directives, each optionally targeted (``max-age=60;edge1``):
    an untargeted one applies, a targeted one only when it names this device. A max-age's
    ``+N`` extension (a stale window) is not used: only its freshness counts.
    """
    out: dict[str, str | None] = {}
    i, n = 0, len(value)
    while i < n:
        end = _skip_to_comma(value, i)
        member = value[i:end].rstrip(",")
        i = end
        directive, semi, target = member.rpartition(";")
        if semi and '"' not in target:  # (a ';' inside a quoted argument targets nothing)
            if target.strip(_OWS).lower() != device.lower():
                continue
        else:
            directive = member
        for name, arg in split_directives(directive):
            if name == "max-age" and arg is not None:
                arg = arg.partition("+")[0]
            out[name] = _merge(out[name], arg, name in _LISTED) if name in out else arg
    return out or None


def parse_cache_status(lines: Iterable[str]) -> list[tuple[str, dict[str, object]]] | None:
    """Cache-Status (RFC 9211: a Structured Fields List); (cache name, parameters) per
    member, oldest cache first, or None when the field is not a valid List."""
    parsed = _structured(", ".join(lines), "list")
    if not isinstance(parsed, list):
        return None
    out: list[tuple[str, dict[str, object]]] = []
    for member in parsed:
        item, params = member
        if not isinstance(item, str | http_sf.Token):  # RFC 9211 2: a Token or a String
            return None
        out.append((str(item), {k: str(v) if isinstance(v, http_sf.Token) else v for k, v in params.items()}))
    return out


def cache_status_name(name: str) -> str:
    """A cache name serialised for Cache-Status: a Token when it is one, else a String."""
    try:
        return http_sf.ser(http_sf.Token(name))
    except (http_sf.StructuredFieldError, ValueError):
        return http_sf.ser(name)


# HTTP-date (RFC 9110 5.6.7). Day and month names and "GMT" are matched without
# regard to case (unambiguous; the grammar's case is what senders must use), the
# rest exactly: one space where the grammar has SP, two digits for day, hour,
# minute and second, and a four-digit year except in the obsolete RFC 850 form.
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(?P<month>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(?P<hour>\d\d):(?P<minute>\d\d):(?P<second>\d\d)"
_IMF_FIXDATE = re.compile(
    rf"{_DAY}, (?P<day>\d\d) {_MONTH} (?P<year>\d{{4}}) {_TIME} GMT", re.IGNORECASE | re.ASCII
)
_RFC850 = re.compile(
    rf"{_LONG_DAY}, (?P<day>\d\d)-{_MONTH}-(?P<year>\d\d) {_TIME} GMT", re.IGNORECASE | re.ASCII
)
_ASCTIME = re.compile(
    rf"{_DAY} {_MONTH} (?P<day>\d\d| \d) {_TIME} (?P<year>\d{{4}})", re.IGNORECASE | re.ASCII
)
_MONTHS = {m: i for i, m in enumerate(("jan feb mar apr may jun jul aug sep oct nov dec").split(), 1)}


def http_date(value: str | None, now: float | None = None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as a Unix time; None when invalid.

    Anything outside the three forms is invalid (RFC 9111 5.3: an invalid Expires
    means "already expired"): no other zones, no missing comma, no one-digit hour,
    no two-digit year outside the RFC 850 form. ``now`` places an RFC 850 year.
    """
    if not value:
        return None
    known = _DATES.get(value)
    if known is not None:
        return known
    value = value.strip(_OWS)
    m = _IMF_FIXDATE.fullmatch(value) or _ASCTIME.fullmatch(value)
    if m is not None:
        year = int(m.group("year"))
        fixed = True
    else:
        fixed = False
        m = _RFC850.fullmatch(value)
        if m is None:
            return None
        # RFC 9110 5.6.7: a two-digit year more than 50 years ahead is in the past century.
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year = this_year - this_year % 100 + int(m.group("year"))
        if year > this_year + 50:
            year -= 100
    try:
        stamp = datetime(
            year,
            _MONTHS[m.group("month").lower()],
            int(m.group("day")),
            int(m.group("hour")),
            int(m.group("minute")),
            tzinfo=UTC,
        )
    except ValueError:  # 31 Feb, hour 24 and the like
        return None
    second = int(m.group("second"))
    if second > 60:  # 60: a leap second (RFC 9110 5.6.7)
        return None
    result = stamp.timestamp() + second
    if fixed:  # an RFC 850 date's century depends on ``now``: not remembered
        if len(_DATES) >= _DATES_KEPT:
            _DATES.clear()
        _DATES[value] = result
    return result


# Dates parsed lately, by their text: a member's Date and Last-Modified repeat from one
# response to the next (the same second, the same file), and every stored entry keeps
# its Date as a float: one parse and one float object (24 bytes) for all of them.
_DATES: dict[str, float] = {}
_DATES_KEPT = 256


def age_header(headers: Headers) -> float:
    """The Age value in seconds; 0 when absent or invalid (RFC 9111 5.1).

    A list-valued Age (one line ``0, 7200`` or several lines) counts by its first
    member, the rest discarded; a first member that is not a non-negative integer
    (``abc``, ``-5``, ``7200.0``, ``7200;p=1``) makes the field ignored, as if
    absent. Values past 2147483648 are 2147483648 (RFC 9111 1.2.2).
    """
    value = headers.get("Age")
    if value is None:
        return 0.0
    comma = value.find(",")
    first = (value if comma < 0 else value[:comma]).strip(_OWS)
    if not first.isascii() or not first.isdigit():
        return 0.0
    return float(delta_seconds(first) or 0)


def vary_names(headers: Headers) -> tuple[str, ...] | None:
    """Lower-cased field names in Vary, sorted; None for ``Vary: *`` (never reused)."""
    names: set[str] = set()
    for line in headers.getall("Vary", ()):
        for name in line.split(","):
            name = name.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))
