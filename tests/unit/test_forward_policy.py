"""Forward proxy rules without sockets: targets, ports, name lists, address blocks, auth, parser mode."""

from __future__ import annotations

import asyncio
import base64

import pytest

from carousel.config import ConfigError
from edge.core.config import DomainListConfig, ForwardConfig
from edge.front.forward.auth import (
    ProxyAuthenticator,
    check_stored,
    hash_password,
    main,
    parse_basic,
    verify_password,
)
from edge.front.forward.chain import ForwardHeaders
from edge.front.forward.policy import (
    BadTarget,
    DestinationPolicy,
    NameList,
    NetworkList,
    PortSet,
    format_authority,
    parse_authority,
)
from edge.http.http1 import Head, ParseError, RequestParser
from edge.main import from_dict

# --- targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "default", "expected"),
    [
        ("Example.TEST", 80, ("example.test", 80)),
        ("example.test.:8080", 80, ("example.test", 8080)),
        ("127.0.0.1:443", None, ("127.0.0.1", 443)),
        ("[::1]:443", None, ("::1", 443)),
        ("[2001:DB8::1]", 80, ("2001:db8::1", 80)),
        ("_srv.example.test:1", None, ("_srv.example.test", 1)),
    ],
)
def test_authorities_parse(authority: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, default) == expected


@pytest.mark.parametrize(
    "authority",
    [
        "example.test",  # CONNECT needs a port
        "example.test:",
        "example.test:0",
        "example.test:65536",
        "example.test:+443",
        "example.test:44\uff13",  # a non-ASCII digit
        "::1:443",  # IPv6 without brackets
        "[::1",
        "[::1]x",
        "[fe80::1%25eth0]:443",  # zone identifiers name our own interfaces
        "[not-v6]:443",
        "exa mple.test:443",
        "-bad.test:443",
        "bad..test:443",
        "bücher.test:443",  # clients send the punycode form
        ":443",
        "a" * 64 + ".test:443",
    ],
)
def test_bad_authorities_are_refused(authority: str) -> None:
    with pytest.raises(BadTarget):
        parse_authority(authority, None)


def test_authorities_format_back() -> None:
    assert format_authority("::1", 443) == "[::1]:443"
    assert format_authority("example.test", 80, 80) == "example.test"
    assert format_authority("example.test", 8080, 80) == "example.test:8080"


# --- ports, names, networks ------------------------------------------------------------


def test_port_sets_hold_numbers_and_ranges() -> None:
    ports = PortSet([443, "8000-8010"])
    assert 443 in ports and 8000 in ports and 8010 in ports
    assert 80 not in ports and 7999 not in ports and 8011 not in ports


def test_name_lists_match_exact_suffix_at_label_boundaries_and_regex() -> None:
    names = NameList(DomainListConfig(exact=["Exact.Test."], suffix=[".example.test"], regex=[r"^ads?\d*\."]))
    assert names.matches("exact.test")
    assert not names.matches("www.exact.test")  # exact is exact
    assert names.matches("example.test") and names.matches("a.b.example.test")
    assert not names.matches("badexample.test")  # suffixes match whole labels only
    assert names.matches("ad1.tracker.test") and names.matches("ads.other.test")
    assert not names.matches("bad.ads.test")  # the regex is anchored by its author
    assert not NameList(DomainListConfig())


def test_network_lists_cover_mapped_addresses_and_refuse_garbage() -> None:
    nets = NetworkList(["127.0.0.0/8", "::1/128", "169.254.0.0/16"])
    assert nets.denied("127.0.0.2") and nets.denied("::1") and nets.denied("169.254.169.254")
    assert nets.denied("::ffff:127.0.0.1")  # IPv4-mapped loopback is loopback
    assert nets.denied("not an address")
    assert not nets.denied("10.1.2.3") and not nets.denied("2001:db8::1")
    assert not NetworkList([]).denied("127.0.0.1")


def _policy(**forward: object) -> DestinationPolicy:
    return DestinationPolicy(from_dict({"forward": forward}).forward)


def test_destination_policy_order_port_deny_allow_network() -> None:
    p = _policy()
    assert p.check("example.test", 443, tunnel=True) is None
    assert p.check("example.test", 22, tunnel=True) == "port"  # CONNECT: 443 only by default
    assert p.check("example.test", 80, tunnel=False) is None
    assert p.check("example.test", 25, tunnel=False) == "port"  # plain HTTP never to SMTP
    assert p.check("example.test", 8080, tunnel=False) == "port"  # high ports: admin listeners, databases
    assert p.check("127.0.0.1", 80, tunnel=False) == "network"  # loopback denied by default
    assert p.check("::1", 80, tunnel=False) == "network"
    p = _policy(allow={"suffix": ["example.test"]}, deny={"exact": ["bad.example.test"]})
    assert p.check("www.example.test", 443, tunnel=True) is None
    assert p.check("bad.example.test", 443, tunnel=True) == "denied"  # deny wins over allow
    assert p.check("other.test", 443, tunnel=True) == "not-allowed"


# --- config ----------------------------------------------------------------------------


def test_forward_config_defaults_are_safe() -> None:
    f = ForwardConfig()
    assert not f.enabled and f.connect_ports == [443] and not f.reveal_client and not f.users
    assert "127.0.0.0/8" in f.deny_networks and "169.254.0.0/16" in f.deny_networks


@pytest.mark.parametrize(
    ("forward", "key"),
    [
        ({"connect_ports": ["80-70"]}, "forward.connect_ports"),
        ({"http_ports": [70000]}, "forward.http_ports"),
        ({"deny": {"regex": ["("]}}, "forward.deny.regex"),
        ({"allow": {"prefix": ["x"]}}, "forward.allow.prefix"),
        ({"hosts": {"origin.test": "nowhere"}}, "forward.hosts"),
        ({"deny_networks": ["10.0.0.0/33"]}, "forward.deny_networks"),
        ({"users": {"alice": "pbkdf2_sha256$x$y$z"}}, "forward.users"),
        ({"users": {"al:ice": "pw"}}, "forward.users"),
        ({"via": "a, b"}, "forward.via"),
        ({"max_body_size": -1}, "forward.max_body_size"),
    ],
)
def test_bad_forward_config_names_the_key(forward: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"forward": forward}, "edge.toml")
    assert err.value.key == key and err.value.file == "edge.toml"


def test_several_workers_need_a_fixed_forward_port() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"edge": {"workers": 2}, "forward": {"enabled": True, "port": 0}})
    assert err.value.key == "forward.port"


# --- authentication --------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_passwords_plain_and_hashed() -> None:
    stored = hash_password("s3cret", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and check_stored(stored) is None
    assert verify_password("s3cret", stored) and not verify_password("s3cre", stored)
    assert verify_password("plain", "plain") and not verify_password("plain", "Plain")
    assert check_stored("") is not None and check_stored("pbkdf2_sha256$1$!!$x") is not None


def test_basic_credentials_parse() -> None:
    assert parse_basic(_basic("alice", "a:b")) == ("alice", "a:b")  # the first colon splits
    assert parse_basic("basic " + base64.b64encode(b"u:").decode()) == ("u", "")
    assert parse_basic("Bearer abc") is None
    assert parse_basic("Basic !!!") is None
    assert parse_basic("Basic " + base64.b64encode(b"no-colon").decode()) is None
    assert parse_basic("Basic " + base64.b64encode(b"\xff:x").decode()) is None


async def test_authenticator_checks_and_remembers_verdicts() -> None:
    auth = ProxyAuthenticator({"alice": hash_password("pw", iterations=1000), "bob": "plain"}, "lab")
    assert auth.challenge == 'Basic realm="lab", charset="UTF-8"'
    assert await auth.user(_basic("alice", "pw")) == "alice"
    assert await auth.user(_basic("bob", "plain")) == "bob"
    assert await auth.user(_basic("alice", "wrong")) is None
    assert await auth.user(_basic("carol", "pw")) is None
    assert await auth.user(None) is None and await auth.user("") is None
    # Verdicts are remembered by a digest of the header, never the header itself.
    assert all(len(k) == 32 for k in auth._verdicts) and len(auth._verdicts) == 4
    assert await asyncio.gather(*(auth.user(_basic("alice", "pw")) for _ in range(3))) == ["alice"] * 3


def test_the_hash_tool_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hunter2\n"))
    assert main(["--iterations", "1000"]) == 0
    stored = capsys.readouterr().out.strip()
    assert verify_password("hunter2", stored)


# --- the parser's proxy mode -----------------------------------------------------------


def _heads(data: bytes, proxy: bool) -> list[Head]:
    p = RequestParser(proxy=proxy)
    events = p.feed(data)
    if p.error is not None:
        raise p.error
    return [e for e in events if isinstance(e, Head)]


def test_connect_authority_form_only_on_a_proxy_listener() -> None:
    data = b"CONNECT example.test:443 HTTP/1.1\r\nHost: other\r\n\r\n"
    (head,) = _heads(data, proxy=True)
    assert head.raw_path == "example.test:443" and head.headers["Host"] == "example.test:443"
    with pytest.raises(ParseError):
        _heads(data, proxy=False)


def test_connect_keeps_the_connection_and_carries_no_body() -> None:
    (head,) = _heads(b"CONNECT example.test:443 HTTP/1.0\r\n\r\n", proxy=True)
    assert head.keep_alive  # it becomes the tunnel after a 2xx
    for bad in (
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"CONNECT /path HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT http://example.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT user@example.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT example.test HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        with pytest.raises(ParseError):
            _heads(bad, proxy=True)


def test_absolute_form_keeps_its_scheme() -> None:
    (head,) = _heads(b"GET http://Example.test:8080?q=1 HTTP/1.1\r\n\r\n", proxy=True)
    assert (head.scheme, head.raw_path, head.query) == ("http", "/?q=1", "q=1")
    assert head.headers["Host"] == "Example.test:8080"
    (head,) = _heads(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", proxy=True)
    assert head.scheme == ""


# --- what the origin sees ------------------------------------------------------------


class _Req:
    def __init__(self, headers: dict[str, str]) -> None:
        from multidict import CIMultiDict, CIMultiDictProxy

        self.headers = CIMultiDictProxy(CIMultiDict(headers))


class _Ex:
    def __init__(self, headers: dict[str, str]) -> None:
        self.request = _Req(headers)
        self.client_ip = "127.0.0.7"


_CLIENT_HEADERS = {
    "Host": "origin.test",
    "Accept": "*/*",
    "Proxy-Authorization": "Basic eDp5",
    "Proxy-Connection": "keep-alive",
    "Connection": "X-Secret",
    "X-Secret": "dropped because Connection names it",
    "X-Forwarded-For": "10.0.0.9",
    "Forwarded": "for=10.0.0.9",
    "X-Real-IP": "10.0.0.9",
    "Via": "1.1 internal-host",
}


def test_origin_headers_hide_the_client_by_default() -> None:
    out = ForwardHeaders(from_dict({})).origin_headers(_Ex(_CLIENT_HEADERS))  # type: ignore[arg-type]
    assert dict(out) == {"Host": "origin.test", "Accept": "*/*", "Via": "1.1 carousel"}


def test_origin_headers_reveal_the_client_when_configured() -> None:
    cfg = from_dict({"forward": {"reveal_client": True, "via": "px1"}})
    out = ForwardHeaders(cfg).origin_headers(_Ex(_CLIENT_HEADERS))  # type: ignore[arg-type]
    assert out["X-Forwarded-For"] == "10.0.0.9, 127.0.0.7"
    assert out.getall("Forwarded") == ["for=10.0.0.9", "for=127.0.0.7"]
    assert out["Via"] == "1.1 internal-host, 1.1 px1"
    assert "Proxy-Authorization" not in out and "Proxy-Connection" not in out and "X-Secret" not in out


def test_parsing_stops_after_a_connect_and_hands_over_the_rest() -> None:
    p = RequestParser(proxy=True)
    events = p.feed(
        b"GET http://a.test/ HTTP/1.1\r\n\r\nCONNECT a.test:443 HTTP/1.1\r\n\r\n\x16\x03\x01early"
    )
    assert [e.method for e in events if isinstance(e, Head)] == ["GET", "CONNECT"]
    assert p.rest == b"\x16\x03\x01early" and p.idle and p.error is None
