"""Every daemon against an etcd that demands TLS client certificates and a password; the edge's admin token.

The etcd comes from the ``secure_etcd`` fixture of test_etcd_security.py
(certificates made with trustme, users and a role limited to /carousel/).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.etcdserver import free_port
from carousel.registry import BanRecord, Keys
from tests.integration.test_etcd_security import PASSWORD, secure_etcd
from tests.procs import ProcessGroup

__all__ = ["secure_etcd"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(120)


def etcd_toml(url: str, files: dict[str, str], password: str = PASSWORD) -> str:
    return f"""
[etcd]
endpoints = ["{url}"]
prefix = "/carousel/"
ca_file = "{files["ca.pem"]}"
cert_file = "{files["client.pem"]}"
key_file = "{files["client.key"]}"
username = "carousel"
password = "{password}"
timeout = 1.0
"""


def agent_toml(node: str, service: str, port: int, check_url: str, etcd: str) -> str:
    return f"""
[agent]
node = "{node}"
ttl = 3
drain_delay = 0.2

[[service]]
name = "{service}"
port = {port}
ipv4 = ["127.0.0.1"]

[service.check]
url = "{check_url}"
interval = 0.2
rise = 1
{etcd}
"""


def edge_toml(port: int, admin: int, etcd: str, **admin_opts: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in admin_opts.items())
    return f"""
[edge]
port = {port}
access_log = false

[admin]
port = {admin}
{extra}
[dos]
enabled = true
soft_rate = 20
hard_rate = 40
ban_seconds = 30

[pool.app]
service = "app"

[[route]]
path = "/"
pool = "app"
{etcd}
"""


def dnsd_toml(etcd: str) -> str:
    return f"""
[dns]
listen = ["127.0.0.1:0"]

[dns.rrl]
enabled = false

[[zone]]
origin = "example.test"
services = {{ "www" = "edge" }}

[[zone.ns]]
name = "ns1"
ipv4 = ["127.0.0.1"]

[admin]
port = 0
{etcd}
"""


def http(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def dnsd_port(output: str) -> int | None:
    for line in output.splitlines():
        if '"dnsd listening"' in line:
            return int(json.loads(line)["listen"][0].rsplit(":", 1)[1])
    return None


async def test_agent_edge_and_dnsd_work_through_tls_client_certificates_and_a_password(
    secure_etcd: Any, procs: ProcessGroup
) -> None:
    _, url, files = secure_etcd
    etcd = etcd_toml(url, files)
    ap, edge_port, edge_admin = free_port(), free_port(), free_port()
    procs.start("ap", ["app", "--host", "127.0.0.1", "--port", str(ap), "--name", "secure-ap"])
    procs.daemon("agent", "agent-ap", agent_toml("apnode", "app", ap, f"http://127.0.0.1:{ap}/healthz", etcd))
    edge = procs.daemon("edge", "edge", edge_toml(edge_port, edge_admin, etcd))
    procs.daemon(
        "agent",
        "agent-edge",
        agent_toml("edgenode", "edge", edge_port, f"http://127.0.0.1:{edge_admin}/healthz", etcd),
    )
    dnsd = procs.daemon("dnsd", "dnsd", dnsd_toml(etcd))

    # The edge found the AP through the registry the agent wrote.
    await until(
        lambda: http(f"http://127.0.0.1:{edge_port}/")[0] == 200, 30, "edge proxies to the registered AP\n"
    )
    status, body = await asyncio.to_thread(http, f"http://127.0.0.1:{edge_port}/echo")
    assert status == 200 and json.loads(body)["ap"] == "secure-ap"
    # dnsd answers with the edge the other agent registered.
    await until(lambda: dnsd_port(dnsd.output()) is not None, 20, "dnsd listening")
    port = dnsd_port(dnsd.output())
    assert port is not None

    def answers() -> list[str]:
        q = dns.message.make_query("www.example.test", "A")
        try:
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=1)
        except Exception:
            return []
        return [rr.address for rrset in r.answer for rr in rrset]

    await until(lambda: answers() == ["127.0.0.1"], 30, "dnsd answers with the registered edge")
    # The edge writes too: a flood's ban lands in the secured etcd.
    flood_status = await asyncio.to_thread(_flood, edge_port, "127.0.0.2")
    assert 403 in flood_status
    secured = EtcdConfig(endpoints=[url], ca_file=files["ca.pem"], cert_file=files["client.pem"],
                         key_file=files["client.key"], username="carousel", password=PASSWORD)  # fmt: skip
    client = Etcd(secured)
    try:
        kv = await client.get(Keys("/carousel/").ban("127.0.0.2"))
    finally:
        await client.close()
    assert kv is not None and BanRecord.decode(kv.value).address == "127.0.0.2"
    assert "refused" not in edge.output()


def _flood(port: int, source: str) -> list[int]:
    statuses = []
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=5) as sock:
        for _ in range(60):
            try:
                sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return statuses
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                statuses.append(int(head.split()[1]))
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += sock.recv(65536)
            except OSError:
                return statuses
    return statuses


@pytest.mark.parametrize("kind", ["agent", "edge", "dnsd"])
async def test_wrong_credentials_stop_each_daemon_with_a_clear_message(
    secure_etcd: Any, procs: ProcessGroup, kind: str
) -> None:
    _, url, files = secure_etcd
    etcd = etcd_toml(url, files, password="wrong")
    port = free_port()
    config = {
        "agent": lambda: agent_toml("n1", "app", port, f"http://127.0.0.1:{port}/healthz", etcd),
        "edge": lambda: edge_toml(port, free_port(), etcd),
        "dnsd": lambda: dnsd_toml(etcd),
    }[kind]()
    daemon = procs.daemon(kind, f"{kind}-bad", config)
    try:
        code = await asyncio.to_thread(daemon.wait, 20)
    except Exception:
        code = None
    out = daemon.output()
    assert code == 1, f"{kind} still running or exit {code}:\n{out[-3000:]}"
    assert f"etcd refused the {kind}'s credentials" in out, out[-3000:]
    assert "authentication failed" in out


async def test_edge_with_a_certificate_etcd_does_not_trust_reports_it(
    secure_etcd: Any, procs: ProcessGroup, tmp_path: Path
) -> None:
    import trustme

    _, url, files = secure_etcd
    stranger = trustme.CA().issue_cert("carousel-client")
    stranger.cert_chain_pems[0].write_to_path(str(tmp_path / "s.pem"))
    stranger.private_key_pem.write_to_path(str(tmp_path / "s.key"))
    bad = dict(files, **{"client.pem": str(tmp_path / "s.pem"), "client.key": str(tmp_path / "s.key")})
    port, admin = free_port(), free_port()
    edge = procs.daemon("edge", "edge-stranger", edge_toml(port, admin, etcd_toml(url, bad)))
    await until(lambda: "etcd unreachable at startup" in edge.output(), 20, "a clear startup warning")
    # The edge itself keeps serving (an etcd outage is not fatal); its pool is empty: 503.
    assert (await asyncio.to_thread(http, f"http://127.0.0.1:{port}/"))[0] == 503


async def test_edge_admin_is_loopback_by_default_and_needs_a_token_when_exposed(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    from carousel.config import ConfigError
    from edge.core.config import from_dict

    assert from_dict({}).admin.host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"admin\.token: an admin listener off loopback requires a token"):
        from_dict({"admin": {"host": "0.0.0.0"}})
    port, admin = free_port(), free_port()
    text = f"""
[edge]
port = {port}
[admin]
host = "0.0.0.0"
port = {admin}
token = "t0ken-t0ken-t0ken-t0ken"
[[route]]
path = "/"
respond = 200
"""
    procs.daemon("edge", "edge-admin", text)
    await until(lambda: http(f"http://127.0.0.1:{port}/")[0] == 200, 20, "edge up")
    # The health endpoint is open (a load balancer or Consul check carries no secret); it says
    # only ok/starting/draining. Everything else on the admin listener needs the token.
    assert (await asyncio.to_thread(http, f"http://127.0.0.1:{admin}/healthz"))[0] == 200
    for path in ("/metrics", "/status"):
        assert (await asyncio.to_thread(http, f"http://127.0.0.1:{admin}{path}"))[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await asyncio.to_thread(http, f"http://127.0.0.1:{admin}{path}", wrong))[0] == 401
        right = {"Authorization": "Bearer t0ken-t0ken-t0ken-t0ken"}
        assert (await asyncio.to_thread(http, f"http://127.0.0.1:{admin}{path}", right))[0] == 200
