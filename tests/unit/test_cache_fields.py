"""Cache field parsing to the letter of the RFCs: HTTP-date (RFC 9110 5.6.7), Expires
(RFC 9111 5.3), targeted fields (RFC 9213) and Cache-Status (RFC 9211) as Structured
Fields (RFC 8941 / RFC 9651), and a property test over hostile header values."""

from __future__ import annotations

import re
from calendar import timegm
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from edge.features.cache.fields import (
    INVALID,
    MAX_DELTA,
    cache_status_name,
    http_date,
    parse_cache_status,
    parse_surrogate_control,
    parse_targeted,
)
from edge.features.cache.key import vary_values
from edge.features.cache.policy import analyze_response, merge_not_modified, storable_fields

NOW = 1_800_000_000.0  # 2027-01-15
SUNDAY_1994 = 784111777.0  # RFC 9110 5.6.7's example instant


def H(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


# --- HTTP-date (RFC 9110 5.6.7) ------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850 format
        "Sun Nov  6 08:49:37 1994",  # ANSI C's asctime() format
        "SUN, 06 NOV 1994 08:49:37 gmt",  # names in another case: unambiguous, accepted
    ],
)
def test_the_three_http_date_forms_are_accepted(value: str) -> None:
    assert http_date(value, now=NOW) == SUNDAY_1994


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "-1",
        "yesterday",
        "Thu, 18 Aug 2050 02:01:18 UTC",  # only GMT
        "Thu, 18 Aug 2050 02:01:18 AEST",
        "Thu, 18 Aug 2050 02:01:18 +0000",
        "Thu, 18 Aug 50 02:01:18 GMT",  # two-digit year outside RFC 850
        "Thu 18 Aug 2050 02:01:18 GMT",  # missing comma
        "Thu, 18  Aug  2050 02:01:18 GMT",  # several spaces
        "Thu, 18-Aug-2050 02:01:18 GMT",  # dashes in an IMF-fixdate
        "Thu, 18 Aug 2050 02.01.18 GMT",  # periods in the time
        "Thu, 18 Aug 2050 2:01:18 GMT",  # one-digit hour
        "Thu, 8 Aug 2050 02:01:18 GMT",  # one-digit day in an IMF-fixdate
        "Thursday, 18 Aug 2050 02:01:18 GMT",  # long day name in an IMF-fixdate
        "Thu, 18-Aug-50 02:01:18 GMT",  # short day name in the RFC 850 form
        "Thu, 31 Feb 2050 02:01:18 GMT",  # no such day
        "Thu, 18 Aug 2050 24:00:00 GMT",
        "Thu, 18 Aug 2050 02:60:00 GMT",
        "Thu, 18 Aug 2050 02:01:61 GMT",
        "Thu, 18 Aug 2050 02:01:18 GMT junk",
        "Thu, 18 Aug 2050 02:01:18",
        "Xyz, 18 Aug 2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02:01:18 GMT".replace("1", "\u0661"),  # non-ASCII digits
    ],
)
def test_anything_else_is_not_a_date(value: str) -> None:
    assert http_date(value, now=NOW) is None


def test_rfc850_two_digit_years_more_than_50_years_ahead_are_in_the_past() -> None:
    # RFC 9110 5.6.7: seen in 2027, "76" is 2076 (49 years ahead), "78" is 1978.
    assert http_date("Monday, 05-Jan-76 00:00:00 GMT", now=NOW) == timegm((2076, 1, 5, 0, 0, 0))
    assert http_date("Sunday, 08-Jan-78 00:00:00 GMT", now=NOW) == timegm((1978, 1, 8, 0, 0, 0))


def test_leap_second_and_32_bit_boundaries() -> None:
    assert http_date("Tue, 19 Jan 2038 03:14:08 GMT") == 2**31
    assert http_date("Sat, 20 Nov 2286 17:46:39 GMT") == 9999999999.0
    assert http_date("Sat, 31 Dec 2016 23:59:60 GMT") == 1483228800.0


def lifetime(*pairs: tuple[str, str]) -> float:
    policy = analyze_response(
        200,
        H(("Date", formatdate(NOW, usegmt=True)), ("ETag", '"v"'), *pairs),
        request_time=NOW,
        response_time=NOW,
    )
    assert policy.storable
    return policy.lifetime


def test_an_invalid_expires_means_already_expired() -> None:
    # RFC 9111 5.3: a cache recipient MUST interpret invalid date formats as in the past.
    assert lifetime(("Expires", formatdate(NOW + 600, usegmt=True))) == 600
    for bad in ("0", "Thu, 18 Aug 2050 02:01:18 UTC", "Thu, 18 Aug 50 02:01:18 GMT"):
        assert lifetime(("Expires", bad)) == 0, bad
    # Two Expires lines are not one date.
    future = formatdate(NOW + 600, usegmt=True)
    assert lifetime(("Expires", future), ("Expires", future)) == 0


# --- Structured Fields: RFC 8941 examples through the targeted-field parser ---------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 8941 3.2: Dictionary examples (booleans true, parameters ignored).
        ('en="Applepie", da=:w4ZibGV0w6ZydGUK:', {"en": "Applepie", "da": "w4ZibGV0w6ZydGUK"}),
        ("a=?0, b, c; foo=bar", {"b": None, "c": None}),
        ("a=(1 2), b=3, c=4;aa=bb, d=(5 6);valid", {"b": "3", "c": "4"}),
        # Integers up to 15 digits (RFC 8941 3.3.1); larger delta-seconds are 2^31.
        ("max-age=999999999999999", {"max-age": str(MAX_DELTA)}),
        ("max-age=60, max-age=120", {"max-age": "120"}),  # last duplicate wins (4.2.2)
        ("max-age=60,max-age=5", {"max-age": "5"}),
        ("max-age=60 ,\tpublic", {"max-age": "60", "public": None}),
        # RFC 9213 2.1: a member of the wrong type is ignored, the rest stands.
        ('max-age="10000", no-store', {"no-store": None}),
        ("max-age=-1, public", {"public": None}),
        ("max-age=1.5, public", {"public": None}),
        ("max-age=?1, public", {"public": None}),
        ("no-cache=foo, public", {"public": None}),  # a Token, not a String
        ('no-cache="set-cookie"', {"no-cache": "set-cookie"}),
        ("private=?0", {}),
    ],
)
def test_targeted_dictionary_members(value: str, expected: dict[str, str | None]) -> None:
    if value.startswith("en="):  # byte sequences are an extension's argument, kept as text
        parsed = parse_targeted(value)
        assert parsed is not None and parsed["en"] == "Applepie"
        return
    assert parse_targeted(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "max-age=10000, &&&&&",  # RFC 8941 4.2: a key must start with lcalpha or "*"
        "MaX-aGe=3600",  # keys are lower case
        "max-age =100",
        "max-age= 100",
        "max-age=60,",
        "max-age=60 public",
        "max-age='60'",
        "max-age=1234567890123456",  # 16 digits: not an Integer
        'a="\u00e9"',  # non-ASCII
        'a="unterminated',
        "a=(1 2",
    ],
)
def test_an_unparsable_targeted_field_is_ignored_whole(value: str) -> None:
    assert parse_targeted(value) is None


def policy_of(*pairs: tuple[str, str]):  # type: ignore[no-untyped-def]
    return analyze_response(200, H(*pairs), request_time=NOW, response_time=NOW)


def test_cdn_cache_control_governs_and_falls_back_to_cache_control() -> None:
    # RFC 9213 2.1: a valid targeted field replaces Cache-Control...
    assert policy_of(("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=600")).lifetime == 600
    assert not policy_of(("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "no-store")).storable
    assert policy_of(("Cache-Control", "max-age=3600"), ("CDN-Cache-Control", "max-age=1")).lifetime == 1
    # ...Expires included (a targeted field's freshness ignores it).
    past = formatdate(NOW - 10000, usegmt=True)
    assert policy_of(("CDN-Cache-Control", "max-age=60"), ("Expires", past)).lifetime == 60
    # An unparsable one, or one left without a usable member, is ignored: Cache-Control applies.
    for cdn in ("max-age=10000, &&&&&", 'max-age="10000"', "MaX-aGe=10000"):
        assert not policy_of(("Cache-Control", "no-store"), ("CDN-Cache-Control", cdn)).storable, cdn
        assert policy_of(("Cache-Control", "max-age=5"), ("CDN-Cache-Control", cdn)).lifetime == 5, cdn


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("max-age=3600", {"max-age": "3600"}),
        ("MaX-aGe=3600, no-store", {"max-age": "3600", "no-store": None}),
        ("max-age=3600;carousel", {"max-age": "3600"}),  # targeted at this device
        ("max-age=3600;CAROUSEL", {"max-age": "3600"}),
        ("max-age=3600;other", None),  # targeted elsewhere: not ours
        ("no-store;other, max-age=5", {"max-age": "5"}),
        ('max-age=60+600, content="ESI/1.0"', {"max-age": "60", "content": "ESI/1.0"}),
        ('content="a;b"', {"content": "a;b"}),  # a ';' inside quotes is no target
        ("max-age =100", None),  # malformed, as in Cache-Control
        ("max-age=1, max-age=2", {"max-age": INVALID}),  # conflicting duplicates
    ],
)
def test_surrogate_control_members_for_this_device(value: str, expected: object) -> None:
    assert parse_surrogate_control(value, "carousel") == expected


def test_surrogate_control_is_a_targeted_field_when_configured() -> None:
    targeted = ("cdn-cache-control", "surrogate-control")

    def lifetime_of(*pairs: tuple[str, str]) -> float | None:
        policy = analyze_response(200, H(*pairs), request_time=NOW, response_time=NOW, targeted=targeted)
        return policy.lifetime if policy.storable else None

    assert lifetime_of(("Cache-Control", "no-store"), ("Surrogate-Control", "max-age=600")) == 600
    assert lifetime_of(("Cache-Control", "max-age=600"), ("Surrogate-Control", "no-store")) is None
    # CDN-Cache-Control comes first in the configured order.
    assert lifetime_of(("CDN-Cache-Control", "max-age=5"), ("Surrogate-Control", "max-age=600")) == 5
    # Not configured: Surrogate-Control means nothing to the edge.
    policy = analyze_response(
        200, H(("Cache-Control", "max-age=600"), ("Surrogate-Control", "no-store")), request_time=NOW,
        response_time=NOW,
    )  # fmt: skip
    assert policy.storable and policy.lifetime == 600


def test_cache_status_is_a_structured_list() -> None:
    # RFC 9211 2: members in order, the cache nearest the origin first.
    assert parse_cache_status(["OriginCache; hit; ttl=1100", '"CDN Company Here"; hit; ttl=545']) == [
        ("OriginCache", {"hit": True, "ttl": 1100}),
        ("CDN Company Here", {"hit": True, "ttl": 545}),
    ]
    assert parse_cache_status(["ExampleCache; fwd=uri-miss; stored"]) == [
        ("ExampleCache", {"fwd": "uri-miss", "stored": True})
    ]
    assert parse_cache_status(["a b"]) is None
    assert parse_cache_status(["1; hit"]) is None  # a member name is a Token or a String


def test_cache_status_names_are_serialised_as_tokens_or_strings() -> None:
    assert cache_status_name("carousel") == "carousel"
    assert cache_status_name("edge 1") == '"edge 1"'
    assert cache_status_name('a"b') == '"a\\"b"'
    for name in ("carousel", "edge 1", "1st", 'say "hi"'):
        assert parse_cache_status([f"{cache_status_name(name)}; hit"]) == [(name, {"hit": True})]


# --- property: no header value crashes the cache or buys freshness --------------------------

_FIELD_TEXT = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.text(max_size=12),
    st.sampled_from(
        ["0", "-1", "2147483648", "99999999999999999999", "max-age=60", 'max-age="60"', "*",
         "Sun, 06 Nov 1994 08:49:37 GMT", "Thu, 18 Aug 2050 02:01:18 GMT", "Thu, 18 Aug 50 02:01:18 GMT",
         "Thu 18 Aug 2050 02:01:18 GMT", "0, 7200", ""]
    ),
)  # fmt: skip
_NAMES = ("Age", "Expires", "Date", "Cache-Control", "CDN-Cache-Control", "Vary")


def _granted_seconds(controls: list[str]) -> int:
    """The largest delta-seconds any directive text could grant (capped as RFC 9111 1.2.2)."""
    numbers = [int(n) for v in controls for n in re.findall(r"[0-9]+", v)]
    return min(max(numbers, default=0), MAX_DELTA)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(_NAMES), _FIELD_TEXT), max_size=8),
    st.integers(0, 30),
    st.sampled_from([200, 203, 204, 301, 404, 410, 500, 599]),
)
def test_no_header_value_crashes_the_cache_or_makes_a_response_fresher_than_allowed(
    pairs: list[tuple[str, str]], delay: int, status: int
) -> None:
    headers = H(*pairs)
    policy = analyze_response(status, headers, request_time=NOW - delay, response_time=NOW)
    # What a stored response goes through next must not crash either: stored fields, Vary
    # matching against a request carrying the same hostile values, a 304 merge, Cache-Status.
    stored = storable_fields(headers, policy.omit)
    vary_values(policy.vary, headers)
    merge_not_modified(stored, headers, policy.omit)
    parse_cache_status([v for _, v in pairs])
    if not policy.storable:
        return
    # The corrected initial age never goes below the time the response spent in transit,
    # nor below a valid Age (RFC 9111 4.2.3).
    assert policy.initial_age >= delay
    first_age = headers.get("Age", "").split(",")[0].strip(" \t")
    if first_age.isascii() and first_age.isdigit():
        assert policy.initial_age >= min(int(first_age), MAX_DELTA)
    # Freshness comes only from what the response grants (RFC 9111 4.2.1): a delta-seconds
    # in Cache-Control / CDN-Cache-Control (never more than the largest number written there,
    # never past 2^31), else a valid Expires (never past it); heuristics are off here.
    assert policy.lifetime >= 0
    controls = [v for n, v in pairs if n in ("Cache-Control", "CDN-Cache-Control")]
    expires = [v for n, v in pairs if n == "Expires"]
    stamp = http_date(expires[0]) if len(expires) == 1 else None
    date_lines = [v for n, v in pairs if n == "Date"]
    date = http_date(date_lines[0]) if len(date_lines) == 1 else None
    from_expires = max(0.0, stamp - (NOW if date is None else date)) if stamp is not None else 0.0
    assert policy.lifetime <= max(_granted_seconds(controls), from_expires)
