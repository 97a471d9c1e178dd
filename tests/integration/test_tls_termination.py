"""TLS termination with real clients: SNI picks the certificate, modern settings, reload, redirect, HSTS."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from carousel.etcdserver import free_port
from edge.testing import read_response, running_edge
from sampleapp.main import start_app
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(90)

NAMES = {"a": ["a.example.test"], "b": ["b.example.test", "*.w.example.test"]}


def write_cert(ca: trustme.CA, directory: Path, name: str, hosts: list[str]) -> tuple[str, str]:
    cert = ca.issue_cert(*hosts)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Any]:
    ca = trustme.CA()
    files: dict[str, Any] = {"ca": ca, "dir": tmp_path}
    for name, hosts in NAMES.items():
        files[name] = write_cert(ca, tmp_path, name, hosts)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    files["ca.pem"] = str(tmp_path / "ca.pem")
    return files


@pytest.fixture
async def ap() -> AsyncIterator[int]:
    runner, port = await start_app("127.0.0.1", 0, "ap1")
    yield port
    await runner.cleanup()


def edge_config(ap_port: int, certs: dict[str, Any], **tls: Any) -> dict[str, Any]:
    return {
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{ap_port}"}]}},
        "route": [{"path": "/", "pool": "app"}],
        "tls": {
            "port": 0,
            "certificate": [
                {"cert_file": certs["a"][0], "key_file": certs["a"][1]},
                {"cert_file": certs["b"][0], "key_file": certs["b"][1]},
            ],
            **tls,
        },
    }


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def https_get(
    port: int, host: str, ctx: ssl.SSLContext, path: str = "/echo"
) -> tuple[dict[str, Any], ssl.SSLObject, int]:
    """One request over a fresh TLS connection; (peer certificate, ssl object, status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        resp = await asyncio.wait_for(read_response(reader), 5)
        sslobj = writer.get_extra_info("ssl_object")
        return writer.get_extra_info("peercert"), sslobj, resp.status
    finally:
        writer.close()


def sans(cert: dict[str, Any]) -> list[str]:
    return [v for k, v in cert["subjectAltName"] if k == "DNS"]


async def test_python_ssl_and_aiohttp_get_the_certificate_of_the_name_they_ask_for(certs, ap) -> None:
    ctx = client_context(certs["ca"])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    cfg = edge_config(ap, certs)
    cfg["http2"] = {"enabled": False}  # ALPN then picks http/1.1 (h2 by ALPN: test_h2.py)
    async with running_edge(cfg) as edge:
        for host, expected in (
            ("a.example.test", NAMES["a"]),
            ("b.example.test", NAMES["b"]),
            ("deep.w.example.test", NAMES["b"]),
        ):
            cert, sslobj, status = await https_get(edge.tls_port, host, ctx)
            assert status == 200 and sans(cert) == expected, host
            assert sslobj.selected_alpn_protocol() == "http/1.1"
            assert sslobj.version() == "TLSv1.3"
        # No SNI (an IP address) or an unknown name: the first certificate, the default.
        plain = client_context(certs["ca"])
        plain.check_hostname = False
        cert, _, _ = await https_get(edge.tls_port, "unknown.example.test", plain)
        assert sans(cert) == NAMES["a"]
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"https://127.0.0.1:{edge.tls_port}/echo",
                ssl=ctx,
                server_hostname="b.example.test",
                headers={"Host": "b.example.test"},
            ) as resp:
                assert resp.status == 200
                echo = await resp.json()
        # Plain HTTP to the AP, which learns the client spoke HTTPS.
        headers = {k.lower(): v for k, v in echo["headers"]}
        assert headers["x-forwarded-proto"] == "https"
        assert "proto=https" in headers["forwarded"]


async def test_curl_and_openssl_s_client_see_the_right_certificate(certs, ap) -> None:
    async with running_edge(edge_config(ap, certs)) as edge:
        port = edge.tls_port

        def curl(host: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "--cacert", certs["ca.pem"], "--resolve", f"{host}:{port}:127.0.0.1",
                 "-o", "/dev/null", "-w", "%{http_code} %{http_version} %{ssl_verify_result}",
                 f"https://{host}:{port}/echo"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip

        def s_client(host: str) -> str:
            out = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", host,
                 "-alpn", "http/1.1", "-CAfile", certs["ca.pem"], "-verify_hostname", host],
                input="", capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            pem = out.stdout[out.stdout.index("-----BEGIN CERTIFICATE-----") :]
            pem = pem[: pem.index("-----END CERTIFICATE-----") + 25]
            san = subprocess.run(
                ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                input=pem, capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            return out.stdout + san.stdout

        # curl verifies the certificate against the name it asked for.
        for host in ("a.example.test", "b.example.test", "x.w.example.test"):
            out = await asyncio.to_thread(curl, host)
            # curl picks HTTP/2 by ALPN ([http2] is on by default); the certificate is what counts here.
            assert out.stdout == "200 2 0", (host, out.stdout, out.stderr)
        out_a = await asyncio.to_thread(s_client, "a.example.test")
        out_b = await asyncio.to_thread(s_client, "b.example.test")
    assert "DNS:a.example.test" in out_a and "DNS:b.example.test" not in out_a
    assert "DNS:b.example.test, DNS:*.w.example.test" in out_b
    for out in (out_a, out_b):
        assert "ALPN protocol: http/1.1" in out
        assert "Verify return code: 0 (ok)" in out


async def test_only_tls_12_and_up_with_forward_secret_aead_ciphers(certs, ap) -> None:
    async with running_edge(edge_config(ap, certs)) as edge:
        tls12 = client_context(certs["ca"])
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        _, sslobj, status = await https_get(edge.tls_port, "a.example.test", tls12)
        assert status == 200 and sslobj.version() == "TLSv1.2"
        cipher = sslobj.cipher()[0]
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher

        old = client_context(certs["ca"])
        old.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():  # deliberately old
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        # The handshake is refused (asyncio's TLS closes without flushing the alert).
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await https_get(edge.tls_port, "a.example.test", old)
        # A client willing to speak TLS 1.1 (openssl at security level 0) gets no session either.
        out = await asyncio.to_thread(
            subprocess.run,
            ["openssl", "s_client", "-connect", f"127.0.0.1:{edge.tls_port}", "-tls1_1",
             "-cipher", "DEFAULT:@SECLEVEL=0"],
            input="", capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.returncode != 0 and "Cipher is (NONE)" in out.stdout, out.stdout[-1000:]

        weak = client_context(certs["ca"])
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("AES128-SHA:AES256-GCM-SHA384")  # RSA key exchange: no forward secrecy
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await https_get(edge.tls_port, "a.example.test", weak)


async def test_redirect_to_https_and_hsts(certs, ap) -> None:
    cfg = edge_config(ap, certs, redirect_http=True, redirect_port=8443, hsts_max_age=600)
    async with running_edge(cfg) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /echo?x=1 HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
        resp = await asyncio.wait_for(read_response(reader), 5)
        writer.write(b"POST /form HTTP/1.1\r\nHost: a.example.test:80\r\nContent-Length: 1\r\n\r\nx")
        post = await asyncio.wait_for(read_response(reader), 5)
        writer.write(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
        acme = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert (resp.status, resp.header("location")) == (301, "https://a.example.test:8443/echo?x=1")
        assert (post.status, post.header("location")) == (308, "https://a.example.test:8443/form")
        assert acme.status == 404 and acme.header("strict-transport-security") is None  # the AP's answer
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"https://127.0.0.1:{edge.tls_port}/echo",
                ssl=client_context(certs["ca"]),
                server_hostname="a.example.test",
            ) as https:
                assert https.status == 200
                assert https.headers["Strict-Transport-Security"] == "max-age=600"


async def keepalive_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> int:
    writer.write(f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    resp = await asyncio.wait_for(read_response(reader), 5)
    assert resp.header("connection") != "close"
    return resp.status


async def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listening on {port}"
            await asyncio.sleep(0.05)


async def test_sighup_reload_keeps_a_live_keepalive_connection(certs, ap, procs: ProcessGroup) -> None:
    port, tls_port = free_port(), free_port()
    cert_file, key_file = certs["a"]
    edge = procs.daemon(
        "edge",
        "edge-tls",
        f"""
[edge]
port = {port}
[tls]
port = {tls_port}
reload_interval = 0
[[tls.certificate]]
cert_file = "{cert_file}"
key_file = "{key_file}"
[pool.app]
members = [{{ address = "127.0.0.1:{ap}" }}]
[[route]]
path = "/"
pool = "app"
""",
    )
    await wait_listening(tls_port)
    old_ca = certs["ca"]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tls_port, ssl=client_context(old_ca), server_hostname="a.example.test"
    )
    first_serial = writer.get_extra_info("peercert")["serialNumber"]
    assert await keepalive_get(reader, writer, "a.example.test") == 200

    # Renew: a new certificate from another CA replaces the files, then SIGHUP.
    new_ca = trustme.CA()
    write_cert(new_ca, certs["dir"], "a", ["a.example.test"])
    edge.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        try:
            cert, _, _ = await https_get(tls_port, "a.example.test", client_context(new_ca))
            break
        except ssl.SSLError:  # still the old certificate
            assert time.monotonic() < deadline, edge.output()[-2000:]
            await asyncio.sleep(0.05)
    assert cert["serialNumber"] != first_serial
    # The connection opened before the reload is still alive and still serves.
    for _ in range(3):
        assert await keepalive_get(reader, writer, "a.example.test") == 200
    assert writer.get_extra_info("peercert")["serialNumber"] == first_serial
    writer.close()
    assert "certificates reloaded" in edge.output()


async def test_changed_files_are_picked_up_without_a_signal(certs, ap) -> None:
    cfg = edge_config(ap, certs, reload_interval=0.1)
    async with running_edge(cfg) as edge:
        ctx = client_context(certs["ca"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", edge.tls_port, ssl=ctx, server_hostname="b.example.test"
        )
        assert await keepalive_get(reader, writer, "b.example.test") == 200
        new_ca = trustme.CA()
        write_cert(new_ca, certs["dir"], "b", ["b.example.test", "new.example.test"])
        deadline = time.monotonic() + 5
        while edge.certificates is not None and edge.certificates.reloads == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        cert, _, status = await https_get(edge.tls_port, "new.example.test", client_context(new_ca))
        assert status == 200 and "new.example.test" in sans(cert)
        assert await keepalive_get(reader, writer, "b.example.test") == 200
        writer.close()


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carousel.cli", "check-config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_bad_certificate_or_key_is_a_clear_config_error(certs, tmp_path: Path) -> None:
    cert_a, key_a = certs["a"]
    _, key_b = certs["b"]
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = {
        "mismatch": (
            cert_a,
            key_b,
            "tls.certificate[1].key_file: " + f"{key_b} does not match the certificate",
        ),
        "junk cert": (
            str(junk),
            key_a,
            "tls.certificate[1].cert_file: " + f"{junk} holds no PEM certificate",
        ),
        "junk key": (cert_a, str(junk), "tls.certificate[1].key_file: " + f"{junk} holds no usable PEM"),
        "missing": (cert_a, str(tmp_path / "gone.key"), "tls.certificate[1].key_file: cannot read"),
    }
    for name, (cert, key, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.toml"
        path.write_text(
            f"""
[edge]
port = 8080
[[tls.certificate]]
cert_file = "{cert_a}"
key_file = "{key_a}"
[[tls.certificate]]
cert_file = "{cert}"
key_file = "{key}"
[[route]]
path = "/"
respond = 200
"""
        )
        out = check_config(path)
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert f"{path}: {message}" in out.stderr, (name, out.stderr)
        # The daemon refuses to start the same way.
        run = subprocess.run(
            [sys.executable, "-m", "carousel.cli", "edge", "--config", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 2 and message in run.stderr, (name, run.stderr)
    good = tmp_path / "good.toml"
    good.write_text(
        f'[[tls.certificate]]\ncert_file = "{cert_a}"\nkey_file = "{key_a}"\n'
        '[[route]]\npath = "/"\nrespond = 200\n'
    )
    assert check_config(good).returncode == 0


async def test_status_reports_tls(certs, ap) -> None:
    async with running_edge(edge_config(ap, certs)) as edge:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{edge.admin_port}/status") as resp:
                status = json.loads(await resp.text())
    tls = status["security"]["tls"]
    assert tls["port"] == edge.tls_port
    assert tls["names"] == ["a.example.test", "b.example.test", "*.w.example.test"]


async def test_sighup_to_the_supervisor_reloads_every_worker(certs, ap, procs: ProcessGroup) -> None:
    port, tls_port = free_port(), free_port()
    cert_file, key_file = certs["a"]
    edge = procs.daemon(
        "edge",
        "edge-workers",
        f"""
[edge]
port = {port}
workers = 2
[tls]
port = {tls_port}
reload_interval = 0
[[tls.certificate]]
cert_file = "{cert_file}"
key_file = "{key_file}"
[[route]]
path = "/"
respond = 200
""",
    )
    deadline = time.monotonic() + 15
    while edge.output().count("edge listening") < 2:  # both workers up
        assert time.monotonic() < deadline, edge.output()[-3000:]
        await asyncio.sleep(0.05)
    new_ca = trustme.CA()
    write_cert(new_ca, certs["dir"], "a", ["a.example.test"])
    edge.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while edge.output().count("certificates reloaded") < 2:
        assert time.monotonic() < deadline, edge.output()[-3000:]
        await asyncio.sleep(0.05)
    # New connections land on either worker (SO_REUSEPORT): every one sees the new certificate.
    for _ in range(12):
        _, _, status = await https_get(tls_port, "a.example.test", client_context(new_ca), path="/")
        assert status == 200
    assert edge.running()
