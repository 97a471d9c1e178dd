"""ISC's EDNS compliance checks (genreport / ednscomp), with DNSSEC, cookies and sites all on.

Each case is the dig command genreport runs (its flags), and what a compliant
authoritative server answers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from carousel.config import EtcdConfig
from carousel.etcdserver import EtcdProcess
from tests.integration.test_dnsd_helpers import Dnsd, Registry, dnsd_toml, edge, start_dnsd, sync
from tests.procs import ProcessGroup

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig")]
ZONE = "example.test"


@pytest.fixture(scope="module")
def full(shared_etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsd]:
    base = tmp_path_factory.mktemp("genreport")
    out = subprocess.run(
        [sys.executable, "-m", "carousel.cli", "dnssec", "keygen", ZONE, "--dir", str(base)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    key = Path(out.stdout.strip())
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/gr-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in (1, 2, 3)])
        await reg.etcd.close()

    sync(register())
    extra = '[dns.cookies]\nenabled = true\n\n[dns.sites.here]\nnetworks = ["127.0.0.0/8"]\n\n[dns.rrl]'
    config = dnsd_toml(cfg, zone_extra=f'[[zone.dnssec.key]]\nfile = "{key}"\n').replace("[dns.rrl]", extra)
    procs = ProcessGroup(base)
    try:
        yield start_dnsd(procs, "dnsd-genreport", config)
    finally:
        procs.stop_all()


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


def flags(out: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]*);", out)
    assert m, out
    return set(m.group(1).split())


def edns_line(out: str) -> str:
    m = re.search(r"; EDNS: (.*)", out)
    return m.group(1) if m else ""


CASES = {
    # name: (dig flags, expected status, must contain, must not contain)
    "dns": (["+norec", "+noedns", "soa", ZONE], "NOERROR", ["IN\tSOA"], ["OPT PSEUDOSECTION"]),
    "edns": (["+norec", "+edns=0", "+nocookie", "soa", ZONE], "NOERROR", ["EDNS: version: 0"], []),
    "edns1": (["+norec", "+edns=1", "+noednsneg", "+nocookie", "soa", ZONE], "BADVERS",
              ["EDNS: version: 0"], ["IN\tSOA\tns1"]),
    "edns@512": (["+norec", "+edns=0", "+dnssec", "+bufsize=512", "+ignore", "dnskey", ZONE], "NOERROR",
                 [], []),
    "ednsopt": (["+norec", "+edns=0", "+nocookie", "+ednsopt=100", "soa", ZONE], "NOERROR", [],
                ["OPT=100"]),
    "edns1opt": (["+norec", "+edns=1", "+noednsneg", "+nocookie", "+ednsopt=100", "soa", ZONE], "BADVERS",
                 ["EDNS: version: 0"], ["OPT=100"]),
    "do": (["+norec", "+edns=0", "+nocookie", "+dnssec", "soa", ZONE], "NOERROR", ["RRSIG\tSOA"], []),
    "ednsflags": (["+norec", "+edns=0", "+nocookie", "+ednsflags=0x80", "soa", ZONE], "NOERROR", [],
                  ["MBZ"]),
    "optlist": (["+norec", "+edns=0", "+nsid", "+subnet=0.0.0.0/0", "+expire", "+cookie", "soa", ZONE],
                "NOERROR", ["CLIENT-SUBNET: 0.0.0.0/0/0", "COOKIE: "], ["NSID", "EXPIRE"]),
    "signed": (["+norec", "+edns=0", "+nocookie", "+dnssec", "www." + ZONE], "NOERROR", ["RRSIG\tA 13"], []),
    "ednstcp": (["+norec", "+edns=0", "+nocookie", "+tcp", "soa", ZONE], "NOERROR", ["IN\tSOA"], []),
    "zflag": (["+norec", "+noedns", "+zflag", "soa", ZONE], "NOERROR", ["IN\tSOA"], ["MBZ"]),
    "nxdomain-do": (["+norec", "+edns=0", "+dnssec", "nothing." + ZONE], "NOERROR", ["\tNSEC\t"], []),
    "subnet-site": (["+norec", "+edns=0", "+subnet=127.0.0.0/24", "www." + ZONE], "NOERROR",
                    ["CLIENT-SUBNET: 127.0.0.0/24/8"], []),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_genreport_case(full: Dnsd, case: str) -> None:
    args, expected, present, absent = CASES[case]
    out = full.dig(*args)
    assert status(out) == expected, out
    assert "aa" in flags(out) or expected != "NOERROR", out
    assert "ra" not in flags(out) and "ad" not in flags(out), out
    for text in present:
        assert text in out, (text, out)
    for text in absent:
        assert text not in out, (text, out)
    if "+noedns" in args:
        assert not edns_line(out), out
    elif edns_line(out):
        assert "flags:" in edns_line(out) and "0x" not in edns_line(out).split("flags:")[1].split(";")[0], out


def test_opcode_notimp_with_everything_on(full: Dnsd) -> None:
    out = full.dig("+norec", "+noedns", "+opcode=15", "+header-only", "soa", ZONE)
    assert status(out) == "NOTIMP" and flags(out) == {"qr"}, out
