#!/usr/bin/env python3
"""How dnsd's costs grow with the number of edges, and how fresh its answers stay under churn.

    python bench/scale_bench.py                       # everything (about 10 minutes)
    python bench/scale_bench.py --sizes 3,1000 --churn-sizes 1000 --agents 0
    python bench/scale_bench.py --json after.json     # also write the figures as JSON
    python bench/scale_bench.py --no-build --sizes 10000 --churn-sizes 10000 --agents 0 --workers 2
                                                      # churn with a supervisor and 2 workers
    python bench/scale_bench.py --no-build --sizes 10000 --start-rounds 5 --compare-repo ../old
                                                      # start-up CPU, this checkout and another alternating

What it measures, per number of edges N registered under one name:

1. ``build``: the time TableBuilder takes to build the whole answer table from
   N records (in this process, median of a few runs), with equal weights and
   with mixed weights (1-10), and ``change``: the time to produce the next
   table after one edge changes state (the incremental path when the builder
   has one, else a full rebuild, as dnsd did before);
2. ``start``: a real dnsd process against a real etcd holding N records, from
   exec to the first answer whose SOA serial is the registry revision (the
   first full answer), and its resident memory (RSS) once it answers;
3. ``qps`` and ``us/q``: dnsperf against that dnsd (dnsd and dnsperf pinned to
   different cores), and dnsd's CPU time per answered query;
4. churn (N = 1,000 and 10,000): 10 edges change state every 100 ms for 10 s
   while a prober asks for the SOA serial every 5 ms. The SOA serial is the
   registry revision, so the delay of each change is the time from its etcd
   put returning to the first answer carrying a serial at or past its
   revision (p50 / p99 / max); the bench's own watch on etcd gives etcd's
   share of it. Also dnsd's CPU during the churn (% of one core) and how long
   after the last change the answers reached the last revision. Then, per
   layout (``--layouts``: ``split``, etcd, the churn writer and the prober on
   the client core beside dnsperf; ``shared``, anywhere), a quiet dnsperf run
   and the same churn under dnsperf: queries per second during churn relative
   to quiet, the delays under load, queries answered per dnsd CPU-second
   during churn relative to quiet, and ``dedicated_ratio``, the ratio projected
   for a dnsd alone on its core from CPU times. Each phase prints who used the
   cores (dnsd, its event loops and answer threads, etcd, this process,
   dnsperf, and each core's busy time);
5. agents: 200 lease keepers (each its own etcd connection and lease, TTL 3 s,
   keepalive every second as agent/lease.py does) in 4 processes on one etcd:
   etcd CPU, agent CPU, keepalive round-trip p50 / p99.

The machine may be shared: compare figures from the same run, and read CPU
per query (which moves little with load) before queries per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import multiprocessing
import os
import random
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carousel.config import EtcdConfig  # noqa: E402
from carousel.etcd import Etcd  # noqa: E402
from carousel.etcdserver import EtcdProcess, free_port  # noqa: E402
from carousel.registry import Keys, ServiceRecord  # noqa: E402

ZONE = "example.test"
NAME = f"www.{ZONE}"
CAP = 8  # max_answer_records (the default)


def address(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


def record(i: int, state: str = "up", weight: int = 1) -> ServiceRecord:
    return ServiceRecord("edge", f"edge{i:05d}", 80, ipv4=(address(i),), weight=weight, state=state)  # type: ignore[arg-type]


def _tree(pid: int) -> list[int]:
    """A process and its descendants (dnsd's workers with ``--workers``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def cpu_seconds(pid: int) -> float:
    """User + system time of a process (all its threads) and of its live descendants."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024 if total else float("nan")


def _threads(pid: int) -> dict[int, float]:
    """CPU s of every thread of a process tree, by thread id (main threads have their process's id)."""
    out: dict[int, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for p in _tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, IndexError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / hz
    return out


def answer_threads(before: dict[int, float], after: dict[int, float], mains: set[int]) -> set[int]:
    """The threads that answered a quiet dnsperf run: the UDP answer threads.

    Told apart by what they did, since CPython 3.11 names no OS thread: each took at
    least a fifth of the CPU that the threads other than the event loops used.
    """
    used = {t: after[t] - before.get(t, 0.0) for t in after if t not in mains}
    total = sum(used.values())
    return {t for t, v in used.items() if total > 0 and v >= total / 5}


def _core_busy(core: int) -> float:
    """Seconds core ``core`` spent running anything (all but idle and iowait), since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(v) for v in line.split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return float("nan")


class Usage:
    """Who used the two cores during a phase: CPU s of each party and busy s of each core.

    Parties: dnsd (its process tree; ``dnsd_loop`` its main threads, ``dnsd_threads`` the
    others: the UDP answer threads and gRPC's; ``dnsd_answer`` the answer threads, once
    ``answering`` names them), etcd, this bench
    process (the churn writer and the prober) and dnsperf (reaped children of this
    process, counted when dnsperf has exited).
    """

    def __init__(
        self, dnsd: int, etcd: int, args: argparse.Namespace, answering: set[int] | None = None
    ) -> None:
        self.pids = {"dnsd": dnsd, "etcd": etcd}
        self.answering = answering or set()
        self.cores = {"server_core": args.server_core, "client_core": args.client_core}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.threads = _threads(self.pids["dnsd"])
        mains = set(_tree(self.pids["dnsd"]))
        out["dnsd_loop"] = sum(v for t, v in self.threads.items() if t in mains)
        out["dnsd_threads"] = sum(v for t, v in self.threads.items() if t not in mains)
        out["dnsd_answer"] = sum(v for t, v in self.threads.items() if t in self.answering)
        me = os.times()
        out["bench"] = me.user + me.system
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["dnsperf"] = kids.ru_utime + kids.ru_stime
        out.update({name: _core_busy(core) for name, core in self.cores.items()})
        out["wall"] = time.monotonic()
        return out

    def percent(self) -> dict[str, float]:
        """Each party's CPU and each core's busy time since construction, in % of the wall time."""
        self.before = self.threads
        now = self._read()
        wall = now["wall"] - self.start["wall"]
        return {k: (now[k] - self.start[k]) / wall * 100 for k in now if k != "wall"}


def place(pid: int, cores: set[int] | None) -> None:
    """Pin every thread of ``pid`` to ``cores`` (None: any core)."""
    allowed = cores if cores is not None else set(range(os.cpu_count() or 1))
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), allowed)


def pct(data: list[float], p: float) -> float:
    if not data:
        return float("nan")
    data = sorted(data)
    return data[min(len(data) - 1, int(p / 100 * len(data)))]


# --- 1. building the table in this process ---------------------------------------------


def measure_build(n: int, mixed: bool) -> dict[str, float]:
    """Median full build time and the time for one change, in ms (wall clock and CPU)."""
    from dnsd.build import TableBuilder
    from dnsd.config import NSConfig, ZoneConfig
    from dnsd.zone import compile_zones

    zones = compile_zones([ZoneConfig(origin=ZONE, ns=[NSConfig("ns1", ipv4=["192.0.2.53"])],
                                      services={"www": "edge"})])  # fmt: skip
    rng = random.Random(n)
    records = [record(i, weight=rng.randint(1, 10) if mixed else 1) for i in range(n)]
    builder = TableBuilder(zones, max_answer_records=CAP)
    times, cpu = [], []
    table = None
    runs = 5 if n <= 1000 else 3
    for _ in range(runs):
        started, c0 = time.perf_counter(), time.process_time()
        table = builder.build(records, 1, previous=table)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - c0)
        if times[-1] > 20:
            break  # one is enough to show the order of magnitude
    assert table is not None
    change, change_cpu = [], []
    for k in range(max(runs, 9) if times[-1] < 5 else 1):
        i = rng.randrange(n)
        old = records[i]
        new = record(i, state="draining" if old.state == "up" else "up", weight=old.weight)
        records[i] = new
        started, c0 = time.perf_counter(), time.process_time()
        if hasattr(builder, "update"):
            table = builder.update([(old, new)], 2 + k, previous=table)
        else:  # the code before incremental updates: every change is a full build
            table = builder.build(records, 2 + k, previous=table)
        change.append(time.perf_counter() - started)
        change_cpu.append(time.process_time() - c0)
    return {
        "build_ms": statistics.median(times) * 1000,
        "change_ms": statistics.median(change) * 1000,
        "build_cpu_ms": statistics.median(cpu) * 1000,
        "change_cpu_ms": statistics.median(change_cpu) * 1000,
    }


def nginx_swrr(weights: list[int]) -> list[int]:
    """The order dnsd used before: nginx's smooth weighted round robin, O(n x total weight)."""
    total = sum(weights)
    current = [0] * len(weights)
    order = []
    for _ in range(total):
        best = 0
        for i, w in enumerate(weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        order.append(best)
    return order


def heap_swrr(weights: list[int]) -> list[int]:
    """Stride scheduling with a heap: the same kind of order in O(total weight x log n)."""
    import heapq

    heap = [(0.5 / w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    order = []
    for _ in range(sum(weights)):
        t, i = heap[0]
        order.append(i)
        heapq.heapreplace(heap, (t + 1 / weights[i], i))
    return order


def measure_algorithms(n: int) -> dict[str, float]:
    """ms per period of first places (weights 1-10) by each candidate; us per query of a heap pick."""
    import heapq

    from dnsd.rotation import weighted_order

    weights = [random.Random(n).randint(1, 10) for _ in range(n)]
    out = {}
    candidates = {"virtual_time_ms": weighted_order, "heap_ms": heap_swrr}
    if n <= 1000:
        candidates["nginx_ms"] = nginx_swrr
    for label, fn in candidates.items():
        started = time.perf_counter()
        fn(weights)
        out[label] = (time.perf_counter() - started) * 1000
    heap = [(0.5 / w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    picks = 100_000
    started = time.perf_counter()
    for _ in range(picks):  # what a per-query scheduler would add to every answer
        t, i = heap[0]
        heapq.heapreplace(heap, (t + 1 / weights[i], i))
    out["heap_pick_us"] = (time.perf_counter() - started) / picks * 1e6
    return out


# --- 2-4. a real dnsd -----------------------------------------------------------------


def dnsd_config(port: int, endpoint: str, prefix: str, workers: int = 1) -> str:
    return f"""
[dns]
listen = ["127.0.0.1:{port}"]
max_answer_records = {CAP}
workers = {workers}

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
endpoints = ["{endpoint}"]
prefix = "{prefix}"

[log]
level = "warning"
"""


def soa_query(qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in ZONE.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0) + labels + struct.pack("!HH", 6, 1)


_QUESTION_END = len(soa_query(0))


def soa_serial(resp: bytes) -> int | None:
    """The serial of the SOA in a response to soa_query.

    Read in place (dnspython's parse was about a third of the bench process's CPU during
    churn, on the client core beside dnsperf): the answer's owner is a pointer to the
    question (2 bytes), then type, class, TTL, RDLENGTH; MNAME and RNAME are compressed
    or not, so they are walked; the serial follows them.
    """
    if len(resp) < _QUESTION_END + 12 or resp[6:8] != b"\x00\x01":
        return None
    at = _QUESTION_END
    at = _skip_name(resp, at)
    if at < 0 or resp[at : at + 2] != b"\x00\x06":
        return None
    at += 10  # type, class, TTL, RDLENGTH
    for _ in range(2):  # MNAME, RNAME
        at = _skip_name(resp, at)
        if at < 0:
            return None
    if at + 4 > len(resp):
        return None
    return int.from_bytes(resp[at : at + 4], "big")


def _skip_name(msg: bytes, at: int) -> int:
    """The offset after the wire name at ``at`` (-1 if malformed)."""
    while at < len(msg):
        n = msg[at]
        if n == 0:
            return at + 1
        if n & 0xC0 == 0xC0:
            return at + 2
        at += 1 + n
    return -1


class Prober(threading.Thread):
    """Asks for the SOA serial every ``interval`` s; records (time, serial) when it moves."""

    def __init__(self, port: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.seen: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.serial = 0

    def run(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.2)
        qid = 0
        while not self.stop.is_set():
            qid = (qid + 1) & 0xFFFF
            try:
                s.sendto(soa_query(qid), ("127.0.0.1", self.port))
                while True:
                    data = s.recv(4096)
                    if data[:2] == struct.pack("!H", qid):
                        break
            except OSError:
                continue
            serial = soa_serial(data)
            if serial is not None and serial != self.serial:
                self.serial = serial
                self.seen.append((time.monotonic(), serial))
            time.sleep(self.interval)
        s.close()

    def first_at_or_after(self, revision: int) -> float | None:
        for t, serial in self.seen:
            if serial >= revision:
                return t
        return None


async def register(endpoint: str, prefix: str, n: int) -> int:
    """Put N records; return the revision of the last put."""
    etcd = Etcd(EtcdConfig(endpoints=[endpoint], prefix=prefix))
    keys = Keys(prefix)
    rev = 0
    try:
        for start in range(0, n, 200):
            revs = await asyncio.gather(*(
                etcd.put(keys.service("edge", f"edge{i:05d}"), record(i).encode())
                for i in range(start, min(n, start + 200))
            ))  # fmt: skip
            rev = max(rev, *revs)
    finally:
        await etcd.close()
    return rev


async def churn(
    endpoint: str,
    prefix: str,
    n: int,
    seconds: float,
    loader: threading.Thread | None = None,
    per_tick: int = 10,
) -> tuple[list[tuple[float, int]], dict[int, float]]:
    """Toggle ``per_tick`` edges' state every 100 ms; ``loader`` is started with the first change.

    Returns (time each put returned, its revision) and, per revision, when
    etcd's own watch delivered it to us: the part of the delay that is etcd's.
    """
    etcd = Etcd(EtcdConfig(endpoints=[endpoint], prefix=prefix, timeout=5.0))
    keys = Keys(prefix)
    states = ["up"] * n
    rng = random.Random(7)
    done: list[tuple[float, int]] = []
    delivered: dict[int, float] = {}

    async def one(i: int) -> None:
        states[i] = "draining" if states[i] == "up" else "up"
        rev = await etcd.put(keys.service("edge", f"edge{i:05d}"), record(i, states[i]).encode())
        done.append((time.monotonic(), rev))

    arrived = asyncio.Event()

    async def watch(start: int) -> None:
        async for ev in etcd.watch_prefix(keys.services, start):
            delivered.setdefault(ev.revision, time.monotonic())
            arrived.set()

    watcher = asyncio.create_task(watch((await etcd.revision()) + 1))
    try:
        start = time.monotonic()
        if loader is not None:
            loader.start()
        tick = 0
        while time.monotonic() - start < seconds:
            await asyncio.gather(*(one(i) for i in rng.sample(range(n), per_tick)))
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * 0.1 - time.monotonic()))
        last = max(r for _, r in done)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while last not in delivered:
                    arrived.clear()
                    await arrived.wait()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await etcd.close()
    return done, delivered


def dnsperf(port: int, queries: Path, seconds: float, core: int) -> tuple[float, int]:
    """(queries per second, queries completed)."""
    import re

    out = subprocess.run(
        ["taskset", "-c", str(core), "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
         "-l", str(seconds), "-c", "4", "-q", "64"],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    done = re.search(r"Queries completed:\s+(\d+)", out)
    if not qps or not done:
        raise RuntimeError(f"dnsperf output not understood:\n{out[-2000:]}")
    return float(qps.group(1)), int(done.group(1))


_COMPILED: set[Path] = set()


def _compile(repo: Path) -> None:
    """Compile a checkout's bytecode once, as installing the package does.

    Started from a checkout with PYTHONDONTWRITEBYTECODE set (this machine's
    environment), dnsd compiled carousel/ and dnsd/ from source at every start:
    about 0.13 s of CPU (0.54 against 0.41 s for the imports) that an installed
    dnsd, whose bytecode pip compiles at install, never pays.
    """
    if repo not in _COMPILED:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "carousel", "dnsd"], cwd=repo, check=True)
        _COMPILED.add(repo)


def _launch_dnsd(
    work: Path, name: str, endpoint: str, prefix: str, repo: Path, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], int, float]:
    """Start a dnsd from checkout ``repo`` on the server core: (process, port, monotonic start)."""
    _compile(repo)
    port = free_port()
    cfg = work / f"{name}.toml"
    cfg.write_text(dnsd_config(port, endpoint, prefix, args.workers))
    with open(work / f"{name}.log", "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            ["taskset", "-c", str(args.server_core), sys.executable, "-m", "carousel.cli", "dnsd",
             "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, cwd=repo, start_new_session=True,
        )  # fmt: skip
    return proc, port, started


def _wait_full_answer(
    proc: subprocess.Popen[bytes], prober: Prober, revision: int, started: float, log: Path, poll: float
) -> float | None:
    """When the prober first saw ``revision`` in the SOA serial (None after 300 s)."""
    deadline = started + 300
    while time.monotonic() < deadline and prober.first_at_or_after(revision) is None:
        if proc.poll() is not None:
            raise RuntimeError(f"dnsd exited: see {log}")
        time.sleep(poll)
    return prober.first_at_or_after(revision)


def run_dnsd(work: Path, etcd: EtcdProcess, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start dnsd over N records; measure start-up, RSS, qps, CPU per query, and churn."""
    prefix = f"/bench{n}/"
    revision = asyncio.run(register(etcd.endpoint, prefix, n))
    out: dict[str, Any] = {"n": n}
    proc, port, started = _launch_dnsd(work, f"dnsd-{n}", etcd.endpoint, prefix, REPO, args)
    prober = Prober(port, 0.002)
    prober.start()
    try:
        at = _wait_full_answer(proc, prober, revision, started, work / f"dnsd-{n}.log", 0.005)
        out["start_s"] = (at - started) if at is not None else float("nan")
        prober.stop.set()
        prober.join()
        time.sleep(0.5)
        out["rss_mib"] = rss_mib(proc.pid)
        queries = work / "queries.txt"
        queries.write_text(f"{NAME} A\n")
        cpu0 = cpu_seconds(proc.pid)
        qps, done = dnsperf(port, queries, args.seconds, args.client_core)
        out["qps"] = qps
        out["us_per_query"] = (cpu_seconds(proc.pid) - cpu0) / max(done, 1) * 1e6
        if n in args.churn:
            assert etcd.proc is not None
            out.update(run_churn(proc.pid, port, etcd.endpoint, prefix, n, queries, args, etcd.proc.pid))
    finally:
        prober.stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # dnsd logs at warning level here: anything it said (a lost watch, a re-list) explains outliers.
    text = (work / f"dnsd-{n}.log").read_text(errors="replace")
    said = [line for line in text.splitlines() if line.strip()]
    for line in said[:5]:
        print(f"  dnsd N={n} said: {line[:300]}", flush=True)
    return out


def start_cost(
    work: Path, etcd: EtcdProcess, n: int, repo: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """(wall s, CPU s) from exec of a dnsd from checkout ``repo`` to its first full answer over N records.

    The CPU is read the moment the prober sees the registry revision in the SOA serial
    (every 2 ms): the interpreter, the imports, the etcd read, decoding and the first build.
    """
    prefix = f"/bench{n}/"
    revision = asyncio.run(_revision(etcd.endpoint))
    proc, port, started = _launch_dnsd(work, f"dnsd-start-{n}", etcd.endpoint, prefix, repo, args)
    prober = Prober(port, 0.002)
    prober.start()
    try:
        at = _wait_full_answer(proc, prober, revision, started, work / f"dnsd-start-{n}.log", 0.001)
        cpu = cpu_seconds(proc.pid)
        wall = (at - started) if at is not None else float("nan")
    finally:
        prober.stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        prober.join()
    return wall, cpu


async def _revision(endpoint: str) -> int:
    etcd = Etcd(EtcdConfig(endpoints=[endpoint]))
    try:
        return await etcd.revision()
    finally:
        await etcd.close()


def run_start(work: Path, etcd: EtcdProcess, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start-up to the first full answer, this checkout and ``--compare-repo`` alternating."""
    asyncio.run(register(etcd.endpoint, f"/bench{n}/", n))
    repos = {"this": REPO, **({"compare": args.compare_repo} if args.compare_repo else {})}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in repos}
    for rnd in range(args.start_rounds):
        for label, repo in list(repos.items()) if rnd % 2 == 0 else list(repos.items())[::-1]:
            runs[label].append(start_cost(work, etcd, n, repo, args))
            wall, cpu = runs[label][-1]
            print(f"  start N={n} {label:8s} round {rnd + 1}: {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True)
    out: dict[str, Any] = {"n": n}
    for label, values in runs.items():
        out[f"{label}_start_s"] = statistics.median(w for w, _ in values)
        out[f"{label}_start_cpu_s"] = statistics.median(c for _, c in values)
        out[f"{label}_start_cpu_min_s"] = min(c for _, c in values)
    return out


def _delays(prober: Prober, done: list[tuple[float, int]], delivered: dict[int, float]) -> dict[str, float]:
    """Change-to-answer delays (and etcd's share) from the prober's serials, in ms."""
    delays, etcd_delays, unseen = [], [], 0
    for t, rev in done:
        seen = prober.first_at_or_after(rev)
        if seen is None:
            unseen += 1
            continue
        delays.append(max(0.0, seen - t))
        if rev in delivered:
            etcd_delays.append(max(0.0, delivered[rev] - t))
    last_rev = max(r for _, r in done)
    last_put = max(t for t, _ in done)
    caught = prober.first_at_or_after(last_rev)
    return {
        "unseen": unseen,
        "p50_ms": pct(delays, 50) * 1000,
        "p99_ms": pct(delays, 99) * 1000,
        "max_ms": max(delays) * 1000 if delays else float("nan"),
        "etcd_p50_ms": pct(etcd_delays, 50) * 1000,
        "etcd_p99_ms": pct(etcd_delays, 99) * 1000,
        "caught_up_s": (caught - last_put) if caught is not None else float("inf"),
    }


LAYOUTS = {
    # etcd, the churn writer and the prober run where the scheduler puts them, the server
    # core included: what dnsd gets of its core then depends on them (as it did before
    # the layouts were told apart).
    "shared": None,
    # dnsd alone on the server core; etcd, the churn writer and the prober beside dnsperf
    # on the client core: the ratio then says what dnsd's own churn work costs its queries.
    "split": "client",
}


def _place_layout(layout: str, etcd_pid: int, args: argparse.Namespace) -> None:
    cores = {args.client_core} if LAYOUTS[layout] == "client" else None
    place(etcd_pid, cores)
    place(os.getpid(), cores)  # the churn writer, its gRPC threads and the prober start from here


def _churn_phase(
    pid: int,
    port: int,
    endpoint: str,
    prefix: str,
    n: int,
    args: argparse.Namespace,
    load: Path | None,
    etcd_pid: int,
    answering: set[int] | None = None,
) -> tuple[dict[str, Any], dict[str, float], int, float]:
    """One churn run: (delays, usage in %, queries answered, dnsperf's qps).

    With ``load``, dnsperf runs inside the churn: it starts ``LOAD_LEAD`` s after the
    first change and stops as long before the last, so every query it counts was
    answered while the registry changed, and the usage covers dnsperf's run exactly.
    Without, the usage covers the churn.
    """
    prober = Prober(port)
    prober.start()
    result: dict[str, Any] = {}
    loader = None
    if load is not None:

        def run() -> None:
            time.sleep(LOAD_LEAD)
            usage = Usage(pid, etcd_pid, args, answering)
            seconds = args.churn_seconds - 2 * LOAD_LEAD
            result["qps"], result["done"] = dnsperf(port, load, seconds, args.client_core)
            result["usage"] = usage.percent()

        loader = threading.Thread(target=run)
    try:
        usage = Usage(pid, etcd_pid, args)
        done, delivered = asyncio.run(churn(endpoint, prefix, n, args.churn_seconds, loader))
        if loader is not None:
            loader.join()
        used = result.get("usage") or usage.percent()
        last_rev = max(r for _, r in done)
        deadline = time.monotonic() + args.catch_up
        while time.monotonic() < deadline and prober.first_at_or_after(last_rev) is None:
            time.sleep(0.01)
    finally:
        prober.stop.set()
        prober.join()
    out = _delays(prober, done, delivered)
    out["changes"] = len(done)
    return out, used, result.get("done", 0), result.get("qps", 0.0)


LOAD_LEAD = 0.5  # seconds between the churn's start and dnsperf's (and dnsperf's end and the churn's)


def _use_line(used: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1f}%" for k, v in used.items())


def run_churn(
    pid: int,
    port: int,
    endpoint: str,
    prefix: str,
    n: int,
    queries: Path,
    args: argparse.Namespace,
    etcd_pid: int,
) -> dict[str, Any]:
    """Churn alone (delays, CPU); then, per layout, a quiet dnsperf run and churn under dnsperf."""
    _place_layout(args.layouts[0], etcd_pid, args)
    alone, used, _, _ = _churn_phase(pid, port, endpoint, prefix, n, args, None, etcd_pid)
    out: dict[str, Any] = {f"churn_{k}": v for k, v in alone.items()}
    out["churn_cpu_pct"] = used["dnsd"]
    out["churn_use"] = used
    print(f"  N={n} churn alone, % of a core: {_use_line(used)}", flush=True)
    seconds = args.churn_seconds - 2 * LOAD_LEAD
    for layout in args.layouts:
        _place_layout(layout, etcd_pid, args)
        quiet_use = Usage(pid, etcd_pid, args)
        quiet_qps, quiet_done = dnsperf(port, queries, seconds, args.client_core)
        quiet = quiet_use.percent()
        answering = answer_threads(quiet_use.before, quiet_use.threads, set(_tree(pid)))
        quiet["dnsd_answer"] = quiet["dnsd_threads"]  # nothing else ran in the quiet phase
        loaded, churn_use, done, churn_qps = _churn_phase(
            pid, port, endpoint, prefix, n, args, queries, etcd_pid, answering
        )
        tag = "" if layout == args.layouts[0] else f"{layout}_"
        for k in ("p50_ms", "p99_ms", "max_ms", "caught_up_s"):
            out[f"{tag}loaded_{k}"] = loaded[k]
        out[f"{tag}quiet_qps"] = quiet_qps
        out[f"{tag}loaded_qps"] = churn_qps
        out[f"{tag}qps_ratio"] = churn_qps / quiet_qps
        # Queries answered per CPU-second of dnsd: what dnsd could serve where it, not the
        # client, is the limit (dnsperf and the churn share a loaded machine).
        out[f"{tag}capacity_ratio"] = (done / max(churn_use["dnsd"], 1e-9)) / (
            quiet_done / max(quiet["dnsd"], 1e-9)
        )
        # What the ratio would be where dnsd had its core to itself (a projection from CPU
        # times, which move little with the machine's load, unlike queries per second): the
        # core less what dnsd spent on the churn (its event loops, gRPC's threads), at the
        # answer threads' cost per query during churn against quiet.
        per_query_quiet = quiet["dnsd_answer"] / max(quiet_done, 1)
        per_query_churn = churn_use["dnsd_answer"] / max(done, 1)
        churn_work = (churn_use["dnsd"] - churn_use["dnsd_answer"]) / 100
        out[f"{tag}dedicated_ratio"] = (1 - churn_work) * per_query_quiet / max(per_query_churn, 1e-12)
        out[f"{tag}quiet_use"], out[f"{tag}loaded_use"] = quiet, churn_use
        print(
            f"  N={n} layout {layout}: quiet {quiet_qps:.0f} qps, % of a core: {_use_line(quiet)}", flush=True
        )
        print(f"  N={n} layout {layout}: churn {churn_qps:.0f} qps ({churn_qps / quiet_qps:.3f}x), "
              f"% of a core: {_use_line(churn_use)}", flush=True)  # fmt: skip
    out["layout"] = args.layouts[0]
    return out


# --- 5. agents ------------------------------------------------------------------------


def _agents(endpoint: str, count: int, seconds: float, conn: Any) -> None:
    """``count`` agents' lease keepers in one process: (keepalive latencies, cpu seconds)."""

    async def main() -> list[float]:
        from agent.lease import LeaseKeeper

        latencies: list[float] = []
        clients = [Etcd(EtcdConfig(endpoints=[endpoint], prefix="/agents/")) for _ in range(count)]
        keepers = []
        for i, etcd in enumerate(clients):
            inner = etcd.keepalive

            async def timed(lease_id: int, *, budget: float | None = None, _inner: Any = inner) -> int:
                t = time.perf_counter()
                ttl = await _inner(lease_id, budget=budget)
                latencies.append(time.perf_counter() - t)
                return ttl

            etcd.keepalive = timed  # type: ignore[method-assign]

            def on_lease(lease: int, _etcd: Etcd = etcd, _i: int = i) -> None:
                asyncio.get_running_loop().create_task(
                    _etcd.put(f"/agents/services/edge/a{os.getpid()}-{_i}", b"{}", lease=lease)
                )

            keepers.append(LeaseKeeper(etcd, 3, on_lease))
        tasks = [asyncio.create_task(k.run()) for k in keepers]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for etcd in clients:
            await etcd.close()
        return latencies

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    t = time.process_time()
    lat = asyncio.run(main())
    conn.send((lat, time.process_time() - t))


def run_agents(etcd: EtcdProcess, count: int, seconds: float, procs: int = 4) -> dict[str, Any]:
    assert etcd.proc is not None
    ctx = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    cpu0, t0 = cpu_seconds(etcd.proc.pid), time.monotonic()
    for _ in range(procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_agents, args=(etcd.endpoint, count // procs, seconds, child))
        p.start()
        pipes.append(parent)
        workers.append(p)
    latencies: list[float] = []
    agent_cpu = 0.0
    for parent, p in zip(pipes, workers, strict=True):
        lat, cpu = parent.recv()
        latencies += lat
        agent_cpu += cpu
        p.join()
    wall = time.monotonic() - t0
    return {
        "agents": count,
        "etcd_cpu_pct": (cpu_seconds(etcd.proc.pid) - cpu0) / wall * 100,
        "agent_cpu_pct": agent_cpu / seconds * 100,
        "renewals": len(latencies),
        "renew_p50_ms": pct(latencies, 50) * 1000,
        "renew_p99_ms": pct(latencies, 99) * 1000,
    }


# --- report ---------------------------------------------------------------------------


def _figures(r: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in r.items()
        if k != "n" and not isinstance(v, dict)  # the usage tables are printed as they are measured
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3,100,1000,10000")
    p.add_argument("--churn-sizes", default="1000,10000")
    p.add_argument("--build-only", action="store_true", help="only the in-process build figures")
    p.add_argument("--no-build", action="store_true", help="skip the in-process build figures")
    p.add_argument("--seconds", type=float, default=5.0, help="dnsperf run length for qps")
    p.add_argument("--churn-seconds", type=float, default=10.0)
    p.add_argument("--catch-up", type=float, default=60.0, help="wait at most this long after the churn")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--agent-seconds", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=1, help="dnsd's [dns] workers (all on the server core)")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument(
        "--layouts",
        default="split,shared",
        help="churn under dnsperf in each layout, the first one reported without a prefix: "
        "split (etcd, the churn writer and the prober on the client core) and shared (anywhere)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--start-rounds",
        type=int,
        default=0,
        help="only start-up: exec to first full answer at each of --sizes, this many times",
    )
    p.add_argument(
        "--compare-repo",
        type=Path,
        help="with --start-rounds: a checkout of other code, run alternately with this one",
    )
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.churn = {int(s) for s in args.churn_sizes.split(",") if s}
    args.layouts = [s for s in args.layouts.split(",") if s]
    if not args.layouts or any(s not in LAYOUTS for s in args.layouts):
        p.error(f"--layouts: a comma-separated list of {', '.join(LAYOUTS)}")
    report: dict[str, Any] = {"build": {}, "dnsd": {}, "agents": None}

    print("build (in process, ms, wall / CPU): N, full build equal weights, one change, "
          "full build weights 1-10, one change")  # fmt: skip
    for n in [] if args.no_build else sizes:
        eq = measure_build(n, mixed=False)
        mx = measure_build(n, mixed=True)
        report["build"][n] = {"equal": eq, "mixed": mx}
        figures = [f"{r[k]:8.2f} / {r[k.replace('_ms', '_cpu_ms')]:7.2f}"
                   for r in (eq, mx) for k in ("build_ms", "change_ms")]  # fmt: skip
        print(f"  {n:>6}  " + "  ".join(figures), flush=True)
    print("rotation order, one period, weights 1-10 (ms), and a per-query heap pick (us):")
    has_rotation = importlib.util.find_spec("dnsd.rotation") is not None  # not in the code before
    for n in [] if args.no_build or not has_rotation else (1000, 10000):
        report.setdefault("algorithms", {})[n] = alg = measure_algorithms(n)
        print(f"  {n:>6}  " + _figures(alg), flush=True)
    if not args.build_only:
        if not shutil.which("dnsperf"):
            sys.exit("scale_bench: dnsperf not found (apt-get install dnsperf)")
        work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
        # etcd is not pinned: on the client core it would queue behind dnsperf and
        # delay every watch event (measured: seconds), which is not dnsd's doing.
        etcd = EtcdProcess(work / "etcd", extra_args=["--quota-backend-bytes", str(4 << 30)])
        etcd.start()
        try:
            for n in sizes if args.start_rounds else ():
                r = run_start(work, etcd, n, args)
                report["dnsd"][n] = r
                print(f"start N={n} (medians): " + _figures(r), flush=True)
            for n in () if args.start_rounds else sizes:
                r = run_dnsd(work, etcd, n, args)
                report["dnsd"][n] = r
                print(f"dnsd N={n}: " + _figures(r), flush=True)
            if args.agents and not args.start_rounds:
                report["agents"] = run_agents(etcd, args.agents, args.agent_seconds)
                print("agents: " + _figures(report["agents"]), flush=True)
        finally:
            etcd.stop()
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
