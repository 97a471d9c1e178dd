"""RFC 9111 (HTTP caching) rules as pure functions and tables: no I/O, no clock of their own.

Theory of operation
-------------------
A response is looked at once, when it arrives: ``analyze_response`` parses its
directives (Cache-Control, or the first valid targeted field such as
CDN-Cache-Control, RFC 9213), decides whether a shared cache may store it
(section 3), computes its freshness lifetime (4.2.1, heuristics only when
enabled and allowed, 4.2.2) and its corrected initial age (4.2.3), and records
what later reuse decisions need (no-cache, must-revalidate, stale extensions,
Authorization rules). The result is a ``ResponsePolicy``: plain fields that the
hit path reads without parsing anything again.

A request is looked at only when it carries Cache-Control or Pragma
(``parse_request``). ``current_age`` is one addition and one subtraction.

Parsing follows the list and quoted-string rules of RFC 9110 5.6: commas inside
quotes do not split, ``max-age =1`` and ``max-age= 1`` are not directives,
``max-age="60"`` is accepted. A delta-seconds value that is not an integer makes
the response stale (4.2.1: invalid freshness information), as do conflicting
duplicates of one directive.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import parsedate_tz
from http import HTTPStatus

from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# RFC 9110 15.1: status codes a cache may store with heuristic freshness.
HEURISTIC_STATUS = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Final status codes this cache understands (for must-understand, RFC 9111 5.2.2.3).
UNDERSTOOD_STATUS = frozenset(s.value for s in HTTPStatus if s.value >= 200) - {206}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Never stored (RFC 9111 3.1): hop-by-hop fields, proxy-specific fields, framing and
# Age (recomputed on every reuse). Set-Cookie is never stored either: a route that
# allows caching such responses gets them stored without it.
NOT_STORED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authentication-info",
        "proxy-authorization",
        "content-length",
        "age",
        "set-cookie",
        "set-cookie2",
    }
)
# Fields a cache puts in a 304 it generates (RFC 9110 15.4.5), plus Last-Modified.
NOT_MODIFIED_FIELDS = (
    "Cache-Control",
    "Content-Location",
    "Date",
    "ETag",
    "Expires",
    "Vary",
    "Last-Modified",
)
# delta-seconds beyond this are this (RFC 9111 1.2.2).
MAX_DELTA = 2147483648
# A conflicting or unparsable argument: the directive is present but gives no value.
INVALID = "\x00"

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"


# --- field parsing -------------------------------------------------------------------------


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
    """The Age value; invalid or repeated values are ignored (RFC 9111 5.1)."""
    values = headers.getall("Age", ())
    if len(values) != 1:
        return 0.0
    value = values[0].strip()
    if not value.isascii() or not value.isdigit():
        return 0.0
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


# --- the response --------------------------------------------------------------------------


@dataclass(slots=True)
class HeuristicRule:
    """When and how much heuristic freshness (RFC 9111 4.2.2) may be given."""

    fraction: float = 0.1
    maximum: float = 86400.0


@dataclass(slots=True)
class ResponsePolicy:
    """What a cache needs to know about one response, decided once."""

    storable: bool
    reason: str = ""
    # Seconds of freshness from the response's Date (0: stale at once).
    lifetime: float = 0.0
    # Age of the response when it was received, corrected (RFC 9111 4.2.3).
    initial_age: float = 0.0
    # Must be validated before every reuse (unqualified no-cache).
    no_cache: bool = False
    # Never served stale (must-revalidate, proxy-revalidate, s-maxage, no-cache).
    no_stale: bool = False
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    # May answer requests carrying Authorization (public, s-maxage, must-revalidate).
    auth_ok: bool = False
    # Fields stored responses must leave out (qualified no-cache / private).
    omit: frozenset[str] = frozenset()
    vary: tuple[str, ...] = ()
    etag: str | None = None
    last_modified: str | None = None
    date: float = 0.0


def _directives(headers: Headers, targeted: tuple[str, ...]) -> tuple[dict[str, str | None], bool]:
    """The governing directives: the first valid targeted field, else Cache-Control."""
    for name in targeted:
        lines = headers.getall(name, ())
        if lines:
            parsed = parse_targeted(", ".join(lines))
            if parsed:
                return parsed, True
    return parse_directives(headers.getall("Cache-Control", ())), False


def analyze_response(
    status: int,
    headers: Headers,
    *,
    request_time: float,
    response_time: float,
    authorized: bool = False,
    request_no_store: bool = False,
    targeted: tuple[str, ...] = ("cdn-cache-control",),
    heuristic: HeuristicRule | None = None,
) -> ResponsePolicy:
    """Decide storing, freshness and reuse rules for a response to a GET (RFC 9111 3, 4.2)."""
    cc, from_targeted = _directives(headers, targeted)
    if status < 200 or status in (206, 304):
        return ResponsePolicy(False, "status")
    if request_no_store:
        return ResponsePolicy(False, "request no-store")
    if "must-understand" in cc:
        if status not in UNDERSTOOD_STATUS:
            return ResponsePolicy(False, "must-understand")
    elif "no-store" in cc:
        return ResponsePolicy(False, "no-store")
    private = cc.get("private", INVALID) if "private" in cc else INVALID
    if "private" in cc and private is None:
        return ResponsePolicy(False, "private")
    vary = vary_names(headers)
    if vary is None:
        return ResponsePolicy(False, "vary *")
    public = "public" in cc
    s_maxage = delta_seconds(cc.get("s-maxage")) if "s-maxage" in cc else None
    must_revalidate = "must-revalidate" in cc
    if authorized and not (public or "s-maxage" in cc or must_revalidate):
        return ResponsePolicy(False, "authorization")
    if "content-range" in headers:
        return ResponsePolicy(False, "partial")

    date = http_date(headers.get("Date")) if len(headers.getall("Date", ())) == 1 else None
    date_value = date if date is not None else response_time
    # Freshness lifetime, shared cache order (RFC 9111 4.2.1).
    lifetime: float | None = None
    explicit = False
    if "s-maxage" in cc:
        explicit = True
        lifetime = float(s_maxage) if s_maxage is not None else 0.0
    elif "max-age" in cc:
        explicit = True
        max_age = delta_seconds(cc.get("max-age"))
        lifetime = float(max_age) if max_age is not None else 0.0
    elif not from_targeted and "Expires" in headers:
        explicit = True
        expires_lines = headers.getall("Expires")
        expires = http_date(expires_lines[0]) if len(expires_lines) == 1 else None
        # Invalid dates (notably "0") mean "already expired" (RFC 9111 5.3).
        lifetime = max(0.0, expires - date_value) if expires is not None else 0.0
    etag = headers.get("ETag")
    last_modified = headers.get("Last-Modified")
    if lifetime is None and heuristic is not None and (status in HEURISTIC_STATUS or public):
        modified = http_date(last_modified)
        if modified is not None and modified < date_value:
            lifetime = min((date_value - modified) * heuristic.fraction, heuristic.maximum)
    if not (explicit or public or status in HEURISTIC_STATUS):
        return ResponsePolicy(False, "no explicit freshness for this status")
    if not lifetime and etag is None and last_modified is None:
        # Nothing fresh to serve and nothing to revalidate with: storing buys nothing.
        return ResponsePolicy(False, "no freshness and no validator")

    apparent_age = max(0.0, response_time - date_value)
    corrected_age = age_header(headers) + (response_time - request_time)
    no_cache_arg = cc.get("no-cache", INVALID) if "no-cache" in cc else INVALID
    no_cache = "no-cache" in cc and no_cache_arg is None
    omit = field_names(no_cache_arg) | field_names(private)
    no_stale = no_cache or must_revalidate or "proxy-revalidate" in cc or "s-maxage" in cc
    return ResponsePolicy(
        True,
        lifetime=lifetime or 0.0,
        initial_age=max(apparent_age, corrected_age),
        no_cache=no_cache,
        no_stale=no_stale,
        stale_while_revalidate=float(delta_seconds(cc.get("stale-while-revalidate")) or 0),
        stale_if_error=float(delta_seconds(cc.get("stale-if-error")) or 0),
        auth_ok=public or "s-maxage" in cc or must_revalidate,
        omit=omit,
        vary=vary,
        etag=etag,
        last_modified=last_modified,
        date=date_value,
    )


def storable_fields(
    headers: Headers, omit: frozenset[str], also: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The header fields a stored response keeps (RFC 9111 3.1)."""
    drop = NOT_STORED | omit | also
    if "Connection" in headers:
        drop = drop | {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


# Fields a 304 must not change in the stored response (RFC 9111 3.2): framing, and
# what the stored body and its selection depend on.
NOT_UPDATED = NOT_STORED | {"content-encoding", "content-range", "vary"}


def merge_not_modified(
    stored: list[tuple[str, str]], update: Headers, omit: frozenset[str]
) -> list[tuple[str, str]]:
    """Stored fields updated from a 304 (or HEAD) response: its fields replace stored ones."""
    drop = NOT_UPDATED | omit
    if "Connection" in update:
        drop = drop | {t.strip().lower() for v in update.getall("Connection") for t in v.split(",")}
    fresh = [(k, v) for k, v in update.items() if k.lower() not in drop]
    replaced = {k.lower() for k, _ in fresh}
    return [(k, v) for k, v in stored if k.lower() not in replaced] + fresh


# --- the request ---------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRules:
    """What a request's Cache-Control (or Pragma) asks of the cache."""

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age: float | None = None
    min_fresh: float = 0.0
    # None: no max-stale; inf: any staleness.
    max_stale: float | None = None
    stale_if_error: float = 0.0


def parse_request(headers: Headers) -> RequestRules:
    """Request directives (RFC 9111 5.2.1); Pragma: no-cache counts when Cache-Control is absent."""
    lines = headers.getall("Cache-Control", ())
    if not lines:
        pragma = headers.get("Pragma", "").lower()
        return RequestRules(no_cache="no-cache" in pragma)
    cc = parse_directives(lines)
    rules = RequestRules(
        no_cache="no-cache" in cc,
        no_store="no-store" in cc,
        only_if_cached="only-if-cached" in cc,
    )
    if "max-age" in cc:
        max_age = delta_seconds(cc["max-age"])
        rules.max_age = float(max_age) if max_age is not None else 0.0
    if "min-fresh" in cc:
        rules.min_fresh = float(delta_seconds(cc["min-fresh"]) or 0)
    if "max-stale" in cc:
        arg = cc["max-stale"]
        stale = delta_seconds(arg) if arg is not None else None
        rules.max_stale = float("inf") if arg is None else float(stale or 0)
    if "stale-if-error" in cc:
        rules.stale_if_error = float(delta_seconds(cc["stale-if-error"]) or 0)
    return rules


def fresh_enough(rules: RequestRules | None, age: float, ttl: float) -> bool:
    """May a response of this age and remaining freshness answer this request without validation?"""
    if rules is None:
        return ttl > 0
    if rules.no_cache:
        return False
    if rules.max_age is not None and age > rules.max_age:
        return False
    if ttl - rules.min_fresh > 0:
        return True
    return rules.max_stale is not None and ttl <= 0 and -ttl <= rules.max_stale


# --- conditional requests answered by the cache (RFC 9110 13.2, RFC 9111 4.3.2) -----------


def etag_in(header: str, etag: str) -> bool:
    """Weak comparison of an entity tag against an If-None-Match list."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in header.split(","))


def not_modified(
    request: Headers, etag: str | None, last_modified: str | None, date: float, received: float
) -> bool:
    """Should the cache answer 304 to this conditional request for the stored response?"""
    inm = request.get("If-None-Match")
    if inm is not None:
        return etag is not None and etag_in(inm, etag)
    ims = request.get("If-Modified-Since")
    if ims is None:
        return False
    since = http_date(ims)
    if since is None:
        return False
    stamp = http_date(last_modified) if last_modified else None
    if stamp is None:
        stamp = date or received
    return stamp <= since
