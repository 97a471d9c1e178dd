#!/usr/bin/env python3
"""dnsd vs NSD under dnsperf: the same zone (3 A records), the same run, pinned cores.

    python bench/dns_bench.py                 # defaults: 3 rounds of 5 s per server
    python bench/dns_bench.py --rounds 5 --seconds 10 --engine asyncio

What it does:

1. starts a private etcd and registers 3 edges (service "edge") in it;
2. starts dnsd (one process) serving example.test with www -> edge, and NSD
   serving a zone file with the same 3 A records, each pinned to one core
   (``--server-core``), on free loopback ports, unprivileged;
3. runs dnsperf pinned to the other core (``--client-core``) against each
   server in turn, alternating the order every round so background noise
   hits both alike; reports the median queries per second of each and the
   ratio dnsd / NSD (target: >= 0.75);
4. also reports queries answered per CPU-second of each server (its process
   tree's user + system time during the run): on a shared machine this moves
   far less with background load than queries per second do, and it shows
   what each server could do where dnsperf, not the server, is the limit;
5. measures latency at the same fixed offered load for both (``--latency-qps``,
   dnsperf -Q with per-query reporting) and prints p50 and p99. Latency at
   saturation is only queueing, so it is not reported.

Response rate limiting is off in both servers: every query comes from
127.0.0.1, which RRL would (rightly) throttle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carousel.config import EtcdConfig  # noqa: E402
from carousel.etcd import Etcd  # noqa: E402
from carousel.etcdserver import EtcdProcess, free_port  # noqa: E402
from carousel.registry import Keys, ServiceRecord  # noqa: E402

ZONE = "example.test"
NAME = f"www.{ZONE}"
ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@dataclass
class Result:
    """The measurements of one server."""

    name: str
    qps: list[float] = field(default_factory=list)
    per_cpu: list[float] = field(default_factory=list)  # queries per server CPU-second
    lost: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(p / 100 * len(data)))]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (NSD runs xfrd -> main -> server processes)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def cpu_seconds(pid: int) -> float:
    """User + system time of a process, its threads and its descendants (NSD forks)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                fields = Path(f"/proc/{p}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if not path:
        sys.exit(f"dns_bench: {tool} not found (apt-get install {tool})")
    return path


def wait_answering(port: int, timeout: float = 15.0) -> None:
    """Until the server answers www with the 3 addresses."""
    import dns.message
    import dns.query

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = dns.query.udp(dns.message.make_query(NAME, "A"), "127.0.0.1", port=port, timeout=0.5)
            got = sorted(rr.address for rrset in r.answer for rr in rrset)
            if got == ADDRESSES:
                return
            last = f"answer {got}"
        except Exception as exc:  # not up yet
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not answering: {last}")


async def register(endpoint: str, prefix: str) -> None:
    etcd = Etcd(EtcdConfig(endpoints=[endpoint], prefix=prefix))
    keys = Keys(prefix)
    try:
        for i, addr in enumerate(ADDRESSES, 1):
            record = ServiceRecord("edge", f"edge{i}", 80, ipv4=(addr,))
            await etcd.put(keys.service("edge", f"edge{i}"), record.encode())
    finally:
        await etcd.close()


def dnsd_config(port: int, etcd_endpoint: str, prefix: str, engine: str) -> str:
    return f"""
[dns]
listen = ["127.0.0.1:{port}"]
udp_engine = "{engine}"

[dns.rrl]
enabled = false

[[zone]]
origin = "{ZONE}"
service_ttl = 5
services = {{ "www" = "edge" }}

[[zone.ns]]
name = "ns1"
ipv4 = ["127.0.0.1"]

[etcd]
endpoints = ["{etcd_endpoint}"]
prefix = "{prefix}"

[log]
level = "warning"
"""


def nsd_files(workdir: Path, port: int) -> Path:
    zone = workdir / "example.test.zone"
    records = "\n".join(f"www IN A {a}" for a in ADDRESSES)
    zone.write_text(
        f"""$ORIGIN {ZONE}.
$TTL 5
@ IN SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60
@ IN NS ns1.{ZONE}.
ns1 IN A 127.0.0.1
{records}
"""
    )
    conf = workdir / "nsd.conf"
    conf.write_text(
        f"""server:
  ip-address: 127.0.0.1@{port}
  port: {port}
  username: ""
  chroot: ""
  zonesdir: "{workdir}"
  pidfile: "{workdir}/nsd.pid"
  database: ""
  xfrdfile: "{workdir}/xfrd.state"
  zonelistfile: "{workdir}/zone.list"
  logfile: "{workdir}/nsd.log"
  server-count: 1
  verbosity: 0
  hide-version: yes
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: {ZONE}
  zonefile: {zone.name}
"""
    )
    return conf


def dnsperf(
    port: int, queries: Path, seconds: float, args: argparse.Namespace, *, rate: int = 0
) -> tuple[float, float, list[float], int]:
    """(queries per second, lost %, per-query latencies when rate is set, queries completed)."""
    cmd = ["taskset", "-c", str(args.client_core), need("dnsperf"), "-s", "127.0.0.1",
           "-p", str(port), "-d", str(queries), "-l", str(seconds),
           "-c", str(args.clients), "-q", str(args.outstanding)]  # fmt: skip
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out)
    if not qps:
        raise RuntimeError(f"dnsperf output not understood:\n{out[-2000:]}")
    latencies = [float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M)] if rate else []
    done = re.search(r"Queries completed:\s+(\d+)", out)
    return (
        float(qps.group(1)),
        float(lost.group(1)) if lost else 0.0,
        latencies,
        int(done.group(1)) if done else 0,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=5.0, help="per dnsperf run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10, help="dnsperf -c")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    parser.add_argument("--latency-qps", type=int, default=20000, help="fixed load for latency")
    parser.add_argument("--engine", choices=["mmsg", "thread", "asyncio"], default="mmsg")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--qtypes",
        default="A",
        help="comma-separated query types, asked in turn (A,AAAA,HTTPS is what a browser's resolver asks)",
    )
    parser.add_argument(
        "--compare-pure",
        action="store_true",
        help="also a dnsd with CAROUSEL_PURE_PYTHON=1 (the receive loop in Python), in the same rounds",
    )
    args = parser.parse_args()
    nsd = need("nsd")
    need("dnsperf")
    need("taskset")

    workdir = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    etcd: EtcdProcess | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # etcd sits on the client core: it is idle during the runs, and keeps
        # the server core to the server alone.
        etcd = EtcdProcess(workdir / "etcd", extra_args=[])
        etcd_cmd = etcd.command
        etcd.command = lambda: ["taskset", "-c", str(args.client_core), *etcd_cmd()]  # type: ignore[method-assign]
        etcd.start()
        prefix = "/bench/"
        asyncio.run(register(etcd.endpoint, prefix))

        dnsds = {"dnsd": {}, **({"dnsd-py": {"CAROUSEL_PURE_PYTHON": "1"}} if args.compare_pure else {})}
        servers: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, extra in dnsds.items():
            servers[name] = free_port()
            cfg = workdir / f"{name}.toml"
            cfg.write_text(dnsd_config(servers[name], etcd.endpoint, prefix, args.engine))
            env = {**os.environ, "CAROUSEL_LOG_FORMAT": "json", **extra}
            if not extra:
                env.pop("CAROUSEL_PURE_PYTHON", None)
            with open(workdir / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    ["taskset", "-c", str(args.server_core), sys.executable, "-m", "carousel.cli",
                     "dnsd", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
                ))  # fmt: skip
            pids[name] = procs[-1].pid
        nsd_port = free_port()
        conf = nsd_files(workdir, nsd_port)
        with open(workdir / "nsd.out", "wb") as log:
            procs.append(subprocess.Popen(
                ["taskset", "-c", str(args.server_core), nsd, "-d", "-c", str(conf)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))  # fmt: skip
        for port in servers.values():
            wait_answering(port)
        wait_answering(nsd_port)
        servers["nsd"] = nsd_port
        pids["nsd"] = procs[-1].pid

        queries = workdir / "queries.txt"
        queries.write_text("".join(f"{NAME} {qtype}\n" for qtype in args.qtypes.split(",")))
        results = {name: Result(name) for name in servers}
        print(f"dnsperf -c {args.clients} -q {args.outstanding}, {args.seconds:g} s per run, "
              f"{args.rounds} rounds; servers on core {args.server_core}, dnsperf on core "
              f"{args.client_core}; dnsd udp_engine={args.engine}; query types {args.qtypes}",
              flush=True)  # fmt: skip
        for port in servers.values():  # warm-up
            dnsperf(port, queries, 1, args)
        for rnd in range(args.rounds):
            names = list(servers)
            order = names[rnd % len(names) :] + names[: rnd % len(names)]  # each first in turn
            if rnd // len(names) % 2:
                order.reverse()
            for name in order:
                before = cpu_seconds(pids[name])
                qps, lost, _, done = dnsperf(servers[name], queries, args.seconds, args)
                used = cpu_seconds(pids[name]) - before
                results[name].qps.append(qps)
                results[name].lost.append(lost)
                results[name].per_cpu.append(done / used if used > 0 else float("nan"))
                print(f"  round {rnd + 1}: {name:5s} {qps:10.0f} qps  lost {lost:.2f}%  "
                      f"{results[name].per_cpu[-1]:10.0f} queries/CPU-s", flush=True)  # fmt: skip
        for name, port in servers.items():
            _, _, lat, _ = dnsperf(port, queries, args.seconds, args, rate=args.latency_qps)
            results[name].latencies = lat

        d, n = results["dnsd"], results["nsd"]
        dq, nq = statistics.median(d.qps), statistics.median(n.qps)
        print()
        print(f"{'server':8s} {'median qps':>12s} {'min':>10s} {'max':>10s} {'q/CPU-s':>10s} "
              f"{'p50 ms':>8s} {'p99 ms':>8s}  (latency at {args.latency_qps} qps)")  # fmt: skip
        for r in results.values():
            print(f"{r.name:8s} {statistics.median(r.qps):12.0f} {min(r.qps):10.0f} "
                  f"{max(r.qps):10.0f} {statistics.median(r.per_cpu):10.0f} "
                  f"{r.percentile(50) * 1000:8.3f} {r.percentile(99) * 1000:8.3f}")  # fmt: skip
        ratios = [a / b for a, b in zip(d.qps, n.qps, strict=True)]
        print(f"\ndnsd / NSD = {dq / nq:.2f} (median of per-round ratios "
              f"{statistics.median(ratios):.2f}); target >= 0.75")  # fmt: skip
        print(
            f"per CPU-second: dnsd / NSD = {statistics.median(d.per_cpu) / statistics.median(n.per_cpu):.2f}"
        )
        if "dnsd-py" in results:
            p = results["dnsd-py"]
            per_round = [a / b for a, b in zip(d.per_cpu, n.per_cpu, strict=True)]
            per_round_py = [a / b for a, b in zip(p.per_cpu, n.per_cpu, strict=True)]
            print(
                f"per CPU-second: dnsd with the loop in Python / NSD = "
                f"{statistics.median(p.per_cpu) / statistics.median(n.per_cpu):.2f}; "
                f"compiled / Python = {statistics.median(d.per_cpu) / statistics.median(p.per_cpu):.2f}"
            )
            print("per-round ratios per CPU-second, compiled / NSD: "
                  + " ".join(f"{x:.2f}" for x in per_round) + "; Python / NSD: "
                  + " ".join(f"{x:.2f}" for x in per_round_py))  # fmt: skip
        return 0
    finally:
        for proc in procs:
            stop(proc)
        if etcd is not None:
            etcd.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
