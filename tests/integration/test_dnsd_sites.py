"""Site-aware answers on a real dnsd: `dig +subnet=...` and queries from different loopback sources."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid

import pytest

from carousel.config import EtcdConfig
from carousel.etcdserver import EtcdProcess
from carousel.registry import ServiceRecord
from tests.integration.test_dnsd_helpers import WWW, Dnsd, Registry, dnsd_toml, start_dnsd, sync
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(90)
DIG = shutil.which("dig")
SITES = """
[dns.sites.tokyo]
networks = ["10.1.0.0/16", "127.0.1.0/24"]
fallback = ["osaka"]

[dns.sites.osaka]
networks = ["10.2.0.0/16", "127.0.2.0/24"]
fallback = ["tokyo"]
"""


def site_edge(i: int, site: str) -> ServiceRecord:
    return ServiceRecord("edge", f"edge{i}", 8080, ipv4=(f"10.9.0.{i}",), site=site)


def registry(cfg: EtcdConfig, put: list[ServiceRecord], delete: list[ServiceRecord]) -> None:
    async def go() -> None:
        reg = Registry(cfg, ttl=600)
        try:
            await reg.put_all(put)
            for r in delete:
                await reg.delete(r)
        finally:
            await reg.etcd.close()  # leases stay for the test's life

    sync(go())


@pytest.fixture
def sited(shared_etcd: EtcdProcess, procs: ProcessGroup) -> tuple[Dnsd, EtcdConfig]:
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/site-{uuid.uuid4().hex[:8]}/", timeout=1.0)
    registry(cfg, [site_edge(1, "tokyo"), site_edge(2, "tokyo"), site_edge(3, "osaka")], [])
    config = dnsd_toml(cfg).replace("[dns.rrl]", SITES + "\n[dns.rrl]")
    return start_dnsd(procs, "dnsd-sites", config), cfg


def answers(out: str) -> set[str]:
    return set(re.findall(r"^www\.example\.test\.\s+\d+\s+IN\s+A\s+(\S+)$", out, re.M))


@pytest.mark.skipif(DIG is None, reason="dig is not installed")
def test_dig_subnet_picks_the_site_and_shows_the_scope(sited: tuple[Dnsd, EtcdConfig]) -> None:
    d, _ = sited
    out = d.dig("+subnet=10.1.44.0/24", WWW)
    assert answers(out) == {"10.9.0.1", "10.9.0.2"}, out
    assert "CLIENT-SUBNET: 10.1.44.0/24/16" in out, out  # source /24, scope /16
    out = d.dig("+subnet=10.2.0.0/24", WWW)
    assert answers(out) == {"10.9.0.3"} and "CLIENT-SUBNET: 10.2.0.0/24/16" in out, out
    out = d.dig("+subnet=192.0.2.0/24", WWW)
    assert answers(out) == {"10.9.0.1", "10.9.0.2", "10.9.0.3"}, out  # no site: every edge


@pytest.mark.skipif(DIG is None, reason="dig is not installed")
def test_source_address_picks_the_site_and_empty_sites_fall_back(sited: tuple[Dnsd, EtcdConfig]) -> None:
    d, cfg = sited
    assert answers(d.dig("-b", "127.0.1.1", WWW)) == {"10.9.0.1", "10.9.0.2"}
    assert answers(d.dig("-b", "127.0.2.1", WWW)) == {"10.9.0.3"}
    assert answers(d.dig("-b", "127.0.0.1", WWW)) == {"10.9.0.1", "10.9.0.2", "10.9.0.3"}
    registry(cfg, [], [site_edge(3, "osaka")])  # osaka has no edge left: its clients go to tokyo
    deadline = time.monotonic() + 5
    while answers(d.dig("-b", "127.0.2.1", WWW)) != {"10.9.0.1", "10.9.0.2"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_tcp_queries_use_the_site_too(sited: tuple[Dnsd, EtcdConfig]) -> None:
    d, _ = sited
    if DIG is None:
        pytest.skip("dig is not installed")
    out = subprocess.run([DIG, "@127.0.0.1", "-p", str(d.port), "+tcp", "-b", "127.0.1.1", WWW],
                         capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    assert answers(out) == {"10.9.0.1", "10.9.0.2"}, out
