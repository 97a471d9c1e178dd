#!/usr/bin/env python3
"""Failover measurements on the Vagrant lab (or any carousel cluster), from the host.

Three experiments, each printing its figures:

- crash: power an edge VM off (`vagrant halt --force`); time until its address
  leaves the DNS answers (the lease TTL), then boot it and time until it returns.
- halt: the same with a graceful shutdown (`vagrant halt`): systemd stops the
  agent first, which drains, so the address should leave at once.
- rolling: restart every edge in turn (agent drains, edge restarts, agent comes
  back) while a client resolves through ns1 before every request and sends
  requests continuously; count the failed requests (the goal is 0).

Four more run on the VM lab, each a window of client traffic around a failure, and
a baseline window with no failure at all (whatever fails there is not a failover's):

- baseline: no fault; every request must succeed.

- etcd-member: one etcd member stopped (DNS and proxying must not notice).
- etcd-quorum: two of three members stopped: dnsd answers from its last-known
  state and the edges keep serving.
- dnsd: the first DNS server's VM powered off; a client that knows both NS
  (tries ns1 for 1 s, then ns2) keeps resolving.
- upgrade: a command (upgrade.yml) runs while the client loops; count failures.

`--repeat N` runs each experiment N times and prints min/median/max.

Only the standard library and `dig` are needed. `--dry-run` runs the same logic
against a simulated cluster on a virtual clock and prints the commands it would
run, so the logic is tested without VMs. The `--*-cmd` options point the script
at something other than Vagrant (the network-namespace lab, local processes):
each is a shell command with {edge} and {address} filled in.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

DEFAULT_EDGES = "edge1=192.168.56.21,edge2=192.168.56.22,edge3=192.168.56.23"


class Clock(Protocol):
    """Monotonic time that can be slept on (real or virtual)."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    """The wall clock."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    """A clock that only moves when slept on: the dry run takes no real time."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Action(Protocol):
    """A started cluster operation (a VM halting, an edge restarting)."""

    def done(self) -> bool: ...


class Cluster(Protocol):
    """What the experiments need from a cluster."""

    def resolve(self) -> list[str]: ...

    def resolve_any(self, servers: list[str]) -> list[str]: ...

    def request(self, address: str) -> bool: ...

    def run(self, command: str) -> Action: ...

    def stop(self, edge: str, address: str, crash: bool) -> Action: ...

    def start(self, edge: str, address: str) -> Action: ...

    def restart(self, edge: str, address: str) -> Action: ...


# --- the real cluster: dig, HTTP and shell commands ----------------------------------------


class Command:
    """A shell command running in the background, its whole output kept in a log file.

    upgrade.yml failed on the VM lab after 249 s with its output thrown away, and which
    task had failed could not be told afterwards: every command now writes its stdout and
    stderr to its own file (`NNN-<first words>.log` in the run's log directory), with the
    command line, its start time, exit status and duration; a command that fails prints
    its log's path and last lines.
    """

    TAIL = 15

    def __init__(self, command: str, log: list[str], logfile: Path | None = None) -> None:
        log.append(command)
        self.command = command
        self.logfile = logfile
        self.started = time.monotonic()
        self.finished = False
        print(f"  $ {command}" + (f"   (log {logfile})" if logfile else ""), flush=True)
        if logfile is None:
            self.sink = None
            self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.DEVNULL)
            return
        logfile.parent.mkdir(parents=True, exist_ok=True)
        self.sink = open(logfile, "w")  # closed in done(), when the command ends
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.sink.write(f"$ {command}\n# started {stamp}\n")
        self.sink.flush()
        self.proc = subprocess.Popen(
            command, shell=True, stdout=self.sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def done(self) -> bool:
        rc = self.proc.poll()
        if rc is None:
            return False
        if not self.finished:
            self.finished = True
            seconds = time.monotonic() - self.started
            if self.sink is not None:
                self.sink.write(f"# exit {rc} after {seconds:.1f} s\n")
                self.sink.close()
            if rc != 0:
                print(f"  command exited {rc} after {seconds:.0f} s: {self.command}", flush=True)
                if self.logfile is not None:
                    lines = self.logfile.read_text(errors="replace").splitlines()[2:-1]
                    print(f"  its output: {self.logfile}; last lines:", flush=True)
                    for line in lines[-self.TAIL :]:
                        print(f"  | {line}", flush=True)
        return True


def log_name(seq: int, command: str) -> str:
    """A log file's name: its sequence number and the command's first words, file-safe."""
    words = re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(shlex.split(command)[:4]) if command else "")
    return f"{seq:03d}-{words.strip('-.')[:60] or 'command'}.log"


@dataclass
class CommandCluster:
    """A cluster reached with dig and HTTP, operated by shell commands."""

    ns: str
    dns_port: int
    name: str
    http_port: int
    crash_cmd: str
    halt_cmd: str
    start_cmd: str
    restart_cmd: str
    request_timeout: float = 2.0
    commands: list[str] = field(default_factory=list)
    # Why requests failed ("HTTP 503", "TimeoutError", ...) and at which edge: the
    # etcd-lost runs on the VMs failed 17 of 18 requests, and a count alone did not say
    # whether the edge answered, nor which one did not.
    failures: Counter[str] = field(default_factory=Counter)
    # Seconds each request took, failed or not, since the last report.
    timings: list[float] = field(default_factory=list)
    # Digs that gave no address, by cause and server (a timeout or an empty answer).
    dns_misses: Counter[str] = field(default_factory=Counter)
    # Each of those digs: its UTC time and cause, in order.
    dns_miss_times: list[str] = field(default_factory=list)
    # Each failed request: when it was sent (UTC) and its cause, in order.
    failure_times: list[str] = field(default_factory=list)
    # Where each command's output goes (one file per command); None: discarded.
    log_dir: Path | None = None

    def resolve(self) -> list[str]:
        return self._dig(self.ns)

    def _dig(self, server: str) -> list[str]:
        # Not +short: its empty output was the same for a server that said SERVFAIL, one
        # that answered NOERROR with no address, and (nearly) one that never answered.
        argv = ["dig", f"@{server}", "-p", str(self.dns_port), "+time=1", "+tries=1", "+noall", "+answer"]
        try:
            out = subprocess.run(
                [*argv, "+comments", self.name, "A"], capture_output=True, text=True, timeout=5
            ).stdout
        except subprocess.TimeoutExpired:
            self._missed(f"dig killed after 5 s at {server}")
            return []
        answers, status = parse_dig(out)
        if not answers:
            # A server that did not answer within dig's 1 s, or one that answered with no
            # address (and which rcode): the upgrade run's one unresolved request could not
            # be told apart.
            self._missed(
                f"no answer within 1 s at {server}"
                if status is None
                else f"an answer without an address ({status}) at {server}"
            )
        return answers

    def _missed(self, cause: str) -> None:
        self.dns_misses[cause] += 1
        # When, to the millisecond (UTC): to be found in dnsd's journal and the playbook's log.
        self.dns_miss_times.append(f"{utc_stamp()} {cause}")

    def resolve_any(self, servers: list[str]) -> list[str]:
        """Like a stub resolver with several nameservers: the next one after a 1 s timeout."""
        for server in servers:
            answers = self._dig(server)
            if answers:
                return answers
        return []

    def run(self, command: str) -> Action:
        return self._command(command)

    def _command(self, command: str) -> Command:
        logfile = None if self.log_dir is None else self.log_dir / log_name(len(self.commands) + 1, command)
        return Command(command, self.commands, logfile)

    def request(self, address: str) -> bool:
        conn = http.client.HTTPConnection(address, self.http_port, timeout=self.request_timeout)
        started = time.monotonic()
        try:
            conn.request("GET", "/", headers={"Host": self.name, "Connection": "close"})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            self._failed(f"{type(exc).__name__} at {address}", started)
            return False
        finally:
            conn.close()
            self.timings.append(time.monotonic() - started)
        if status >= 500:
            self._failed(f"HTTP {status} at {address}", started)
            return False
        return True

    def _failed(self, cause: str, started: float) -> None:
        self.failures[cause] += 1
        # When it was sent (UTC, ms), to be found in the edge's access log and journal.
        sent = time.time() - (time.monotonic() - started)
        self.failure_times.append(f"{utc_stamp(sent)} {cause}")

    def _run(self, template: str, edge: str, address: str) -> Action:
        cmd = template.format(edge=shlex.quote(edge), address=shlex.quote(address))
        return self._command(cmd)

    def stop(self, edge: str, address: str, crash: bool) -> Action:
        return self._run(self.crash_cmd if crash else self.halt_cmd, edge, address)

    def start(self, edge: str, address: str) -> Action:
        return self._run(self.start_cmd, edge, address)

    def restart(self, edge: str, address: str) -> Action:
        return self._run(self.restart_cmd, edge, address)


def utc_stamp(when: float | None = None) -> str:
    """HH:MM:SS.mmm in UTC, of `when` (time.time()) or now."""
    now = time.time() if when is None else when
    return time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


def parse_dig(out: str) -> tuple[list[str], str | None]:
    """dig's `+noall +answer +comments` output: (the A records' addresses, the rcode or None).

    None when no response came (dig's "timed out" / "no servers could be reached").
    """
    found = re.search(r"->>HEADER<<- opcode: \w+, status: (\w+)", out)
    addresses = []
    for line in out.splitlines():
        fields = line.split()
        if line.startswith(";") or len(fields) < 5 or fields[-2] != "A":
            continue
        if _is_ipv4(fields[-1]):
            addresses.append(fields[-1])
    return addresses, found.group(1) if found else None


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


# --- the simulated cluster of --dry-run ---------------------------------------------------


@dataclass
class SimEdge:
    """One edge of the simulation: whether DNS lists it and whether it serves, over time."""

    in_dns: list[tuple[float, bool]] = field(default_factory=lambda: [(0.0, True)])
    serving: list[tuple[float, bool]] = field(default_factory=lambda: [(0.0, True)])

    @staticmethod
    def at(timeline: list[tuple[float, bool]], t: float) -> bool:
        state = timeline[0][1]
        for since, value in timeline:
            if since <= t:
                state = value
        return state


@dataclass
class SimAction:
    """A simulated operation that finishes at a point of the virtual clock."""

    clock: VirtualClock
    ends: float

    def done(self) -> bool:
        return self.clock.now() >= self.ends


@dataclass
class SimulatedCluster:
    """The lab as the design says it behaves, on a virtual clock (for --dry-run and tests).

    A crash leaves DNS when the lease expires; a graceful stop drains first (out of
    DNS at once, still serving for drain_delay); a boot takes boot_seconds and the
    agent registers after rise checks. With drain=False a restart takes the edge
    down while DNS still lists it, which is what a client-failure count must catch.
    """

    clock: VirtualClock
    addresses: dict[str, str]
    lease_ttl: float = 5.0
    drain_delay: float = 6.0
    shutdown_seconds: float = 2.0
    boot_seconds: float = 20.0
    register_seconds: float = 2.0
    edge_restart_seconds: float = 1.0
    drain: bool = True
    real: CommandCluster | None = None  # only to print the commands it would run
    edges: dict[str, SimEdge] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.edges = {addr: SimEdge() for addr in self.addresses.values()}

    def _say(self, template: str, edge: str, address: str) -> None:
        cmd = template.format(edge=shlex.quote(edge), address=shlex.quote(address))
        self.commands.append(cmd)
        print(f"  [dry-run] would run: {cmd}", flush=True)

    def resolve(self) -> list[str]:
        t = self.clock.now()
        return [a for a, e in self.edges.items() if SimEdge.at(e.in_dns, t)]

    def request(self, address: str) -> bool:
        self.clock.sleep(0.005)  # a request takes a little time
        return SimEdge.at(self.edges[address].serving, self.clock.now())

    def stop(self, edge: str, address: str, crash: bool) -> Action:
        assert self.real is not None
        self._say(self.real.crash_cmd if crash else self.real.halt_cmd, edge, address)
        t, e = self.clock.now(), self.edges[address]
        if crash:
            e.serving.append((t, False))
            e.in_dns.append((t + self.lease_ttl, False))
            return SimAction(self.clock, t + 1.0)
        # systemd stops the agent first: it drains, then the VM goes down.
        e.in_dns.append((t + 0.2, False))
        e.serving.append((t + 0.2 + self.shutdown_seconds, False))
        return SimAction(self.clock, t + self.shutdown_seconds + 1.0)

    def start(self, edge: str, address: str) -> Action:
        assert self.real is not None
        self._say(self.real.start_cmd, edge, address)
        t, e = self.clock.now(), self.edges[address]
        e.serving.append((t + self.boot_seconds, True))
        e.in_dns.append((t + self.boot_seconds + self.register_seconds, True))
        return SimAction(self.clock, t + self.boot_seconds)

    def run(self, command: str) -> Action:
        self.commands.append(command)
        print(f"  [dry-run] would run: {command}", flush=True)
        return SimAction(self.clock, self.clock.now() + 1.0)

    def resolve_any(self, servers: list[str]) -> list[str]:
        return self.resolve()

    def restart(self, edge: str, address: str) -> Action:
        assert self.real is not None
        self._say(self.real.restart_cmd, edge, address)
        t, e = self.clock.now(), self.edges[address]
        down = t + (self.drain_delay if self.drain else 0.0)
        if self.drain:
            e.in_dns.append((t, False))
        e.serving.append((down, False))
        up = down + self.edge_restart_seconds
        e.serving.append((up, True))
        e.in_dns.append((up + self.register_seconds, True))
        return SimAction(self.clock, up)


# --- the experiments ----------------------------------------------------------------------


@dataclass
class Outage:
    """How long an edge's address took to leave the answers and to come back."""

    edge: str
    address: str
    crash: bool
    gone_after: float | None
    back_after: float | None


@dataclass
class ClientCount:
    """Requests a client sent during an experiment, and how many failed."""

    requests: int = 0
    failed: int = 0
    unresolved: int = 0
    turn: int = 0

    def one(self, cluster: Cluster) -> None:
        """Resolve, then send one request to the next address in the answer."""
        answers = cluster.resolve()
        self.requests += 1
        if not answers:
            self.unresolved += 1
            self.failed += 1
            return
        address = answers[self.turn % len(answers)]
        self.turn += 1
        if not cluster.request(address):
            self.failed += 1


def wait_for(clock: Clock, predicate: Callable[[], object], timeout: float, poll: float) -> float | None:
    """Seconds until predicate() holds, or None after timeout."""
    start = clock.now()
    while clock.now() - start <= timeout:
        if predicate():
            return clock.now() - start
        clock.sleep(poll)
    return None


def measure_outage(
    cluster: Cluster, clock: Clock, edge: str, address: str, crash: bool, timeout: float, poll: float
) -> Outage:
    """Stop an edge, time its address leaving DNS; start it, time its return."""
    if address not in cluster.resolve():
        print(f"  warning: {address} is not in the answers before the test", flush=True)
    stopping = cluster.stop(edge, address, crash)

    def left() -> bool:
        # An answer without the address, not a failed dig (no answer within its 1 s: seen
        # under TCG), which would count a slow DNS server as a fast failover.
        answers = cluster.resolve()
        return bool(answers) and address not in answers

    gone = wait_for(clock, left, timeout, poll)
    # The address can leave DNS before the stop command returns (`vagrant halt` holds a
    # lock on the machine that `vagrant up` then refuses: seen on the VM lab).
    wait_action(clock, stopping, timeout)
    starting = cluster.start(edge, address)
    back = wait_for(clock, lambda: address in cluster.resolve(), timeout, poll)
    # The next run's stop command would find the machine still locked by this start.
    wait_action(clock, starting, timeout)
    return Outage(edge, address, crash, gone, back)


def rolling_restart(
    cluster: Cluster, clock: Clock, edges: dict[str, str], timeout: float, interval: float
) -> ClientCount:
    """Restart every edge in turn, each back in DNS before the next, while a client loops."""
    count = ClientCount()
    for edge, address in edges.items():
        action = cluster.restart(edge, address)
        started = clock.now()
        while not (action.done() and address in cluster.resolve()):
            if clock.now() - started > timeout:
                print(f"  warning: {edge} not back within {timeout:.0f} s", flush=True)
                break
            count.one(cluster)
            clock.sleep(interval)
    # A little traffic after the last edge is back.
    for _ in range(int(2.0 / interval)):
        count.one(cluster)
        clock.sleep(interval)
    return count


@dataclass
class WindowCount(ClientCount):
    """ClientCount, plus answers that missed an edge which was up all along."""

    short_answers: int = 0
    slowest_resolve: float = 0.0


def traffic_window(
    cluster: Cluster,
    clock: Clock,
    seconds: float,
    interval: float,
    expected: set[str],
    servers: list[str] | None = None,
    until: Action | None = None,
) -> WindowCount:
    """Resolve and request in a loop for `seconds` (or until `until` is done)."""
    count = WindowCount()
    started = clock.now()
    while (clock.now() - started < seconds) if until is None else not until.done():
        t0 = clock.now()
        answers = cluster.resolve_any(servers) if servers else cluster.resolve()
        count.slowest_resolve = max(count.slowest_resolve, clock.now() - t0)
        count.requests += 1
        if not answers:
            count.unresolved += 1
            count.failed += 1
        else:
            if not expected <= set(answers):
                count.short_answers += 1
            address = answers[count.turn % len(answers)]
            count.turn += 1
            if not cluster.request(address):
                count.failed += 1
        clock.sleep(interval)
    return count


def wait_action(clock: Clock, action: Action, timeout: float) -> bool:
    """Wait for a started command; False after timeout."""
    return wait_for(clock, action.done, timeout, 0.2) is not None


def summary(values: list[float]) -> str:
    """min / median / max of the runs."""
    if not values:
        return "no run finished"
    return f"min {min(values):.1f} / median {statistics.median(values):.1f} / max {max(values):.1f}"


def _fmt(seconds: float | None, timeout: float) -> str:
    return f"{seconds:.1f} s" if seconds is not None else f"not within {timeout:.0f} s"


def parse_edges(text: str) -> dict[str, str]:
    """'edge1=192.168.56.21,edge2=...' -> {'edge1': '192.168.56.21', ...}."""
    edges: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, address = part.partition("=")
        if not sep or not name or not _is_ipv4(address):
            raise ValueError(f"expected NAME=IPV4 in --edges, found {part!r}")
        edges[name] = address
    if not edges:
        raise ValueError("--edges lists no edge")
    return edges


EXPERIMENTS = ("baseline", "crash", "halt", "rolling", "etcd-member", "etcd-quorum", "dnsd", "upgrade")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; the defaults fit the Vagrant lab."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "experiments",
        nargs="*",
        metavar="{baseline,crash,halt,rolling,etcd-member,etcd-quorum,dnsd,upgrade}",
        help="what to run (default: crash, halt, rolling)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="simulate the cluster on a virtual clock; print the commands instead of running them",
    )
    p.add_argument("--ns", default="192.168.56.11", help="DNS server to dig (default ns1)")
    p.add_argument("--dns-port", type=int, default=53)
    p.add_argument("--name", default="www.example.test", help="name the edges answer for")
    p.add_argument("--http-port", type=int, default=80, help="the edges' HTTP port")
    p.add_argument("--edges", default=DEFAULT_EDGES, help="NAME=IPV4 list of the edges")
    p.add_argument("--victim", default=None, help="edge to halt or crash (default: the second)")
    p.add_argument("--timeout", type=float, default=180.0, help="give up waiting after this many seconds")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between two digs")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between two client requests")
    p.add_argument("--crash-cmd", default="vagrant halt --force {edge}")
    p.add_argument("--halt-cmd", default="vagrant halt {edge}")
    p.add_argument("--start-cmd", default="vagrant up --no-provision {edge}")
    p.add_argument(
        "--restart-cmd",
        default=(
            "vagrant ssh {edge} -c 'sudo systemctl stop carousel-agent"
            " && sudo systemctl restart carousel-edge && sudo systemctl start carousel-agent'"
        ),
        help="restart one edge without losing requests: the agent drains before the edge stops",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each experiment (min/median/max)")
    p.add_argument(
        "--log-dir",
        default=None,
        help="where each command's full output goes, one file per command"
        " (default: failover-logs/<UTC date and time>; not with --dry-run)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=20.0,
        help="seconds of traffic in the baseline and during an etcd failure",
    )
    p.add_argument("--ns2", default="192.168.56.12", help="the second DNS server (dnsd experiment)")
    p.add_argument("--ns-vm", default="ns1", help="the VM of --ns (dnsd experiment)")
    p.add_argument("--etcd-members", default="app1,ns2", help="members the etcd experiments stop, in order")
    p.add_argument("--etcd-stop-cmd", default="vagrant ssh {member} -c 'sudo systemctl stop etcd'")
    p.add_argument("--etcd-start-cmd", default="vagrant ssh {member} -c 'sudo systemctl start etcd'")
    p.add_argument("--upgrade-cmd", default="./vmlab.py ansible upgrade.yml", help="the rolling upgrade")
    p.add_argument(
        "--no-drain",
        action="store_true",
        help="dry run only: simulate restarts that skip the drain (requests then fail)",
    )
    return p


# How many digs without an address (and failed requests) are listed with their times, per run.
MISS_TIMES_SHOWN = 20

# What each experiment's summary line is about.
EXPERIMENT_FIGURE = {
    "baseline": "failed requests",
    "crash": "seconds until out of DNS",
    "halt": "seconds until out of DNS",
    "rolling": "failed requests",
    "etcd-member": "failed requests",
    "etcd-quorum": "failed requests",
    "dnsd": "failed resolutions",
    "upgrade": "failed requests",
}


def run_experiment(
    experiment: str,
    tag: str,
    cluster: Cluster,
    clock: Clock,
    args: argparse.Namespace,
    edges: dict[str, str],
    victim: str,
) -> tuple[bool, float | None]:
    """One run of one experiment: (passed, its figure for the summary)."""
    expected = set(edges.values())
    if experiment == "baseline":
        print(f"{tag}: no fault; {args.window:.0f} s of traffic", flush=True)
        count = traffic_window(cluster, clock, args.window, args.interval, expected)
        _print_window(count)
        return count.failed == 0 and count.short_answers == 0, float(count.failed)
    if experiment in ("crash", "halt"):
        crash = experiment == "crash"
        how = "power off (crash)" if crash else "graceful halt"
        print(f"{tag}: {how} of {victim} ({edges[victim]}), digging {args.ns}:{args.dns_port}", flush=True)
        out = measure_outage(cluster, clock, victim, edges[victim], crash, args.timeout, args.poll)
        print(f"  {victim} left the answers after {_fmt(out.gone_after, args.timeout)}")
        print(f"  {victim} was back {_fmt(out.back_after, args.timeout)} after the start command")
        return out.gone_after is not None and out.back_after is not None, out.gone_after
    if experiment == "rolling":
        print(f"{tag}: restarting {', '.join(edges)} one by one while a client loops", flush=True)
        rolled = rolling_restart(cluster, clock, edges, args.timeout, args.interval)
        share = 100.0 * rolled.failed / rolled.requests if rolled.requests else 0.0
        print(
            f"  {rolled.requests} requests, {rolled.failed} failed ({share:.2f} %),"
            f" {rolled.unresolved} without any address"
        )
        return rolled.failed == 0, float(rolled.failed)
    if experiment in ("etcd-member", "etcd-quorum"):
        members = [m for m in args.etcd_members.split(",") if m][: 1 if experiment == "etcd-member" else 2]
        print(f"{tag}: stopping etcd on {', '.join(members)}; {args.window:.0f} s of traffic", flush=True)
        for member in members:
            wait_action(
                clock, cluster.run(args.etcd_stop_cmd.format(member=shlex.quote(member))), args.timeout
            )
        count = traffic_window(cluster, clock, args.window, args.interval, expected)
        for member in members:
            wait_action(
                clock, cluster.run(args.etcd_start_cmd.format(member=shlex.quote(member))), args.timeout
            )
        _print_window(count)
        return count.failed == 0 and count.short_answers == 0, float(count.failed)
    if experiment == "dnsd":
        print(f"{tag}: power off {args.ns_vm} ({args.ns}); the client falls back to {args.ns2}", flush=True)
        wait_action(clock, cluster.run(args.crash_cmd.format(edge=shlex.quote(args.ns_vm))), args.timeout)
        count = traffic_window(cluster, clock, args.window, args.interval, expected, [args.ns, args.ns2])
        start = clock.now()
        wait_action(clock, cluster.run(args.start_cmd.format(edge=shlex.quote(args.ns_vm))), args.timeout)
        back = wait_for(clock, lambda: bool(cluster.resolve()), args.timeout, args.poll)
        print(
            f"  {count.requests} resolutions+requests, {count.unresolved} unresolved, {count.failed} failed,"
            f" slowest resolution {count.slowest_resolve * 1000:.0f} ms;"
            f" {args.ns_vm} answering again"
            f" {_fmt(None if back is None else clock.now() - start, args.timeout)}"
            " after its start command"
        )
        return count.unresolved == 0, float(count.unresolved)
    # upgrade
    print(f"{tag}: {args.upgrade_cmd} while a client loops", flush=True)
    action = cluster.run(args.upgrade_cmd)
    started = clock.now()
    count = traffic_window(cluster, clock, args.timeout, args.interval, set(), until=action)
    proc = getattr(action, "proc", None)
    ok = proc is None or proc.returncode == 0
    print(
        f"  upgrade took {clock.now() - started:.0f} s ({'ok' if ok else 'FAILED'});"
        f" {count.requests} requests,"
        f" {count.failed} failed, {count.unresolved} without any address,"
        f" slowest resolution {count.slowest_resolve * 1000:.0f} ms"
    )
    return ok and count.failed == 0, float(count.failed)


def _print_times(what: str, times: list[str]) -> None:
    """The first MISS_TIMES_SHOWN stamped events, then forget them all."""
    shown = times[:MISS_TIMES_SHOWN]
    more = f" (and {len(times) - len(shown)} more)" if len(times) > len(shown) else ""
    if shown:
        print(f"  {what}: {'; '.join(shown)}{more}")
    times.clear()


def _print_window(count: WindowCount) -> None:
    print(
        f"  {count.requests} requests, {count.failed} failed,"
        f" {count.short_answers} answers missing an edge,"
        f" slowest resolution {count.slowest_resolve * 1000:.0f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the chosen experiments and print their figures; 1 if a rolling restart lost requests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = set(args.experiments) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiment {', '.join(sorted(unknown))}: choose from {', '.join(EXPERIMENTS)}")
    args.experiments = args.experiments or ["crash", "halt", "rolling"]
    try:
        edges = parse_edges(args.edges)
    except ValueError as exc:
        print(f"failover: {exc}", file=sys.stderr)
        return 2
    victim = args.victim or list(edges)[min(1, len(edges) - 1)]
    if victim not in edges:
        print(f"failover: --victim {victim} is not in --edges", file=sys.stderr)
        return 2
    real = CommandCluster(
        ns=args.ns,
        dns_port=args.dns_port,
        name=args.name,
        http_port=args.http_port,
        crash_cmd=args.crash_cmd,
        halt_cmd=args.halt_cmd,
        start_cmd=args.start_cmd,
        restart_cmd=args.restart_cmd,
    )
    if not args.dry_run:
        real.log_dir = Path(args.log_dir or time.strftime("failover-logs/%Y%m%d-%H%M%S", time.gmtime()))
        real.log_dir.mkdir(parents=True, exist_ok=True)
        print(f"each command's output: {real.log_dir}/", flush=True)
    clock: Clock
    cluster: Cluster
    if args.dry_run:
        clock = VirtualClock()
        cluster = SimulatedCluster(clock, edges, drain=not args.no_drain, real=real)
        print("dry run: a simulated cluster on a virtual clock; nothing is contacted or changed")
    else:
        clock, cluster = RealClock(), real
    status = 0
    for experiment in args.experiments:
        runs = []
        for attempt in range(1, args.repeat + 1):
            tag = f"{experiment} [{attempt}/{args.repeat}]" if args.repeat > 1 else experiment
            ok, figure = run_experiment(experiment, tag, cluster, clock, args, edges, victim)
            reasons = getattr(cluster, "failures", None)
            if reasons:
                causes = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
                print(f"  failed requests by cause: {causes}")
                reasons.clear()
                _print_times("failed requests' times (UTC, sent)", getattr(cluster, "failure_times", []))
            misses = getattr(cluster, "dns_misses", None)
            if misses:
                print(f"  digs without an address: {', '.join(f'{k} {v}' for k, v in misses.most_common())}")
                misses.clear()
                _print_times("their times (UTC)", getattr(cluster, "dns_miss_times", []))
            timings = getattr(cluster, "timings", None)
            if timings:
                ms = sorted(t * 1000 for t in timings)
                print(
                    f"  request time: median {statistics.median(ms):.0f} ms,"
                    f" 90th {ms[int(0.9 * (len(ms) - 1))]:.0f} ms, max {ms[-1]:.0f} ms"
                )
                timings.clear()
            if not ok:
                status = 1
            if figure is not None:
                runs.append(figure)
        if args.repeat > 1:
            print(f"{experiment}: {EXPERIMENT_FIGURE[experiment]} over {args.repeat} runs: {summary(runs)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
