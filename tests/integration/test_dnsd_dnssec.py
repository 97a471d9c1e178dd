"""A signed zone served by a real dnsd, checked by independent validators: delv, dnspython, unbound."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from carousel.config import EtcdConfig
from carousel.etcdserver import EtcdProcess, die_with_parent
from tests.integration.test_dnsd_helpers import (
    WWW,
    Dnsd,
    Registry,
    addr,
    dnsd_toml,
    edge,
    start_dnsd,
    sync,
)
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(120)
DELV = shutil.which("delv")
DIG = shutil.which("dig")
UNBOUND = shutil.which("unbound") or (Path("/usr/sbin/unbound").exists() and "/usr/sbin/unbound") or None
ZONE_NAME = dns.name.from_text("example.test.")


def keygen(directory: Path, *args: str) -> Path:
    """`carousel dnssec keygen`, as a user runs it; returns the .private file."""
    cmd = [sys.executable, "-m", "carousel.cli", "dnssec", "keygen", "example.test", "--dir", str(directory)]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, check=True, timeout=30)
    return Path(out.stdout.strip())


def key_tables(keys: list[tuple[Path, str, str]]) -> str:
    return "\n".join(
        f'[[zone.dnssec.key]]\nfile = "{p}"\nrole = "{role}"\nstate = "{state}"\n' for p, role, state in keys
    )


def anchor_file(directory: Path, key_file: Path) -> Path:
    """A delv/BIND trust-anchors file for the zone's key (from its .key file)."""
    text = Path(str(key_file).removesuffix(".private") + ".key").read_text()
    flags, proto, alg, b64 = re.search(r"DNSKEY (\d+) (\d+) (\d+) (\S+)", text).groups()  # type: ignore[union-attr]
    path = directory / "anchor.conf"
    path.write_text(f'trust-anchors {{ example.test. static-key {flags} {proto} {alg} "{b64}"; }};\n')
    return path


@pytest.fixture(scope="module")
def signed(
    shared_etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Dnsd, Path, EtcdConfig]]:
    """dnsd serving example.test signed with a CSK made by `carousel dnssec keygen`; 3 edges."""
    base = tmp_path_factory.mktemp("dnssec")
    key = keygen(base)
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/sec-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in (1, 2, 3)])
        await reg.etcd.close()

    sync(register())
    procs = ProcessGroup(base)
    config = dnsd_toml(cfg, zone_extra=key_tables([(key, "csk", "active")]))
    try:
        yield start_dnsd(procs, "dnsd-sec", config), anchor_file(base, key), cfg
    finally:
        procs.stop_all()


def delv(d: Dnsd, anchor: Path, name: str, rdtype: str) -> str:
    assert DELV is not None
    cmd = [DELV, "@127.0.0.1", "-p", str(d.port), "-a", str(anchor), "+root=example.test", name, rdtype]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    return out.stdout + out.stderr


@pytest.mark.skipif(DELV is None, reason="delv is not installed (Debian bind9-dnsutils)")
@pytest.mark.parametrize(
    ("name", "rdtype", "expect"),
    [
        (WWW, "A", "; fully validated"),
        (WWW, "AAAA", "; fully validated"),
        ("mail.example.test", "AAAA", "; negative response, fully validated"),  # NODATA
        ("nothing-here.example.test", "A", "; negative response, fully validated"),  # NXDOMAIN
        ("example.test", "DNSKEY", "; fully validated"),
    ],
)
def test_delv_fully_validates(
    signed: tuple[Dnsd, Path, EtcdConfig], name: str, rdtype: str, expect: str
) -> None:
    d, anchor, _ = signed
    out = delv(d, anchor, name, rdtype)
    assert expect in out, out


@pytest.mark.skipif(DIG is None, reason="dig is not installed")
def test_dig_dnssec_shows_the_rrsig_and_plain_dig_does_not(signed: tuple[Dnsd, Path, EtcdConfig]) -> None:
    d, _, _ = signed
    out = d.dig("+dnssec", WWW, "A")
    assert re.search(r"^www\.example\.test\.\s+5\s+IN\s+RRSIG\s+A 13 3 5 ", out, re.M), out
    assert "RRSIG" not in d.dig(WWW, "A")


def test_dnspython_validates_answers_and_denials(signed: tuple[Dnsd, Path, EtcdConfig]) -> None:
    d, _, _ = signed
    keys_msg = d.query("example.test", "DNSKEY", use_edns=0, want_dnssec=True)
    dnskey = keys_msg.find_rrset(keys_msg.answer, ZONE_NAME, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
    keyring = {ZONE_NAME: dnskey}
    for name, rdtype, section in [(WWW, "A", "answer"), (WWW, "AAAA", "answer"),
                                  ("mail.example.test", "TXT", "authority"),
                                  ("nothing.example.test", "A", "authority")]:  # fmt: skip
        r = d.query(name, rdtype, use_edns=0, want_dnssec=True)
        rrsets = getattr(r, section)
        sigs = {(s.name, s.covers): s for s in rrsets if s.rdtype == dns.rdatatype.RRSIG}
        data = [s for s in rrsets if s.rdtype != dns.rdatatype.RRSIG]
        assert data and len(sigs) == len(data), (name, rdtype)
        for rrset in data:
            dns.dnssec.validate(rrset, sigs[(rrset.name, rrset.rdtype)], keyring)


@pytest.mark.parametrize("name", [WWW, "mail.example.test", "example.test"])
def test_nsec_and_rrsig_queries_at_an_existing_name_get_the_records_not_a_nodata(
    signed: tuple[Dnsd, Path, EtcdConfig], name: str
) -> None:
    # The name's NSEC lists NSEC and RRSIG among its types (RFC 4034 §4.1.2): a NODATA for
    # either contradicts its own proof. Answered as BIND and Knot answer a name with an NSEC.
    d, _, _ = signed
    keys_msg = d.query("example.test", "DNSKEY", use_edns=0, want_dnssec=True)
    keyring = {
        ZONE_NAME: keys_msg.find_rrset(keys_msg.answer, ZONE_NAME, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
    }
    owner = dns.name.from_text(name)
    for tcp in (False, True):
        r = d.query(name, "NSEC", use_edns=0, want_dnssec=True, tcp=tcp)
        assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and not r.authority, r
        nsec = r.find_rrset(r.answer, owner, dns.rdataclass.IN, dns.rdatatype.NSEC)
        sig = r.find_rrset(r.answer, owner, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.NSEC)
        dns.dnssec.validate(nsec, sig, keyring)
        types = set(_bitmap_types(nsec[0]))
        assert {dns.rdatatype.NSEC, dns.rdatatype.RRSIG} <= types
        assert {rr.rdtype for rr in r.answer} == {dns.rdatatype.NSEC, dns.rdatatype.RRSIG}

        r = d.query(name, "RRSIG", use_edns=0, want_dnssec=True, tcp=tcp)
        assert r.rcode() == dns.rcode.NOERROR and r.answer and not r.authority, r
        assert all(rr.rdtype == dns.rdatatype.RRSIG and rr.name == owner for rr in r.answer)
        covered = {rr.covers for rr in r.answer}
        # Every type the NSEC says the name has is signed, and each of those RRSIGs is served.
        assert covered == types - {dns.rdatatype.RRSIG}, (covered, types)
    # Plain DNS (no DO) is unchanged: no NSEC or RRSIG records exist outside DNSSEC answers.
    assert not d.query(name, "NSEC", use_edns=0).answer


def _bitmap_types(nsec: Any) -> list[int]:
    out = []
    for window, bitmap in nsec.windows:
        for i, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    out.append(window * 256 + i * 8 + bit)
    return out


# --- a validating resolver ----------------------------------------------------------------


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def _unbound_conf(directory: Path, port: int, dnsd_port: int, anchor_key: str) -> Path:
    conf = directory / "unbound.conf"
    conf.write_text(f"""server:
    interface: 127.0.0.1
    port: {port}
    do-daemonize: no
    use-syslog: no
    logfile: ""
    username: ""
    chroot: ""
    directory: "{directory}"
    pidfile: "{directory}/unbound.pid"
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor: "{anchor_key}"
    val-log-level: 2
    verbosity: 1
    cache-max-ttl: 1
    cache-max-negative-ttl: 1
    local-zone: "test." nodefault
    harden-referral-path: no
    qname-minimisation: no
    num-threads: 1
    so-reuseport: no
    outgoing-port-permit: 1024-65535
    remote-control:
        control-enable: no
stub-zone:
    name: "example.test."
    stub-addr: 127.0.0.1@{dnsd_port}
""")
    return conf


@pytest.mark.skipif(UNBOUND is None, reason="unbound is not installed (Debian unbound)")
def test_unbound_keeps_ad_while_edges_join_and_leave(
    signed: tuple[Dnsd, Path, EtcdConfig], tmp_path: Path, procs: ProcessGroup
) -> None:
    d, anchor, cfg = signed
    m = re.search(r'static-key (\d+) (\d+) (\d+) "(\S+)"', anchor.read_text())
    assert m
    anchor_key = f"example.test. IN DNSKEY {m.group(1)} {m.group(2)} {m.group(3)} {m.group(4)}"
    port = _free_udp_tcp_port()
    conf = _unbound_conf(tmp_path, port, d.port, anchor_key)
    assert UNBOUND is not None
    check = subprocess.run([UNBOUND + "-checkconf", str(conf)], capture_output=True, text=True, timeout=20)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(
        die_with_parent([UNBOUND, "-d", "-c", str(conf)]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        def resolve() -> tuple[bool, set[str], int]:
            q = dns.message.make_query(WWW, "A", want_dnssec=True)
            q.flags |= dns.flags.AD
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=3)
            addrs = {rr.address for s in r.answer if s.rdtype == dns.rdatatype.A for rr in s}
            return bool(r.flags & dns.flags.AD), addrs, r.rcode()

        deadline = time.monotonic() + 20
        while True:
            try:
                ad, addrs, rcode = resolve()
                break
            except (OSError, dns.exception.Timeout):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert rcode == dns.rcode.NOERROR and ad and addrs == {addr(1), addr(2), addr(3)}

        async def churn() -> None:
            reg = Registry(cfg, ttl=600)
            try:
                for step, (change, i) in enumerate(
                    [("join", 4), ("join", 5), ("leave", 1), ("leave", 4), ("join", 1)]
                ):
                    if change == "join":
                        await reg.put(edge(i))
                    else:
                        await reg.delete(edge(i))
                    expected = {
                        1: {1, 2, 3, 4},
                        2: {1, 2, 3, 4, 5},
                        3: {2, 3, 4, 5},
                        4: {2, 3, 5},
                        5: {1, 2, 3, 5},
                    }
                    want = {addr(n) for n in expected[step + 1]}
                    until = time.monotonic() + 10
                    while True:  # the resolver caches for 1 s (cache-max-ttl): wait for the new set
                        ad, addrs, rcode = await asyncio.to_thread(resolve)
                        assert rcode == dns.rcode.NOERROR and ad, (change, i, addrs)  # AD every time
                        if addrs == want:
                            break
                        assert time.monotonic() < until, (change, i, addrs, want)
                        await asyncio.sleep(0.2)
            finally:
                await reg.etcd.close()

        sync(churn())
        # A name that does not exist: a validated denial, still AD.
        q = dns.message.make_query("nothing.example.test", "A", want_dnssec=True)
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=3)
        assert r.flags & dns.flags.AD and not r.answer
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_a_signed_answer_too_big_for_udp_is_truncated_and_complete_over_tcp(
    shared_etcd: EtcdProcess, tmp_path: Path, procs: ProcessGroup
) -> None:
    key = keygen(tmp_path)
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/sec-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in range(1, 29)])
        await reg.etcd.close()

    sync(register())
    config = dnsd_toml(cfg, dns={"max_answer_records": 28}, zone_extra=key_tables([(key, "csk", "active")]))
    d = start_dnsd(procs, "dnsd-sec-big", config)
    plain = d.query(WWW, "A", use_edns=0, payload=512)
    assert not plain.flags & dns.flags.TC and len(plain.answer[0]) == 28
    r = d.query(WWW, "A", use_edns=0, payload=512, want_dnssec=True)
    assert r.flags & dns.flags.TC and not r.answer
    r = d.query(WWW, "A", use_edns=0, payload=512, want_dnssec=True, tcp=True)
    assert len(r.answer) == 2 and len(r.answer[0]) == 28


def test_prepublish_rollover_keeps_validation(
    shared_etcd: EtcdProcess, tmp_path: Path, procs: ProcessGroup
) -> None:
    """ZSK pre-publish rollover (RFC 6781 §4.1.1.1), each step a config change and a restart."""
    ksk = keygen(tmp_path, "--role", "ksk")
    old = keygen(tmp_path, "--role", "zsk")
    new = keygen(tmp_path, "--role", "zsk")
    anchor = anchor_file(tmp_path, ksk)
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/sec-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in (1, 2)])
        await reg.etcd.close()

    sync(register())
    tag = {p: int(p.name.split("+")[2].split(".")[0]) for p in (old, new)}
    steps = [
        ([(ksk, "ksk", "active"), (old, "zsk", "active")], {tag[old]}, {tag[old]}),
        (
            [(ksk, "ksk", "active"), (old, "zsk", "active"), (new, "zsk", "published")],
            {tag[old], tag[new]},
            {tag[old]},
        ),
        (
            [(ksk, "ksk", "active"), (old, "zsk", "published"), (new, "zsk", "active")],
            {tag[old], tag[new]},
            {tag[new]},
        ),
        ([(ksk, "ksk", "active"), (new, "zsk", "active")], {tag[new]}, {tag[new]}),
    ]
    previous: tuple[dns.rrset.RRset, dns.rrset.RRset, dns.rrset.RRset] | None = None
    for i, (key_list, published, signing) in enumerate(steps):
        d = start_dnsd(procs, f"dnsd-roll-{i}", dnsd_toml(cfg, zone_extra=key_tables(key_list)))
        r = d.query("example.test", "DNSKEY", use_edns=0, want_dnssec=True)
        dnskey = r.find_rrset(r.answer, ZONE_NAME, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
        assert {dns.dnssec.key_id(k) for k in dnskey if k.flags == 256} == published, i
        r = d.query(WWW, "A", use_edns=0, want_dnssec=True)
        a = r.find_rrset(r.answer, dns.name.from_text(WWW), dns.rdataclass.IN, dns.rdatatype.A)
        sig = r.find_rrset(r.answer, a.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.A)
        assert {s.key_tag for s in sig} == signing, i
        dns.dnssec.validate(a, sig, {ZONE_NAME: dnskey})
        if previous is not None:
            # The point of pre-publishing: a resolver holding the last step's DNSKEY set
            # validates this step's signatures, and last step's cached signatures validate
            # against this step's DNSKEY set.
            old_dnskey, old_a, old_sig = previous
            dns.dnssec.validate(a, sig, {ZONE_NAME: old_dnskey})
            dns.dnssec.validate(old_a, old_sig, {ZONE_NAME: dnskey})
        previous = (dnskey, a, sig)
        if DELV is not None:
            out = delv(d, anchor, WWW, "A")
            assert "; fully validated" in out, out
        d.daemon.signal(signal.SIGTERM)
        assert d.daemon.wait(10) == 0


def test_a_bad_key_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "Kbad.private"
    bad.write_text("Private-key-format: v1.3\nAlgorithm: 8 (RSASHA256)\nPrivateKey: AAAA\n")
    cfg = EtcdConfig(endpoints=["127.0.0.1:1"], prefix="/x/")
    path = tmp_path / "dnsd.toml"
    path.write_text(dnsd_toml(cfg, zone_extra=key_tables([(bad, "csk", "active")])))
    out = subprocess.run([sys.executable, "-m", "carousel.cli", "check-config", str(path)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "zone[0].dnssec.key[0].file" in out.stderr and "algorithm 8 is not supported" in out.stderr


def test_dnssec_ds_prints_the_ds_of_the_configured_keys(tmp_path: Path) -> None:
    key = keygen(tmp_path)
    cfg = EtcdConfig(endpoints=["127.0.0.1:1"], prefix="/x/")
    path = tmp_path / "dnsd.toml"
    path.write_text(dnsd_toml(cfg, zone_extra=key_tables([(key, "csk", "active")])))
    out = subprocess.run([sys.executable, "-m", "carousel.cli", "dnssec", "ds", "--config", str(path)],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    tag = int(key.name.split("+")[2].split(".")[0])
    key_text = Path(str(key).removesuffix(".private") + ".key").read_text()
    b64 = key_text.split()[-1]
    dnskey = dns.rdata.from_text("IN", "DNSKEY", f"257 3 13 {b64}")
    ds = dns.dnssec.make_ds(ZONE_NAME, dnskey, "SHA256")
    assert out.stdout.strip() == f"example.test. IN DS {tag} 13 2 {ds.digest.hex().upper()}"
    assert base64.b64decode(b64)  # the .key file holds the public key


@pytest.mark.skipif(DIG is None, reason="dig is not installed")
def test_workers_sign_and_share_the_cookie_secret(
    shared_etcd: EtcdProcess, tmp_path: Path, procs: ProcessGroup
) -> None:
    """workers = 2: each worker signs its own tables and uses the supervisor's cookie secret."""
    key = keygen(tmp_path)
    anchor = anchor_file(tmp_path, key)
    cfg = EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/sec-{uuid.uuid4().hex[:8]}/", timeout=1.0)

    async def register() -> None:
        reg = Registry(cfg, ttl=600)
        await reg.put_all([edge(i) for i in (1, 2, 3)])
        await reg.etcd.close()

    sync(register())
    config = dnsd_toml(cfg, dns={"workers": 2}, zone_extra=key_tables([(key, "csk", "active")]))
    config = config.replace("[dns.rrl]", "[dns.cookies]\nenabled = true\npoll_interval = 0.2\n\n[dns.rrl]")
    d = start_dnsd(procs, "dnsd-sec-workers", config)
    if DELV is not None:
        for _ in range(4):  # SO_REUSEPORT spreads the queries over both workers
            assert "; fully validated" in delv(d, anchor, WWW, "A")
    deadline = time.monotonic() + 10
    while True:  # fresh sockets land on either worker: once both have the secret, one hash per second
        hashes: dict[str, set[str]] = {}
        for _ in range(20):
            out = d.dig("+cookie=0102030405060708", WWW)
            m = re.search(r"; COOKIE: 0102030405060708(01000000)([0-9a-f]{8})([0-9a-f]{16}) \(good\)", out)
            assert m, out
            hashes.setdefault(m.group(2), set()).add(m.group(3))
        if all(len(h) == 1 for h in hashes.values()):
            break
        assert time.monotonic() < deadline, hashes
        time.sleep(0.2)
