"""Shared helpers for the dnsd integration tests (this module holds no tests).

A real dnsd process (``carousel dnsd``) on free loopback ports, a real etcd,
registrations written the way agents write them (ServiceRecord values under
leases, through carousel.etcd.Etcd), and queries through dnspython and dig.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.registry import Keys, ServiceRecord
from tests.procs import Daemon, ProcessGroup

ZONE = "example.test"
WWW = f"www.{ZONE}"
DIG = shutil.which("dig")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def dnsd_toml(
    etcd: EtcdConfig,
    *,
    dns: dict[str, Any] | None = None,
    rrl: dict[str, Any] | None = None,
    zone_extra: str = "",
    ipv6: bool = False,
) -> str:
    """A dnsd config for example.test: www and the apex -> service 'edge'."""
    listen = ["127.0.0.1:0"] + (["[::1]:0"] if ipv6 else [])
    dns_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (dns or {}).items())
    rrl_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (rrl or {"enabled": False}).items())
    return f"""
[dns]
listen = {json.dumps(listen)}
{dns_lines}

[dns.rrl]
{rrl_lines}

[[zone]]
origin = "{ZONE}"
service_ttl = 5
services = {{ "www" = "edge", "@" = "edge" }}
{zone_extra}

[zone.soa]
minimum = 60
ttl = 3600

[[zone.ns]]
name = "ns1"
ipv4 = ["127.0.0.1"]

[[zone.record]]
name = "mail"
type = "A"
value = "192.0.2.25"

[etcd]
endpoints = {json.dumps(etcd.endpoints)}
prefix = "{etcd.prefix}"
timeout = 1.0

[admin]
host = "127.0.0.1"
port = 0
"""


@dataclass
class Dnsd:
    """A running dnsd process and where it listens."""

    daemon: Daemon
    port: int
    admin: str
    listen: list[str] = field(default_factory=list)

    def port_for(self, host: str) -> int:
        """The port of the listener on ``host`` (each listen address binds its own with port 0)."""
        for address in self.listen:
            h, _, p = address.rpartition(":")
            if h.strip("[]") == host:
                return int(p)
        raise KeyError(host)

    def query(self, name: str = WWW, rdtype: str = "A", *, tcp: bool = False, host: str = "127.0.0.1",
              timeout: float = 2.0, **kw: Any) -> dns.message.Message:  # fmt: skip
        q = dns.message.make_query(name, rdtype, **kw)
        port = self.port_for(host)
        if tcp:
            return dns.query.tcp(q, host, port=port, timeout=timeout)
        return dns.query.udp(q, host, port=port, timeout=timeout, ignore_trailing=False)

    def addresses(self, name: str = WWW, rdtype: str = "A", **kw: Any) -> list[str]:
        r = self.query(name, rdtype, **kw)
        return [
            rr.address
            for rrset in r.answer
            for rr in rrset
            if rrset.rdtype == dns.rdatatype.from_text(rdtype)
        ]

    def dig(self, *args: str, host: str = "127.0.0.1") -> str:
        assert DIG is not None, "dig is not installed"
        cmd = [DIG, f"@{host}", "-p", str(self.port_for(host)), "+tries=1", "+time=2", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout

    def http(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        # The admin listener holds its first requests until the registry is loaded (at most
        # dnsd's ADMIN_WAIT, 1 s) and a new dnsd imports aiohttp meanwhile: on a loaded CI
        # machine that passed 2 s. The answer is what is checked, not how fast it comes.
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def status(self) -> dict[str, Any]:
        return json.loads(self.http("/status")[1])

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics, e.g. metric('dnsd_rrl_dropped_total')."""
        _, text = self.http("/metrics")
        for line in text.splitlines():
            if line.startswith(name + (f"{{{labels}}}" if labels else " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def start_dnsd(procs: ProcessGroup, name: str, config: str, *, synced: bool = True,
               timeout: float = 20.0) -> Dnsd:  # fmt: skip
    """Start dnsd; wait for its 'listening' line (ports) and, by default, its first snapshot."""
    daemon = procs.daemon("dnsd", name, config)
    deadline = time.monotonic() + timeout
    ready: dict[str, Any] | None = None
    while ready is None:
        for line in daemon.output().splitlines():
            if '"dnsd listening"' in line:
                ready = json.loads(line)
        if ready is None:
            if not daemon.running():
                raise AssertionError(f"dnsd exited with {daemon.proc.returncode}:\n{daemon.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dnsd did not start:\n{daemon.output()}")
            time.sleep(0.05)
    port = int(ready["listen"][0].rsplit(":", 1)[1])
    d = Dnsd(daemon, port, ready["admin"], ready["listen"])
    while synced:
        try:
            healthy = d.http("/healthz")[0] == 200
        except OSError:  # timeouts too: the admin listener is served only once the first
            healthy = False  # snapshot is answered, and a loaded machine can take over 2 s to it
        if healthy:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"dnsd never loaded the registry:\n{daemon.output()}")
        time.sleep(0.05)
    return d


def edge(i: int, *, state: str = "up", weight: int = 1, service: str = "edge",
         v6: bool = True) -> ServiceRecord:  # fmt: skip
    """Edge number i: 10.0.0.i and fd00::i."""
    return ServiceRecord(
        service, f"edge{i}", 8080, ipv4=(f"10.0.{i // 250}.{i % 250}",),
        ipv6=(f"fd00::{i:x}",) if v6 else (), weight=weight, state=state,  # type: ignore[arg-type]
    )  # fmt: skip


def addr(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250}"


class Registry:
    """Writes registrations like an agent does: each record under its own lease."""

    def __init__(self, cfg: EtcdConfig, ttl: int = 30) -> None:
        self.cfg = cfg
        self.keys = Keys(cfg.prefix)
        self.etcd = Etcd(cfg)
        self.ttl = ttl
        self.leases: dict[str, int] = {}

    async def put(self, record: ServiceRecord, *, ttl: int | None = None) -> int:
        """Register (or update) a record; returns the etcd revision of the write."""
        key = self.keys.service(record.service, record.node)
        lease = self.leases.get(key)
        if lease is None or ttl is not None:
            lease = (await self.etcd.grant(ttl or self.ttl)).id
            self.leases[key] = lease
        return await self.etcd.put(key, record.encode(), lease=lease)

    async def put_all(self, records: Iterable[ServiceRecord]) -> None:
        for r in records:
            await self.put(r)

    async def delete(self, record: ServiceRecord) -> None:
        await self.etcd.delete(self.keys.service(record.service, record.node))

    async def close(self) -> None:
        for lease in self.leases.values():
            try:
                await self.etcd.revoke(lease)
            except Exception:
                pass
        await self.etcd.close()


def sync(coro: Any) -> Any:
    """Run a coroutine from synchronous code (module-scoped fixtures)."""
    return asyncio.run(coro)


async def poll(predicate: Any, within: float, interval: float = 0.002) -> float:
    """Seconds until predicate() (called in a thread: it may block on the network) is true."""
    start = time.monotonic()
    while True:
        if await asyncio.to_thread(predicate):
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)
