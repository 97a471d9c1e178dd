"""`carousel demo`: a whole cluster on loopback, in one foreground process tree (plan in demo_plan.py).

Every child runs in its own session so that Ctrl-C reaches only this process,
which then stops the children in order: agents first (they drain), then the
services, then etcd. Linux routes all of 127.0.0.0/8 to lo, so the 127.0.0.x
addresses need no setup.

A child that dies is reported and started again after a back-off, as systemd's
``Restart=on-failure`` with ``RestartSec`` would: 1 s, doubled for each death
within 30 s of the last start, at most 16 s; five quick deaths in a row stop the
demo (systemd's start limit). Meanwhile its agent takes it out of DNS, and the
demo prints the registry changes as they happen, so the failover can be watched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from carousel.demo_plan import (
    DNS_TTL,
    DOS_TRY_ADDRESS,
    DRAIN_DELAY,
    ZONE,
    Plan,
    TlsFiles,
    agent_config,
    dashboard_config,
    dnsd_config,
    edge_config,
    make_certificates,
    make_plan,
    port_problems,
    remove_state,
    write_state,
)
from carousel.etcdserver import EtcdProcess, die_with_parent

__all__ = ["DNS_TTL", "DRAIN_DELAY", "Demo", "Plan", "cli", "make_plan", "port_problems"]

RESTART_FIRST = 1.0
RESTART_MAX = 16.0
QUICK_DEATH = 30.0  # a child that dies within this of its start backs off longer
START_LIMIT = 5


@dataclass
class Child:
    """A daemon the demo started, and how to start it again."""

    name: str
    kind: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    deaths: int = 0  # quick deaths in a row
    restart_at: float = 0.0  # monotonic; 0 = running


def _say(text: str) -> None:
    print(text, flush=True)


class Demo:
    """Starts, watches, restarts and stops the demo cluster."""

    def __init__(self, plan: Plan, workdir: Path, say: Callable[[str], None] = _say) -> None:
        self.plan = plan
        self.workdir = workdir
        self.say = say
        self.children: list[Child] = []
        self.etcd: EtcdProcess | None = None
        self.tls: TlsFiles | None = None
        self.t0 = time.monotonic()

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.t0:5.1f}s"

    def step(self, text: str) -> None:
        """One line of progress, with the time since the start."""
        self.say(f"  [{self._elapsed()}] {text}")

    def _popen(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "CAROUSEL_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            return subprocess.Popen(
                die_with_parent([sys.executable, "-m", "carousel.cli", *argv]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def spawn(self, name: str, kind: str, config_text: str | None, argv: list[str]) -> Child:
        log = self.workdir / f"{name}.log"
        if config_text is not None:
            cfg = self.workdir / f"{name}.toml"
            cfg.write_text(config_text)
            argv = [kind, "--config", str(cfg)]
        child = Child(name, kind, argv, log, self._popen(argv, log))
        self.children.append(child)
        return child

    def start(self) -> None:
        plan = self.plan
        self.etcd = EtcdProcess(
            self.workdir / "etcd-data",
            host=plan.etcd[0],
            client_port=plan.etcd[1],
            peer_port=plan.etcd[2],
            name="demo",
            log_file=self.workdir / "etcd.log",
        ).start()
        self.step(f"etcd ready on {plan.etcd_endpoint}")
        self.tls = make_certificates(self.workdir)
        if self.tls is None:
            self.step("no openssl on PATH: the edges run without their HTTPS listener")
        else:
            self.step(f"made a demo CA and a certificate for www.{ZONE} ({self.tls.ca})")
        import sampleapp.main

        static_dir = sampleapp.main.STATIC_DIR
        for name, ip, port in plan.apps:
            self.spawn(name, "app", None, ["app", "--host", ip, "--port", str(port), "--name", name])
            url = f"http://{ip}:{port}/healthz"
            self.spawn(f"agent-{name}", "agent", agent_config(plan, name, "app", ip, port, url), [])
        self.step(f"started {len(plan.apps)} sample APs and their agents")
        for name, ip, port, admin in plan.edges:
            self.spawn(name, "edge", edge_config(plan, name, ip, port, admin, static_dir, self.tls), [])
            url = f"http://{ip}:{admin}/healthz"
            admin_url = f"http://{ip}:{admin}"
            text = agent_config(plan, name, "edge", ip, port, url, admin_url)
            self.spawn(f"agent-{name}", "agent", text, [])
        self.step(f"started {len(plan.edges)} edges and their agents")
        self.spawn("dnsd", "dnsd", dnsd_config(plan, self._signing_key()), [])
        self.step(f"started dnsd on {plan.dns[0]}:{plan.dns[1]}")
        self.spawn("dashboard", "dashboard", dashboard_config(plan), [])
        self.step(f"started the dashboard on {plan.dashboard_url}")

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.restart_at == 0.0 and c.proc.poll() is not None]

    async def wait_registered(self, limit: float) -> dict[str, int]:
        """Wait until every edge and AP is up in the registry, printing progress; counts by service."""
        from carousel.config import EtcdConfig
        from carousel.etcd import Etcd, EtcdError
        from carousel.ops import collect_status

        want = {"edge": len(self.plan.edges), "app": len(self.plan.apps)}
        cfg = EtcdConfig(endpoints=[self.plan.etcd_endpoint], timeout=1.0)
        etcd = Etcd(cfg)
        counts: dict[str, int] = {}
        shown: dict[str, int] = {}
        try:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                if self.dead_children():
                    return counts
                try:
                    rows = await collect_status(etcd, cfg)
                except EtcdError:
                    rows = []
                counts = {
                    s: sum(1 for r in rows if r.get("service") == s and r.get("state") == "up") for s in want
                }
                if counts != shown:
                    shown = dict(counts)
                    parts = ", ".join(f"{s} {counts[s]}/{want[s]}" for s in want)
                    self.step(f"healthy in the registry: {parts}")
                if counts == want:
                    return counts
                await asyncio.sleep(0.1)
            return counts
        finally:
            await etcd.close()

    async def wait_answer(self, limit: float) -> list[str]:
        """Query dnsd until it answers with every edge; the addresses it gave last."""
        from dnslib import QTYPE, DNSRecord

        want = sorted(ip for _, ip, _, _ in self.plan.edges)
        loop = asyncio.get_running_loop()
        got: list[str] = []
        deadline = time.monotonic() + limit
        query = DNSRecord.question(f"www.{ZONE}", "A")
        host, port = self.plan.dns
        while time.monotonic() < deadline and not self.dead_children():
            try:
                raw = await loop.run_in_executor(None, lambda: query.send(host, port, timeout=0.5))
                got = [str(r.rdata) for r in DNSRecord.parse(raw).rr if r.rtype == QTYPE.A]
            except (OSError, ValueError):
                got = []
            if sorted(got) == want:
                self.step(f"first healthy answer: www.{ZONE} -> {' '.join(got)}")
                return got
            await asyncio.sleep(0.1)
        return got

    # --- watching ----------------------------------------------------------------------

    def restart_due(self, now: float) -> None:
        """Report children that died, and start again those whose back-off has passed."""
        for c in self.children:
            if c.restart_at == 0.0:
                code = c.proc.poll()
                if code is None:
                    continue
                quick = now - c.started < QUICK_DEATH
                c.deaths = c.deaths + 1 if quick else 1
                delay = min(RESTART_FIRST * 2 ** (c.deaths - 1), RESTART_MAX)
                c.restart_at = now + delay
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                self.step(f"{c.name} stopped unexpectedly ({how}); restarting in {delay:.0f} s")
                if c.deaths > START_LIMIT:
                    raise RuntimeError(f"{c.name} died {c.deaths} times in a row; see {c.log}")
            elif now >= c.restart_at:
                c.proc = self._popen(c.argv, c.log)
                c.started = now
                c.restart_at = 0.0
                self.step(f"{c.name} restarted (pid {c.proc.pid})")
        if self.etcd is not None and not self.etcd.running:
            self.step("etcd stopped unexpectedly; restarting it on its data dir")
            self.etcd.start()
            self.step("etcd restarted")

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart dead children and print registry changes until ``stop`` is set."""
        from carousel.config import EtcdConfig
        from carousel.etcd import Etcd, EtcdError
        from carousel.ops import collect_status

        cfg = EtcdConfig(endpoints=[self.plan.etcd_endpoint], timeout=1.0)
        etcd = Etcd(cfg)
        seen: dict[tuple[str, str], str] | None = None
        next_poll = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                self.restart_due(now)
                if now >= next_poll:
                    next_poll = now + 0.3
                    try:
                        rows = await collect_status(etcd, cfg)
                    except EtcdError:
                        rows = None
                    if rows is not None:
                        states = {
                            (r["service"], r["node"]): r["state"]
                            for r in rows
                            if r.get("service", "-") != "-"
                        }
                        if seen is not None:
                            self._print_changes(seen, states)
                        seen = states
                try:
                    await asyncio.wait_for(stop.wait(), 0.1)
                except TimeoutError:
                    pass
        finally:
            await etcd.close()

    def _print_changes(self, before: dict[tuple[str, str], str], after: dict[tuple[str, str], str]) -> None:
        for key in sorted(before.keys() | after.keys()):
            service, node = key
            old, new = before.get(key), after.get(key)
            if old == new:
                continue
            where = "DNS answers" if service == "edge" else "the edges' pools"
            if new is None:
                self.step(f"{node}: its agent took {service} out of the registry, so out of {where}")
            elif new == "draining":
                self.step(f"{node}: {service} draining")
            elif old is None or old == "draining":
                self.step(f"{node}: {service} healthy, in the registry and {where} again")

    def stop(self) -> None:
        """Agents first (they drain), then the services, then etcd; nothing left behind."""
        agents = [c for c in self.children if c.kind == "agent"]
        others = [c for c in self.children if c.kind != "agent"]
        for group, limit in ((agents, DRAIN_DELAY + 5), (others, 8.0)):
            for c in group:
                if c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + limit
            for c in group:
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                    c.proc.wait(5)
        if self.etcd is not None:
            self.etcd.stop()

    def _signing_key(self) -> Path:
        """A CSK for the demo zone, and the trust anchor delv needs for it (see the banner)."""
        from dnsd import wire
        from dnsd.dnssec import keys

        key, zone = keys.generate(), wire.to_wire(ZONE)
        (self.workdir / "anchor.conf").write_text(keys.trust_anchor(zone, key))
        return keys.write(self.workdir / "keys", zone, key)

    def banner(self) -> str:
        """The table of what runs where, and a line to try for every feature."""
        plan = self.plan
        dns_ip, dns_port = plan.dns
        rows = [("WHAT", "ADDRESS", "NOTES")]
        rows.append(("etcd", plan.etcd_endpoint, "embedded, data in " + str(self.workdir)))
        rows.append(("dnsd", f"{dns_ip}:{dns_port} udp+tcp", f"authoritative for {ZONE}"))
        for name, ip, port, admin in plan.edges:
            extra = f", https :{plan.tls_port}" if self.tls else ""
            rows.append((name, f"{ip}:{port}", f"admin :{admin}{extra}, forward proxy :{plan.forward_port}"))
        for name, ip, port in plan.apps:
            rows.append((name, f"{ip}:{port}", f"sample AP, agent node {name}"))
        rows.append(("dashboard", plan.dashboard_url, "live view and actions (token below)"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        table = "\n".join(
            ("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip() for r in rows
        )
        _, first_ip, first_port, first_admin = plan.edges[0]
        www = f"www.{ZONE}"
        resolve = f"--resolve {www}:{first_port}:{first_ip}"
        base = f"http://{www}:{first_port}"
        carousel = _carousel_command()
        ap_ip, ap_port = plan.apps[0][1], plan.apps[0][2]
        forward = f"-x http://{first_ip}:{plan.forward_port}"
        dig = f"dig @{dns_ip} -p {dns_port}"
        codes = "-s -o /dev/null -w '%{http_code} '"
        tries: list[tuple[str, str]] = [
            (f"{dig} {www}", ""),
            (f"{dig} +short {www}", "run it a few times: the order rotates"),
            (f"delv @{dns_ip} -p {dns_port} -a {self.workdir}/anchor.conf +root={ZONE} {www} A", "DNSSEC"),
            (f"curl {resolve} {base}/", ""),
            (f"curl {resolve} {base}/static/img/tile01.svg", ""),
            (f"curl -s -D - -o /dev/null {resolve} {base}/cacheable", "twice: miss, then hit"),
            (f"curl -s -D - -o /dev/null -H 'Accept-Encoding: br' {resolve} {base}/", "brotli; try gzip"),
        ]
        if self.tls is not None:
            ca = f"--cacert {self.tls.ca}"
            tries += [
                (f"curl {ca} --resolve {www}:{plan.tls_port}:{first_ip} https://{www}:{plan.tls_port}/",
                 "HTTPS, certificate signed by the demo's own CA"),
                (f"curl --http2 -v {ca} --resolve {www}:{plan.tls_port}:{first_ip} "
                 f"https://{www}:{plan.tls_port}/static/img/tile01.svg",
                 "HTTP/2 by ALPN: < HTTP/2 200, the same answer as HTTP/1.1"),
                (f"curl {forward} {ca} https://{www}:{plan.tls_port}/",
                 "a CONNECT tunnel through the forward proxy"),
            ]  # fmt: skip
        tries += [
            (f"curl {forward} http://{ap_ip}:{ap_port}/", "the forward proxy, to an AP"),
            (f"for i in $(seq 80); do curl {codes} --interface {DOS_TRY_ADDRESS} {resolve} {base}/; done",
             "DoS limits: 200, then 429, then 403 and closed connections: banned on every edge"),
            (f"{carousel} status", "finds the demo's etcd by itself"),
            (f"{carousel} drain edge2", "edge2 leaves the DNS answers at once"),
            (f"{carousel} undrain edge2", ""),
            (f"{carousel} purge --prefix /cacheable", "the next request is a miss"),
            (f"kill -9 $(pgrep -f {self.workdir}/edge2.toml)", "the demo reports it and restarts it"),
            (f"curl -s http://{first_ip}:{first_admin}/metrics | grep ^carousel_edge_requests", ""),
        ]  # fmt: skip
        lines = "\n".join(f"  {cmd}" + (f"      ({note})" if note else "") for cmd, note in tries)
        return f"""
Carousel demo cluster is up.

{table}

Try:
{lines}

Dashboard: {plan.dashboard_url}   admin token: {plan.token}
Logs: {self.workdir}/*.log     Stop: Ctrl-C
"""


def _carousel_command() -> str:
    """How the user can run `carousel` from here: on PATH, else the venv's script."""
    script = Path(sys.executable).with_name("carousel")
    if shutil.which("carousel") == str(script) or not script.exists():
        return "carousel" if shutil.which("carousel") else f"{sys.executable} -m carousel.cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _fail_start(demo: Demo, counts: dict[str, int]) -> None:
    dead = demo.dead_children()
    for c in dead:
        print(f"carousel demo: {c.name} exited with {c.proc.returncode}; its log:", file=sys.stderr)
        print(c.log.read_text(errors="replace")[-2000:], file=sys.stderr)
    if not dead:
        print(f"carousel demo: registry incomplete after 40 s: {counts}", file=sys.stderr)


def cli(args: argparse.Namespace) -> int:
    """Entry point of `carousel demo`."""
    plan = make_plan(args)
    problems = port_problems(plan, tls=shutil.which("openssl") is not None)
    if problems:
        print("carousel demo: cannot start, addresses already in use:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(
            "Another demo may be running. Stop it, or pick other ports with --dns-port, --edge-port, "
            "--app-port, --etcd-port, --tls-port, --forward-port, --dashboard-port.",
            file=sys.stderr,
        )
        return 1
    own_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="carousel-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(plan, workdir)
    return asyncio.run(_run(demo, args, own_dir))


async def _run(demo: Demo, args: argparse.Namespace, own_dir: bool) -> int:
    plan, workdir = demo.plan, demo.workdir
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    try:
        print(
            f"Starting etcd, {len(plan.apps)} sample APs, {len(plan.edges)} edges, their agents, dnsd "
            f"and the dashboard (work dir {workdir}) ...",
            flush=True,
        )
        await loop.run_in_executor(None, demo.start)
        counts = await demo.wait_registered(40)
        if demo.dead_children() or counts != {"edge": len(plan.edges), "app": len(plan.apps)}:
            _fail_start(demo, counts)
            return 1
        await demo.wait_answer(10)
        state = write_state(plan, workdir, demo.tls)
        demo.step(f"state file {state}: `carousel status`, drain, purge find this demo without flags")
        print(demo.banner(), flush=True)
        if args.json_ready:
            ready = {"ready": True, "workdir": str(workdir), "dashboard": plan.dashboard_url}
            print(json.dumps({**ready, "token": plan.token, "state": str(state)}), flush=True)
        try:
            await demo.watch(stop)
        except RuntimeError as exc:
            print(f"carousel demo: {exc}", file=sys.stderr)
            status = 1
    finally:
        print("\nStopping: agents drain first ...", flush=True)
        remove_state()
        await loop.run_in_executor(None, demo.stop)
        if own_dir and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        print("Stopped.", flush=True)
    return status
