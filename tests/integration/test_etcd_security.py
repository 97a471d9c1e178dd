"""The etcd adapter against an etcd that demands TLS client certificates and a password."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trustme

from carousel.config import EtcdConfig
from carousel.etcd import Etcd, EtcdAuthError, EtcdError, EtcdUnavailable
from carousel.etcdserver import EtcdProcess, die_with_parent, etcd_binary

PASSWORD = "s3cret-pass"


@pytest.fixture
def secure_etcd(tmp_path: Path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("carousel-client")
    files = {}
    for name, blob in (
        ("ca.pem", ca.cert_pem),
        ("server.pem", server.cert_chain_pems[0]),
        ("server.key", server.private_key_pem),
        ("client.pem", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
    ):
        path = tmp_path / name
        blob.write_to_path(str(path))
        files[name] = str(path)
    proc = EtcdProcess(tmp_path / "data", log_file=tmp_path / "etcd.log")
    tls = [
        "--cert-file", files["server.pem"], "--key-file", files["server.key"],
        "--client-cert-auth", "--trusted-ca-file", files["ca.pem"],
    ]  # fmt: skip
    proc.extra_args = tls
    url = f"https://{proc.host}:{proc.client_port}"
    cmd = proc.command()
    # Serve clients over TLS only.
    cmd[cmd.index("--listen-client-urls") + 1] = url
    cmd[cmd.index("--advertise-client-urls") + 1] = url
    log = open(proc.log_file, "ab")
    proc.data_dir.mkdir(parents=True, exist_ok=True)
    proc.proc = subprocess.Popen(
        die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))
    base = [
        etcdctl, f"--endpoints={url}", f"--cacert={files['ca.pem']}",
        f"--cert={files['client.pem']}", f"--key={files['client.key']}", "--dial-timeout=2s",
    ]  # fmt: skip
    import time

    deadline = time.monotonic() + 15
    while True:
        r = subprocess.run([*base, "endpoint", "health"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.1)
    for args in (
        ["user", "add", f"root:{PASSWORD}"],
        ["user", "add", f"carousel:{PASSWORD}"],
        ["role", "add", "carousel"],
        ["role", "grant-permission", "carousel", "--prefix=true", "readwrite", "/carousel/"],
        ["user", "grant-role", "carousel", "carousel"],
        ["auth", "enable"],
    ):
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, (args, r.stderr)
    yield proc, url, files
    proc.stop()


def cfg(url: str, files: dict[str, str], **kw: object) -> EtcdConfig:
    base: dict[str, object] = dict(
        endpoints=[url],
        ca_file=files["ca.pem"],
        cert_file=files["client.pem"],
        key_file=files["client.key"],
        username="carousel",
        password=PASSWORD,
        timeout=1.0,
    )
    base.update(kw)
    return EtcdConfig(**base)  # type: ignore[arg-type]


async def test_tls_client_cert_and_password(secure_etcd):
    _, url, files = secure_etcd
    etcd = Etcd(cfg(url, files))
    try:
        await etcd.put("/carousel/services/edge/n1", b"x")
        assert (await etcd.get("/carousel/services/edge/n1")).value == b"x"
        lease = await etcd.grant(5)
        assert await etcd.keepalive(lease.id) > 0
        snap = await etcd.get_prefix("/carousel/")
        assert [kv.key for kv in snap.items] == ["/carousel/services/edge/n1"]
    finally:
        await etcd.close()


async def test_wrong_password_is_a_clear_auth_error(secure_etcd):
    _, url, files = secure_etcd
    etcd = Etcd(cfg(url, files, password="wrong"))
    try:
        with pytest.raises(EtcdAuthError, match="credentials"):
            await etcd.put("/carousel/x", b"1")
    finally:
        await etcd.close()


async def test_permission_outside_prefix_is_refused(secure_etcd):
    _, url, files = secure_etcd
    etcd = Etcd(cfg(url, files))
    try:
        with pytest.raises(EtcdAuthError, match="permission denied"):
            await etcd.put("/elsewhere/x", b"1")
    finally:
        await etcd.close()


async def test_missing_client_certificate_fails_cleanly(secure_etcd):
    _, url, files = secure_etcd
    etcd = Etcd(cfg(url, files, cert_file=None, key_file=None))
    try:
        with pytest.raises(EtcdError):
            await etcd.put("/carousel/x", b"1")
    finally:
        await etcd.close()


async def test_plaintext_client_against_tls_etcd_is_unavailable(secure_etcd):
    _, url, _ = secure_etcd
    plain = EtcdConfig(endpoints=[url.removeprefix("https://")], timeout=0.5)
    etcd = Etcd(plain)
    try:
        with pytest.raises(EtcdUnavailable):
            await etcd.put("/carousel/x", b"1")
    finally:
        await etcd.close()


def agent_toml(url: str, files: dict[str, str], password: str, app_port: int) -> str:
    return f"""
[agent]
node = "secure1"
ttl = 3
drain_delay = 0.5

[etcd]
endpoints = ["{url}"]
ca_file = "{files["ca.pem"]}"
cert_file = "{files["client.pem"]}"
key_file = "{files["client.key"]}"
username = "carousel"
password = "{password}"
timeout = 1.0

[[service]]
name = "app"
port = {app_port}
ipv4 = ["127.0.0.1"]

[service.check]
interval = 0.2
rise = 1
"""


async def test_agent_registers_through_tls_and_auth(secure_etcd, procs):
    import asyncio
    import time

    from carousel.etcdserver import free_port

    _, url, files = secure_etcd
    port = free_port()
    procs.start("ap", ["app", "--port", str(port), "--name", "ap"])
    procs.daemon("agent", "agent-ok", agent_toml(url, files, PASSWORD, port))
    etcd = Etcd(cfg(url, files))
    try:
        deadline = time.monotonic() + 15
        while await etcd.get("/carousel/services/app/secure1") is None:
            assert time.monotonic() < deadline, procs.daemons[-1].output()[-2000:]
            await asyncio.sleep(0.05)
    finally:
        await etcd.close()


async def test_agent_with_wrong_password_exits_with_a_clear_message(secure_etcd, procs):
    import asyncio

    from carousel.etcdserver import free_port

    _, url, files = secure_etcd
    agent = procs.daemon("agent", "agent-bad", agent_toml(url, files, "wrong", free_port()))
    code = await asyncio.to_thread(agent.wait, 20)
    assert code == 1
    out = agent.output()
    assert "etcd refused the agent's credentials" in out, out[-2000:]
    assert "authentication failed" in out
