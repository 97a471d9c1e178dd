"""`carousel demo` end to end: start it, run the commands it prints, stop it, nothing left behind."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carousel.etcdserver import free_port
from tests.demo_ports import demo_ports


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.mark.skipif(not shutil.which("dig") or not shutil.which("curl"), reason="needs dig and curl")
def test_demo_prints_commands_that_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    workdir = tmp_path / "demo"
    ports = demo_ports()
    argv = [sys.executable, "-m", "carousel.cli", "demo", "--workdir", str(workdir), "--json-ready"]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    log = tmp_path / "demo.out"
    state = tmp_path / "state.json"
    # The printed `carousel status` has no flag: it finds the demo through this state file.
    monkeypatch.setenv("CAROUSEL_DEMO_STATE", str(state))
    monkeypatch.delenv("CAROUSEL_ETCD", raising=False)
    with open(log, "wb") as out:
        demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while '"ready": true' not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        commands = [line.strip().split("  (")[0].strip() for line in text.splitlines()]
        digs = [c for c in commands if c.startswith("dig ")]
        curls = [c for c in commands if c.startswith("curl --resolve")]
        assert digs and len(curls) == 2, text
        for step in ("etcd ready", "started 3 edges", "in the registry: edge 3/3", "first healthy answer"):
            assert step in text, f"progress line {step!r} missing:\n{text}"

        # dig: three edges, rotated between queries.
        short = next(c for c in digs if "+short" in c)
        firsts = []
        for _ in range(3):
            out = subprocess.run(
                shlex.split(short), capture_output=True, text=True, timeout=10
            ).stdout.split()
            assert sorted(out) == ["127.0.0.11", "127.0.0.12", "127.0.0.13"], out
            firsts.append(out[0])
        assert len(set(firsts)) == 3, f"each edge first once: {firsts}"
        full = subprocess.run(shlex.split(digs[0]), capture_output=True, text=True, timeout=10).stdout
        assert "status: NOERROR" in full and " aa" in full, full
        # delv: the demo zone is signed, and the printed line validates it.
        delv = next(c for c in commands if c.startswith("delv "))
        if shutil.which("delv"):
            out = subprocess.run(shlex.split(delv), capture_output=True, text=True, timeout=20)
            assert "; fully validated" in out.stdout + out.stderr, out

        # curl: the dynamic page through an edge, and a static file served by the edge itself.
        page = subprocess.run([*shlex.split(curls[0]), "-sf"], capture_output=True, text=True, timeout=10)
        assert page.returncode == 0 and "Served by AP ap" in page.stdout, page
        static = subprocess.run(
            [*shlex.split(curls[1]), "-sf", "-o", "/dev/null", "-w", "%{http_code} %{content_type}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert static.stdout.startswith("200 image/svg+xml"), static
        # HTTP/2 by ALPN on the HTTPS listener, as printed (the demo's CA file trusts it).
        h2 = next(c for c in commands if c.startswith("curl --http2"))
        got = subprocess.run(
            [*shlex.split(h2), "-s", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert got.stdout == "2 200", got

        # status and drain, as printed: no flag, the state file points at the demo's etcd; a flag wins.
        status_cmd = next(c for c in commands if c.split()[-1:] == ["status"])
        status = subprocess.run(shlex.split(status_cmd), capture_output=True, text=True, timeout=20)
        assert status.returncode == 0 and len(re.findall(r"^edge\s", status.stdout, re.M)) == 3, status
        assert str(state) in status.stderr, status.stderr
        elsewhere = f"127.0.0.1:{free_port()}"
        flagged = subprocess.run(
            [*shlex.split(status_cmd), "--etcd", elsewhere], capture_output=True, text=True, timeout=30
        )
        assert flagged.returncode == 1 and elsewhere in flagged.stderr, flagged
        drain_cmd = next(c for c in commands if " drain edge2" in c)
        subprocess.run(shlex.split(drain_cmd), check=True, capture_output=True, timeout=20)
        deadline = time.monotonic() + 2
        while True:
            out = subprocess.run(
                shlex.split(short), capture_output=True, text=True, timeout=10
            ).stdout.split()
            if sorted(out) == ["127.0.0.11", "127.0.0.13"]:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.05)
        undrain = next(c for c in commands if " undrain edge2" in c)
        subprocess.run(shlex.split(undrain), check=True, capture_output=True, timeout=20)

        # kill -9 of an edge: reported, out of DNS by its agent, restarted after the back-off, back in DNS.
        edge3 = _processes_mentioning(str(workdir / "edge3.toml"))
        victim = next(int(p.split(":")[0]) for p in edge3 if "agent" not in p)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        wanted = [
            "edge3 stopped unexpectedly (killed by signal 9)",
            "edge3: its agent took edge out",
            "edge3 restarted",
            "edge3: edge healthy",
        ]
        while not all(w in log.read_text() for w in wanted):
            assert demo.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        out = subprocess.run(shlex.split(short), capture_output=True, text=True, timeout=10).stdout.split()
        assert sorted(out) == ["127.0.0.11", "127.0.0.12", "127.0.0.13"], out
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-3000:]
    assert "Stopped." in log.read_text()
    assert not state.exists(), "the state file goes with the demo"
    leftovers = _processes_mentioning(str(workdir))
    assert not leftovers, leftovers


def test_demo_refuses_a_taken_port_with_a_clear_message(tmp_path: Path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "carousel.cli", "demo", "--dns-port", str(port)]
        argv += ["--workdir", str(tmp_path / "demo"), "--etcd-port", str(free_port())]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"dnsd (udp): 127.0.0.1:{port} is not free" in out.stderr, out.stderr
    assert "--dns-port" in out.stderr
    assert not (tmp_path / "demo").exists(), "nothing may start when a port is taken"
