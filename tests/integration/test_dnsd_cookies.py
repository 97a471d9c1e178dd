"""DNS Cookies on a real dnsd: `dig +cookie`, a secret shared by two dnsds through etcd, RRL exemption."""

from __future__ import annotations

import re
import shutil
import time
import uuid

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import EtcdProcess
from carousel.registry import Keys
from dnsd.cookies import decode_secrets
from tests.integration.test_dnsd_helpers import WWW, Dnsd, Registry, dnsd_toml, edge, start_dnsd, sync
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(90)
DIG = shutil.which("dig")
CLIENT = bytes.fromhex("0102030405060708")


def _cookie_query(d: Dnsd, cookie: bytes) -> tuple[dns.message.Message | None, bytes]:
    q = dns.message.make_query(WWW, "A", use_edns=0, options=[dns.edns.GenericOption(10, cookie)])
    try:
        r = dns.query.udp(q, "127.0.0.1", port=d.port, timeout=0.3)
    except dns.exception.Timeout:
        return None, b""  # dropped by RRL
    got = [bytes(o.to_wire()) for o in r.options if o.otype == 10]
    return r, got[0] if got else b""


@pytest.fixture
def two(shared_etcd: EtcdProcess, procs: ProcessGroup) -> tuple[Dnsd, Dnsd, EtcdConfig]:
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/ck-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in (1, 2, 3)])
        await reg.etcd.close()

    sync(register())
    rrl = {"enabled": True, "responses_per_second": 5, "window": 5, "slip": 2}
    config = dnsd_toml(cfg, rrl=rrl).replace(
        "[dns.rrl]", "[dns.cookies]\nenabled = true\npoll_interval = 0.2\n\n[dns.rrl]"
    )
    return start_dnsd(procs, "dnsd-ck-a", config), start_dnsd(procs, "dnsd-ck-b", config), cfg


@pytest.mark.skipif(DIG is None, reason="dig is not installed")
def test_dig_cookie_shows_a_server_cookie_that_dig_calls_good(two: tuple[Dnsd, Dnsd, EtcdConfig]) -> None:
    a, _, _ = two
    out = a.dig("+cookie", WWW)
    m = re.search(r"; COOKIE: ([0-9a-f]{16})([0-9a-f]{32}) \(good\)", out)
    assert m, out
    client, server = m.groups()
    assert server.startswith("01000000")  # RFC 9018: version 1, reserved zero
    out = a.dig(f"+cookie={client}{server}", WWW)
    assert f"; COOKIE: {client}{server} (good)" in out, out  # still fresh: echoed as it was
    assert "status: NOERROR" in out and "ANSWER: 3" in out


def test_one_cluster_secret_in_etcd_validates_at_every_dnsd(two: tuple[Dnsd, Dnsd, EtcdConfig]) -> None:
    a, b, cfg = two

    async def secret() -> bytes:
        etcd = Etcd(cfg)
        try:
            kv = await etcd.get(Keys(cfg.prefix).cookie_secret)
            assert kv is not None
            return decode_secrets(kv.value)[0].current
        finally:
            await etcd.close()

    assert len(sync(secret())) == 16
    deadline = time.monotonic() + 10
    while True:  # both have read the secret once they hand out the same cookie
        _, from_a = _cookie_query(a, CLIENT)
        _, from_b = _cookie_query(b, from_a)
        if from_b == from_a:
            break
        assert time.monotonic() < deadline, "the second dnsd never accepted the first one's cookie"
        time.sleep(0.2)


def test_a_valid_cookie_exempts_from_rrl_a_missing_one_does_not(two: tuple[Dnsd, Dnsd, EtcdConfig]) -> None:
    a, _, _ = two
    _, cookie = _cookie_query(a, CLIENT)
    answered = 0
    for _ in range(40):  # 8x the rate, from one address: all answered in full
        r, got = _cookie_query(a, cookie)
        assert r is not None and r.answer and not r.flags & dns.flags.TC
        answered += 1
        cookie = got
    assert answered == 40
    limited = 0
    for _ in range(40):  # the same flood with only a client cookie is limited
        r, _ = _cookie_query(a, bytes(8))
        if r is None or r.rcode() == dns.rcode.BADCOOKIE:
            limited += 1
    assert limited >= 20


def test_the_secret_rotates_and_cookies_of_the_previous_one_stay_valid(
    shared_etcd: EtcdProcess, procs: ProcessGroup
) -> None:
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/ck-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(1)])
        await reg.etcd.close()

    async def secrets():  # type: ignore[no-untyped-def]
        etcd = Etcd(cfg)
        try:
            kv = await etcd.get(Keys(cfg.prefix).cookie_secret)
            return decode_secrets(kv.value)[0] if kv is not None else None
        finally:
            await etcd.close()

    sync(register())
    rrl = {"enabled": True, "responses_per_second": 5, "window": 5, "slip": 2}
    cookies = "[dns.cookies]\nenabled = true\nsecret_rotation = 4.0\npoll_interval = 0.2\n\n[dns.rrl]"
    d = start_dnsd(procs, "dnsd-ck-rot", dnsd_toml(cfg, rrl=rrl).replace("[dns.rrl]", cookies))
    deadline = time.monotonic() + 5
    while (first := sync(secrets())) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # dnsd has read it
    _, cookie = _cookie_query(d, CLIENT)
    deadline = time.monotonic() + 10
    while (now := sync(secrets())) == first:
        assert time.monotonic() < deadline, "the secret never rotated"
        time.sleep(0.2)
    assert now is not None and now.previous == first.current and now.current != first.current
    time.sleep(0.5)  # dnsd has read the rotated secret
    for _ in range(30):  # 6x the rate with the pre-rotation cookie: still exempt, never limited
        r, fresh = _cookie_query(d, cookie)
        assert r is not None and r.answer and not r.flags & dns.flags.TC
        assert fresh != cookie  # made with the old secret: the answer carries a new one
