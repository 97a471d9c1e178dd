"""Hardening rules as pure functions: path and Host normalisation, Forwarded, X-Forwarded-For hops, bans."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict

from edge.core.fields import TrustedProxies, hop_address
from edge.core.pipeline import BytesBody, Exchange, Reply
from edge.core.routing import parse_host
from edge.features.dos import ClientKeys, DosDetector
from edge.features.headers import forwarded_value
from edge.http.http1 import Head, ParseError, RequestParser, normalize_path
from edge.main import from_dict
from tests.unit.test_security import FakeEdge, _exchange

# --- paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/x/../admin/", "/admin/"),
        ("//admin/", "/admin/"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/a/b/../", "/a/"),
        ("/x/%2E%2E/admin", "/admin"),
        ("/x/.%2e/admin", "/admin"),
        ("/%41%7e%3f%2a", "/A~%3F%2A"),
        ("/%c3%a9", "/%C3%A9"),
        ("/a/.../b", "/a/.../b"),
        ("/a/..b/.c", "/a/..b/.c"),
        ("/a/%252e%252e/b", "/a/%252e%252e/b"),
    ],
)
def test_paths_are_normalised_once_per_rfc_3986(path: str, normal: str) -> None:
    assert normalize_path(path) == normal
    assert normalize_path(normal) == normal  # idempotent: a second pass changes nothing


@pytest.mark.parametrize(
    "path",
    [
        "/..",
        "/../a",
        "/a/../..",
        "/%2e%2e/",
        "/a%2fb",
        "/a%2Fb",
        "/a%5cb",
        "/a\\b",
        "/a%00",
        "/%zz",
        "/a%",
        "/a%4",
    ],
)
def test_paths_that_cannot_be_normalised_safely_are_refused(path: str) -> None:
    with pytest.raises(ParseError):
        normalize_path(path)


def test_the_parser_routes_and_forwards_the_normalised_path_and_keeps_the_query() -> None:
    events = RequestParser().feed(b"GET /a/%2e%2e//b/%63?x=/../%2e HTTP/1.1\r\nHost: h\r\n\r\n")
    head = events[0]
    assert isinstance(head, Head)
    assert (head.raw_path, head.path, head.query) == ("/b/c?x=/../%2e", "/b/c", "x=/../%2e")
    for bad in (b"GET /a#/../b HTTP/1.1\r\nHost: h\r\n\r\n", b"GET /../b HTTP/1.1\r\nHost: h\r\n\r\n"):
        parser = RequestParser()
        assert parser.feed(bad) == [] and parser.error is not None and parser.error.status == 400
    # The forward proxy's parser leaves an origin's path as it came.
    proxied = RequestParser(proxy=True).feed(b"GET http://o.test/a/../b HTTP/1.1\r\nHost: o.test\r\n\r\n")[0]
    assert isinstance(proxied, Head) and proxied.raw_path == "/a/../b"


# --- Host ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("", ""),
        ("www.example.test", "www.example.test"),
        ("WWW.Example.Test.:1337", "www.example.test"),
        ("[::1]:80", "[::1]"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("x:", "x"),
        ("a;b", "a;b"),
        ("a%2Db", "a%2db"),
    ],
)
def test_valid_hosts_are_normalised(value: str, host: str) -> None:
    assert parse_host(value) == host


@pytest.mark.parametrize(
    "value",
    ['a"b', "a/b", "a@b", "a b", "[::1", "[::1]x", "[v1.x]", "[fe80::1%eth0]", "[1.2.3.4]", "x:65536",
     "x:1:2", ":80", ".", "a%zz", "a\\b", "a,b c", "a\tb", "é.test"],
)  # fmt: skip
def test_invalid_hosts_are_refused(value: str) -> None:
    assert parse_host(value) is None


# --- Forwarded ----------------------------------------------------------------------------


def test_forwarded_values_are_tokens_or_escaped_quoted_strings() -> None:
    assert forwarded_value("192.0.2.1") == "192.0.2.1"
    assert forwarded_value("[2001:db8::1]") == '"[2001:db8::1]"'
    assert forwarded_value('x";for=1.2.3.4') == '"x\\";for=1.2.3.4"'
    assert forwarded_value("a\\b") == '"a\\\\b"'
    assert forwarded_value("h.test", quote=True) == '"h.test"'


# --- X-Forwarded-For and bans -------------------------------------------------------------


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("203.0.113.5", "203.0.113.5"),
        (" 203.0.113.5:4711 ", "203.0.113.5"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
        ("0.0.0.0/0", None),
        ("10.0.0.0/8", None),
        ("::/0", None),
        ("unknown", None),
        ("junk text", None),
        ("fe80::1%eth0", None),
        ("203.0.113.5:x", None),
        ("[::1]x", None),
        ("", None),
    ],
)
def test_forwarded_for_hops_are_ip_addresses(hop: str, address: str | None) -> None:
    assert hop_address(hop) == address


def test_the_client_is_the_rightmost_valid_untrusted_hop() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    assert trusted.client_of("10.0.0.1", ["203.0.113.7, 0.0.0.0/0"]) == "203.0.113.7"
    assert trusted.client_of("10.0.0.1", ["203.0.113.7", "junk, 10.0.0.2"]) == "203.0.113.7"
    assert trusted.client_of("10.0.0.1", ["0.0.0.0/0, junk"]) == "10.0.0.1"
    assert trusted.client_of("192.0.2.1", ["0.0.0.0/0"]) == "192.0.2.1"  # an untrusted peer is itself


def test_only_one_client_is_ever_a_ban_key() -> None:
    keys = ClientKeys(64)
    assert keys.bannable("203.0.113.5") and keys.bannable("2001:db8::/64")
    for key in ["0.0.0.0/0", "203.0.113.0/24", "203.0.113.5/32", "2001:db8::/48", "::/0", "2001:db8::1",
                "junk", "10.0.0.1/8", ""]:  # fmt: skip
        assert not keys.bannable(key), key


async def _ok(ex: Exchange) -> Reply:
    return Reply(200, CIMultiDict(), BytesBody(b"ok"))


async def test_a_range_or_junk_in_x_forwarded_for_is_never_banned() -> None:
    config = from_dict(
        {
            "edge": {"trusted_proxies": ["10.0.0.0/8"]},
            "dos": {"enabled": True, "cluster": False, "allowlist": [], "soft_rate": 3, "hard_rate": 5},
        }
    )
    dos = DosDetector(config, FakeEdge(config))  # type: ignore[arg-type]
    for hops in ["203.0.113.7, 0.0.0.0/0", "203.0.113.7, junk", "203.0.113.7, ::/0"]:
        for _ in range(8):
            await dos(_exchange("10.0.0.1", {"X-Forwarded-For": hops}), _ok)
    assert set(dos.bans.exact) == {"203.0.113.7"}
    assert not dos.bans.networks
    # Everybody else goes on.
    assert (await dos(_exchange("10.0.0.1", {"X-Forwarded-For": "203.0.113.8"}), _ok)).status == 200
    assert (await dos(_exchange("192.0.2.1"), _ok)).status == 200
    assert dos.ban("0.0.0.0/0", "test") is False and "0.0.0.0/0" not in dos.bans.exact


# --- forward proxy destinations (decision function only: no traffic to these) --------------

DENIED_BY_DEFAULT = [
    "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1",  # RFC 1918
    "100.64.0.1", "100.100.100.200",  # CGNAT, Alibaba metadata
    "169.254.169.254", "192.0.0.192",  # AWS/GCP/Azure and Oracle metadata
    "127.0.0.1", "127.9.9.9", "0.0.0.0", "0.1.2.3",
    "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",  # multicast, broadcast
    "198.18.0.1", "192.0.2.1",
    "::1", "::", "fc00::1", "fd12:3456::1", "fd00:ec2::254", "fe80::1", "fec0::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::10.0.0.1",
    "64:ff9b::10.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b:1::8.8.8.8",
    "2002:a00:1::", "2002:a9fe:a9fe::1", "2002:7f00:1::",  # 6to4 of 10.0.0.1, metadata, loopback
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo whose client is 10.0.0.1
    "not-an-address",
]  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::"]


@pytest.mark.parametrize("address", DENIED_BY_DEFAULT)
def test_the_forward_proxy_refuses_every_non_public_address_by_default(address: str) -> None:
    from edge.front.forward.policy import DestinationPolicy

    policy = DestinationPolicy(from_dict({"forward": {}}).forward)
    assert policy.networks.denied(address)
    if ":" in address or address[0].isdigit():
        assert policy.check(address, 80, tunnel=False) == "network"


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass_also_when_carried_in_ipv6(address: str) -> None:
    from edge.front.forward.policy import DestinationPolicy

    assert not DestinationPolicy(from_dict({"forward": {}}).forward).networks.denied(address)


def test_forward_ports_and_explicit_allowances() -> None:
    from edge.front.forward.policy import DestinationPolicy

    policy = DestinationPolicy(from_dict({"forward": {}}).forward)
    assert policy.check("example.test", 80, tunnel=False) is None
    for port in (1024, 2379, 3306, 6379, 8080, 9090, 65535):
        assert policy.check("example.test", port, tunnel=False) == "port", port
    allowing = DestinationPolicy(
        from_dict({"forward": {"allow_networks": ["10.1.2.0/24", "fd00:1::/64"]}}).forward
    )
    assert not allowing.networks.denied("10.1.2.3") and not allowing.networks.denied("64:ff9b::10.1.2.3")
    assert allowing.networks.denied("10.1.3.1") and not allowing.networks.denied("fd00:1::5")
    assert allowing.networks.denied("169.254.169.254")


def test_the_sample_aps_admin_token_is_long_or_absent(tmp_path: Path) -> None:
    from carousel.config import ConfigError
    from sampleapp import config as app_config

    path = tmp_path / "app.toml"
    path.write_text('[app]\nadmin_token = "short"\n')
    with pytest.raises(ConfigError, match="admin_token"):
        app_config.load(str(path))
    with pytest.raises(ConfigError, match="admin-token"):
        app_config.override(app_config.Config(), host=None, port=None, name=None, admin_token="x")
    path.write_text('[app]\nadmin_token = "0123456789abcdef"\n')
    assert app_config.load(str(path)).app.admin_token == "0123456789abcdef"


# --- forward proxy Basic auth -------------------------------------------------------------


async def test_an_unknown_user_costs_the_same_pbkdf2_as_a_known_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import hashlib

    from edge.front.forward import auth as auth_module

    authenticator = auth_module.ProxyAuthenticator({"alice": auth_module.hash_password("pw", 3000)}, "lab")
    rounds: list[int] = []
    real = hashlib.pbkdf2_hmac

    def spy(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        rounds.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(auth_module.hashlib, "pbkdf2_hmac", spy)

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert await authenticator.user(basic("alice", "wrong"), "192.0.2.1") is None
    assert await authenticator.user(basic("mallory", "wrong"), "192.0.2.1") is None
    assert rounds == [3000, 3000]
    # The dummy never lets anyone in, whatever the password.
    assert await authenticator.user(basic("nobody", ""), "192.0.2.1") is None


async def test_failed_logins_are_limited_per_client() -> None:
    import base64

    from edge.front.forward.auth import MAX_FAILURES, ProxyAuthenticator

    authenticator = ProxyAuthenticator({"bob": "correct horse"}, "lab")
    bad = "Basic " + base64.b64encode(b"bob:guess").decode()
    for i in range(MAX_FAILURES):
        assert authenticator.retry_after("192.0.2.1") == 0, i
        assert await authenticator.user(bad, "192.0.2.1") is None
    assert 0 < authenticator.retry_after("192.0.2.1") <= 60
    assert authenticator.retry_after("192.0.2.2") == 0  # another client is not affected
    # A client that sends no credentials at all (the first request of a browser) is not failing.
    for _ in range(MAX_FAILURES * 2):
        assert await authenticator.user(None, "192.0.2.3") is None
    assert authenticator.retry_after("192.0.2.3") == 0


# --- admin listener ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1"])
def test_a_loopback_admin_listener_may_go_without_a_token(host: str) -> None:
    assert from_dict({"admin": {"host": host}}).admin.token is None


@pytest.mark.parametrize(
    "host",
    [
        "127.attacker.example",
        "127.0.0.1.nip.io",
        "localhost",
        "0.0.0.0",
        "::",
        "10.0.0.1",
        "::ffff:127.0.0.1",
    ],
)
def test_anything_but_a_loopback_address_needs_a_token(host: str) -> None:
    from carousel.config import ConfigError

    with pytest.raises(ConfigError, match="requires a token"):
        from_dict({"admin": {"host": host}})
    assert from_dict({"admin": {"host": host, "token": "x" * 16}}).admin.token == "x" * 16


@pytest.mark.parametrize("token", ["x", "t0ken", "x" * 15])
def test_short_admin_tokens_are_refused(token: str) -> None:
    from carousel.config import ConfigError

    with pytest.raises(ConfigError, match="at least 16 characters"):
        from_dict({"admin": {"host": "127.0.0.1", "token": token}})
