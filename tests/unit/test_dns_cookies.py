"""DNS Cookies (RFC 7873) with RFC 9018 server cookies, through the answer function."""

from __future__ import annotations

import struct

import dns.edns
import dns.message
import dns.rcode
import pytest

from dnsd import rrl as rrl_mod
from dnsd.build import TableBuilder
from dnsd.config import RRLConfig
from dnsd.cookies import Secrets, ServerCookies, decode_secrets, encode_secrets, packed_address
from dnsd.respond import NEEDS_PEER, VALIDATED, Answerer
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE, edges

SECRET = bytes.fromhex("e5e973e5a6b2a43f48e7dc849e37bfcf")
CLIENT = bytes.fromhex("2464c4abcf10c957")
NOW = 1559731985


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rfc9018_test_vector() -> None:
    """RFC 9018 Appendix A.1: client 198.51.100.100, the secret and time above."""
    cookies = ServerCookies(Secrets(SECRET), Clock())
    server = cookies.make(CLIENT, packed_address("198.51.100.100"))
    assert server.hex() == "010000005cf79f111f8130c3eee29480"
    assert cookies.check(CLIENT + server, packed_address("198.51.100.100")) == (True, True)
    assert cookies.check(CLIENT + server, packed_address("198.51.100.101")) == (False, False)


def test_timestamps_and_secret_rotation() -> None:
    clock = Clock()
    cookies = ServerCookies(Secrets(SECRET), clock)
    client = packed_address("192.0.2.1")
    cookie = CLIENT + cookies.make(CLIENT, client)
    clock.now = NOW + 1799
    assert cookies.check(cookie, client) == (True, True)
    clock.now = NOW + 1801  # valid, but a fresh one is handed out (RFC 9018 §4.3)
    assert cookies.check(cookie, client) == (True, False)
    clock.now = NOW + 3601  # more than an hour old
    assert cookies.check(cookie, client) == (False, False)
    clock.now = NOW - 301  # more than 5 minutes in the future
    assert cookies.check(cookie, client) == (False, False)
    clock.now = NOW
    cookies.secrets = Secrets(b"\x01" * 16, SECRET)  # rotated: the old secret still validates
    assert cookies.check(cookie, client) == (True, False)
    cookies.secrets = Secrets(b"\x02" * 16, b"\x01" * 16)  # rotated twice: gone
    assert cookies.check(cookie, client) == (False, False)


def test_secret_encoding_round_trips_and_rejects_junk() -> None:
    s = Secrets(SECRET, b"\x07" * 16)
    assert decode_secrets(encode_secrets(s, 12.5)) == (s, 12.5)
    for bad in (b"{}", b"[]", b'{"current": "00", "rotated": 1}', b"garbage"):
        with pytest.raises((ValueError, KeyError, TypeError)):
            decode_secrets(bad)


@pytest.fixture
def table() -> AnswerTable:
    builder = TableBuilder(compile_zones([ZONE]))
    builder.cookies = ServerCookies(Secrets(SECRET))
    return builder.build(edges(3), revision=42)


def ask(table: AnswerTable, cookie: bytes, name: str = "www.example.test", host: str = "192.0.2.1"):
    q = dns.message.make_query(name, "A", use_edns=0, options=[dns.edns.GenericOption(10, cookie)])
    raw = q.to_wire()
    answerer = Answerer()
    response, key = answerer.respond(raw, table, True)
    assert response is None and key == NEEDS_PEER  # the answer depends on the client address
    response, key = answerer.respond_peer(raw, table, True, host)
    assert response is not None
    return dns.message.from_wire(response), key, answerer, raw


def server_cookie(r: dns.message.Message) -> bytes:
    (opt,) = [o for o in r.options if o.otype == 10]
    data = opt.to_wire() if hasattr(opt, "to_wire") else opt.data
    return bytes(data)


def test_client_cookie_alone_gets_an_answer_and_a_server_cookie(table: AnswerTable) -> None:
    r, key, _, _ = ask(table, CLIENT)
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 3
    cookie = server_cookie(r)
    assert cookie[:8] == CLIENT and len(cookie) == 24 and cookie[8] == 1  # RFC 9018 version 1
    assert key != VALIDATED
    # Sent back from the same address: valid, so the answer is exempt from RRL.
    r, key, _, _ = ask(table, cookie)
    assert key == VALIDATED and server_cookie(r) == cookie  # fresh: echoed unchanged
    # From another address the same cookie is worthless.
    r, key, _, _ = ask(table, cookie, host="192.0.2.2")
    assert key != VALIDATED and server_cookie(r) != cookie


def test_rate_limited_clients_with_a_bad_cookie_get_badcookie(table: AnswerTable) -> None:
    forged = CLIENT + b"\x01\x00\x00\x00" + b"\x00" * 12
    r, key, answerer, raw = ask(table, forged)
    assert r.rcode() == dns.rcode.NOERROR and key != VALIDATED  # answered, not trusted
    slip = answerer.truncate(raw, table)  # what RRL sends instead of this answer
    assert slip is not None
    m = dns.message.from_wire(slip)
    assert m.rcode() == dns.rcode.BADCOOKIE and not m.answer and m.question
    fresh = server_cookie(m)
    assert fresh[:8] == CLIENT and fresh != forged
    _, key, _, _ = ask(table, fresh)  # the client retries with it and is through
    assert key == VALIDATED


def test_valid_cookie_exempts_from_rrl() -> None:
    limiter = rrl_mod.RateLimiter(RRLConfig(enabled=True, responses_per_second=1, slip=2), clock=lambda: 0)
    verdicts = [limiter.check("192.0.2.1", b"www") for _ in range(10)]
    assert rrl_mod.SLIP in verdicts and rrl_mod.DROP in verdicts
    assert all(limiter.check("192.0.2.1", VALIDATED) == rrl_mod.SEND for _ in range(100))


@pytest.mark.parametrize("length", [1, 7, 9, 15, 41])
def test_malformed_cookie_lengths_are_formerr(table: AnswerTable, length: int) -> None:
    r, _, _, _ = ask(table, b"\x01" * length)
    assert r.rcode() == dns.rcode.FORMERR


def test_a_query_with_only_a_cookie_gets_a_server_cookie(table: AnswerTable) -> None:
    """RFC 7873 §5.4: QDCOUNT 0 and a COOKIE option."""
    q = dns.message.make_query(
        "www.example.test", "A", use_edns=0, options=[dns.edns.GenericOption(10, CLIENT)]
    )
    raw = q.to_wire()
    raw = raw[:4] + struct.pack("!HHHH", 0, 0, 0, 1) + raw[12 + len(b"\x03www\x07example\x04test\x00") + 4 :]
    answerer = Answerer()
    response, key = answerer.respond(raw, table, True)
    assert response is None and key == NEEDS_PEER
    response, _ = answerer.respond_peer(raw, table, True, "192.0.2.1")
    assert response is not None
    r = dns.message.from_wire(response)
    assert r.rcode() == dns.rcode.NOERROR and not r.question and server_cookie(r)[:8] == CLIENT


def test_cookies_off_options_ignored_and_no_peer_needed() -> None:
    table = TableBuilder(compile_zones([ZONE])).build(edges(3), revision=1)
    q = dns.message.make_query(
        "www.example.test", "A", use_edns=0, options=[dns.edns.GenericOption(10, CLIENT)]
    )
    response, _ = Answerer().respond(q.to_wire(), table, True)
    assert response is not None and dns.message.from_wire(response).options == ()
