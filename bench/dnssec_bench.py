#!/usr/bin/env python3
"""Signed vs unsigned answers from one dnsd, and the signing cost of a registry change.

    python bench/dnssec_bench.py                       # 3 rounds of 5 s per query kind
    python bench/dnssec_bench.py --rounds 5 --seconds 10 --algorithm ed25519
    python bench/dnssec_bench.py --rebuild-only --names 1 --edges 10000   # one change at 10,000 edges

What it does:

1. starts a private etcd, registers 3 edges, makes a CSK with
   ``carousel dnssec keygen`` and starts dnsd serving example.test signed,
   pinned to one core (``--server-core``);
2. runs dnsperf (pinned to the other core) with three query kinds in turn,
   rotating the order every round: ``www A`` without EDNS, with EDNS but no
   DO bit, and with the DO bit (the signed answer: A RRset + RRSIG); reports
   queries answered per dnsd CPU-second for each and the ratio
   signed / unsigned (target: >= 0.8). CPU-seconds move far less with the
   load of a shared machine than queries per second do;
3. in-process, measures what one registry change costs a signed zone: the
   table update time signed and unsigned (CPU), and the signatures made, for
   a zone with ``--names`` mapped names over ``--edges`` edges per service
   when one edge joins or leaves.

Response rate limiting is off: every query comes from 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from dns_bench import cpu_seconds, need, register, stop, wait_answering  # noqa: E402

from carousel.etcdserver import EtcdProcess, free_port  # noqa: E402
from carousel.registry import ServiceRecord  # noqa: E402

ZONE = "example.test"
KINDS = {"plain": [], "edns": ["-e"], "signed (DO)": ["-D"]}


def dnsd_config(port: int, etcd_endpoint: str, prefix: str, key: Path) -> str:
    return f"""
[dns]
listen = ["127.0.0.1:{port}"]

[dns.rrl]
enabled = false

[[zone]]
origin = "{ZONE}"
service_ttl = 5
services = {{ "www" = "edge" }}

[[zone.dnssec.key]]
file = "{key}"

[[zone.ns]]
name = "ns1"
ipv4 = ["127.0.0.1"]

[etcd]
endpoints = ["{etcd_endpoint}"]
prefix = "{prefix}"

[log]
level = "warning"
"""


def rebuild_cost(names: int, edges: int, algorithm: int, rounds: int = 5) -> None:
    """CPU time and signatures of the table update after one edge joins or leaves, signed and unsigned.

    The update is what dnsd does on a batch of watch events (``TableBuilder.update``);
    rounds alternate a join and a leave of the same edge.
    """
    from dnsd import wire
    from dnsd.build import TableBuilder
    from dnsd.config import NSConfig, ZoneConfig
    from dnsd.dnssec import keys
    from dnsd.dnssec.sign import ZoneKey, ZoneSigner
    from dnsd.zone import compile_zones

    services = {f"n{i}": f"svc{i % 10}" for i in range(names)}
    zone = ZoneConfig(origin=ZONE, ns=[NSConfig("ns1", ipv4=["192.0.2.53"])], services=services)
    zones = compile_zones([zone])

    def record(s: int, i: int) -> ServiceRecord:
        v4, v6 = f"10.{s}.{i // 250}.{i % 250 + 1}", f"fd00::{s:x}:{i:x}"
        return ServiceRecord(f"svc{s}", f"e{s}-{i}", 80, ipv4=(v4,), ipv6=(v6,))

    before = [record(s, i) for s in range(min(10, names)) for i in range(edges)]
    joiner = record(0, edges)  # one edge joins service svc0, then leaves again
    origin = wire.to_wire(ZONE)
    for label, signers in (
        ("unsigned", None),
        ("signed", {origin: ZoneSigner(origin, [ZoneKey(keys.generate(algorithm))])}),
    ):
        builder = TableBuilder(zones, signers=signers)
        start = time.process_time()
        table = builder.build(before, 1)
        full = time.process_time() - start
        times, sigs = [], []
        for r in range(rounds):
            made = sum(s.signatures_made for s in (signers or {}).values())
            change = (None, joiner) if r % 2 == 0 else (joiner, None)
            start = time.process_time()
            table = builder.update([change], 2 + r, previous=table)
            times.append(time.process_time() - start)
            sigs.append(sum(s.signatures_made for s in (signers or {}).values()) - made)
        print(f"  {label:9s} full build {full * 1000:8.1f} ms CPU; one change: "
              f"{statistics.median(times) * 1000:8.1f} ms CPU (median of {rounds}; "
              f"{', '.join(f'{t * 1000:.1f}' for t in times)}), "
              f"signatures made: {statistics.median(sigs):.0f}", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per dnsperf run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10, help="dnsperf -c")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    parser.add_argument("--algorithm", choices=["ecdsap256sha256", "ed25519"], default="ecdsap256sha256")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--names", type=int, default=200, help="mapped names, for the rebuild cost")
    parser.add_argument("--edges", type=int, default=5, help="edges per service, for the rebuild cost")
    parser.add_argument("--rebuild-only", action="store_true", help="only the in-process change cost")
    args = parser.parse_args()
    if args.rebuild_only:
        services = min(10, args.names)
        print(f"registry change: {args.names} names over {services} services of {args.edges} edges")
        rebuild_cost(args.names, args.edges, 13 if args.algorithm == "ecdsap256sha256" else 15)
        return 0
    need("dnsperf")
    need("taskset")

    workdir = Path(tempfile.mkdtemp(prefix="dnssec-bench-"))
    etcd: EtcdProcess | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        etcd = EtcdProcess(workdir / "etcd", extra_args=[])
        etcd_cmd = etcd.command
        etcd.command = lambda: ["taskset", "-c", str(args.client_core), *etcd_cmd()]  # type: ignore[method-assign]
        etcd.start()
        prefix = "/bench/"
        asyncio.run(register(etcd.endpoint, prefix))
        key = subprocess.run(
            [sys.executable, "-m", "carousel.cli", "dnssec", "keygen", ZONE, "--dir", str(workdir),
             "--algorithm", args.algorithm],
            capture_output=True, text=True, check=True, cwd=REPO,
        ).stdout.strip()  # fmt: skip
        port = free_port()
        cfg = workdir / "dnsd.toml"
        cfg.write_text(dnsd_config(port, etcd.endpoint, prefix, Path(key)))
        with open(workdir / "dnsd.log", "wb") as log:
            proc = subprocess.Popen(
                ["taskset", "-c", str(args.server_core), sys.executable, "-m", "carousel.cli",
                 "dnsd", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                env={**os.environ, "CAROUSEL_LOG_FORMAT": "json"},
            )  # fmt: skip
        wait_answering(port)
        queries = workdir / "queries.txt"
        queries.write_text(f"www.{ZONE} A\n")
        print(f"dnsperf -c {args.clients} -q {args.outstanding}, {args.seconds:g} s per run, {args.rounds} "
              f"rounds; dnsd on core {args.server_core}, dnsperf on core {args.client_core}; "
              f"algorithm {args.algorithm}", flush=True)  # fmt: skip
        per_cpu: dict[str, list[float]] = {k: [] for k in KINDS}
        kinds = list(KINDS)
        for rnd in range(args.rounds):
            order = kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]
            for kind in order:
                before = cpu_seconds(proc.pid)
                qps, lost, done = dnsperf_flags(port, queries, args, KINDS[kind])
                used = cpu_seconds(proc.pid) - before
                per_cpu[kind].append(done / used if used > 0 else float("nan"))
                print(f"  round {rnd + 1}: {kind:12s} {qps:10.0f} qps  lost {lost:.2f}%  "
                      f"{per_cpu[kind][-1]:10.0f} queries/CPU-s", flush=True)  # fmt: skip
        med = {k: statistics.median(v) for k, v in per_cpu.items()}
        print()
        for kind, value in med.items():
            print(f"{kind:12s} {value:10.0f} queries per dnsd CPU-second (median)")
        signed = med["signed (DO)"]
        print(f"\nsigned / plain = {signed / med['plain']:.2f}, signed / EDNS without DO = "
              f"{signed / med['edns']:.2f}; target >= 0.8")  # fmt: skip
        print(
            f"\nregistry change: {args.names} names over 10 services of {args.edges} edges; one edge "
            "joins one service (the A and AAAA of its names change, and the SOA serial):"
        )
        rebuild_cost(args.names, args.edges, 13 if args.algorithm == "ecdsap256sha256" else 15)
        return 0
    finally:
        stop(proc)
        if etcd is not None:
            etcd.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def dnsperf_flags(
    port: int, queries: Path, args: argparse.Namespace, extra: list[str]
) -> tuple[float, float, int]:
    """(queries per second, lost %, queries completed) of one dnsperf run with extra flags."""
    cmd = ["taskset", "-c", str(args.client_core), need("dnsperf"), "-s", "127.0.0.1",
           "-p", str(port), "-d", str(queries), "-l", str(args.seconds),
           "-c", str(args.clients), "-q", str(args.outstanding), *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 30).stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out)
    done = re.search(r"Queries completed:\s+(\d+)", out)
    if not qps or not done:
        raise RuntimeError(f"dnsperf output not understood:\n{out[-2000:]}")
    return float(qps.group(1)), float(lost.group(1)) if lost else 0.0, int(done.group(1))


if __name__ == "__main__":
    sys.exit(main())
