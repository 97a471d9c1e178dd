"""The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core from npm,
against a `carousel demo` cluster. The browser steps are in dashboard.mjs; this test starts the demo on
free ports, keeps some traffic going so the charts have lines, runs the script and stops everything.

The screenshots (full width and 375 px wide) go to the test's own directory; with
CAROUSEL_SCREENSHOTS=docs (`make screenshots`) they regenerate docs/dashboard.png and
docs/dashboard-narrow.png. A plain test run leaves the checkout as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from carousel.demo_plan import DRAIN_DELAY
from tests.demo_ports import demo_ports

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _node_major() -> int:
    node = shutil.which("node")
    if node is None:
        return 0
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    return int(out.strip().lstrip("v").split(".")[0] or 0)


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM} (apt install chromium)"),
    pytest.mark.skipif(_node_major() < 20 or not shutil.which("npm"), reason="needs node >= 20 and npm"),
    pytest.mark.skipif(not shutil.which("dig") or not shutil.which("curl"), reason="needs dig and curl"),
]


def _playwright() -> None:
    """Install playwright-core (no browser download) from the lock file when it is missing."""
    if (HERE / "node_modules" / "playwright-core" / "package.json").exists():
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=HERE,
        check=True,
        timeout=300,
        env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
    )


def _traffic(stop: threading.Event, edges: list[str], port: int, dns: tuple[str, int]) -> None:
    """A few requests and DNS queries per second, so the charts and rates show something."""
    paths = ["/", "/cacheable", "/static/img/tile01.svg", "/cacheable?v=2", "/nope-404"]
    query = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    i = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.5)
        while not stop.is_set():
            ip = edges[i % len(edges)]
            req = urllib.request.Request(
                f"http://{ip}:{port}{paths[i % len(paths)]}", headers={"Host": "www.example.test"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    r.read()
            except OSError:
                pass
            try:
                udp.sendto(query, dns)
                udp.recv(512)
            except OSError:
                pass
            i += 1
            stop.wait(0.1)


def test_dashboard_in_chromium(tmp_path: Path):
    _playwright()
    workdir = tmp_path / "demo"
    state = tmp_path / "demo-state.json"
    ports = demo_ports()
    argv = [sys.executable, "-m", "carousel.cli", "demo", "--workdir", str(workdir), "--json-ready"]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    env = {**os.environ, "CAROUSEL_DEMO_STATE": str(state)}
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    stop = threading.Event()
    traffic: threading.Thread | None = None
    try:
        deadline = time.monotonic() + 90
        ready: dict[str, str] = {}
        while not ready:
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            for line in log.read_text().splitlines():
                if line.startswith('{"ready": true'):
                    ready = json.loads(line)
            time.sleep(0.2)
        edges = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        dns = ("127.0.0.1", ports["--dns-port"])
        traffic = threading.Thread(target=_traffic, args=(stop, edges, ports["--edge-port"], dns))
        shots = ROOT / "docs" if os.environ.get("CAROUSEL_SCREENSHOTS") == "docs" else tmp_path
        traffic.start()
        time.sleep(3)  # a few scrape intervals, so the rates and charts have points
        script_env = {
            **os.environ,
            "DASHBOARD_URL": ready["dashboard"],
            "DASHBOARD_TOKEN": ready["token"],
            "DNS": f"{dns[0]}:{dns[1]}",
            "EDGE": f"127.0.0.11:{ports['--edge-port']}",
            "WWW": "www.example.test",
            "DRAIN_DELAY": str(DRAIN_DELAY),
            "NODES": "edge1,edge2,edge3,ap1,ap2,dnsd,etcd",
            "EDGE2_IP": "127.0.0.12",
            "ETCD": f"127.0.0.1:{ports['--etcd-port']}",
            "SCREENSHOT": str(shots / "dashboard.png"),
            "CHROMIUM": CHROMIUM,
        }
        run = subprocess.run(
            ["node", str(HERE / "dashboard.mjs")],
            cwd=HERE,
            env=script_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, f"{run.stderr}\n{run.stdout}\ndemo:\n{log.read_text()[-3000:]}"
        timings = json.loads(run.stdout.strip().splitlines()[-1])
        print("browser timings:", json.dumps(timings), file=sys.stderr)
        print(run.stderr, file=sys.stderr)
        assert timings["page_load_ms"] < 1000
        assert timings["drain_out_of_dns_ms"] < DRAIN_DELAY * 1000
    finally:
        stop.set()
        if traffic is not None:
            traffic.join(5)
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-3000:]
    assert not state.exists(), "the demo removes its state file when it stops"
