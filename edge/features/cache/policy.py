"""RFC 9111 (HTTP caching) rules as pure functions and tables: no I/O, no clock of their own.

Theory of operation
-------------------
A response is looked at once, when it arrives: ``analyze_response`` reads its
directives (Cache-Control, or the first valid targeted field such as
CDN-Cache-Control, RFC 9213; parsing lives in edge/cache/fields.py), decides
whether a shared cache may store it (section 3), computes its freshness
lifetime (4.2.1, heuristics only when enabled and allowed, 4.2.2) and its
corrected initial age (4.2.3), and records what later reuse decisions need
(no-cache, must-revalidate, stale extensions, Authorization rules). The result
is a ``ResponsePolicy``: plain fields that the hit path reads without parsing
anything again.

A request is looked at only when it carries Cache-Control or Pragma
(``parse_request``). ``current_age`` is one addition and one subtraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from edge.features.cache.fields import (
    INVALID,
    Headers,
    age_header,
    delta_seconds,
    field_names,
    http_date,
    parse_directives,
    parse_surrogate_control,
    parse_targeted,
    vary_names,
)

# RFC 9110 15.1: status codes a cache may store with heuristic freshness.
HEURISTIC_STATUS = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Final status codes this cache understands (for must-understand, RFC 9111 5.2.2.3).
UNDERSTOOD_STATUS = frozenset(s.value for s in HTTPStatus if s.value >= 200) - {206}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Never stored (RFC 9111 3.1): hop-by-hop fields, proxy-specific fields, framing and
# Age (recomputed on every reuse).
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
    }
)
# RFC 9111 7.3: Set-Cookie does not inhibit storing, and a stored one is replayed to
# every client. A route chooses (`cache_set_cookie`): such responses not stored, stored
# without these fields (they join the entry's omitted fields), or stored with them.
COOKIE_FIELDS = frozenset({"set-cookie", "set-cookie2"})
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


def _directives(
    headers: Headers, targeted: tuple[str, ...], device: str
) -> tuple[dict[str, str | None], bool]:
    """The governing directives: the first valid targeted field, else Cache-Control."""
    for name in targeted:
        lines = headers.getall(name, ())
        if lines:
            if name == "surrogate-control":  # not a Structured Field: its own syntax
                parsed = parse_surrogate_control(", ".join(lines), device)
            else:
                parsed = parse_targeted(", ".join(lines))
            if parsed:
                return parsed, True
    return parse_directives(headers.getall("Cache-Control", ())), False


# Lifetimes as floats, one object per distinct value: every entry keeps its lifetime, and
# max-age values repeat (a site uses a handful); bounded, as the values come from members.
_LIFETIMES: dict[int, float] = {}


def _seconds(value: int) -> float:
    seconds = _LIFETIMES.get(value)
    if seconds is None:
        seconds = float(value)
        if len(_LIFETIMES) < 1024:
            _LIFETIMES[value] = seconds
    return seconds


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
    device: str = "carousel",
) -> ResponsePolicy:
    """Decide storing, freshness and reuse rules for a response to a GET (RFC 9111 3, 4.2).

    ``device``: this cache's name in Surrogate-Control targets, when that field is targeted.
    """
    cc, from_targeted = _directives(headers, targeted, device)
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
    # Content-Range outside a 206 or 416 has no meaning (RFC 9110 14.4): an ordinary field
    # of a complete response. (Requests with Range are never stored: edge/cache/feature.py.)

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
        lifetime = _seconds(max_age) if max_age is not None else 0.0
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
        # float(0) would be a new object (24 bytes) in every cached entry; the constant is shared.
        stale_while_revalidate=float(delta_seconds(cc.get("stale-while-revalidate")) or 0) or 0.0,
        stale_if_error=float(delta_seconds(cc.get("stale-if-error")) or 0) or 0.0,
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
# what the stored body and its selection depend on (Content-MD5 is a digest of that body).
NOT_UPDATED = NOT_STORED | {"content-encoding", "content-range", "content-md5", "vary"}


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
