"""dnsd as a real process, questioned by dig and dnspython: one test per standards point."""

from __future__ import annotations

import re
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from carousel.config import EtcdConfig
from carousel.etcdserver import EtcdProcess
from tests.integration.test_dnsd_helpers import (
    DIG,
    WWW,
    Dnsd,
    Registry,
    addr,
    dnsd_toml,
    edge,
    has_ipv6_loopback,
    start_dnsd,
    sync,
)
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(60)
needs_dig = pytest.mark.skipif(DIG is None, reason="dig is not installed")
MANY = 20


@pytest.fixture(scope="module")
def dnsd(shared_etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsd]:
    """One dnsd for the module: 3 edges on www and @, 20 on 'many' (answers capped at 20)."""
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/std-{uuid.uuid4().hex[:8]}/")

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in (1, 2, 3)])
        await reg.put_all([edge(100 + i, service="many") for i in range(MANY)])
        await reg.etcd.close()  # leases stay: they outlive the module

    sync(register())
    procs = ProcessGroup(tmp_path_factory.mktemp("dnsd-std"))
    config = dnsd_toml(
        cfg,
        dns={"max_answer_records": MANY},
        ipv6=has_ipv6_loopback(),
    ).replace('services = { "www" = "edge", "@" = "edge" }',
              'services = { "www" = "edge", "@" = "edge", "many" = "many" }')  # fmt: skip
    try:
        yield start_dnsd(procs, "dnsd-std", config)
    finally:
        procs.stop_all()


def flags(dig_output: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]+);", dig_output)
    assert m, dig_output
    return set(m.group(1).split())


def status(dig_output: str) -> str:
    m = re.search(r"status: (\w+)", dig_output)
    assert m, dig_output
    return m.group(1)


@needs_dig
def test_aa_set_ra_clear_rd_copied(dnsd: Dnsd) -> None:
    out = dnsd.dig(WWW)
    assert status(out) == "NOERROR"
    assert flags(out) == {"qr", "aa", "rd"}
    assert flags(dnsd.dig("+nordflag", WWW)) == {"qr", "aa"}


@needs_dig
def test_nxdomain_with_soa_in_authority(dnsd: Dnsd) -> None:
    out = dnsd.dig("nothing-here.example.test")
    assert status(out) == "NXDOMAIN"
    assert "aa" in flags(out)
    soa = re.search(r"^example\.test\.\s+(\d+)\s+IN\s+SOA\s", out, re.M)
    assert soa and int(soa.group(1)) == 60  # min(SOA TTL 3600, minimum 60)
    assert "ANSWER: 0" in out


@needs_dig
def test_nodata_with_soa_in_authority(dnsd: Dnsd) -> None:
    out = dnsd.dig("mail.example.test", "AAAA")
    assert status(out) == "NOERROR"
    assert "ANSWER: 0" in out and "AUTHORITY: 1" in out
    assert re.search(r"^example\.test\.\s+60\s+IN\s+SOA\s", out, re.M)


@needs_dig
def test_refused_outside_our_zones(dnsd: Dnsd) -> None:
    out = dnsd.dig("www.example.org")
    assert status(out) == "REFUSED"
    assert "aa" not in flags(out)


@needs_dig
@pytest.mark.parametrize("opcode", ["1", "2", "4", "5"])
def test_notimp_for_opcodes_other_than_query(dnsd: Dnsd, opcode: str) -> None:
    out = dnsd.dig(f"+opcode={opcode}", "+cdflag", "+adflag", WWW)
    assert status(out) == "NOTIMP"
    assert flags(out) == {"qr"}  # no RD, CD or AD copied
    assert "QUERY: 0, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 0" in out


@needs_dig
def test_tsig_with_an_unknown_key_gets_notauth_badkey(dnsd: Dnsd) -> None:
    out = dnsd.dig("-y", "hmac-sha256:unknown-key:c2VjcmV0c2VjcmV0c2VjcmV0", WWW)
    assert status(out) == "NOTAUTH", out
    assert re.search(r"unknown-key\.\s+0\s+ANY\s+TSIG\s+hmac-sha256\.\s+\d+ 300 0\s+\d+ BADKEY 0", out), out


@needs_dig
def test_edns_version_above_zero_gets_badvers(dnsd: Dnsd) -> None:
    out = dnsd.dig("+edns=1", "+noednsnegotiation", WWW)
    assert status(out) == "BADVERS"
    assert "EDNS: version: 0" in out


@needs_dig
def test_no_opt_without_edns(dnsd: Dnsd) -> None:
    out = dnsd.dig("+noedns", WWW)
    assert "OPT PSEUDOSECTION" not in out
    r = dnsd.query(use_edns=False)
    assert r.edns == -1 and not r.additional


@needs_dig
def test_opt_with_edns_advertises_our_size_and_echoes_do(dnsd: Dnsd) -> None:
    out = dnsd.dig("+dnssec", "+bufsize=4096", WWW)
    assert re.search(r"EDNS: version: 0, flags: do; udp: 1232", out), out


@needs_dig
def test_unknown_options_are_not_echoed(dnsd: Dnsd) -> None:
    out = dnsd.dig("+ednsopt=65001:c0ffee", "+cookie", "+nsid", WWW)
    assert status(out) == "NOERROR"
    opt = out.split("OPT PSEUDOSECTION", 1)[1].split("QUESTION SECTION", 1)[0]
    assert "65001" not in opt and "COOKIE" not in opt and "NSID" not in opt, opt


@needs_dig
def test_truncation_then_tcp_retry_with_20_edges(dnsd: Dnsd) -> None:
    udp = dnsd.dig("+noedns", "+ignore", "many.example.test", "AAAA")
    assert "tc" in flags(udp) and "ANSWER: 0" in udp
    assert "QUERY: 1" in udp  # the question is kept
    retried = dnsd.dig("+noedns", "many.example.test", "AAAA")
    assert "Truncated, retrying in TCP mode" in retried
    assert "tc" not in flags(retried)
    assert len(re.findall(r"^many\.example\.test\.\s+\d+\s+IN\s+AAAA\s", retried, re.M)) == MANY
    # dnspython: the UDP answer fits 512 bytes, the TCP one carries all 20
    r = dnsd.query("many.example.test", "AAAA", use_edns=False)
    assert r.flags & dns.flags.TC and len(r.to_wire()) <= 512
    assert len(dnsd.query("many.example.test", "AAAA", tcp=True).answer[0]) == MANY


def test_edns_size_avoids_truncation(dnsd: Dnsd) -> None:
    r = dnsd.query("many.example.test", "AAAA", use_edns=0, payload=1232)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == MANY


def test_0x20_case_is_kept_byte_for_byte(dnsd: Dnsd) -> None:
    q = dns.message.make_query("wWw.ExAmPlE.TeSt", "A")
    raw = q.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(raw, ("127.0.0.1", dnsd.port))
        response, _ = s.recvfrom(4096)
    qlen = len(raw) - 12
    assert response[12 : 12 + qlen] == raw[12:]
    r = dns.message.from_wire(response)
    assert r.question[0].name.to_text() == "wWw.ExAmPlE.TeSt."
    assert len(r.answer[0]) == 3


@needs_dig
def test_soa_ns_and_any(dnsd: Dnsd) -> None:
    soa = dnsd.query("example.test", "SOA").answer[0][0]
    assert soa.mname.to_text() == "ns1.example.test." and soa.minimum == 60
    r = dnsd.query("example.test", "NS")
    assert r.answer[0][0].target.to_text() == "ns1.example.test."
    assert r.additional[0][0].address == "127.0.0.1"  # glue
    out = dnsd.dig(WWW, "ANY")
    assert '"RFC8482"' in out and "ANSWER: 1" in out


def test_apex_and_aaaa_from_ipv6_registrations(dnsd: Dnsd) -> None:
    assert sorted(dnsd.addresses("example.test")) == [addr(1), addr(2), addr(3)]
    assert sorted(dnsd.addresses(WWW, "AAAA")) == ["fd00::1", "fd00::2", "fd00::3"]


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listener_udp_and_tcp(dnsd: Dnsd) -> None:
    assert sorted(dnsd.addresses(host="::1")) == [addr(1), addr(2), addr(3)]
    r = dnsd.query(WWW, "AAAA", tcp=True, host="::1")
    assert len(r.answer[0]) == 3


def _framed(msg: dns.message.Message) -> bytes:
    raw = msg.to_wire()
    return struct.pack("!H", len(raw)) + raw


def _read_framed(sock: socket.socket) -> dns.message.Message:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    (size,) = struct.unpack("!H", exactly(2))
    return dns.message.from_wire(exactly(size))


def test_tcp_serves_several_pipelined_queries_in_order(dnsd: Dnsd) -> None:
    queries = [dns.message.make_query(n, t) for n, t in
               [(WWW, "A"), ("example.test", "SOA"), ("nope.example.test", "A"), (WWW, "AAAA")]]  # fmt: skip
    with socket.create_connection(("127.0.0.1", dnsd.port), timeout=3) as s:
        s.sendall(b"".join(_framed(q) for q in queries))  # all at once, one write
        answers = [_read_framed(s) for _ in queries]
        s.sendall(_framed(queries[0]))  # and the connection stays usable
        answers.append(_read_framed(s))
    assert [a.id for a in answers] == [q.id for q in queries] + [queries[0].id]
    assert answers[2].rcode() == dns.rcode.NXDOMAIN
    assert answers[1].answer[0].rdtype == dns.rdatatype.SOA


def test_config_error_exits_2_naming_the_key(tmp_path: Path, procs: ProcessGroup) -> None:
    d = procs.daemon(
        "dnsd", "bad", '[dns]\nlisten = ["127.0.0.1:0"]\nworkers = "many"\n[[zone]]\norigin = "x.test"\n'
    )
    assert d.wait(20) == 2
    assert "dns.workers" in d.output() and "expected an integer" in d.output()
    d = procs.daemon(
        "dnsd",
        "bad2",
        """
[[zone]]
origin = "x.test"
[[zone.ns]]
name = "ns1"
[[zone.record]]
name = "www"
type = "CNAME"
value = "elsewhere.test."
[[zone.record]]
name = "www"
type = "TXT"
value = "no"
""",
    )
    assert d.wait(20) == 2
    assert "zone[0].record[0]" in d.output() and "CNAME" in d.output()


def test_taken_port_exits_1_with_a_clear_message(
    dnsd: Dnsd, etcd_cfg: EtcdConfig, procs: ProcessGroup
) -> None:
    config = dnsd_toml(etcd_cfg).replace('"127.0.0.1:0"', f'"127.0.0.1:{dnsd.port}"')
    d = procs.daemon("dnsd", "clash", config)
    assert d.wait(20) == 1
    assert f"cannot listen on 127.0.0.1:{dnsd.port}" in d.output()
