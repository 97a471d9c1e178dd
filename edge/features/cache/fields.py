"""Parsing the header fields HTTP caching depends on: no I/O, no policy.

Cache-Control follows the list and quoted-string rules of RFC 9110 5.6: commas
inside quotes do not split, ``max-age =1`` and ``max-age= 1`` are not
directives, ``max-age="60"`` is accepted, and conflicting duplicates of one
directive give ``INVALID`` (RFC 9111 4.2.1 lets a cache treat them as stale).
Targeted fields (CDN-Cache-Control, RFC 9213) are Structured Field
Dictionaries: one bad member makes the whole field invalid. Dates are the
three HTTP-date forms; Age is one non-negative integer or nothing.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from email.utils import parsedate_tz

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


_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_SF_NUMBER = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,3})?")
_SF_BYTES = re.compile(r":[A-Za-z0-9+/=]*:")


def _sf_item(text: str, i: int) -> tuple[str | None, int] | None:
    """A bare item at text[i]: (its value as a directive argument, next index), None if invalid."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        parsed = _quoted(text, i)
        if parsed is None or not parsed[0].isascii():
            return None
        return parsed
    if c == "?":
        if text[i + 1 : i + 2] in ("0", "1"):
            return (None if text[i + 1] == "1" else INVALID), i + 2
        return None
    for pattern in (_SF_NUMBER, _SF_TOKEN, _SF_BYTES):
        m = pattern.match(text, i)
        if m:
            return m.group(0), m.end()
    return None


def parse_targeted(value: str) -> dict[str, str | None] | None:
    """A targeted cache-control field (RFC 9213: a Structured Fields Dictionary); None if invalid.

    Booleans become argument-less directives (``?0`` ones are dropped), numbers,
    tokens and strings become arguments; parameters are accepted and ignored.
    """
    out: dict[str, str | None] = {}
    text = value.strip(" ")
    i, n = 0, len(text)
    if not n:
        return None
    while i < n:
        m = _SF_KEY.match(text, i)
        if m is None:
            return None
        key = m.group(0)
        i = m.end()
        arg: str | None = None
        if i < n and text[i] == "=":
            item = _sf_item(text, i + 1)
            if item is None:
                return None
            arg, i = item
        while i < n and text[i] == ";":  # parameters: key[=item]
            m = _SF_KEY.match(text, i + 1)
            if m is None:
                return None
            i = m.end()
            if i < n and text[i] == "=":
                item = _sf_item(text, i + 1)
                if item is None:
                    return None
                i = item[1]
        if arg != INVALID:
            out[key] = arg
        while i < n and text[i] in _OWS:
            i += 1
        if i < n:
            if text[i] != ",":
                return None
            i += 1
            while i < n and text[i] in _OWS:
                i += 1
            if i >= n:
                return None  # trailing comma
    return out


def http_date(value: str | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as a Unix time; None when invalid."""
    if not value:
        return None
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    try:
        return float(calendar.timegm(parsed[:9])) - (parsed[9] or 0)
    except (OverflowError, ValueError):
        return None


def age_header(headers: Headers) -> float:
    """The Age value (0 when absent). One that cannot be trusted (not one non-negative
    integer: a list, repeated lines, a sign, a fraction, parameters) counts as the oldest
    possible, so the response is stale at once and revalidated before any reuse: when an
    upstream's age is unknown, assuming it fresh could serve it past its lifetime. RFC
    9111 5.1 lets a cache ignore such a field; the cache-tests.fyi suite asks for stale,
    the safer reading."""
    values = headers.getall("Age", ())
    if not values:
        return 0.0
    value = values[0].strip()
    if len(values) != 1 or not value.isascii() or not value.isdigit():
        return float(MAX_DELTA)
    return float(delta_seconds(value) or 0)


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
