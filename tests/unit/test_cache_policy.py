"""RFC 9111 rules without sockets: field parsing, storing, freshness, age, request rules, 304s."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from edge.core.config import RouteConfig
from edge.core.fields import accepted_codings
from edge.features.cache.fields import (
    INVALID,
    MAX_DELTA,
    age_header,
    delta_seconds,
    http_date,
    parse_directives,
    parse_targeted,
    vary_names,
)
from edge.features.cache.key import KeyRule, url_key, vary_value
from edge.features.cache.policy import (
    COOKIE_FIELDS,
    HeuristicRule,
    analyze_response,
    fresh_enough,
    merge_not_modified,
    not_modified,
    parse_request,
    storable_fields,
)

NOW = 1_800_000_000.0


def H(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def date(offset: float = 0.0) -> str:
    return formatdate(NOW + offset, usegmt=True)


def analyze(status: int = 200, *pairs: tuple[str, str], **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("request_time", NOW)
    kw.setdefault("response_time", NOW)
    return analyze_response(status, H(("Date", date()), *pairs), **kw)  # type: ignore[arg-type]


# --- directive parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["max-age=60"], {"max-age": "60"}),
        (["Max-Age=60, Public"], {"max-age": "60", "public": None}),
        (['max-age="60"'], {"max-age": "60"}),
        (['extension="max-age=3600", max-age=1'], {"extension": "max-age=3600", "max-age": "1"}),
        (['no-cache="a, b", private'], {"no-cache": "a, b", "private": None}),
        (["max-age =60, public"], {"public": None}),  # space before '=': not a directive
        (["max-age= 60, public"], {"public": None}),  # space after '='
        ([",,  max-age=5 ,"], {"max-age": "5"}),
        (["max-age=1", "max-age=1"], {"max-age": "1"}),
        (["max-age=1800, max-age=1"], {"max-age": INVALID}),  # conflicting duplicates
        (['no-cache="a"', 'no-cache="b"'], {"no-cache": "a, b"}),
        (['no-cache="a"', "no-cache"], {"no-cache": None}),  # unqualified is the stricter
        (['x="unterminated'], {}),
    ],
)
def test_cache_control_parsing(lines: list[str], expected: dict[str, str | None]) -> None:
    assert parse_directives(lines) == expected


@pytest.mark.parametrize(
    ("arg", "value"),
    [("60", 60), ("003600", 3600), ("0", 0), ("99999999999", MAX_DELTA), ("3600.0", None), ("a1", None),
     ("-1", None), ("'60'", None), (None, None), ("", None), ("٣", None)],
)  # fmt: skip
def test_delta_seconds(arg: str | None, value: int | None) -> None:
    assert delta_seconds(arg) == value


def test_targeted_field_is_a_structured_dictionary() -> None:
    assert parse_targeted("max-age=60, stale-if-error=30") == {"max-age": "60", "stale-if-error": "30"}
    assert parse_targeted("no-store") == {"no-store": None}
    assert parse_targeted('no-cache="a";x=1, public=?1') == {"no-cache": "a", "public": None}
    assert parse_targeted("private=?0") == {}  # false booleans are absent directives
    assert not parse_targeted("")  # an empty Dictionary: no directives, Cache-Control applies
    for bad in ("max-age=", "Max-Age=60", "max-age=60,", "max-age=60 public", "max-age='60'"):
        assert parse_targeted(bad) is None, bad


def test_http_dates_in_all_three_formats() -> None:
    assert http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0
    assert http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777.0
    assert http_date("Sun Nov  6 08:49:37 1994") == 784111777.0
    assert http_date("0") is None
    assert http_date("yesterday") is None


@pytest.mark.parametrize(
    ("values", "age"),
    [
        ([], 0.0),
        (["30"], 30.0),
        ([" 30 "], 30.0),
        # RFC 9111 5.1: not a non-negative integer -> ignored, as if absent.
        (["abc"], 0.0),
        (["-5"], 0.0),
        (["7200.0"], 0.0),
        (["7200;foo=111"], 0.0),
        ([""], 0.0),
        # A list: the first member counts, the others are discarded.
        (["7200,0"], 7200.0),
        (["0, 7200"], 0.0),
        (["0, 0"], 0.0),
        (["7200", "0"], 7200.0),
        (["0", "7200"], 0.0),
        (["3600", "3600"], 3600.0),
        # RFC 9111 1.2.2: delta-seconds beyond 2^31 are 2^31.
        (["2147483647"], 2147483647.0),
        (["2147483649"], float(MAX_DELTA)),
        (["99999999999999999999"], float(MAX_DELTA)),
    ],
)
def test_age_uses_the_first_member_and_ignores_invalid_values(values: list[str], age: float) -> None:
    assert age_header(H(*[("Age", v) for v in values])) == age
    policy = analyze(200, ("Cache-Control", "max-age=3600"), *[("Age", v) for v in values])
    assert (policy.initial_age < policy.lifetime) == (age < 3600)


def test_vary_names() -> None:
    assert vary_names(H(("Vary", "Accept-Encoding, X-Lang"), ("Vary", "x-lang"))) == (
        "accept-encoding",
        "x-lang",
    )
    assert vary_names(H(("Vary", "Accept, *"))) is None
    assert vary_names(H()) == ()


# --- storing (RFC 9111 3) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "pairs", "storable", "reason"),
    [
        (200, [("Cache-Control", "max-age=60")], True, ""),
        (200, [("Cache-Control", "no-store, max-age=60")], False, "no-store"),
        (200, [("Cache-Control", "private, max-age=60")], False, "private"),
        (200, [("Cache-Control", 'private="x-user", max-age=60')], True, ""),
        (200, [("Cache-Control", "max-age=60"), ("Vary", "*")], False, "vary *"),
        (200, [], False, "no freshness and no validator"),
        (200, [("ETag", '"v1"')], True, ""),  # stored, stale at once, revalidated
        (500, [("ETag", '"v1"')], False, "no explicit freshness for this status"),
        (500, [("Cache-Control", "max-age=60")], True, ""),
        (302, [("Cache-Control", "max-age=60")], True, ""),
        (206, [("Cache-Control", "max-age=60")], False, "status"),
        (304, [("Cache-Control", "max-age=60")], False, "status"),
        (200, [("Cache-Control", "max-age=0")], False, "no freshness and no validator"),
        (200, [("Cache-Control", "must-understand, no-store, max-age=60")], True, ""),
        (299, [("Cache-Control", "must-understand, no-store, max-age=60")], False, "must-understand"),
        # Content-Range means nothing outside 206/416 (RFC 9110 14.4): a complete response.
        (200, [("Cache-Control", "max-age=60"), ("Content-Range", "bytes 0-1/10")], True, ""),
    ],
)
def test_what_a_shared_cache_may_store(
    status: int, pairs: list[tuple[str, str]], storable: bool, reason: str
) -> None:
    policy = analyze(status, *pairs)
    assert (policy.storable, policy.reason) == (storable, reason)


def test_authorization_needs_public_s_maxage_or_must_revalidate() -> None:
    assert not analyze(200, ("Cache-Control", "max-age=60"), authorized=True).storable
    for cc in ("public, max-age=60", "s-maxage=60", "must-revalidate, max-age=60"):
        policy = analyze(200, ("Cache-Control", cc), authorized=True)
        assert policy.storable and policy.auth_ok, cc
    assert not analyze(200, ("Cache-Control", "max-age=60")).auth_ok


def test_request_no_store_prevents_storing() -> None:
    assert not analyze(200, ("Cache-Control", "max-age=60"), request_no_store=True).storable


# --- freshness (RFC 9111 4.2) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "lifetime"),
    [
        ([("Cache-Control", "max-age=60")], 60),
        ([("Cache-Control", "max-age=60, s-maxage=10")], 10),  # shared cache: s-maxage first
        ([("Cache-Control", "max-age=60"), ("Expires", date(3600))], 60),  # max-age beats Expires
        ([("Expires", date(120))], 120),
        ([("Expires", "0"), ("ETag", '"x"')], 0),  # invalid: already expired
        ([("Expires", date(120)), ("Expires", date(240)), ("ETag", '"x"')], 0),
        ([("Cache-Control", "max-age=a60"), ("ETag", '"x"')], 0),  # invalid: stale
        ([("Cache-Control", "max-age=1800, max-age=1"), ("ETag", '"x"')], 0),
        ([("Cache-Control", 'max-age="120"')], 120),
    ],
)
def test_freshness_lifetime(pairs: list[tuple[str, str]], lifetime: float) -> None:
    policy = analyze(200, *pairs)
    assert policy.storable and policy.lifetime == lifetime


def test_targeted_field_replaces_cache_control_and_expires() -> None:
    policy = analyze(200, ("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=300"))
    assert policy.storable and policy.lifetime == 300
    ignored_expires = analyze(
        200, ("Expires", date(900)), ("CDN-Cache-Control", "must-revalidate"), ("ETag", '"e"')
    )
    assert ignored_expires.lifetime == 0 and ignored_expires.no_stale
    # Invalid targeted field: Cache-Control governs.
    assert analyze(200, ("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=x y")).lifetime == 5
    # Not on the target list: ignored.
    assert not analyze(200, ("CDN-Cache-Control", "max-age=300"), targeted=()).storable


def test_heuristic_freshness_only_when_enabled_and_allowed() -> None:
    old = ("Last-Modified", date(-10 * 86400))
    assert analyze(200, old).lifetime == 0  # off by default: stored for revalidation only
    rule = HeuristicRule(0.1, 86400)
    assert analyze(200, old, heuristic=rule).lifetime == pytest.approx(86400)
    assert analyze(200, ("Last-Modified", date(-1000)), heuristic=rule).lifetime == pytest.approx(100)
    # Never when explicit freshness exists, never for a status not heuristically cacheable.
    assert analyze(200, old, ("Cache-Control", "max-age=7"), heuristic=rule).lifetime == 7
    assert not analyze(500, old, heuristic=rule).storable
    assert analyze(500, old, ("Cache-Control", "public"), heuristic=rule).lifetime == pytest.approx(86400)


def test_initial_age_uses_age_date_and_delays() -> None:
    policy = analyze(200, ("Cache-Control", "max-age=60"), ("Age", "10"), request_time=NOW - 2)
    assert policy.initial_age == pytest.approx(12)  # Age + response delay
    skewed = analyze_response(
        200,
        H(("Date", date(-30)), ("Cache-Control", "max-age=60")),
        request_time=NOW,
        response_time=NOW,
    )
    assert skewed.initial_age == pytest.approx(30)  # apparent age from Date


def test_stale_rules_from_directives() -> None:
    swr = analyze(200, ("Cache-Control", "max-age=1, stale-while-revalidate=30, stale-if-error=60"))
    assert (swr.stale_while_revalidate, swr.stale_if_error, swr.no_stale) == (30, 60, False)
    for cc in ("max-age=1, must-revalidate", "max-age=1, proxy-revalidate", "s-maxage=1", "no-cache"):
        policy = analyze(200, ("Cache-Control", cc), ("ETag", '"e"'))
        assert policy.no_stale, cc
    no_cache = analyze(200, ("Cache-Control", "no-cache, max-age=60"))
    assert no_cache.storable and no_cache.no_cache
    qualified = analyze(200, ("Cache-Control", 'no-cache="X-A", max-age=60'))
    assert not qualified.no_cache and qualified.omit == {"x-a"}


# --- stored fields and 304 merges ----------------------------------------------------------


def test_fields_never_stored() -> None:
    headers = H(
        ("Content-Type", "text/plain"),
        ("Connection", "x-hop, close"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Age", "3"),
        ("Content-Length", "10"),
        ("X-Secret", "s"),
        ("Proxy-Authenticate", "Basic"),
    )
    kept = storable_fields(headers, frozenset({"x-secret"}))
    assert kept == [("Content-Type", "text/plain")]


def test_set_cookie_is_stored_unless_the_entry_omits_it() -> None:
    # RFC 9111 7.3: Set-Cookie does not inhibit caching; a route may keep it out.
    headers = H(("Content-Type", "text/plain"), ("Set-Cookie", "a=b"), ("Set-Cookie2", "c=d"))
    assert storable_fields(headers, frozenset()) == list(headers.items())
    assert storable_fields(headers, COOKIE_FIELDS) == [("Content-Type", "text/plain")]
    # A 304's Set-Cookie updates a stored one (RFC 9111 3.2) unless the entry omits them.
    stored = [("Content-Type", "text/plain"), ("Set-Cookie", "a=b")]
    update = H(("Set-Cookie", "a=c"))
    assert merge_not_modified(stored, update, frozenset()) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=c"),
    ]
    assert merge_not_modified(stored[:1], update, COOKIE_FIELDS) == [("Content-Type", "text/plain")]


def test_304_fields_replace_stored_ones_except_framing() -> None:
    stored = [
        ("Content-Type", "text/plain"),
        ("X-V", "1"),
        ("X-V", "1b"),
        ("ETag", '"a"'),
        ("Vary", "X"),
        ("Content-MD5", "stored=="),
    ]
    update = H(
        ("X-V", "2"),
        ("Content-Length", "0"),
        ("Vary", "Y"),
        ("Content-Type", "text/html"),
        ("Content-MD5", "other=="),  # a digest of the stored body: a 304 cannot change it
    )
    merged = merge_not_modified(stored, update, frozenset())
    assert sorted(merged) == sorted(
        [
            ("ETag", '"a"'),
            ("Vary", "X"),
            ("X-V", "2"),
            ("Content-Type", "text/html"),
            ("Content-MD5", "stored=="),
        ]
    )


# --- requests ------------------------------------------------------------------------------


def test_request_directives() -> None:
    assert parse_request(H(("Pragma", "no-cache"))).no_cache
    assert not parse_request(H(("Pragma", "no-cache"), ("Cache-Control", "max-age=5"))).no_cache
    rules = parse_request(H(("Cache-Control", "max-age=5, min-fresh=2, max-stale, only-if-cached")))
    assert (rules.max_age, rules.min_fresh, rules.max_stale, rules.only_if_cached) == (
        5,
        2,
        float("inf"),
        True,
    )
    assert parse_request(H(("Cache-Control", "max-stale=30"))).max_stale == 30
    assert parse_request(H(("Cache-Control", "max-age=abc"))).max_age == 0


def test_fresh_enough_for_a_request() -> None:
    assert fresh_enough(None, age=10, ttl=50)
    assert not fresh_enough(None, age=70, ttl=-10)
    assert not fresh_enough(parse_request(H(("Cache-Control", "no-cache"))), 1, 59)
    assert not fresh_enough(parse_request(H(("Cache-Control", "max-age=5"))), 10, 50)
    assert not fresh_enough(parse_request(H(("Cache-Control", "min-fresh=60"))), 10, 50)
    assert fresh_enough(parse_request(H(("Cache-Control", "max-stale=20"))), 70, -10)
    assert not fresh_enough(parse_request(H(("Cache-Control", "max-stale=5"))), 70, -10)


def test_conditional_requests_answered_by_the_cache() -> None:
    lm = date(-100)
    assert not_modified(H(("If-None-Match", '"a", W/"b"')), 'W/"b"', None, NOW, NOW)
    assert not not_modified(H(("If-None-Match", '"c"')), '"b"', lm, NOW, NOW)
    assert not_modified(H(("If-None-Match", "*")), '"b"', None, NOW, NOW)
    # If-None-Match wins over If-Modified-Since.
    assert not not_modified(H(("If-None-Match", '"c"'), ("If-Modified-Since", date())), '"b"', lm, NOW, NOW)
    assert not_modified(H(("If-Modified-Since", date(-50))), None, lm, NOW, NOW)
    assert not not_modified(H(("If-Modified-Since", date(-200))), None, lm, NOW, NOW)
    # No Last-Modified: the Date, then the time it was received.
    assert not_modified(H(("If-Modified-Since", date(10))), None, None, NOW, NOW)
    assert not not_modified(H(("If-Modified-Since", "garbage")), None, lm, NOW, NOW)


# --- keys ----------------------------------------------------------------------------------


def test_key_rules_for_query_strings() -> None:
    plain = KeyRule()
    assert plain.target("/a?b=1&a=2") == "/a?b=1&a=2"
    rule = KeyRule(
        RouteConfig(path="/", respond=200, cache_ignore_query=["utm_*", "fbclid"], cache_sort_query=True)
    )
    assert rule.target("/a?utm_source=x&b=1&fbclid=z&a=2") == "/a?a=2&b=1"
    assert rule.target("/a?utm_source=x") == "/a"
    assert KeyRule(RouteConfig(path="/", respond=200, cache_ignore_query=["*"])).target("/a?x=1") == "/a"


def test_url_keys_for_purges() -> None:
    assert url_key("http://WWW.Example.Test:8080/a?b#frag") == ("www.example.test", "/a?b")
    assert url_key("https://host") == ("host", "/")
    assert url_key("/relative") is None
    assert url_key("ftp://host/x") is None


def test_accept_encoding_reduces_to_the_accepted_set() -> None:
    assert accepted_codings("gzip, deflate, br") == "br,deflate,gzip"
    assert accepted_codings("br;q=1.0, gzip;q=0.8, *;q=0.1") == "*,br,gzip"
    assert accepted_codings("gzip;q=0, identity") == ""
    assert accepted_codings("x-gzip") == "gzip"
    h = H(("Accept-Encoding", "gzip, br"), ("X-A", "a ,b"))
    assert vary_value("accept-encoding", h) == "br,gzip"
    assert vary_value("x-a", h) == "a,b"
    assert vary_value("x-missing", h) != vary_value("x-empty", H(("X-Empty", "")))


@given(st.lists(st.sampled_from(["max-age=5", "public", 'a="x,y"', "no-cache", ", ", "s-maxage=1", "=", '"']),
                max_size=8))  # fmt: skip
def test_directive_parsing_never_fails(parts: list[str]) -> None:
    parse_directives(["".join(parts)])
    parse_targeted("".join(parts))
