#!/usr/bin/env python3
"""Soak: steady HTTP and DNS load through a loopback cluster while its daemons are killed and restarted.

    python bench/soak.py                   # 10 minutes (make soak)
    python bench/soak.py --seconds 60      # a quick try (make soak SOAK_SECONDS=60)

The cluster is the demo's (carousel/demo.py: its plan, config generators and
process spawning), made a little more like production: a 3-member etcd, two
dnsd (ns1, ns2), 3 edges and 2 APs, every edge and AP with its agent, and
dnsd and the edges keeping registry snapshots on disk.

Load, both steady (fixed rates, not closed loops, so an outage cannot slow them):

* DNS: ``--dns-qps`` queries for www.example.test, asked like a resolver asks:
  ns1, then ns2 when ns1 gives no answer within 0.5 s. Every answer is checked
  against the edges that are down at that moment.
* HTTP: ``--http-rps`` GET /echo, each resolved like a browser does (the
  answer cached for its 1 s TTL; on a refused connection the next address).

Every ``--interval`` seconds the chaos schedule SIGKILLs one victim, in turn an
edge, an agent, a dnsd and an etcd member (chosen at random within the kind),
and restarts it ``--down`` seconds later with the same config and data.

Printed at the end, and as JSON with ``--json``: requests sent and failed,
queries sent and unanswered, answers that named a dead edge (split into the
detection window, ``--grace`` seconds after the kill, which agents need to
see a failed check, and after it), the kills, and the longest time an answer
still named a killed edge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carousel.demo import Child, Demo
from carousel.demo_plan import Plan, agent_config, dnsd_config, edge_config, make_plan, port_problems
from carousel.etcdserver import EtcdProcess, free_port

NAME = "www.example.test"


@dataclass
class Tally:
    """What the load saw."""

    http_sent: int = 0
    http_ok: int = 0
    http_failed: int = 0
    http_fell_over: int = 0  # succeeded on a later address after a refused one
    dns_sent: int = 0
    dns_answered: int = 0
    dns_unanswered: int = 0  # neither ns1 nor ns2 answered in time
    dns_ns2: int = 0  # answered by ns2 after ns1 stayed silent
    dns_empty: int = 0  # answered without any address
    dns_tcp: int = 0  # truncated over UDP, asked again over TCP
    dead_in_grace: int = 0
    dead_after_grace: int = 0
    longest_dead_answer: float = 0.0  # seconds after a kill that an answer still named the edge
    errors: dict[str, int] = field(default_factory=dict)


class Cluster:
    """The demo cluster with a 3-member etcd and two dnsd, and the ability to kill and restart parts."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        args = argparse.Namespace(
            edges=3,
            apps=2,
            dns_port=free_port(),
            edge_port=free_port(),
            app_port=free_port(),
            etcd_port=0,
            dashboard_port=free_port(),
            tls_port=free_port(),
            forward_port=free_port(),
        )
        self.plan: Plan = make_plan(args)
        problems = port_problems(self.plan, tls=False)
        if problems:
            raise SystemExit(f"soak: addresses in use: {problems}")
        self.dns2_port = free_port()
        self.demo = Demo(self.plan, workdir)
        self.members = [
            EtcdProcess(workdir / f"etcd{i}", name=f"etcd{i}", log_file=workdir / f"etcd{i}.log")
            for i in range(3)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial
        self.endpoints = [m.endpoint for m in self.members]
        self.configs: dict[str, tuple[str, str]] = {}  # name -> (kind, config text)
        self.live: dict[str, Child] = {}
        self.down_since: dict[str, float] = {}  # edge name -> monotonic time it was killed
        self.rng = random.Random(seed)

    def _etcd(self, text: str) -> str:
        single = f'endpoints = ["{self.plan.etcd[0]}:{self.plan.etcd[1]}"]'
        assert single in text
        return text.replace(single, f"endpoints = {json.dumps(self.endpoints)}")

    def _snapshot(self, name: str) -> str:
        return f'\n[snapshot]\ndirectory = "{self.workdir / "state" / name}"\n'

    def start(self) -> None:
        for m in self.members:
            m.start(timeout=0)
        for m in self.members:
            m.wait_ready(30)
        import sampleapp.main

        plan = self.plan
        for name, ip, port in plan.apps:
            self._spawn(name, "app", None, ["app", "--host", ip, "--port", str(port), "--name", name])
            url = f"http://{ip}:{port}/healthz"
            self._spawn(f"agent-{name}", "agent", self._etcd(agent_config(plan, name, "app", ip, port, url)))
        for name, ip, port, admin in plan.edges:
            text = edge_config(plan, name, ip, port, admin, sampleapp.main.STATIC_DIR, None)
            self._spawn(name, "edge", self._etcd(text) + self._snapshot(name))
            url = f"http://{ip}:{admin}/healthz"
            self._spawn(f"agent-{name}", "agent", self._etcd(agent_config(plan, name, "edge", ip, port, url)))
        ns1 = self._etcd(dnsd_config(plan))
        self._spawn("dnsd1", "dnsd", ns1 + self._snapshot("dnsd1"))
        ns2 = ns1.replace(
            f'listen = ["{plan.dns[0]}:{plan.dns[1]}"]', f'listen = ["{plan.dns[0]}:{self.dns2_port}"]'
        )
        self._spawn("dnsd2", "dnsd", ns2 + self._snapshot("dnsd2"))

    def _spawn(self, name: str, kind: str, config: str | None, argv: list[str] | None = None) -> None:
        self.configs[name] = (kind, config or json.dumps(argv))
        self.live[name] = self.demo.spawn(name, kind, config, argv or [])

    def restart(self, name: str) -> None:
        """Start ``name`` again with the config (and data) it had."""
        if name.startswith("etcd"):
            member = next(m for m in self.members if m.name == name)
            member.start(timeout=0)
            return
        kind, config = self.configs[name]
        if kind == "app":
            self.live[name] = self.demo.spawn(name, kind, None, json.loads(config))
        else:
            self.live[name] = self.demo.spawn(name, kind, config, [])
        self.down_since.pop(name, None)

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (its whole process group: workers too)."""
        if name.startswith("etcd"):
            next(m for m in self.members if m.name == name).kill()
            return
        child = self.live[name]
        if name.startswith("edge"):
            self.down_since[name] = time.monotonic()
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.proc.wait(10)

    def victims(self, kind: str) -> list[str]:
        if kind == "etcd":
            return [m.name for m in self.members]
        if kind == "agent":
            return [n for n in self.live if n.startswith("agent-")]
        return [n for n in self.live if n.startswith(kind)]

    def unexpected_deaths(self) -> list[str]:
        return [n for n, c in self.live.items() if c.proc.poll() is not None]

    def edge_name(self, address: str) -> str | None:
        for name, ip, _, _ in self.plan.edges:
            if ip == address:
                return name
        return None

    def stop(self) -> None:
        self.demo.stop()
        for m in self.members:
            m.stop()


async def resolve(cluster: Cluster, tally: Tally | None) -> tuple[list[str], float]:
    """The A records of NAME, asked of ns1 then ns2 (a resolver's retry); ([], 0) when neither answers."""
    q = dns.message.make_query(NAME, "A")
    why = []
    for i, port in enumerate((cluster.plan.dns[1], cluster.dns2_port)):
        try:
            r = await dns.asyncquery.udp(q, cluster.plan.dns[0], port=port, timeout=0.5)
            if r.flags & dns.flags.TC:  # truncated (or slipped by RRL): a resolver retries over TCP
                if tally is not None:
                    tally.dns_tcp += 1
                r = await dns.asyncquery.tcp(q, cluster.plan.dns[0], port=port, timeout=0.5)
        except (dns.exception.Timeout, OSError) as exc:
            why.append(f"ns{i + 1} {type(exc).__name__}")
            continue
        if r.rcode() != 0:
            why.append(f"ns{i + 1} {dns.rcode.to_text(r.rcode())}")
            continue  # SERVFAIL/REFUSED: try the other server, as a resolver does
        if tally is not None and i == 1:
            tally.dns_ns2 += 1
        addrs = [rr.address for rrset in r.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]
        if not addrs and tally is not None:  # NODATA: a resolver takes it, and so do we
            tally.dns_empty += 1
            key = f"dns: ns{i + 1} answered no address"
            tally.errors[key] = tally.errors.get(key, 0) + 1
        ttl = min((rrset.ttl for rrset in r.answer), default=1)
        return addrs, float(ttl)
    if tally is not None:
        key = "dns: " + ", ".join(why)
        tally.errors[key] = tally.errors.get(key, 0) + 1
    return [], 0.0


async def dns_load(cluster: Cluster, tally: Tally, qps: float, until: float, grace: float) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        tally.dns_sent += 1
        addrs, _ = await resolve(cluster, tally)
        now = time.monotonic()
        if not addrs:
            tally.dns_unanswered += 1
            return
        tally.dns_answered += 1
        for a in addrs:
            name = cluster.edge_name(a)
            since = cluster.down_since.get(name or "")
            if since is not None:
                late = now - since
                tally.longest_dead_answer = max(tally.longest_dead_answer, late)
                if late <= grace:
                    tally.dead_in_grace += 1
                else:
                    tally.dead_after_grace += 1
                break

    step = 1.0 / qps
    nxt = time.monotonic()
    while nxt < until:
        t = asyncio.create_task(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        nxt += step
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    await asyncio.gather(*tasks, return_exceptions=True)


async def http_load(cluster: Cluster, tally: Tally, rps: float, until: float) -> None:
    cache: dict[str, object] = {"addrs": [], "expires": 0.0}
    port = cluster.plan.edges[0][2]
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout) as s:

        async def addresses() -> list[str]:
            if time.monotonic() >= float(cache["expires"]):  # type: ignore[arg-type]
                addrs, ttl = await resolve(cluster, None)
                cache["addrs"], cache["expires"] = addrs, time.monotonic() + max(ttl, 1.0)
            return list(cache["addrs"])  # type: ignore[call-overload]

        async def one() -> None:
            tally.http_sent += 1
            addrs = await addresses()
            for i, a in enumerate(addrs):
                try:
                    async with s.get(f"http://{a}:{port}/echo", headers={"Host": NAME}) as r:
                        await r.read()
                        if r.status == 200:
                            tally.http_ok += 1
                            tally.http_fell_over += i > 0
                            return
                        key = f"http {r.status}"
                except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                    key = type(exc).__name__
                    tally.errors[key] = tally.errors.get(key, 0) + 1
                    continue  # the next address, as a browser does
                except (TimeoutError, aiohttp.ClientError) as exc:
                    key = type(exc).__name__
                tally.errors[key] = tally.errors.get(key, 0) + 1
                break
            tally.http_failed += 1

        step = 1.0 / rps
        nxt = time.monotonic()
        while nxt < until:
            t = asyncio.create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            nxt += step
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)


async def chaos(
    cluster: Cluster, until: float, interval: float, down: float, log: list[dict[str, object]]
) -> None:
    kinds = ["edge", "agent", "dnsd", "etcd"]
    i = 0
    started = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if time.monotonic() + down + 2 > until:
            return
        kind = kinds[i % len(kinds)]
        i += 1
        victim = cluster.rng.choice(cluster.victims(kind))
        t = round(time.monotonic() - started, 1)
        await asyncio.to_thread(cluster.kill, victim)
        print(f"  t={t:7.1f}s  kill -9 {victim}", flush=True)
        await asyncio.sleep(down)
        await asyncio.to_thread(cluster.restart, victim)
        log.append({"t": t, "victim": victim, "kind": kind})
        print(f"  t={time.monotonic() - started:7.1f}s  restarted {victim}", flush=True)


async def wait_ready(cluster: Cluster, within: float) -> None:
    deadline = time.monotonic() + within
    want = {ip for _, ip, _, _ in cluster.plan.edges}
    while time.monotonic() < deadline:
        dead = cluster.unexpected_deaths()
        if dead:
            raise SystemExit(f"soak: {dead} exited during start-up; logs in {cluster.workdir}")
        addrs, _ = await resolve(cluster, None)
        if set(addrs) == want:
            return
        await asyncio.sleep(0.3)
    raise SystemExit(f"soak: the cluster did not come up in {within:.0f} s; logs in {cluster.workdir}")


async def soak(args: argparse.Namespace, cluster: Cluster) -> dict[str, object]:
    await wait_ready(cluster, 60)
    print(f"cluster up; load for {args.seconds:.0f} s, a kill every {args.interval:.0f} s", flush=True)
    tally = Tally()
    kills: list[dict[str, object]] = []
    started = time.monotonic()
    until = started + args.seconds
    await asyncio.gather(
        dns_load(cluster, tally, args.dns_qps, until, args.grace),
        http_load(cluster, tally, args.http_rps, until),
        chaos(cluster, until, args.interval, args.down, kills),
    )
    return {
        "seconds": round(time.monotonic() - started, 1),
        "kills": kills,
        "tally": tally.__dict__,
        "unexpected_deaths": cluster.unexpected_deaths(),
    }


def table(result: dict[str, object], args: argparse.Namespace) -> str:
    t = result["tally"]
    assert isinstance(t, dict)
    kills = result["kills"]
    assert isinstance(kills, list)
    by_kind: dict[str, int] = {}
    for k in kills:
        by_kind[k["kind"]] = by_kind.get(k["kind"], 0) + 1
    rows = [
        ("duration", f"{result['seconds']} s"),
        (
            f"kills (SIGKILL, restarted after {args.down:.0f} s)",
            ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())) or "none",
        ),
        ("HTTP requests sent", t["http_sent"]),
        ("HTTP requests failed", t["http_failed"]),
        ("HTTP requests that needed a second address", t["http_fell_over"]),
        ("DNS queries sent", t["dns_sent"]),
        ("DNS queries without an address (no answer, or NODATA)", t["dns_unanswered"]),
        ("  of which NODATA", t["dns_empty"]),
        ("DNS answers truncated over UDP, asked again over TCP", t["dns_tcp"]),
        ("DNS queries answered by ns2 (ns1 silent)", t["dns_ns2"]),
        (f"answers naming a dead edge, <= {args.grace:.0f} s after the kill", t["dead_in_grace"]),
        (f"answers naming a dead edge, > {args.grace:.0f} s after the kill", t["dead_after_grace"]),
        ("longest a killed edge stayed in answers", f"{t['longest_dead_answer']:.2f} s"),
        ("daemons that died unasked", ", ".join(result["unexpected_deaths"]) or "none"),  # type: ignore[arg-type]
        (
            "errors seen (before any retry)",
            ", ".join(f"{k} {v}" for k, v in sorted(t["errors"].items())) or "none",
        ),
    ]
    width = max(len(str(r[0])) for r in rows)
    return "\n".join(f"| {str(k).ljust(width)} | {v} |" for k, v in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0, help="how long the load runs (default 600)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between two kills (default 15)")
    p.add_argument("--down", type=float, default=5.0, help="seconds a victim stays down (default 5)")
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="detection window after an edge kill (agent check 0.5 s x fall 2, default 2)",
    )
    p.add_argument("--dns-qps", type=float, default=50.0)
    p.add_argument("--http-rps", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", help="keep logs and state here (default: a temp dir, removed on success)")
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = p.parse_args()
    own = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="carousel-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(workdir, args.seed)
    print(f"starting 3 etcd, 2 APs, 3 edges, 5 agents, 2 dnsd (logs: {workdir})", flush=True)
    result: dict[str, object] | None = None
    try:
        cluster.start()
        result = asyncio.run(soak(args, cluster))
    finally:
        cluster.stop()
    print()
    print(table(result, args))
    if args.json:
        print(json.dumps(result))
    ok = not result["unexpected_deaths"]
    if own and ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
