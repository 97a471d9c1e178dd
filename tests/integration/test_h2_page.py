"""The notes' page (1 HTML + 30 assets of 2-20 KiB) over HTTP/1.1 (6 connections) and HTTP/2 (one),
through the edge over TLS, with 50 ms of round-trip delay: HTTP/2 must be faster.

The client is curl (``--parallel``: up to 6 connections for HTTP/1.1, as browsers
do; one multiplexed connection for HTTP/2). Two ways to add the delay:

* ``netem``: ``tc qdisc ... netem delay 25ms`` on the loopback of a network
  namespace this test creates, with the edge and curl inside it (root, and a
  kernel with sch_netem; skipped with the reason otherwise);
* ``relay``: a relay on 127.0.0.1 holding every chunk 25 ms each way, and the
  first client bytes of a connection one more round trip (the TCP handshake a
  real link would cost), for kernels without netem.

Both fetch all 31 resources in one go (the HTML with its assets): that gives
HTTP/1.1 its six connections from the start, which a browser only opens after
the HTML arrived, so the comparison leans towards HTTP/1.1, not HTTP/2.
Run with ``-s`` to see the times (they go in the README).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from carousel.etcdserver import free_port
from edge.testing import running_edge

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
ONE_WAY = 0.025


def make_site(root: Path) -> list[str]:
    """index.html and 30 assets of 2-20 KiB; the paths, HTML first."""
    (root / "a").mkdir(parents=True)
    paths = []
    for i in range(30):
        size = 2048 + (i * 18 * 1024) // 29  # 2 KiB .. 20 KiB
        name = f"a/asset{i:02}.{('css', 'js', 'svg')[i % 3]}"
        (root / name).write_bytes((f"/* asset {i} */\n".encode() * (size // 16 + 1))[:size])
        paths.append("/" + name)
    links = "".join(f'<script src="{p}"></script>' for p in paths)
    (root / "index.html").write_text(f"<!doctype html><title>page</title>{links}\n")
    return ["/index.html", *paths]


def curl_argv(base: str, paths: list[str], ca: str, h2: bool) -> list[str]:
    argv = ["curl", "-sS", "--parallel", "--cacert", ca, "-w", "%{http_version} %{num_connects}\\n"]
    argv += ["--http2", "--parallel-max", "50"] if h2 else ["--http1.1", "--parallel-max", "6"]
    for p in paths:
        argv += [f"{base}{p}", "-o", "/dev/null"]
    return argv


async def timed(argv: list[str]) -> tuple[float, list[str]]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, err.decode()
    return elapsed, out.decode().split("\n")[:-1]


def check(lines: list[str], h2: bool, count: int) -> None:
    assert len(lines) == count
    versions = {line.split()[0] for line in lines}
    assert versions == ({"2"} if h2 else {"1.1"})
    connections = sum(int(line.split()[1]) for line in lines)
    if h2:
        assert connections == 1, lines
    else:
        assert 1 < connections <= 6, lines


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files: dict[str, Any] = {k: str(tmp_path / f"{k}.pem") for k in ("cert", "key", "ca")}
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    files["paths"] = make_site(tmp_path / "www")
    files["www"] = str(tmp_path / "www")
    return files


def edge_config(site: dict[str, Any], tls_port: int = 0) -> dict[str, Any]:
    return {
        "tls": {"port": tls_port, "certificate": [{"cert_file": site["cert"], "key_file": site["key"]}]},
        "route": [{"path": "/", "static": site["www"]}],
    }


async def measure(base: str, site: dict[str, Any], wrap: list[str]) -> dict[str, float]:
    """Best of three page loads per protocol, alternating."""
    best = {"h1": 1e9, "h2": 1e9}
    for _ in range(3):
        for proto in ("h1", "h2"):
            h2 = proto == "h2"
            elapsed, lines = await timed([*wrap, *curl_argv(base, site["paths"], site["ca"], h2)])
            check(lines, h2, len(site["paths"]))
            best[proto] = min(best[proto], elapsed)
    print(
        f"\npage (1 HTML + 30 assets), 50 ms RTT: HTTP/1.1 x6 {best['h1'] * 1000:.0f} ms, "
        f"HTTP/2 x1 {best['h2'] * 1000:.0f} ms"
    )
    return best


# --- netem in a network namespace -----------------------------------------------------------------


def _netem_namespace() -> str:
    """A namespace with 25 ms on its loopback each way; skips with the reason when impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and tc netem)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs ip and tc (iproute2)")
    name = f"carousel-h2-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    tc = subprocess.run(
        ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "25ms"],
        capture_output=True,
        text=True,
    )
    if tc.returncode != 0:
        subprocess.run(["ip", "netns", "del", name], check=False)
        pytest.skip(f"tc netem unavailable in this kernel: {tc.stderr.strip()}")
    return name


def test_page_is_faster_over_h2_with_netem(site: dict[str, Any], tmp_path: Path) -> None:
    ns = _netem_namespace()
    port, admin = free_port(), free_port()
    conf = tmp_path / "edge.toml"
    conf.write_text(
        f'[edge]\nhost = "127.0.0.1"\nport = {free_port()}\naccess_log = false\n'
        f"[admin]\nport = {admin}\n"
        f"[tls]\nport = {port}\n"
        f'[[tls.certificate]]\ncert_file = "{site["cert"]}"\nkey_file = "{site["key"]}"\n'
        f'[[route]]\npath = "/"\nstatic = "{site["www"]}"\n'
    )
    wrap = ["ip", "netns", "exec", ns]
    edge = subprocess.Popen(
        [*wrap, sys.executable, "-m", "carousel.cli", "edge", "--config", str(conf)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"https://localhost:{port}"
        for _ in range(100):
            probe = subprocess.run(
                [*wrap, "curl", "-s", "-o", "/dev/null", "--cacert", site["ca"], f"{base}/index.html"],
                check=False,
            )
            if probe.returncode == 0:
                break
            time.sleep(0.1)
        best = asyncio.run(measure(base, site, wrap))
        assert best["h2"] < best["h1"]
    finally:
        edge.terminate()
        try:
            edge.wait(10)
        except subprocess.TimeoutExpired:
            edge.kill()
            edge.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


# --- the relay, for kernels without netem ---------------------------------------------------------


class DelayRelay:
    """Forwards 127.0.0.1:port to a target, holding each chunk ONE_WAY seconds per direction."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        # A real link costs a round trip before the first byte can be sent (SYN, SYN-ACK).
        ready = loop.time() + 2 * ONE_WAY
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(
            self._pipe(reader, up_writer, ready), self._pipe(up_reader, writer, 0.0), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ready: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                loop.call_at(max(loop.time(), ready) + ONE_WAY, writer.write, data)
        finally:
            loop.call_at(max(loop.time(), ready) + ONE_WAY, writer.close)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def relay_edge(site: dict[str, Any]) -> AsyncIterator[int]:
    async with running_edge(edge_config(site)) as edge:
        relay = DelayRelay(edge.tls_port)
        await relay.start()
        try:
            yield relay.port
        finally:
            await relay.stop()


async def test_page_is_faster_over_h2_through_a_delaying_relay(relay_edge: int, site: dict[str, Any]) -> None:
    best = await measure(f"https://localhost:{relay_edge}", site, [])
    assert best["h2"] < best["h1"]
