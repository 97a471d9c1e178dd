"""Security logic without sockets: ClientHello, PROXY headers, DoS counting and bans, limits, TLS config."""

from __future__ import annotations

import ipaddress
import ssl
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, generate_latest

from carousel.config import ConfigError
from carousel.registry import BanRecord
from edge.core.limits import ConnectionGuard
from edge.core.pipeline import BytesBody, Exchange, Reply
from edge.features.dos import BanTable, ClientKeys, DosDetector, _Client
from edge.features.https import HttpsPolicy
from edge.front.passthrough import PROXY_V2_SIGNATURE, NotClientHello, parse_client_hello, proxy_header
from edge.front.tls import CertificateStore, check_certificate
from edge.http.http1 import Head, RequestParser
from edge.http.request import Request
from edge.main import from_dict

# --- ClientHello parsing -----------------------------------------------------------------


def client_hello(server_name: str | None) -> bytes:
    """The bytes a real Python TLS client sends first."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_is_read_from_a_real_client_hello() -> None:
    assert parse_client_hello(client_hello("Secure.Example.TEST")) == "secure.example.test"
    assert parse_client_hello(client_hello(None)) is None


def test_partial_hello_asks_for_more_and_a_fragmented_one_is_reassembled() -> None:
    hello = client_hello("a.example.test")
    for cut in (0, 1, 4, 5, 40, len(hello) - 1):
        assert parse_client_hello(hello[:cut]) is ..., cut
    # The same handshake split over two TLS records (legal, and used to dodge naive SNI filters).
    payload = hello[5:]
    half = len(payload) // 2
    split = (
        b"\x16\x03\x01" + struct.pack("!H", half) + payload[:half]
        + b"\x16\x03\x01" + struct.pack("!H", len(payload) - half) + payload[half:]
    )  # fmt: skip
    assert parse_client_hello(split[: len(split) - 3]) is ...
    assert parse_client_hello(split) == "a.example.test"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
        b"\x80\x2e\x01\x03\x01",  # SSLv2-style hello
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello, not a ClientHello
        b"\x17\x03\x03\x00\x05hello",  # application data first
    ],
)
def test_anything_but_a_client_hello_is_refused(data: bytes) -> None:
    with pytest.raises(NotClientHello):
        parse_client_hello(data)


def test_mutated_hellos_never_raise_anything_else() -> None:
    import random

    rng = random.Random(7)
    hello = bytearray(client_hello("m.example.test"))
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(5, len(data))] = rng.randrange(256)
        try:
            result = parse_client_hello(bytes(data))
        except NotClientHello:
            continue
        assert result is None or result is ... or isinstance(result, str)


def test_bad_server_name_is_refused() -> None:
    hello = client_hello("ok.example.test")
    bad = hello.replace(b"ok.example.test", b"ok.exa\x00ple.test")
    with pytest.raises(NotClientHello, match="server name"):
        parse_client_hello(bad)


# --- PROXY protocol ----------------------------------------------------------------------


def test_proxy_protocol_v1() -> None:
    assert proxy_header("v1", ("192.0.2.7", 40000), ("198.51.100.1", 443)) == (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
    )
    assert proxy_header("v1", ("2001:db8::7", 1), ("2001:db8::1", 443)) == (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 1 443\r\n"
    )
    # An IPv4 client seen on a dual-stack socket is reported as IPv4.
    assert proxy_header("v1", ("::ffff:192.0.2.7", 5), ("::ffff:127.0.0.1", 443)).startswith(
        b"PROXY TCP4 192.0.2.7 "
    )


def test_proxy_protocol_v2() -> None:
    head = proxy_header("v2", ("192.0.2.7", 40000), ("198.51.100.1", 443))
    assert head[:12] == PROXY_V2_SIGNATURE
    ver_cmd, family, length = struct.unpack("!BBH", head[12:16])
    assert (ver_cmd, family, length) == (0x21, 0x11, 12)
    src, dst, sport, dport = struct.unpack("!4s4sHH", head[16:])
    assert (ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), sport, dport) == (
        ipaddress.IPv4Address("192.0.2.7"),
        ipaddress.IPv4Address("198.51.100.1"),
        40000,
        443,
    )
    six = proxy_header("v2", ("2001:db8::7", 1), ("2001:db8::1", 443))
    assert six[13] == 0x21 and struct.unpack("!H", six[14:16])[0] == 36 and len(six) == 16 + 36


# --- DoS: counting, keys, bans -----------------------------------------------------------


def test_sliding_window_estimate() -> None:
    c = _Client(100.0)
    rates = [c.hit(100.0 + i * 0.01, 1.0) for i in range(50)]
    assert rates[-1] == 50  # 50 requests inside the first window
    # Half-way through the next window, half of the previous one still counts.
    assert c.hit(101.5, 1.0) == pytest.approx(50 * 0.5 + 1)
    # Two windows of silence forget everything.
    assert c.hit(104.0, 1.0) == 1


def test_client_keys() -> None:
    keys = ClientKeys(64)
    assert keys("192.0.2.1") == "192.0.2.1"
    assert keys("2001:db8:1:2:aaaa::1") == keys("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert keys("::ffff:192.0.2.1") == "192.0.2.1"
    assert keys("fe80::1%eth0") == "fe80::/64"


def test_ban_table_exact_networks_and_expiry() -> None:
    now = time.time()
    table = BanTable(ClientKeys(64))
    table.load_remote(
        [
            BanRecord("192.0.2.1", until=now + 60),
            BanRecord("2001:db8::/64", until=now + 60),
            BanRecord("2001:db8:9::5", until=now + 60),  # a single IPv6 address: a network entry
            BanRecord("198.51.100.0/24", until=now + 60),
            BanRecord("203.0.113.9", until=now - 1),  # already over
        ]
    )
    keys = ClientKeys(64)
    assert table.until(keys("192.0.2.1"), "192.0.2.1") > now
    assert table.until(keys("2001:db8::77"), "2001:db8::77") > now
    assert table.until(keys("2001:db8:9::5"), "2001:db8:9::5") > now
    assert not table.until(keys("2001:db8:9::6"), "2001:db8:9::6")
    assert table.until("198.51.100.200", "198.51.100.200") > now
    assert not table.until("203.0.113.9", "203.0.113.9")
    assert not table.until("192.0.2.2", "192.0.2.2")
    table.add_local("192.0.2.2", now + 0.5)
    assert table.until("192.0.2.2", "192.0.2.2")
    assert table.prune(now + 1) and not table.until("192.0.2.2", "192.0.2.2")


class FakeEdge:
    """What the dos feature uses from the edge, without sockets or etcd."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.guard = ConnectionGuard()
        self.metrics = SimpleNamespace(registry=CollectorRegistry())
        self.etcd = None
        self.worker = 0
        self.connections: set[Any] = set()


def _exchange(peer: str, headers: dict[str, str] | None = None) -> Exchange:
    raw = "GET / HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = RequestParser().feed((raw + "\r\n").encode())[0]
    assert isinstance(head, Head)
    request = Request(head, SimpleNamespace(peer=peer), None)  # type: ignore[arg-type]
    return Exchange(request, None, "x", peer, "http")  # type: ignore[arg-type]


async def _ok(ex: Exchange) -> Reply:
    return Reply(200, CIMultiDict(), BytesBody(b"ok"))


def _dos(**dos: Any) -> tuple[DosDetector, FakeEdge]:
    config = from_dict({"dos": {"enabled": True, "cluster": False, "allowlist": [], **dos}, "edge": {}})
    edge = FakeEdge(config)
    return DosDetector(config, edge), edge  # type: ignore[arg-type]


async def test_soft_limit_answers_429_then_the_hard_limit_bans() -> None:
    dos, edge = _dos(soft_rate=10, hard_rate=30, ban_seconds=60)
    statuses = [(await dos(_exchange("192.0.2.5"), _ok)).status for _ in range(40)]
    assert statuses[:10] == [200] * 10
    assert statuses[10:30] == [429] * 20
    assert statuses[30:] == [403] * 10
    reply = await dos(_exchange("192.0.2.5"), _ok)
    assert reply.status == 403 and reply.close_connection
    assert dos.counts == {"rejected": 20, "delayed": 0, "banned": 1, "blocked": 10}
    # Another client is untouched, and the banned one is refused at accept too.
    assert (await dos(_exchange("192.0.2.6"), _ok)).status == 200
    assert not edge.guard.admit("192.0.2.5") and edge.guard.admit("192.0.2.6")
    metrics = generate_latest(edge.metrics.registry).decode()  # type: ignore[arg-type]
    assert 'carousel_edge_dos_actions_total{action="rejected",dry_run="false"} 20.0' in metrics
    assert "carousel_edge_dos_bans 1.0" in metrics


async def test_429_carries_retry_after() -> None:
    dos, _ = _dos(soft_rate=1, hard_rate=100, window=2.5)
    await dos(_exchange("192.0.2.5"), _ok)
    await dos(_exchange("192.0.2.5"), _ok)
    reply = await dos(_exchange("192.0.2.5"), _ok)
    assert reply.status == 429 and reply.headers["Retry-After"] == "3"


async def test_delay_action_serves_late() -> None:
    dos, _ = _dos(soft_rate=1, hard_rate=100, soft_action="delay", delay=0.2)
    await dos(_exchange("192.0.2.5"), _ok)
    start = time.monotonic()
    reply = await dos(_exchange("192.0.2.5"), _ok)
    assert reply.status == 200 and time.monotonic() - start >= 0.2
    assert dos.counts["delayed"] == 1


async def test_dry_run_enforces_nothing_and_counts_everything() -> None:
    dos, edge = _dos(soft_rate=5, hard_rate=10, dry_run=True)
    statuses = {(await dos(_exchange("192.0.2.5"), _ok)).status for _ in range(30)}
    assert statuses == {200}
    assert dos.would["rejected"] == 5 and dos.would["banned"] == 1
    assert dos.counts == {"rejected": 0, "delayed": 0, "banned": 0, "blocked": 0}
    assert edge.guard.admit("192.0.2.5")


async def test_allowlist_is_never_limited() -> None:
    dos, _ = _dos(soft_rate=1, hard_rate=2, allowlist=["192.0.2.0/24"])
    statuses = {(await dos(_exchange("192.0.2.5"), _ok)).status for _ in range(20)}
    assert statuses == {200}
    assert (await dos(_exchange("198.51.100.1"), _ok)).status == 200


async def test_client_behind_a_trusted_proxy_is_counted_by_its_forwarded_address() -> None:
    config = from_dict(
        {
            "edge": {"trusted_proxies": ["10.0.0.0/8"]},
            "dos": {"enabled": True, "cluster": False, "allowlist": [], "soft_rate": 3, "hard_rate": 5},
        }
    )
    edge = FakeEdge(config)
    dos = DosDetector(config, edge)  # type: ignore[arg-type]
    flood = {"X-Forwarded-For": "198.51.100.9"}
    statuses = [(await dos(_exchange("10.0.0.1", flood), _ok)).status for _ in range(7)]
    assert statuses == [200, 200, 200, 429, 429, 403, 403]
    # The proxy itself and its other clients go on.
    assert (await dos(_exchange("10.0.0.1", {"X-Forwarded-For": "198.51.100.10"}), _ok)).status == 200
    assert edge.guard.admit("10.0.0.1")
    # An untrusted peer cannot pose as someone else.
    assert (await dos(_exchange("192.0.2.1", {"X-Forwarded-For": "198.51.100.10"}), _ok)).status == 200


async def test_connection_flood_bans_at_accept_and_soft_connections_shed() -> None:
    dos, edge = _dos(soft_connections=2, hard_connections=4)
    for _ in range(3):
        assert edge.guard.admit("192.0.2.5")
    reply = await dos(_exchange("192.0.2.5"), _ok)
    assert reply.status == 429 and reply.close_connection  # over soft: shed this connection
    assert not edge.guard.admit("192.0.2.5")  # the 4th reaches hard_connections: banned, refused
    assert dos.counts["banned"] == 1 and edge.guard.refused["banned"] == 1
    assert not edge.guard.admit("192.0.2.5")
    assert edge.guard.connections("192.0.2.5") == 3


def test_sweep_forgets_idle_clients() -> None:
    dos, _ = _dos()
    dos.clients["192.0.2.1"] = _Client(time.monotonic() - 10)
    dos.clients["192.0.2.2"] = _Client(time.monotonic())
    dos.sweep(time.monotonic())
    assert list(dos.clients) == ["192.0.2.2"]


# --- connection guard --------------------------------------------------------------------


def test_connection_caps_per_address_and_total() -> None:
    guard = ConnectionGuard(max_total=3, max_per_ip=2)
    assert guard.admit("a") and guard.admit("a")
    assert not guard.admit("a")
    assert guard.admit("b")
    assert not guard.admit("c")  # total reached
    guard.release("a")
    assert guard.admit("c")
    assert guard.refused == {"banned": 0, "total": 1, "per_ip": 1}
    for peer in ("a", "b", "c"):
        guard.release(peer)
    assert guard.total == 0 and guard.per_ip == {}


# --- TLS config and certificates ---------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    files = {}
    for name, hosts in (("a", ["a.example.test"]), ("b", ["b.example.test", "*.w.example.test"])):
        cert = ca.issue_cert(*hosts)
        cert.cert_chain_pems[0].write_to_path(str(tmp / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(tmp / f"{name}.key"))
        files[name] = str(tmp / f"{name}.pem")
        files[f"{name}.key"] = str(tmp / f"{name}.key")
    (tmp / "junk").write_text("not a certificate\n")
    files["junk"] = str(tmp / "junk")
    return files


def test_certificate_problems_name_the_key(certs: dict[str, str]) -> None:
    assert check_certificate(certs["a"], certs["a.key"]) is None
    assert check_certificate(certs["a"], certs["b.key"]) == (
        f"key_file: {certs['b.key']} does not match the certificate in {certs['a']}"
    )
    assert (check_certificate(certs["junk"], certs["a.key"]) or "").startswith("cert_file: ")
    assert (check_certificate(certs["a"], certs["junk"]) or "").startswith("key_file: ")
    assert "No such file" in (check_certificate(certs["a"], "/nonexistent.key") or "")

    def load(cert: str, key: str) -> None:
        from_dict({"tls": {"certificate": [{"cert_file": cert, "key_file": key}]}}, "edge.toml")

    load(certs["a"], certs["a.key"])
    with pytest.raises(ConfigError, match=r"edge\.toml: tls\.certificate\[0\]\.key_file: .* does not match"):
        load(certs["a"], certs["b.key"])
    with pytest.raises(ConfigError, match=r"tls\.certificate\[0\]\.cert_file: .* holds no PEM certificate"):
        load(certs["junk"], certs["a.key"])


def test_security_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"tls\.certificate: redirect_http and HSTS need"):
        from_dict({"tls": {"redirect_http": True}})
    with pytest.raises(ConfigError, match=r"dos\.hard_rate: must be >= soft_rate"):
        from_dict({"dos": {"soft_rate": 10, "hard_rate": 5}})
    with pytest.raises(ConfigError, match=r"dos\.allowlist"):
        from_dict({"dos": {"allowlist": ["nope"]}})
    with pytest.raises(ConfigError, match=r"passthrough\[0\]\.route\[0\]\.pool: no pool named 'x'"):
        from_dict({"passthrough": [{"route": [{"names": ["a.test"], "pool": "x"}]}]})
    with pytest.raises(ConfigError, match=r"passthrough\[0\]\.route\[0\]\.names"):
        from_dict({"passthrough": [{"route": [{"names": ["a.*.test"], "pool": "x"}]}]})
    with pytest.raises(ConfigError, match=r"pool\.p\.health\.type: a passthrough pool needs type = \"tcp\""):
        from_dict(
            {
                "pool": {"p": {"members": [{"address": "127.0.0.1:1"}], "health": {"enabled": True}}},
                "passthrough": [{"route": [{"names": ["a.test"], "pool": "p"}]}],
            }
        )
    with pytest.raises(ConfigError, match=r"passthrough\[0\]\.proxy_protocol"):
        from_dict({"passthrough": [{"proxy_protocol": "v3"}]})


def test_sni_table_picks_exact_wildcard_then_default(certs: dict[str, str]) -> None:
    config = from_dict(
        {
            "tls": {
                "certificate": [
                    {"cert_file": certs["a"], "key_file": certs["a.key"]},
                    {"cert_file": certs["b"], "key_file": certs["b.key"]},
                ]
            }
        }
    )
    store = CertificateStore(config.tls)
    table = store.table
    a, b = table.default, table.exact["b.example.test"]
    assert a is not b
    assert table.pick("A.Example.Test.") is a
    assert table.pick("b.example.test") is b
    assert table.pick("x.w.example.test") is b
    assert table.pick("y.x.w.example.test") is a  # one label only, then the default
    assert table.pick(None) is a and table.pick("unknown.test") is a
    assert store.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert store.status()["names"] == ["a.example.test", "b.example.test", "*.w.example.test"]


def test_a_failed_reload_keeps_the_previous_certificates(certs: dict[str, str], tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_bytes(Path(certs["a"]).read_bytes())
    key.write_bytes(Path(certs["a.key"]).read_bytes())
    store = CertificateStore(
        from_dict({"tls": {"certificate": [{"cert_file": str(cert), "key_file": str(key)}]}}).tls
    )
    before = store.table
    cert.write_bytes(Path(certs["b"]).read_bytes())  # a renewal half-way: new cert, old key
    assert store.changed()
    assert not store.reload("test") and store.table is before and store.reload_failures == 1
    assert not store.changed()  # the same broken state is not retried on every poll
    key.write_bytes(Path(certs["b.key"]).read_bytes())
    assert store.changed() and store.reload("test") and store.table is not before
    assert "b.example.test" in store.table.exact


async def test_https_policy_redirects_plain_http_and_adds_hsts() -> None:
    tls = SimpleNamespace(
        hsts_max_age=31536000,
        hsts_include_subdomains=True,
        hsts_preload=False,
        redirect_http=True,
        redirect_port=8443,
    )
    policy = HttpsPolicy(tls)  # type: ignore[arg-type]
    ex = _exchange("192.0.2.1")
    ex.host = "www.example.test"
    reply = await policy(ex, _ok)
    assert (reply.status, reply.headers["Location"]) == (301, "https://www.example.test:8443/")
    ex.scheme = "https"
    reply = await policy(ex, _ok)
    assert reply.status == 200
    assert reply.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    acme = _exchange("192.0.2.1")
    acme.request.head.path = "/.well-known/acme-challenge/token"
    acme.host = "www.example.test"
    assert (await policy(acme, _ok)).status == 200
